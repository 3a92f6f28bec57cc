"""The training loop of one model: epochs, divergence, checkpoints, a stop request, evaluation."""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import os
import shutil
import time
import traceback
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from memnas_jax import data as data_lib
from memnas_jax import dispatch, preemption, sharding, transfers
from memnas_jax.encoding import Architecture
from memnas_jax.errors import ConfigError, first_line
from memnas_jax.space import Skeleton
from memnas_jax.train import checkpoints
from memnas_jax.train.config import TrainSettings, configure_compilation_cache
from memnas_jax.train.evaluate import Evaluator, scalars
from memnas_jax.train.programs import (
    CandidatePrograms,
    candidate_network,
    compile_programs,
    host_device,
    training_setup,
)
from memnas_jax.train.result import TrainResult, failed_result, from_history
from memnas_jax.train.steps import permutation


def train_candidate(arch: Architecture, config: ml_collections.ConfigDict | TrainSettings,
                    data: data_lib.Dataset, rng: jax.Array, *, skeleton: Skeleton | None = None,
                    programs: CandidatePrograms | concurrent.futures.Future | None = None,
                    mesh: Mesh | None = None) -> TrainResult:
    """Trains the `MemNASNetwork` of `arch` (on `skeleton`, default `config.skeleton` sized to
    the data) with `train_model`. Never raises for a candidate's own failure."""
    start = time.perf_counter()
    try:
        model = candidate_network(arch, config, data, skeleton)
    except ConfigError:
        raise  # it would fail every candidate
    except Exception as e:  # a candidate must never kill a search
        return failed_result(e, start)
    return train_model(model, config, data, rng, programs=programs, mesh=mesh, start=start)


def train_model(model: nn.Module, config: ml_collections.ConfigDict | TrainSettings,
                data: data_lib.Dataset,
                rng: jax.Array, *,
                programs: CandidatePrograms | concurrent.futures.Future | None = None,
                mesh: Mesh | None = None, start: float | None = None) -> TrainResult:
    """Trains `model` from scratch on `data` (train split; validation each `eval_every_epochs`;
    test at the end) and returns a `TrainResult`. Never raises for the model's own failure.

    model: a linen module called as `(x, train)`, with a `batch_stats` collection (may be
    empty). programs: its `compile_model` output, or a future of it (compiled ahead, in another
    thread); None compiles them here. mesh: the data mesh (default: `config.num_devices` of
    all devices; compiled programs must be for the same mesh). start: `time.perf_counter()`
    when its training began.
    A config that is not valid `TrainSettings` raises `ConfigError`: it would fail every model.
    """
    config = TrainSettings.from_config(config)
    start = time.perf_counter() if start is None else start
    configure_compilation_cache(config.compilation_cache_dir)
    try:
        return _train(model, config, data, rng, programs, mesh, start)
    except Exception as e:  # a candidate must never kill a search
        logging.warning("candidate failed: %s", traceback.format_exc())
        return failed_result(e, start)


def _train(model, config, data, rng, programs, mesh, start) -> TrainResult:
    setup = training_setup(model, config, data, mesh)
    mesh = setup.mesh
    wait_start = time.perf_counter()
    if programs is None:
        programs = compile_programs(setup, config, data)
    elif isinstance(programs, concurrent.futures.Future):
        programs = programs.result()
    compile_wait = time.perf_counter() - wait_start

    # Initial state, made on the host and replicated over the mesh.
    with transfers.intended("initial state"):
        rng = jnp.asarray(rng)
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        host_rng = jax.device_put(np.asarray(rng, np.uint32), host_device())
        state = sharding.replicate(jax.device_get(programs.init(host_rng)), mesh)
    param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))

    history: list[dict] = []
    notes: list[str] = []
    manager = None
    resumed_metrics = None  # the running metrics of an epoch stopped half-way
    snapshot_dir = (os.path.join(config.checkpoint_dir, checkpoints.PREEMPTED_DIR)
                    if config.checkpoint_dir else "")
    with transfers.intended("checkpoint restore"):
        if config.checkpoint_dir:
            manager = checkpoints.checkpoint_manager(config.checkpoint_dir,
                                                     config.checkpoints_to_keep)
            restored, history, note = checkpoints.restore_latest(manager, state)
            if note:
                notes.append(note)
            if restored is not None:
                state = sharding.replicate(restored, mesh)
        snapshot = (checkpoints.restore_snapshot(snapshot_dir, state, mesh) if snapshot_dir
                    else None)
        if snapshot is not None and int(snapshot[0].epoch) >= int(jax.device_get(state.epoch)):
            state, resumed_metrics, history = (sharding.replicate(snapshot[0], mesh),
                                               *snapshot[1:])
            notes.append(f"resumed in epoch {int(state.epoch) + 1} after step "
                         f"{int(jax.device_get(resumed_metrics['steps']))} (stopped on request)")
        resumed_from = int(jax.device_get(state.epoch))

    # Data.
    if data.on_device:
        with transfers.intended("training data"):
            train_arrays = sharding.replicate((data.train.images, data.train.labels), mesh)

        def epoch_batches(rng: jax.Array, epoch: int, skip: int) -> Iterator[tuple]:
            with transfers.intended("epoch order"):
                order = jax.device_put(permutation(rng, np.int32(epoch), len(data.train)),
                                       sharding.replicated(mesh))
            for _ in range(setup.steps_per_epoch - skip):  # the step index is in the metrics
                yield (*train_arrays, order)
    else:
        with transfers.intended("initial state"):
            host_seed = int(jax.device_get(state.rng)[-1])
        rows = sharding.process_batch_rows(mesh, config.batch_size)

        def epoch_batches(rng: jax.Array, epoch: int, skip: int) -> Iterator[tuple]:
            del rng  # the host pipeline's order comes from host_seed and the epoch
            batches = data_lib.host_batches(
                data.train, config.batch_size, seed=host_seed, epoch=epoch, train=True,
                rows=rows, num_threads=config.host_threads)
            for images, labels, _ in itertools.islice(batches, skip, None):
                with transfers.intended("streamed batch"):
                    batch = sharding.host_batch_to_global((images, labels), mesh,
                                                          config.batch_size)
                yield batch

    evaluator = Evaluator(programs.eval_step, data, config, mesh)

    # Epochs (the checkpoint manager is closed however they end).
    try:
        train_seconds, images_seen, epoch_seconds = 0.0, 0, []
        status, message = "ok", ""
        for epoch in range(resumed_from, config.epochs):
            epoch_start = time.perf_counter()
            with transfers.intended("epoch metrics"):
                metrics = scalars(mesh, loss_sum=np.float32(0), steps=np.int32(0))
                skip = 0
                if resumed_metrics is not None:  # the epoch a stopped run left half-way
                    metrics, resumed_metrics = resumed_metrics, None
                    skip = int(jax.device_get(metrics["steps"]))
            in_flight = dispatch.InFlight()
            for i, batch in enumerate(epoch_batches(state.rng, epoch, skip), start=skip):
                state, metrics = in_flight.add(programs.train_step(state, metrics, *batch))
                if preemption.requested():  # a stop request: leave after this step
                    if snapshot_dir:
                        try:
                            with transfers.intended("checkpoint save"):
                                checkpoints.save_snapshot(snapshot_dir, state, metrics, history)
                        except Exception as e:  # still stop
                            logging.warning("could not save the mid-epoch snapshot (%s); the "
                                            "candidate resumes from its last epoch checkpoint",
                                            first_line(e))
                    raise preemption.Preempted()
                if config.nan_check_every_steps and (i + 1) % config.nan_check_every_steps == 0:
                    with transfers.intended("nan check"):
                        loss_so_far = float(jax.device_get(metrics["loss_sum"]))
                    if not np.isfinite(loss_so_far):
                        break
            with transfers.intended("epoch metrics"):
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
            with transfers.intended("epoch counter"):
                state = state.replace(epoch=sharding.replicate(np.int32(epoch + 1), mesh))
            evaluate_now = ((epoch + 1) % config.eval_every_epochs == 0
                            or epoch + 1 == config.epochs)
            with transfers.intended("evaluation"):
                val_accuracy = (evaluator.accuracy(state, data.validation)
                                if evaluate_now and data.validation is not None else None)
            history.append(dict(epoch=epoch + 1, train_loss=mean_loss, val_accuracy=val_accuracy))
            logging.info("epoch %d/%d: loss %.4f, val accuracy %s, %.1f s", epoch + 1,
                         config.epochs, mean_loss, val_accuracy, time.perf_counter() - epoch_start)
            if manager is not None and (epoch + 1 == config.epochs or (
                    config.checkpoint_every_epochs
                    and (epoch + 1) % config.checkpoint_every_epochs == 0)):
                with transfers.intended("checkpoint save"):
                    checkpoints.save_checkpoint(manager, state, history)
            if snapshot_dir and epoch == resumed_from and jax.process_index() == 0:
                shutil.rmtree(snapshot_dir, ignore_errors=True)  # the epoch it stopped in is done
    finally:
        if manager is not None:
            with transfers.intended("checkpoint save"):
                manager.wait_until_finished()
                manager.close()

    test_accuracy = None
    if status == "ok" and data.test is not None:
        with transfers.intended("evaluation"):
            test_accuracy = evaluator.accuracy(state, data.test)
    with transfers.intended("final variables"):
        variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    if status == "ok" and not message:
        message = "; ".join(notes)
    elif notes:
        message = f"{message}; {'; '.join(notes)}"
    return from_history(
        history, status=status, message=message, test_accuracy=test_accuracy,
        resumed_from_epoch=resumed_from, param_count=param_count,
        wall_seconds=time.perf_counter() - start, compile_seconds=programs.compile_seconds,
        compile_wait_seconds=compile_wait,
        images_per_second=images_seen / train_seconds if train_seconds > 0 else 0.0,
        epoch_seconds=tuple(epoch_seconds), train_flops_per_image=programs.flops_per_image,
        variables=variables)
