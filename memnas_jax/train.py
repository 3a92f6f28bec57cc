"""Training one candidate network (docs/method.md §8): `train_candidate(arch, config, data, rng)`.

* One jitted train step, data parallel with `jit` + `NamedSharding` over a 1-D device mesh
  (`memnas_jax.sharding`): parameters replicated, the global batch split over the devices, so
  gradients and BatchNorm statistics are over the global batch with no hand-written collectives.
* CIFAR-size data lives on the device as uint8; the step gathers its batch from the epoch's
  permutation and augments it there (`memnas_jax.data.augment_batch`). The step index is read from
  the on-device metrics, so the host only dispatches: no per-step transfers or syncs.
* Loss sums accumulate on the device and are read once per epoch (or every
  `nan_check_every_steps`): a non-finite sum stops the candidate as "diverged". Any exception (a
  compile error, an out-of-memory) ends it as "failed" with the message: nothing escapes to kill a
  search. Config mistakes (`check_config`) still raise, since they would fail every candidate.
* orbax checkpoints of the whole train state every N epochs make a long run resumable; the
  resumed run ends with the same parameters as an uninterrupted one. An unreadable latest
  checkpoint is reported, removed, and the previous one used.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import math
import os
import shutil
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from memnas_jax import checkpoints, ops, preemption, sharding
from memnas_jax import data as data_lib
from memnas_jax.checkpoints import PREEMPTED_DIR  # re-exported
from memnas_jax.encoding import Cell
from memnas_jax.errors import first_line
from memnas_jax.space import Skeleton, cifar_skeleton, imagenet_skeleton

STATUSES = ("ok", "diverged", "failed")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEPTHWISE_IMPLS = ("auto", *ops.DEPTHWISE_IMPLS)  # "auto": resolve_depthwise_impl


# ---------------------------------------------------------------------------------------------
# Config


def default_config() -> ml_collections.ConfigDict:
    """The authors' search-time protocol (docs/method.md §8): SGD lr 0.01 momentum 0.9, batch
    64, 150 epochs with steps at 60 and 100, width 64, crop + flip; selection on a 5,000-image
    validation split held out of the training set (the authors chose on the test set)."""
    c = ml_collections.ConfigDict()
    c.data = data_lib.default_data_config()
    c.skeleton = ml_collections.ConfigDict(dict(
        kind="cifar",  # "cifar" (cifar_skeleton) or "imagenet" (imagenet_skeleton)
        width=64,
        width_schedule="uniform",  # "uniform", "doubling" or multipliers "1,1,2,2,4"
        removed_op="identity",
        conv_bias=True,
        bn_momentum=0.9,
        bn_epsilon=1e-5,
    ))
    c.augment = ml_collections.ConfigDict(dict(crop_padding=4, flip=True, cutout=0))
    c.epochs = 150
    c.batch_size = 64  # global, split over the devices
    c.eval_batch_size = 500
    c.optimizer = "sgd"  # "sgd" or "adamw"
    c.learning_rate = 0.01
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 0.0  # sgd: L2 added to the gradient (PyTorch style); adamw: decoupled
    c.schedule = "step"  # "step" (milestones x gamma) or "cosine"
    c.milestones = (60, 100)  # epochs at whose start the learning rate is multiplied by gamma
    c.gamma = 0.1
    c.warmup_epochs = 0  # linear warmup from 0, both schedules
    c.grad_clip_norm = 0.0  # 0 = off
    c.label_smoothing = 0.0
    c.dtype = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32
    c.depthwise_impl = "auto"  # "auto": "shifted" on CPU (2x faster there), "xla" elsewhere
    c.num_devices = 0  # 0 = all local devices
    c.eval_every_epochs = 1
    c.nan_check_every_steps = 0  # 0 = once per epoch
    c.checkpoint_dir = ""  # "" = no checkpoints
    c.checkpoint_every_epochs = 0  # 0 = only the last epoch (when checkpoint_dir is set)
    c.checkpoints_to_keep = 2
    # JAX's persistent compilation cache ("" = off; the search's "auto" = <workdir>/xla_cache)
    c.compilation_cache_dir = ""
    c.host_threads = 0  # host pipeline threads for streaming data (0 = auto)
    # XLA options of the evaluation program only, "name=value,...": it runs a few batches per
    # epoch, so on a GPU "xla_gpu_autotune_level=0" may cost less than autotuning it (measure
    # with benchmarks/search_throughput.py --eval_compiler_options).
    c.eval_compiler_options = ""
    return c


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for settings no candidate could train with."""
    choices = dict(optimizer=OPTIMIZERS, schedule=SCHEDULES, dtype=tuple(DTYPES),
                   depthwise_impl=DEPTHWISE_IMPLS)
    for field, allowed in choices.items():
        if config[field] not in allowed:
            raise ValueError(f"config.{field} = {config[field]!r} is not one of {allowed}")
    for field in ("epochs", "batch_size", "eval_batch_size", "eval_every_epochs"):
        if config[field] < 1:
            raise ValueError(f"config.{field} must be >= 1, got {config[field]}")
    if config.learning_rate <= 0:
        raise ValueError(f"config.learning_rate must be > 0, got {config.learning_rate}")
    if list(config.milestones) != sorted(config.milestones):
        raise ValueError(f"config.milestones must be increasing, got {config.milestones}")
    compiler_options(config.get("eval_compiler_options", ""), "eval_compiler_options")
    if not 0 <= config.label_smoothing < 1:
        raise ValueError(f"config.label_smoothing must be in [0, 1), got {config.label_smoothing}")


def compiler_options(text: str, field: str = "compiler_options") -> dict[str, Any]:
    """"name=value,..." -> XLA compile options (ints, floats and true/false parsed); XLA itself
    rejects an unknown name when the program compiles."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"config.{field}: {item!r} is not name=value")
        value = value.strip()
        for parse in (int, float):
            try:
                options[name.strip()] = parse(value)
                break
            except ValueError:
                continue
        else:
            lowered = value.lower()
            options[name.strip()] = (lowered == "true") if lowered in ("true", "false") else value
    return options


def skeleton_from_config(config: ml_collections.ConfigDict, dataset: data_lib.Dataset
                         ) -> Skeleton:
    """The skeleton of `config.skeleton`, sized to the dataset's images and classes."""
    s = config.skeleton
    schedule = s.width_schedule
    if schedule not in ("uniform", "doubling"):
        schedule = tuple(int(m) for m in str(schedule).split(","))
    size, _, channels = dataset.image_shape
    common = dict(removed_op=s.removed_op, conv_bias=s.conv_bias, bn_momentum=s.bn_momentum,
                  bn_epsilon=s.bn_epsilon)
    if s.kind == "cifar":
        return cifar_skeleton(s.width, schedule, num_classes=dataset.num_classes,
                              **common).replace(image_size=size, in_channels=channels)
    if s.kind == "imagenet":
        return imagenet_skeleton(s.width, size, dataset.num_classes, schedule,
                                 **common).replace(in_channels=channels)
    raise ValueError(f"config.skeleton.kind {s.kind!r} is not 'cifar' or 'imagenet'")


def resolve_depthwise_impl(name: str) -> str:
    """"auto" -> "shifted" on CPU (XLA:CPU's depthwise weight gradient is a dense conv, ~2x
    slower overall), "xla" on GPU/TPU."""
    if name == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "xla"
    return name


AUTO_CACHE = "auto"  # compilation_cache_dir: the work directory's XLA_CACHE_DIR
XLA_CACHE_DIR = "xla_cache"


def compilation_cache_path(setting: str, workdir: str | os.PathLike) -> str:
    """`compilation_cache_dir` as a path: "auto" is `<workdir>/xla_cache`, "" stays off."""
    return os.path.join(workdir, XLA_CACHE_DIR) if setting == AUTO_CACHE else setting


def configure_compilation_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in `path` ("" leaves it as it is).

    Every compiled program is stored there, so a resumed search, a rerun and the same candidate
    in a later round skip XLA. With it JAX also turns on XLA's per-fusion autotune cache
    (`jax_persistent_cache_enable_xla_caches`): on a GPU, the convolution algorithms chosen for
    one candidate's fusions are reused by every later candidate with the same fusion, in this
    process and the next."""
    if not path:
        return
    if path == AUTO_CACHE:
        raise ValueError('compilation_cache_dir "auto" means the work directory\'s cache: '
                         "resolve it with compilation_cache_path(setting, workdir) first")
    path = os.path.abspath(os.path.expanduser(path))
    if jax.config.jax_compilation_cache_dir == path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Candidates compile in 1-50 s and are all worth keeping (JAX's default threshold is 1 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:  # JAX reads the directory once per process; make a changed directory take effect
        from jax._src import compilation_cache
        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        logging.warning("could not reset JAX's compilation cache: %s may not be used", path)


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    lr, total = config.learning_rate, config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    if config.schedule == "step":
        # Like PyTorch MultiStepLR stepped at each epoch start: epoch m is the first at lr*gamma.
        main = optax.piecewise_constant_schedule(
            lr, {max(m * steps_per_epoch - warmup, 1): config.gamma for m in config.milestones})
    else:
        main = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
    schedule = make_schedule(config, steps_per_epoch)
    if config.optimizer == "sgd":
        parts = [optax.add_decayed_weights(config.weight_decay)] if config.weight_decay else []
        parts.append(optax.sgd(schedule, momentum=config.momentum or None,
                               nesterov=config.nesterov))
    else:
        parts = [optax.adamw(schedule, weight_decay=config.weight_decay)]
    if config.grad_clip_norm:
        parts.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# State and result


class TrainState(flax.struct.PyTreeNode):
    """Everything a resumed run needs. `rng` is the raw uint32 data key (epoch keys fold in
    the epoch), `epoch` the number of finished epochs."""

    step: jax.Array
    epoch: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What training one candidate gave. Accuracies are fractions in [0, 1]; None when the split
    was not given (validation, test) or the run stopped before evaluating."""

    status: str  # "ok" | "diverged" | "failed"
    message: str
    best_val_accuracy: float | None
    best_val_epoch: int | None  # 1-based
    final_val_accuracy: float | None
    test_accuracy: float | None
    loss_curve: tuple[float, ...]  # mean training loss of each epoch
    val_accuracy_curve: tuple[float | None, ...]
    epochs_done: int
    resumed_from_epoch: int  # 0 = trained from scratch
    param_count: int
    wall_seconds: float
    compile_seconds: float  # compiling its programs (ahead, in another thread, or here)
    images_per_second: float  # training throughput, compile and evaluation excluded
    epoch_seconds: tuple[float, ...] = ()  # training time of each epoch run here (no compile)
    train_flops_per_image: float | None = None  # XLA's cost_analysis of the train step
    compile_wait_seconds: float = 0.0  # how long training waited for its programs
    failure: str = ""  # status "failed": "out_of_memory" (RESOURCE_EXHAUSTED) or "error"
    variables: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False,
                                                             repr=False)  # host numpy

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        """JSON-ready fields (without the variables)."""
        d = dataclasses.asdict(dataclasses.replace(self, variables=None))
        d.pop("variables")
        d["loss_curve"], d["val_accuracy_curve"] = list(self.loss_curve), list(
            self.val_accuracy_curve)
        return d


def is_out_of_memory(error: BaseException) -> bool:
    """Whether XLA ran out of device memory (compiling or running): RESOURCE_EXHAUSTED."""
    text = f"{type(error).__name__}: {error}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _failed(message: str, start: float, **known: Any) -> TrainResult:
    fields = dict(best_val_accuracy=None, best_val_epoch=None, final_val_accuracy=None,
                  test_accuracy=None, loss_curve=(), val_accuracy_curve=(), epochs_done=0,
                  resumed_from_epoch=0, param_count=0, compile_seconds=0.0,
                  images_per_second=0.0)
    fields.update(known)
    fields.setdefault("failure", "error")
    return TrainResult(status="failed", message=message,
                       wall_seconds=time.perf_counter() - start, **fields)


# ---------------------------------------------------------------------------------------------
# Steps


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
    """Per-example softmax cross-entropy, in float32."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _epoch_keys(rng: jax.Array, epoch: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(shuffling key, augmentation key) of an epoch: a function of the data key and the epoch
    alone, so a resumed run sees the same data as an uninterrupted one."""
    keys = jax.random.split(jax.random.fold_in(rng, epoch))
    return keys[0], keys[1]


@functools.partial(jax.jit, static_argnums=2)
def _permutation(rng: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
    return data_lib.epoch_permutation(_epoch_keys(rng, epoch)[0], num_examples)


@dataclasses.dataclass(frozen=True)
class _StepFactory:
    """Builds the jitted train and eval steps for one model / optimizer / mesh."""

    model: nn.Module
    tx: optax.GradientTransformation
    mesh: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool
    cutout: int
    label_smoothing: float
    batch_size: int

    def _train_on_batch(self, state: TrainState, metrics: dict, images: jax.Array,
                        labels: jax.Array) -> tuple[TrainState, dict]:
        images, labels = sharding.constrain_batch((images, labels), self.mesh)
        key = jax.random.fold_in(_epoch_keys(state.rng, state.epoch)[1], metrics["steps"])
        x = data_lib.augment_batch(key, images, mean=self.mean, std=self.std,
                                   crop_padding=self.crop_padding, flip=self.flip,
                                   cutout_length=self.cutout)

        def loss_fn(params):
            logits, updates = self.model.apply(
                {"params": params, "batch_stats": state.batch_stats}, x, train=True,
                mutable=["batch_stats"])
            loss = jnp.mean(cross_entropy(logits, labels, self.label_smoothing))
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params,
                              updates), batch_stats=batch_stats, opt_state=opt_state)
        metrics = dict(loss_sum=metrics["loss_sum"] + loss, steps=metrics["steps"] + 1)
        return state, metrics

    def resident_train_step(self) -> Callable:
        """(state, metrics, all images, all labels, permutation) -> (state, metrics); the
        batch is the `steps`-th slice of the epoch's permutation."""
        def step(state, metrics, images, labels, permutation):
            idx = jax.lax.dynamic_slice_in_dim(permutation, metrics["steps"] * self.batch_size,
                                               self.batch_size)
            return self._train_on_batch(state, metrics, images[idx], labels[idx])
        return self._jit_train(step)

    def streamed_train_step(self) -> Callable:
        """(state, metrics, batch images, batch labels) -> (state, metrics)."""
        return self._jit_train(self._train_on_batch)

    def init_fn(self, sample_shape: tuple[int, ...]) -> Callable:
        """raw uint32 key -> a fresh `TrainState`."""
        def init(rng):
            init_key, data_key = jax.random.split(rng)
            variables = self.model.init(init_key, jnp.zeros(sample_shape, jnp.float32),
                                        train=False)
            params = variables["params"]
            return TrainState(step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32),
                              params=params, batch_stats=variables.get("batch_stats", {}),
                              opt_state=self.tx.init(params), rng=data_key)
        return init

    def _jit_train(self, step: Callable) -> Callable:
        repl = sharding.replicated(self.mesh)
        return jax.jit(step, donate_argnums=(0, 1), out_shardings=(repl, repl))

    def eval_step(self) -> Callable:
        """(variables, totals, images (B,...), labels, mask) -> totals with correct / loss sums."""
        def step(variables, totals, images, labels, mask):
            images, labels, mask = sharding.constrain_batch((images, labels, mask), self.mesh)
            logits = self.model.apply(variables, data_lib.normalize(images, self.mean, self.std),
                                      train=False)
            correct = (jnp.argmax(logits, -1) == labels) & mask
            loss = jnp.where(mask, cross_entropy(logits, labels), 0.0)
            return dict(correct=totals["correct"] + jnp.sum(correct, dtype=jnp.int32),
                        loss_sum=totals["loss_sum"] + jnp.sum(loss),
                        batches=totals["batches"] + 1)
        return jax.jit(step, donate_argnums=(1,), out_shardings=sharding.replicated(self.mesh))

    def resident_eval_step(self) -> Callable:
        """Like `eval_step` on the `batches`-th batch of (batches, B, ...) device arrays."""
        inner = self.eval_step()

        def step(variables, totals, images, labels, mask):
            i = totals["batches"]
            return inner(variables, totals, images[i], labels[i], mask[i])
        return jax.jit(step, donate_argnums=(1,),
                       out_shardings=sharding.replicated(self.mesh))


# ---------------------------------------------------------------------------------------------
# Compiling a candidate


@dataclasses.dataclass(frozen=True)
class CandidatePrograms:
    """The compiled executables of one candidate (`compile_candidate`): made ahead of training
    (`memnas_jax.compile_ahead`) or when it starts. Each takes exactly the argument shapes and
    shardings `_train` gives it, so training never traces or compiles."""

    init: Any  # raw uint32 key -> TrainState (on the host CPU)
    train_step: Any  # resident: (state, metrics, images, labels, permutation); streamed: batch
    eval_step: Any  # resident: (variables, totals, eval images, labels, mask); streamed: batch;
    # None when there is nothing to evaluate
    compile_seconds: float
    flops_per_image: float | None  # XLA's cost_analysis of the train step


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What a candidate's programs and its training loop share: model, optimizer, mesh."""

    steps: _StepFactory
    mesh: Any
    steps_per_epoch: int
    eval_batches: int  # resident data: batches of the validation and test splits together


def data_layout(config, data: data_lib.Dataset) -> tuple[Any, int, int]:
    """(mesh, steps per epoch, resident evaluation batches) of `config` on `data`, with the batch
    sizes checked against the mesh and the training split: what standalone and packed training
    share."""
    mesh = sharding.make_data_mesh(config.num_devices)
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(config.eval_batch_size, mesh, "eval batch size")
    steps_per_epoch = len(data.train) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {config.batch_size} exceeds the {len(data.train)} "
                         "training examples")
    eval_batches = sum(-(-len(s) // config.eval_batch_size) for s in _eval_splits(data))
    return mesh, steps_per_epoch, eval_batches


def _setup(arch, config, data: data_lib.Dataset, skeleton, model) -> _Setup:
    mesh, steps_per_epoch, eval_batches = data_layout(config, data)
    if model is None:
        from memnas_jax.network import MemNASNetwork
        skeleton = skeleton or skeleton_from_config(config, data)
        model = MemNASNetwork(arch, skeleton, depthwise_impl=resolve_depthwise_impl(
            config.depthwise_impl), dtype=DTYPES[config.dtype])
    tx = make_optimizer(config, steps_per_epoch)
    steps = _StepFactory(model, tx, mesh, tuple(data.mean), tuple(data.std),
                         config.augment.crop_padding, config.augment.flip, config.augment.cutout,
                         config.label_smoothing, config.batch_size)
    return _Setup(steps, mesh, steps_per_epoch, eval_batches)


def _eval_splits(data: data_lib.Dataset) -> list[data_lib.ArraySplit]:
    return [s for s in (data.validation, data.test) if isinstance(s, data_lib.ArraySplit)]


def _key_shape() -> tuple[int, ...]:
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape


def _host_device() -> jax.Device:
    return jax.local_devices(backend="cpu")[0]


def _abstract(tree: Any, sharding_: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, jax.dtypes.canonicalize_dtype(x.dtype), sharding=sharding_), tree)


def _compile_programs(setup: _Setup, config, data: data_lib.Dataset) -> CandidatePrograms:
    start = time.perf_counter()
    steps, mesh = setup.steps, setup.mesh
    repl, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    host = jax.sharding.SingleDeviceSharding(_host_device())
    # Init runs once, on the host CPU, without backend optimisation: XLA spends seconds
    # optimising the unrolled threefry hash of every initialiser, and an accelerator would
    # autotune a program that runs once. The state then goes to the mesh.
    init_fn = steps.init_fn((1, *data.image_shape))
    key = jax.ShapeDtypeStruct(_key_shape(), jnp.uint32, sharding=host)
    init = jax.jit(init_fn, out_shardings=host).lower(key).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    state = _abstract(jax.eval_shape(init_fn, key), repl)
    scalars = lambda **dtypes: {k: jax.ShapeDtypeStruct((), d, sharding=repl)  # noqa: E731
                                for k, d in dtypes.items()}
    metrics = scalars(loss_sum=jnp.float32, steps=jnp.int32)
    totals = scalars(correct=jnp.int32, loss_sum=jnp.float32, batches=jnp.int32)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    image_shape, size = data.image_shape, len(data.train)
    eval_options = compiler_options(config.get("eval_compiler_options", ""))
    if data.on_device:
        train_args = (state, metrics,
                      jax.ShapeDtypeStruct((size, *image_shape), jnp.uint8, sharding=repl),
                      jax.ShapeDtypeStruct((size,), jnp.int32, sharding=repl),
                      jax.ShapeDtypeStruct((size,), jnp.int32, sharding=repl))
        train_step = steps.resident_train_step().lower(*train_args).compile()
        shape = (setup.eval_batches, config.eval_batch_size)
        split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None,
                                                                            sharding.DATA_AXIS))
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
                             flops_per_image=_flops_per_image(train_step, mesh,
                                                              config.batch_size))


def compile_candidate(arch: Iterable[Iterable[Cell]] | None, config: ml_collections.ConfigDict,
                      data: data_lib.Dataset, *, skeleton: Skeleton | None = None,
                      model: nn.Module | None = None) -> CandidatePrograms:
    """Compiles the init, train and evaluation programs of a candidate without running them
    (what `train_candidate` would compile first). Thread-safe: XLA compiles release the GIL, so
    a thread pool compiles the next candidates while one trains. Raises on a compile failure;
    `train_candidate(..., programs=future)` records that as the candidate's failure."""
    check_config(config)
    configure_compilation_cache(config.compilation_cache_dir)
    return _compile_programs(_setup(arch, config, data, skeleton, model), config, data)


# ---------------------------------------------------------------------------------------------
# Data on the device


@dataclasses.dataclass(frozen=True)
class _EvalArrays:
    """The validation and test splits, each padded to whole batches and stacked into one
    (batches, B, ...) batch-sharded array, so one compiled program evaluates both."""

    images: jax.Array
    labels: jax.Array
    mask: jax.Array
    batches: Mapping[int, tuple[int, int]]  # id(split) -> (first batch, number of batches)


def _eval_arrays(splits: list[data_lib.ArraySplit], batch_size: int, mesh) -> _EvalArrays:
    images, labels, masks, batches, first = [], [], [], {}, 0
    for split in splits:
        n = len(split)
        count = -(-n // batch_size)
        pad = count * batch_size - n
        images.append(np.concatenate([split.images,
                                      np.zeros((pad, *split.images.shape[1:]), np.uint8)]))
        labels.append(np.concatenate([split.labels, np.zeros(pad, np.int32)]))
        masks.append(np.arange(count * batch_size) < n)
        batches[id(split)] = (first, count)
        first += count

    def stacked(parts):
        return np.concatenate(parts).reshape(first, batch_size, *parts[0].shape[1:])
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.DATA_AXIS))
    arrays = jax.device_put((stacked(images), stacked(labels), stacked(masks)), spec)
    return _EvalArrays(*arrays, batches=batches)


def _scalars(mesh, **values: Any) -> dict:
    """Replicated scalar accumulators, made on the host (no compile)."""
    return sharding.replicate({k: np.asarray(v) for k, v in values.items()}, mesh)


# ---------------------------------------------------------------------------------------------
# The training loop


def train_candidate(arch: Iterable[Iterable[Cell]] | None, config: ml_collections.ConfigDict,
                    data: data_lib.Dataset, rng: jax.Array, *, skeleton: Skeleton | None = None,
                    model: nn.Module | None = None,
                    programs: CandidatePrograms | concurrent.futures.Future | None = None
                    ) -> TrainResult:
    """Trains `arch` from scratch on `data` (train split; validation each `eval_every_epochs`;
    test at the end) and returns a `TrainResult`. Never raises for a candidate's own failure.

    skeleton: overrides `config.skeleton`. model: any linen module with the MemNASNetwork
    signature `__call__(x, train)` and a `batch_stats` collection, trained instead of `arch`.
    programs: the candidate's `compile_candidate` output, or a future of it (compiled ahead, in
    another thread); None compiles them here.
    """
    check_config(config)
    start = time.perf_counter()
    configure_compilation_cache(config.compilation_cache_dir)
    try:
        return _train(arch, config, data, rng, skeleton, model, programs, start)
    except Exception as e:  # a candidate must never kill a search
        logging.warning("candidate failed: %s", traceback.format_exc())
        return failed_result(e, start)


def failed_result(error: BaseException, start: float) -> TrainResult:
    """The "failed" result of a candidate whose training raised `error` (started at
    `time.perf_counter()` `start`): out of memory or another error, with the message."""
    return _failed(f"{type(error).__name__}: {first_line(error, 2000)}", start,
                   failure="out_of_memory" if is_out_of_memory(error) else "error")


def _train(arch, config, data, rng, skeleton, model, programs, start) -> TrainResult:
    setup = _setup(arch, config, data, skeleton, model)
    mesh = setup.mesh
    wait_start = time.perf_counter()
    if programs is None:
        programs = _compile_programs(setup, config, data)
    elif isinstance(programs, concurrent.futures.Future):
        programs = programs.result()
    compile_wait = time.perf_counter() - wait_start

    # Initial state, made on the host and replicated over the mesh.
    rng = jnp.asarray(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    host_rng = jax.device_put(np.asarray(rng, np.uint32), _host_device())
    state = sharding.replicate(jax.device_get(programs.init(host_rng)), mesh)
    param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))

    history: list[dict] = []
    notes: list[str] = []
    manager = None
    if config.checkpoint_dir:
        manager = checkpoints.checkpoint_manager(config.checkpoint_dir, config.checkpoints_to_keep)
        restored, history, note = checkpoints.restore_latest(manager, state)
        if note:
            notes.append(note)
        if restored is not None:
            state = sharding.replicate(restored, mesh)
    resumed_metrics = None  # the running metrics of an epoch stopped half-way
    snapshot_dir = (os.path.join(config.checkpoint_dir, checkpoints.PREEMPTED_DIR)
                    if config.checkpoint_dir else "")
    snapshot = checkpoints.restore_snapshot(snapshot_dir, state, mesh) if snapshot_dir else None
    if snapshot is not None and int(snapshot[0].epoch) >= int(jax.device_get(state.epoch)):
        state, resumed_metrics, history = sharding.replicate(snapshot[0], mesh), *snapshot[1:]
        notes.append(f"resumed in epoch {int(state.epoch) + 1} after step "
                     f"{int(jax.device_get(resumed_metrics['steps']))} (stopped on request)")
    resumed_from = int(jax.device_get(state.epoch))

    # Data.
    if data.on_device:
        train_arrays = sharding.replicate((data.train.images, data.train.labels), mesh)

        def epoch_batches(rng: jax.Array, epoch: int, skip: int) -> Iterator[tuple]:
            permutation = jax.device_put(_permutation(rng, np.int32(epoch), len(data.train)),
                                         sharding.replicated(mesh))
            for _ in range(setup.steps_per_epoch - skip):  # the step index is in the metrics
                yield (*train_arrays, permutation)
    else:
        host_seed = int(jax.device_get(state.rng)[-1])
        rows = sharding.process_batch_rows(mesh, config.batch_size)

        def epoch_batches(rng: jax.Array, epoch: int, skip: int) -> Iterator[tuple]:
            del rng  # the host pipeline's order comes from host_seed and the epoch
            batches = data_lib.host_batches(
                data.train, config.batch_size, seed=host_seed, epoch=epoch, train=True,
                rows=rows, num_threads=config.host_threads)
            for images, labels, _ in itertools.islice(batches, skip, None):
                yield sharding.host_batch_to_global((images, labels), mesh, config.batch_size)

    evaluator = _Evaluator(programs.eval_step, data, config, mesh)

    # Epochs (the checkpoint manager is closed however they end).
    try:
        train_seconds, images_seen, epoch_seconds = 0.0, 0, []
        status, message = "ok", ""
        for epoch in range(resumed_from, config.epochs):
            epoch_start = time.perf_counter()
            metrics = _scalars(mesh, loss_sum=np.float32(0), steps=np.int32(0))
            skip = 0
            if resumed_metrics is not None:  # the epoch a stopped run left half-way
                metrics, resumed_metrics = resumed_metrics, None
                skip = int(jax.device_get(metrics["steps"]))
            for i, batch in enumerate(epoch_batches(state.rng, epoch, skip), start=skip):
                state, metrics = programs.train_step(state, metrics, *batch)
                if preemption.requested():  # a stop request: leave after this step
                    if snapshot_dir:
                        try:
                            checkpoints.save_snapshot(snapshot_dir, state, metrics, history)
                        except Exception as e:  # still stop
                            logging.warning("could not save the mid-epoch snapshot (%s); the "
                                            "candidate resumes from its last epoch checkpoint",
                                            first_line(e))
                    raise preemption.Preempted()
                if config.nan_check_every_steps and (i + 1) % config.nan_check_every_steps == 0:
                    if not np.isfinite(float(jax.device_get(metrics["loss_sum"]))):
                        break
            loss_sum, done_steps = jax.device_get((metrics["loss_sum"], metrics["steps"]))
            epoch_seconds.append(time.perf_counter() - epoch_start)
            train_seconds += epoch_seconds[-1]
            images_seen += int(done_steps) * config.batch_size
            mean_loss = float(loss_sum) / max(int(done_steps), 1)
            if not math.isfinite(mean_loss):
                status = "diverged"
                message = f"training loss became {mean_loss} in epoch {epoch + 1}"
                history.append(dict(epoch=epoch + 1, train_loss=mean_loss, val_accuracy=None))
                break
            state = state.replace(epoch=sharding.replicate(np.int32(epoch + 1), mesh))
            evaluate_now = ((epoch + 1) % config.eval_every_epochs == 0
                            or epoch + 1 == config.epochs)
            val_accuracy = (evaluator.accuracy(state, data.validation)
                            if evaluate_now and data.validation is not None else None)
            history.append(dict(epoch=epoch + 1, train_loss=mean_loss, val_accuracy=val_accuracy))
            logging.info("epoch %d/%d: loss %.4f, val accuracy %s, %.1f s", epoch + 1,
                         config.epochs, mean_loss, val_accuracy, time.perf_counter() - epoch_start)
            if manager is not None and (epoch + 1 == config.epochs or (
                    config.checkpoint_every_epochs
                    and (epoch + 1) % config.checkpoint_every_epochs == 0)):
                checkpoints.save_checkpoint(manager, state, history)
            if snapshot_dir and epoch == resumed_from and jax.process_index() == 0:
                shutil.rmtree(snapshot_dir, ignore_errors=True)  # the epoch it stopped in is done
    finally:
        if manager is not None:
            manager.wait_until_finished()
            manager.close()

    test_accuracy = None
    if status == "ok" and data.test is not None:
        test_accuracy = evaluator.accuracy(state, data.test)
    if status == "ok" and not message:
        message = "; ".join(notes)
    elif notes:
        message = f"{message}; {'; '.join(notes)}"
    val_curve = tuple(h["val_accuracy"] for h in history)
    evaluated = [(acc, h["epoch"]) for acc, h in zip(val_curve, history) if acc is not None]
    best = max(evaluated, key=lambda t: t[0], default=(None, None))
    return TrainResult(
        status=status, message=message, best_val_accuracy=best[0], best_val_epoch=best[1],
        final_val_accuracy=evaluated[-1][0] if evaluated and status == "ok" else None,
        test_accuracy=test_accuracy, loss_curve=tuple(h["train_loss"] for h in history),
        val_accuracy_curve=val_curve, epochs_done=len([h for h in history
                                                       if math.isfinite(h["train_loss"])]),
        resumed_from_epoch=resumed_from, param_count=param_count,
        wall_seconds=time.perf_counter() - start, compile_seconds=programs.compile_seconds,
        compile_wait_seconds=compile_wait,
        images_per_second=images_seen / train_seconds if train_seconds > 0 else 0.0,
        epoch_seconds=tuple(epoch_seconds), train_flops_per_image=programs.flops_per_image,
        variables=jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))


def _flops_per_image(compiled, mesh, batch_size: int) -> float | None:
    """XLA's FLOP count of one train step per image (cost_analysis is per device)."""
    try:
        analysis = compiled.cost_analysis()
        flops = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]
    except Exception:  # no analysis on this backend
        return None
    return float(flops) * sharding.mesh_size(mesh) / batch_size


class _Evaluator:
    """Accuracy of the current state on a split (device-resident or streamed), with the
    candidate's one compiled evaluation program."""

    def __init__(self, eval_step, data: data_lib.Dataset, config, mesh):
        self._step, self._data, self._mesh = eval_step, data, mesh
        self._batch, self._threads = config.eval_batch_size, config.host_threads
        self._rows = sharding.process_batch_rows(mesh, config.eval_batch_size)  # streamed splits
        self._arrays: _EvalArrays | None = None

    def accuracy(self, state: TrainState, split: data_lib.Split) -> float:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        resident = isinstance(split, data_lib.ArraySplit)
        if resident and self._arrays is None:
            self._arrays = _eval_arrays(_eval_splits(self._data), self._batch, self._mesh)
        # Resident splits: the program reads batch `batches` of the stacked arrays.
        first, count = self._arrays.batches[id(split)] if resident else (0, 0)
        totals = _scalars(self._mesh, correct=np.int32(0), loss_sum=np.float32(0),
                          batches=np.int32(first))
        if resident:
            a = self._arrays
            for _ in range(count):
                totals = self._step(variables, totals, a.images, a.labels, a.mask)
        else:
            for batch in data_lib.host_batches(split, self._batch, seed=0, epoch=0, train=False,
                                               rows=self._rows, num_threads=self._threads):
                totals = self._step(variables, totals, *sharding.host_batch_to_global(
                    batch, self._mesh, self._batch))
        return int(jax.device_get(totals["correct"])) / len(split)


__all__ = [
    "AUTO_CACHE", "DTYPES", "PREEMPTED_DIR", "STATUSES", "XLA_CACHE_DIR", "CandidatePrograms",
    "TrainResult",
    "TrainState", "check_config", "compilation_cache_path", "compile_candidate",
    "compiler_options", "configure_compilation_cache", "cross_entropy", "default_config",
    "failed_result",
    "is_out_of_memory", "make_optimizer", "make_schedule", "resolve_depthwise_impl",
    "skeleton_from_config", "train_candidate",
]
