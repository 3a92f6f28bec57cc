"""Packed training: K candidates of a round in one compiled program (`train_packed`).

The candidates run as one `TemplateNetwork` (`memnas_jax.template_network`) whose architecture is
data (`RoundTemplate.code`). One train step `jax.vmap`s a candidate's step over the pack: each
candidate keeps its own parameters, BatchNorm statistics, optimizer state, data order and
augmentation stream (the same ones `train.train_candidate` gives it for the same key), and gets its
own `TrainResult`. A candidate whose loss turns non-finite is frozen (its updates are dropped by a
select) and reported "diverged"; the others train on.

Programs are compiled once per (template, K): every pack of a round shares them, the last one
padded with frozen copies of its first candidate. With K = 1 and `selection="switch"` the step is
not vmapped and `lax.switch` runs only each slot's chosen op: a CPU stops compiling per
candidate without paying for the alternatives it does not run.

Initial parameters follow each candidate's own initialisers (`mask_to_candidate`), drawn from the
template's shapes: the same distribution as `train_candidate`, other values. `initial_variables`
starts from given ones instead (the equivalence tests give the standalone initialisation).

Scope: device-resident data (`Dataset.on_device`), no per-candidate checkpoints (a stopped or
killed pack is trained again; the search saves a pack's results together).
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from typing import Any, Iterable, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from memnas_jax import data as data_lib
from memnas_jax import dispatch, preemption, sharding, transfers
from memnas_jax import train as train_lib
from memnas_jax.encoding import Architecture, Cell
from memnas_jax.network import check_architecture, param_count
from memnas_jax.space import Skeleton
from memnas_jax.template import RoundTemplate
from memnas_jax.template_network import (
    SELECTIONS,
    TemplateNetwork,
    embed_variables,
    extract_variables,
    mask_to_candidate,
    real_shapes,
    template_shapes,
    unflatten_paths,
)
from memnas_jax.train.evaluate import Evaluator
from memnas_jax.train.programs import flops_per_image, host_device, key_shape
from memnas_jax.train.steps import epoch_keys, permutation


def resolve_selection(name: str, pack_size: int) -> str:
    """"auto": "switch" for a pack of one on a CPU (only the chosen ops run), else "select"."""
    if name == "auto":
        return "switch" if pack_size == 1 and jax.default_backend() == "cpu" else "select"
    if name not in SELECTIONS:
        raise ValueError(f"selection {name!r} is not 'auto' or one of {SELECTIONS}")
    if name == "switch" and pack_size != 1:
        raise ValueError("selection 'switch' runs one candidate at a time: use pack size 1")
    return name


@dataclasses.dataclass(frozen=True)
class PackedPrograms:
    """The compiled programs of one (template, pack size): every pack of the round uses them."""

    module: TemplateNetwork
    pack_size: int
    init: Any  # (keys (K, 2) uint32, real shapes) -> stacked TrainState, on the host CPU
    train_step: Any  # (state, metrics, active, code, images, labels, permutations)
    eval_step: Any | None  # (variables, totals, code, eval images, labels, mask)
    compile_seconds: float
    flops_per_image: float | None  # executed FLOPs of the train step per image of the pack
    steps_per_epoch: int
    mesh: Any


@dataclasses.dataclass(frozen=True)
class _Steps:
    module: TemplateNetwork
    tx: Any
    mesh: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: tuple[int, bool, int]  # crop padding, flip, cutout
    label_smoothing: float
    batch_size: int
    vmapped: bool

    def _over_pack(self, fn, *args):
        """fn over the pack's leading axis: vmapped, or on the one candidate (switch)."""
        if self.vmapped:
            return jax.vmap(fn)(*args)
        out = fn(*jax.tree.map(lambda x: x[0], args))
        return jax.tree.map(lambda x: x[None], out)

    def init(self, sample_shape: tuple[int, ...]):
        def one(key, shapes, code):
            init_key, data_key = jax.random.split(key)
            variables = self.module.init(init_key,
                                         jnp.zeros(sample_shape, jnp.float32), code, train=False)
            variables = mask_to_candidate(variables, shapes)
            return train_lib.TrainState.fresh(self.tx, variables, data_key)

        def init(keys, shapes, codes):
            return jax.vmap(one)(keys, shapes, codes)
        return init

    def train_step(self):
        b = self.batch_size

        def one(state, loss_sum, active, code, steps, images, labels):
            key = jax.random.fold_in(epoch_keys(state.rng, state.epoch)[1], steps)
            x = data_lib.augment_batch(key, images, mean=self.mean, std=self.std,
                                       crop_padding=self.augment[0], flip=self.augment[1],
                                       cutout_length=self.augment[2])

            def loss_fn(params):
                logits, updates = self.module.apply(
                    {"params": params, "batch_stats": state.batch_stats}, x, code, train=True,
                    mutable=["batch_stats"])
                loss = jnp.mean(train_lib.cross_entropy(logits, labels, self.label_smoothing))
                return loss, updates["batch_stats"]

            (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            new = state.replace(step=state.step + 1,
                                params=jax.tree.map(jnp.add, state.params, updates),
                                batch_stats=batch_stats, opt_state=opt_state)
            # A frozen (diverged or padding) candidate keeps its state: a select, so its NaNs
            # stay where they are.
            new = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)
            return new, loss_sum + jnp.where(active, loss, 0.0)

        def step(state, metrics, active, codes, images, labels, permutations):
            steps = metrics["steps"]
            idx = jax.lax.dynamic_slice_in_dim(permutations, steps * b, b, axis=1)  # (K, B)
            batch = jax.lax.with_sharding_constraint(
                (images[idx], labels[idx]), sharding.stacked_batch_sharded(self.mesh))
            chex.assert_shape(batch[1], (permutations.shape[0], b))  # (K, B): one per candidate
            chex.assert_tree_shape_prefix(state, (permutations.shape[0],))
            state, loss_sum = self._over_pack(
                lambda s, ls, a, c, x, y: one(s, ls, a, c, steps, x, y),
                state, metrics["loss_sum"], active, codes, *batch)
            return state, dict(loss_sum=loss_sum, steps=steps + 1)

        repl = sharding.replicated(self.mesh)
        return jax.jit(step, donate_argnums=(0, 1), out_shardings=(repl, repl))

    def eval_step(self):
        def one(variables, correct, loss_sum, code, images, labels, mask):
            logits = self.module.apply(variables, data_lib.normalize(images, self.mean, self.std),
                                       code, train=False)
            hit = (jnp.argmax(logits, -1) == labels) & mask
            loss = jnp.where(mask, train_lib.cross_entropy(logits, labels), 0.0)
            return correct + jnp.sum(hit, dtype=jnp.int32), loss_sum + jnp.sum(loss)

        def step(variables, totals, codes, images, labels, mask):
            i = totals["batches"]
            batch = (images[i], labels[i], mask[i])
            correct, loss_sum = self._over_pack(
                lambda v, c, ls, code: one(v, c, ls, code, *batch),
                variables, totals["correct"], totals["loss_sum"], codes)
            return dict(correct=correct, loss_sum=loss_sum, batches=i + 1)
        return jax.jit(step, donate_argnums=(1,), out_shardings=sharding.replicated(self.mesh))


def _module(template: RoundTemplate, config, selection: str) -> TemplateNetwork:
    return TemplateNetwork(template, train_lib.resolve_depthwise_impl(config.depthwise_impl),
                           train_lib.DTYPES[config.dtype], selection)


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _codes(template: RoundTemplate, archs: Sequence[Architecture], pack_size: int) -> dict:
    """The pack's codes, padded to `pack_size` with the first candidate (frozen there)."""
    padded = list(archs) + [archs[0]] * (pack_size - len(archs))
    return {k: np.asarray(v) for k, v in template.codes(padded).items()}


def compile_packed(template: RoundTemplate, config: ml_collections.ConfigDict,
                   data: data_lib.Dataset, pack_size: int, selection: str = "auto"
                   ) -> PackedPrograms:
    """Compiles the init, train and evaluation programs of packs of `pack_size` candidates of
    `template` (ahead of training: thread-safe, like `train.compile_candidate`)."""
    config = train_lib.TrainSettings.from_config(config)
    train_lib.configure_compilation_cache(config.compilation_cache_dir)
    if not data.on_device:
        raise ValueError("packed training needs device-resident data (a CIFAR-size dataset); "
                         "use standalone training (parallel.packing='standalone') for streamed "
                         "datasets")
    if pack_size < 1:
        raise ValueError(f"pack size must be >= 1, got {pack_size}")
    start = time.perf_counter()
    selection = resolve_selection(selection, pack_size)
    module = _module(template, config, selection)
    mesh, steps_per_epoch, eval_batches = train_lib.data_layout(config, data)
    tx = train_lib.make_optimizer(config, steps_per_epoch)
    steps = _Steps(module, tx, mesh, tuple(data.mean), tuple(data.std),
                   (config.augment.crop_padding, config.augment.flip, config.augment.cutout),
                   config.label_smoothing, config.batch_size, vmapped=selection == "select")
    repl = sharding.replicated(mesh)
    host = jax.sharding.SingleDeviceSharding(host_device())
    k = pack_size

    def abstract(tree, sharding_):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, jax.dtypes.canonicalize_dtype(x.dtype), sharding=sharding_), tree)
    codes = abstract(template.codes([None] * k), host)
    shapes = abstract(_real_shape_arrays(module, [None] * k), host)
    keys = jax.ShapeDtypeStruct((k, *key_shape()), jnp.uint32, sharding=host)
    init_fn = steps.init((1, *data.image_shape))
    init = jax.jit(init_fn, out_shardings=host).lower(keys, shapes, codes).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    state = abstract(jax.eval_shape(init_fn, keys, shapes, codes), repl)
    codes = abstract(codes, repl)
    vector = lambda dtype: jax.ShapeDtypeStruct((k,), dtype, sharding=repl)  # noqa: E731
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=repl)  # noqa: E731
    size, image_shape = len(data.train), data.image_shape
    train_step = steps.train_step().lower(
        state, dict(loss_sum=vector(jnp.float32), steps=scalar(jnp.int32)), vector(jnp.bool_),
        codes, jax.ShapeDtypeStruct((size, *image_shape), jnp.uint8, sharding=repl),
        jax.ShapeDtypeStruct((size,), jnp.int32, sharding=repl),
        jax.ShapeDtypeStruct((k, size), jnp.int32, sharding=repl)).compile()
    eval_step = None
    if eval_batches:
        shape = (eval_batches, config.eval_batch_size)
        split = sharding.stacked_batch_sharded(mesh)
        eval_step = steps.eval_step().lower(
            {"params": state.params, "batch_stats": state.batch_stats},
            dict(correct=vector(jnp.int32), loss_sum=vector(jnp.float32),
                 batches=scalar(jnp.int32)), codes,
            jax.ShapeDtypeStruct((*shape, *image_shape), jnp.uint8, sharding=split),
            jax.ShapeDtypeStruct(shape, jnp.int32, sharding=split),
            jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=split)).compile(
                train_lib.compiler_options(config.eval_compiler_options))
    flops = flops_per_image(train_step, mesh, config.batch_size * k)
    return PackedPrograms(module, k, init, train_step, eval_step,
                          time.perf_counter() - start, flops, steps_per_epoch, mesh)


def _real_shape_arrays(module: TemplateNetwork, archs: Sequence[Architecture | None]) -> dict:
    """Per candidate, the real shape of every template entry, stacked: (K, rank) int32."""
    flat_shapes = template_shapes(module)
    per = []
    for arch in archs:
        shapes = (real_shapes(module, arch) if arch is not None
                  else {p: (0,) * len(s) for p, s in flat_shapes.items()})
        per.append({p: np.asarray(s, np.int32) for p, s in shapes.items()})
    return unflatten_paths({p: np.stack([d[p] for d in per]) for p in flat_shapes})


def train_packed(archs: Sequence[Iterable[Iterable[Cell]]], config: ml_collections.ConfigDict,
                 data: data_lib.Dataset, rngs: Sequence[jax.Array], *,
                 skeleton: Skeleton | None = None, template: RoundTemplate | None = None,
                 programs: PackedPrograms | None = None, selection: str = "auto",
                 initial_variables: Sequence[Mapping] | None = None
                 ) -> list[train_lib.TrainResult]:
    """Trains `archs` together, each from its key in `rngs`, and returns one `TrainResult` each,
    as `train.train_candidate` would for that candidate alone (within float rounding, from the
    same initial variables). Never raises for the candidates' own failures: a compile error or
    an out-of-memory fails every candidate of the pack (`failure` says which).

    template: the round's template (default: built from `archs`); programs: from
    `compile_packed(template, ...)`, whose pack size may exceed len(archs) (the pack is padded).
    initial_variables: each candidate's `MemNASNetwork` variables to start from.
    """
    config = train_lib.TrainSettings.from_config(config)
    start = time.perf_counter()
    train_lib.configure_compilation_cache(config.compilation_cache_dir)
    if template is None and programs is not None:
        template = programs.module.template
    skeleton = skeleton or (template.skeleton if template is not None
                            else train_lib.skeleton_from_config(config, data))
    archs = [check_architecture(a, skeleton) for a in archs]
    if len(rngs) != len(archs):
        raise ValueError(f"{len(archs)} architectures but {len(rngs)} keys")
    try:
        return _train(archs, config, data, rngs, skeleton, template, programs, selection,
                      initial_variables, start)
    except Exception as e:  # a pack's failure must never kill a search
        logging.warning("pack failed: %s", traceback.format_exc())
        return [train_lib.failed_result(e, start) for _ in archs]


def _raw_key(rng) -> np.ndarray:
    rng = jnp.asarray(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return np.asarray(rng, np.uint32)


def _train(archs, config, data, rngs, skeleton, template, programs, selection,
           initial_variables, start) -> list[train_lib.TrainResult]:
    if template is None:
        template = RoundTemplate.from_architectures(archs, skeleton)
    wait_start = time.perf_counter()
    compiled_here = programs is None
    if programs is None:
        programs = compile_packed(template, config, data, len(archs), selection)
    if programs.pack_size < len(archs):
        raise ValueError(f"{len(archs)} candidates for programs compiled for packs of "
                         f"{programs.pack_size}")
    compile_wait = time.perf_counter() - wait_start
    module, mesh, k, n = programs.module, programs.mesh, programs.pack_size, len(archs)
    padded = archs + [archs[0]] * (k - n)
    host = host_device()
    codes_host = _codes(template, archs, k)
    with transfers.intended("initial state"):
        keys = np.stack([_raw_key(r) for r in rngs] + [_raw_key(rngs[0])] * (k - n))
        if initial_variables is None:
            shapes = jax.device_put(_real_shape_arrays(module, padded), host)
            state = programs.init(jax.device_put(keys, host), shapes,
                                  jax.device_put(codes_host, host))
        else:
            variables = [embed_variables(module, a, v)
                         for a, v in zip(archs, initial_variables)]
            variables = _stack(variables + [variables[0]] * (k - n))
            tx = train_lib.make_optimizer(config, programs.steps_per_epoch)
            data_keys = np.stack([np.asarray(jax.random.split(key)[1]) for key in keys])
            with jax.default_device(host):
                state = jax.vmap(lambda v, key: train_lib.TrainState.fresh(tx, v, key))(
                    variables, data_keys)
        state = sharding.replicate(jax.device_get(state), mesh)
        codes = sharding.replicate(codes_host, mesh)
    active_host = np.arange(k) < n
    with transfers.intended("training data"):
        train_arrays = sharding.replicate((data.train.images, data.train.labels), mesh)
    evaluator = Evaluator(programs.eval_step, data, config, mesh, pack_size=k, codes=codes)

    histories: list[list[dict]] = [[] for _ in range(n)]
    diverged: dict[int, str] = {}
    epoch_seconds, train_seconds = [], 0.0
    for epoch in range(config.epochs):
        if not active_host[:n].any():
            break
        epoch_start = time.perf_counter()
        was_active = active_host.copy()
        epochs = np.full((k,), epoch, np.int32)
        with transfers.intended("epoch order"):
            perms = np.stack([np.asarray(permutation(
                jax.device_put(keys_data, host), epochs_, len(data.train)))
                for keys_data, epochs_ in zip(jax.device_get(state.rng), epochs)])
            permutations = sharding.replicate(perms, mesh)
        with transfers.intended("pack activity"):
            active = sharding.replicate(active_host, mesh)
        with transfers.intended("epoch metrics"):
            metrics = sharding.replicate(dict(loss_sum=np.zeros(k, np.float32),
                                              steps=np.int32(0)), mesh)
        in_flight = dispatch.InFlight()
        for i in range(programs.steps_per_epoch):
            state, metrics = in_flight.add(programs.train_step(
                state, metrics, active, codes, *train_arrays, permutations))
            if preemption.requested():  # the pack is trained again on resume
                raise preemption.Preempted()
            if config.nan_check_every_steps and (i + 1) % config.nan_check_every_steps == 0:
                with transfers.intended("nan check"):
                    sums = np.asarray(jax.device_get(metrics["loss_sum"]))
                if not np.isfinite(sums[active_host]).all():
                    active_host &= np.isfinite(sums)
                    with transfers.intended("pack activity"):
                        active = sharding.replicate(active_host, mesh)
                    if not active_host[:n].any():
                        break
        with transfers.intended("epoch metrics"):
            loss_sums, done = jax.device_get((metrics["loss_sum"], metrics["steps"]))
        epoch_seconds.append(time.perf_counter() - epoch_start)
        train_seconds += epoch_seconds[-1]
        with transfers.intended("epoch counter"):
            state = state.replace(epoch=sharding.replicate(np.full((k,), epoch + 1, np.int32),
                                                           mesh))
        evaluate_now = (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == config.epochs
        for c in range(n):
            if not was_active[c] or c in diverged:
                continue
            mean_loss = float(loss_sums[c]) / max(int(done), 1)
            if not math.isfinite(mean_loss):
                diverged[c] = f"training loss became {mean_loss} in epoch {epoch + 1}"
                active_host[c] = False
                histories[c].append(dict(epoch=epoch + 1, train_loss=mean_loss,
                                         val_accuracy=None))
        with transfers.intended("evaluation"):
            accuracies = (evaluator.pack_accuracies(state, data.validation)
                          if evaluate_now and data.validation is not None else None)
        for c in range(n):
            if was_active[c] and c not in diverged:
                histories[c].append(dict(
                    epoch=epoch + 1, train_loss=float(loss_sums[c]) / max(int(done), 1),
                    val_accuracy=None if accuracies is None else accuracies[c]))
        logging.info("pack of %d, epoch %d/%d: losses %s, %.1f s", n, epoch + 1, config.epochs,
                     np.round(np.asarray(loss_sums[:n]) / max(int(done), 1), 4),
                     time.perf_counter() - epoch_start)

    ok = [c for c in range(n) if c not in diverged]
    with transfers.intended("evaluation"):
        tests = (evaluator.pack_accuracies(state, data.test) if ok and data.test is not None
                 else None)
    with transfers.intended("final variables"):
        variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    wall = time.perf_counter() - start
    results = []
    for c, arch in enumerate(archs):
        history = histories[c]
        status = "diverged" if c in diverged else "ok"
        own = extract_variables(module, arch, jax.tree.map(lambda x, c=c: x[c], variables))
        epochs_done = sum(1 for h in history if math.isfinite(h["train_loss"]))
        results.append(train_lib.from_history(
            history, status=status, message=diverged.get(c, ""),
            test_accuracy=None if tests is None else tests[c], resumed_from_epoch=0,
            param_count=param_count(arch, skeleton), wall_seconds=wall / n,
            compile_seconds=programs.compile_seconds / n if compiled_here else 0.0,
            compile_wait_seconds=compile_wait / n,
            images_per_second=(epochs_done * programs.steps_per_epoch * config.batch_size
                               / train_seconds if train_seconds > 0 else 0.0),
            epoch_seconds=tuple(epoch_seconds), train_flops_per_image=programs.flops_per_image,
            variables=own))
    return results


def device_memory_bytes() -> int | None:
    """Memory of the first device (None where JAX does not report it, e.g. on a CPU)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics
        return None
    return stats.get("bytes_limit")


def program_bytes(programs: PackedPrograms) -> int | None:
    """XLA's memory analysis of the train step: arguments, outputs and temporaries."""
    try:
        m = programs.train_step.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # no analysis on this backend
        return None


def compile_fitting_pack(template: RoundTemplate, config: ml_collections.ConfigDict,
                         data: data_lib.Dataset, pack_size: int, selection: str = "auto",
                         memory_fraction: float = 0.6) -> PackedPrograms:
    """`compile_packed` at the largest pack size <= `pack_size` whose train step XLA sizes at
    most `memory_fraction` of the device's memory (halving; where the device reports none,
    `pack_size` as asked). A run that still runs out of memory backs off in the search."""
    limit = device_memory_bytes()
    while True:
        programs = compile_packed(template, config, data, pack_size, selection)
        needed = program_bytes(programs)
        if pack_size == 1 or limit is None or needed is None or needed <= memory_fraction * limit:
            return programs
        logging.info("a pack of %d needs %.1f GB of %.1f GB: halving it", pack_size,
                     needed / 1e9, limit / 1e9)
        pack_size //= 2


__all__ = ["SELECTIONS", "PackedPrograms", "compile_fitting_pack", "compile_packed",
           "device_memory_bytes", "program_bytes", "resolve_selection", "train_packed"]

