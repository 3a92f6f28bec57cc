"""A candidate's compiled programs (init, train step, evaluation step), made ahead of training
or when it starts, and the layout they share with its training loop."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from memnas_jax import data as data_lib
from memnas_jax import sharding
from memnas_jax.encoding import Architecture
from memnas_jax.errors import ConfigError
from memnas_jax.space import Skeleton
from memnas_jax.train.config import (
    DTYPES,
    TrainSettings,
    compiler_options,
    configure_compilation_cache,
    resolve_depthwise_impl,
    skeleton_from_config,
)
from memnas_jax.train.evaluate import eval_splits
from memnas_jax.train.optimizer import make_optimizer
from memnas_jax.train.steps import StepFactory


@dataclasses.dataclass(frozen=True)
class CandidatePrograms:
    """The compiled executables of one candidate (`compile_candidate`): made ahead of training
    (`memnas_jax.compile_ahead`) or when it starts. Each takes exactly the argument shapes and
    shardings `train_model` gives it, so training never traces or compiles."""

    init: Any  # raw uint32 key -> TrainState (on the host CPU)
    train_step: Any  # resident: (state, metrics, images, labels, permutation); streamed: batch
    eval_step: Any  # resident: (variables, totals, eval images, labels, mask); streamed: batch;
    # None when there is nothing to evaluate
    compile_seconds: float
    flops_per_image: float | None  # XLA's cost_analysis of the train step


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a candidate's programs and its training loop share: model, optimizer, mesh."""

    steps: StepFactory
    mesh: Any
    steps_per_epoch: int
    eval_batches: int  # resident data: batches of the validation and test splits together


def data_layout(config, data: data_lib.Dataset, mesh: Mesh | None = None
                ) -> tuple[Mesh, int, int]:
    """(mesh, steps per epoch, resident evaluation batches) of `config` on `data`, with the batch
    sizes checked against the mesh and the training split: what standalone and packed training
    share. mesh: the data mesh to train on (default: `config.num_devices` of all devices)."""
    if mesh is None:
        mesh = sharding.make_data_mesh(config.num_devices)
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(config.eval_batch_size, mesh, "eval batch size")
    steps_per_epoch = len(data.train) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {config.batch_size} exceeds the {len(data.train)} "
                         "training examples")
    eval_batches = sum(-(-len(s) // config.eval_batch_size) for s in eval_splits(data))
    return mesh, steps_per_epoch, eval_batches


def training_setup(model: nn.Module, config, data: data_lib.Dataset, mesh: Mesh | None = None
                   ) -> Setup:
    mesh, steps_per_epoch, eval_batches = data_layout(config, data, mesh)
    tx = make_optimizer(config, steps_per_epoch)
    steps = StepFactory(model, tx, mesh, tuple(data.mean), tuple(data.std),
                        config.augment.crop_padding, config.augment.flip, config.augment.cutout,
                        config.label_smoothing, config.batch_size)
    return Setup(steps, mesh, steps_per_epoch, eval_batches)


def candidate_network(arch: Architecture, config: ml_collections.ConfigDict | TrainSettings,
                      data: data_lib.Dataset, skeleton: Skeleton | None = None) -> nn.Module:
    """The `MemNASNetwork` of `arch` with `config`'s depthwise implementation and dtype, on
    `skeleton` (default: `config.skeleton` sized to the data)."""
    from memnas_jax.network import MemNASNetwork
    if skeleton is None:
        if isinstance(config, TrainSettings):
            raise ConfigError("TrainSettings have no skeleton: pass skeleton=, or a config "
                              "with a skeleton section (train.default_config())")
        skeleton = skeleton_from_config(config, data)
    settings = TrainSettings.from_config(config)
    return MemNASNetwork(arch, skeleton,
                         depthwise_impl=resolve_depthwise_impl(settings.depthwise_impl),
                         dtype=DTYPES[settings.dtype])


def key_shape() -> tuple[int, ...]:
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape


def host_device() -> jax.Device:
    return jax.local_devices(backend="cpu")[0]


def _abstract(tree: Any, sharding_: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, jax.dtypes.canonicalize_dtype(x.dtype), sharding=sharding_), tree)


def compile_programs(setup: Setup, config, data: data_lib.Dataset) -> CandidatePrograms:
    start = time.perf_counter()
    steps, mesh = setup.steps, setup.mesh
    repl, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    host = jax.sharding.SingleDeviceSharding(host_device())
    # Init runs once, on the host CPU, without backend optimisation: XLA spends seconds
    # optimising the unrolled threefry hash of every initialiser, and an accelerator would
    # autotune a program that runs once. The state then goes to the mesh.
    init_fn = steps.init_fn((1, *data.image_shape))
    key = jax.ShapeDtypeStruct(key_shape(), jnp.uint32, sharding=host)
    init = jax.jit(init_fn, out_shardings=host).lower(key).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    state = _abstract(jax.eval_shape(init_fn, key), repl)
    scalars = lambda **dtypes: {k: jax.ShapeDtypeStruct((), d, sharding=repl)  # noqa: E731
                                for k, d in dtypes.items()}
    metrics = scalars(loss_sum=jnp.float32, steps=jnp.int32)
    totals = scalars(correct=jnp.int32, loss_sum=jnp.float32, batches=jnp.int32)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    image_shape, size = data.image_shape, len(data.train)
    eval_options = compiler_options(config.eval_compiler_options)
    if data.on_device:
        train_args = (state, metrics,
                      jax.ShapeDtypeStruct((size, *image_shape), jnp.uint8, sharding=repl),
                      jax.ShapeDtypeStruct((size,), jnp.int32, sharding=repl),
                      jax.ShapeDtypeStruct((size,), jnp.int32, sharding=repl))
        train_step = steps.resident_train_step().lower(*train_args).compile()
        shape = (setup.eval_batches, config.eval_batch_size)
        split = sharding.stacked_batch_sharded(mesh)
        eval_step = None if not setup.eval_batches else steps.resident_eval_step().lower(
            variables, totals, jax.ShapeDtypeStruct((*shape, *image_shape), jnp.uint8,
                                                    sharding=split),
            jax.ShapeDtypeStruct(shape, jnp.int32, sharding=split),
            jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=split)).compile(eval_options)
    else:
        def batch_of(size, dtype, *shape):
            return jax.ShapeDtypeStruct((size, *shape), dtype, sharding=batch)
        b, eb = config.batch_size, config.eval_batch_size
        train_step = steps.streamed_train_step().lower(
            state, metrics, batch_of(b, jnp.uint8, *image_shape),
            batch_of(b, jnp.int32)).compile()
        evaluated = data.validation is not None or data.test is not None
        eval_step = None if not evaluated else steps.eval_step().lower(
            variables, totals, batch_of(eb, jnp.uint8, *image_shape), batch_of(eb, jnp.int32),
            batch_of(eb, jnp.bool_)).compile(eval_options)
    return CandidatePrograms(init=init, train_step=train_step, eval_step=eval_step,
                             compile_seconds=time.perf_counter() - start,
                             flops_per_image=flops_per_image(train_step, mesh,
                                                              config.batch_size))


def compile_candidate(arch: Architecture, config: ml_collections.ConfigDict | TrainSettings,
                      data: data_lib.Dataset, *, skeleton: Skeleton | None = None,
                      mesh: Mesh | None = None) -> CandidatePrograms:
    """Compiles the init, train and evaluation programs of a candidate without running them
    (what `train_candidate` would compile first). Thread-safe: XLA compiles release the GIL, so
    a thread pool compiles the next candidates while one trains. Raises on a compile failure;
    `train_candidate(..., programs=future)` records that as the candidate's failure."""
    return compile_model(candidate_network(arch, config, data, skeleton), config, data,
                         mesh=mesh)


def compile_model(model: nn.Module, config: ml_collections.ConfigDict | TrainSettings,
                  data: data_lib.Dataset, *, mesh: Mesh | None = None
                  ) -> CandidatePrograms:
    """`compile_candidate` of any model (`train_model`), for `mesh` (as `data_layout`)."""
    config = TrainSettings.from_config(config)
    configure_compilation_cache(config.compilation_cache_dir)
    return compile_programs(training_setup(model, config, data, mesh), config, data)


def flops_per_image(compiled, mesh, batch_size: int) -> float | None:
    """XLA's FLOP count of one train step per image (cost_analysis is per device)."""
    try:
        analysis = compiled.cost_analysis()
        flops = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]
    except Exception:  # no analysis on this backend
        return None
    return float(flops) * sharding.mesh_size(mesh) / batch_size
