"""Training a round's candidates: standalone (one at a time, compiled ahead, or in candidate
groups) or packed (`memnas_jax.packed`).

`RoundTrainer` is a collaborator of the search loop: it takes the round and the earlier rounds,
trains with the trainer, and yields each `Step` (the round with the newest results recorded);
the loop alone replaces the search state with it, saves, and decides whether to go on. A loop
that stops early closes the steps, which ends the compile threads and the progress bar."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterator, Sequence

import jax
from absl import logging

from memnas_jax import candidate_parallel, distributed
from memnas_jax import packed as packed_lib
from memnas_jax import train as train_lib
from memnas_jax.compile_ahead import CompileAhead, resolve_depth
from memnas_jax.errors import ConfigError
from memnas_jax.search.policy import round_reference, training_order, with_reward
from memnas_jax.search.progress import log_entry, progress_bar
from memnas_jax.search.seeds import candidate_key
from memnas_jax.search.settings import SearchSettings
from memnas_jax.search.state import Entry, Packing, Round
from memnas_jax.search.trainer import AUTO_MAX_PACK, Trainer
from memnas_jax.space import Skeleton
from memnas_jax.template import RoundTemplate

# Backends where packing = "auto" packs. Empty: packing has been measured faster than
# compile-ahead standalone training on none (on a CPU it runs every alternative's FLOPs:
# docs/performance.md; on a GPU it is not measured yet). Add a backend with its measurement.
PACKING_WINS_ON: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Step:
    """The round after some of its candidates were recorded (or its pack size changed), and
    the results of the candidates trained for it here (reused ones excluded)."""

    round: Round
    trained: tuple[train_lib.TrainResult, ...] = ()


@dataclasses.dataclass
class RoundTrainer:
    """Trains rounds with `trainer`; reads the settings, changes no state of its own."""

    settings: SearchSettings
    skeleton: Skeleton
    trainer: Trainer
    show_progress: bool

    # ----- how a round trains
    def decide_packing(self, rnd: Round) -> Round:
        """The round with its `packing` decided (None: standalone), to be recorded so that a
        resume keeps it. A round that trained candidates without a record (a work directory
        from before packing) goes on standalone, so one round never mixes the two."""
        started = any(e.trained and e.reused_from_round is None for e in rnd.entries)
        return dataclasses.replace(rnd, packing=None if started else self._packing(rnd),
                                   packing_decided=True)

    def _packing(self, rnd: Round) -> Packing | None:
        p = self.settings.parallel
        if p.packing == "standalone":
            return None
        why_not = self.trainer.why_not_packed()
        if why_not is None and p.candidate_groups > 1:
            why_not = "parallel.candidate_groups > 1"
        if why_not is not None:
            if p.packing == "packed":
                raise ConfigError(f"config.parallel.packing = 'packed', but {why_not}: use "
                                  "packing = 'standalone' (or 'auto')")
            return None
        if p.packing == "auto" and jax.default_backend() not in PACKING_WINS_ON:
            return None  # standalone until a measurement shows packing winning (PACKING_WINS_ON)
        count = sum(e.reused_from_round is None for e in rnd.entries)
        on_cpu = jax.default_backend() == "cpu"
        size = p.pack_size or (1 if on_cpu else min(AUTO_MAX_PACK, max(count, 1)))
        return Packing(pack_size=size, selection=packed_lib.resolve_selection(p.pack_selection,
                                                                              size))

    def steps(self, rnd: Round, earlier: Sequence[Round]) -> Iterator[Step]:
        """Trains the round's pending candidates (its packing decided), yielding after each
        candidate, or each pack, is recorded."""
        if rnd.packing is not None:
            return self._packed_steps(rnd, earlier)
        return self._standalone_steps(rnd, earlier)

    # ----- standalone
    def _standalone_steps(self, rnd: Round, earlier: Sequence[Round]) -> Iterator[Step]:
        bar = progress_bar(len(rnd.entries), rnd.num_trained, f"round {rnd.round} ({rnd.mode})",
                           self.show_progress)
        # With candidate groups, G pending candidates train at once (candidate_parallel); each
        # result is what training it alone gives, so the state after each save is the same as
        # in a one-by-one run and a resume stays exact.
        groups = self.settings.parallel.candidate_groups
        entries = rnd.entries
        # The order of the whole round, so that a resumed round goes on where it stopped.
        pending = [i for i in training_order([e.architecture for e in entries])
                   if not entries[i].trained]
        previous = {i: previous_result(earlier, entries[i].hash, self.settings)
                    for i in pending}
        ahead = CompileAhead(lambda i: self.trainer.compile(entries[i].architecture,
                                                            self.skeleton),
                             [i for i in pending if previous[i] is None],
                             self._compile_ahead_depth())
        try:
            for start in range(0, len(pending), groups):
                chunk = pending[start:start + groups]
                to_train = [i for i in chunk if previous[i] is None]
                results = dict(zip(to_train, candidate_parallel.map_on_device_groups(
                    lambda i, mesh: self._train_one(entries[i], ahead.take(i),
                                                    mesh if groups > 1 else None),
                    to_train, groups)))
                # Multi-process: all processes finished these candidates (raises if one died,
                # before any of its collective failures is recorded as a failed candidate).
                distributed.sync_processes(f"round {rnd.round} candidates {chunk}")
                for i in chunk:
                    if previous[i] is not None:
                        rnd, trained = recorded(rnd, i, reused_entry(entries[i], *previous[i]),
                                                self.settings), ()
                    else:
                        rnd = recorded(rnd, i, self._entry_of(entries[i], results[i]),
                                       self.settings)
                        trained = (results[i],)
                    log_entry(rnd, i, rnd.entries[i])
                    bar.update(1)
                    ok = [e.accuracy for e in rnd.entries if e.ok]
                    if ok:
                        bar.set_postfix(best_acc=f"{100 * max(ok):.2f}%")
                    yield Step(rnd, trained)
        finally:
            ahead.close()
            bar.close()

    def _compile_ahead_depth(self) -> int:
        """Candidates to compile ahead: with one candidate group and a trainer that can compile
        (candidate groups overlap their compiles already)."""
        if self.settings.parallel.candidate_groups > 1 or not self.trainer.compiles_ahead:
            return 0
        return resolve_depth(self.settings.parallel.compile_ahead)

    def _train_one(self, entry: Entry, programs=None, mesh=None) -> train_lib.TrainResult:
        """Trains an entry's candidate (thread-safe: reads the entry, changes nothing), with its
        programs when they were compiled ahead, on its candidate group's mesh with groups."""
        return self.trainer(entry.architecture, self.skeleton,
                            candidate_key(self.settings.seed, entry.hash), programs=programs,
                            mesh=mesh)

    def _entry_of(self, entry: Entry, result: train_lib.TrainResult) -> Entry:
        """The entry with `result` (a result without a finite accuracy counts as failed)."""
        metric = self.settings.search.accuracy_metric
        accuracy, status, message = getattr(result, metric), result.status, result.message
        if status == "ok" and (accuracy is None or not math.isfinite(accuracy)):
            status = "failed"
            message = f"no {metric} in the training result; {message}".strip("; ")
        return dataclasses.replace(
            entry, status=status, accuracy=accuracy if status == "ok" else None,
            final_val_accuracy=result.final_val_accuracy, test_accuracy=result.test_accuracy,
            best_val_epoch=result.best_val_epoch, epochs_done=result.epochs_done,
            train_seconds=result.wall_seconds, compile_seconds=result.compile_seconds,
            images_per_second=result.images_per_second, message=message,
            failure=(result.failure or "error") if status == "failed" else None)

    # ----- packed
    def _template(self, rnd: Round, earlier: Sequence[Round]) -> RoundTemplate:
        """The template of every candidate of the round that trains (not the reused ones):
        the same however much of the round a previous run finished."""
        archs = [e.architecture for e in rnd.entries
                 if e.reused_from_round is None and not (
                     not e.trained and previous_result(earlier, e.hash, self.settings))]
        return RoundTemplate.from_architectures(archs, self.skeleton)

    def _packed_steps(self, rnd: Round, earlier: Sequence[Round]) -> Iterator[Step]:
        """Trains the pending candidates in packs of the round's pack size, yielding each
        pack's results together (a killed run trains the pack in flight again, the same pack,
        since the packs are cut from the pending candidates in order)."""
        entries = rnd.entries
        pending = [i for i, e in enumerate(entries) if not e.trained]
        bar = progress_bar(len(entries), len(entries) - len(pending),
                           f"round {rnd.round} ({rnd.mode}, packed)", self.show_progress)
        template = self._template(rnd, earlier)
        try:
            to_train = []
            for i in pending:  # results met in earlier rounds first
                previous = previous_result(earlier, entries[i].hash, self.settings)
                if previous is None:
                    to_train.append(i)
                    continue
                rnd = recorded(rnd, i, reused_entry(entries[i], *previous), self.settings)
                log_entry(rnd, i, rnd.entries[i])
                bar.update(1)
                yield Step(rnd)
            programs = None
            while to_train:
                size = rnd.packing.pack_size
                chunk = to_train[:size]
                archs = [entries[i].architecture for i in chunk]
                keys = [candidate_key(self.settings.seed, entries[i].hash) for i in chunk]
                compile_seconds = 0.0
                try:
                    if programs is None or programs.pack_size != size:
                        programs = self.trainer.compile_pack(template, size,
                                                             rnd.packing.selection)
                        compile_seconds = programs.compile_seconds
                except Exception as e:  # recorded, search goes on
                    results = [train_lib.failed_result(e, time.perf_counter()) for _ in chunk]
                else:
                    if programs.pack_size != size:  # sized down to the device's memory
                        rnd = _with_pack_size(rnd, programs.pack_size)
                        yield Step(rnd)
                        continue
                    results = self.trainer.train_pack(archs, self.skeleton, keys, programs)
                    share = compile_seconds / len(chunk)  # the round's compile, on its 1st pack
                    results = [dataclasses.replace(r, compile_seconds=share,
                                                   wall_seconds=r.wall_seconds + share)
                               for r in results]
                distributed.sync_processes(f"round {rnd.round} pack {chunk}")
                if size > 1 and all(r.failure == "out_of_memory" for r in results):
                    logging.warning("a pack of %d ran out of device memory: packs of %d from "
                                    "now on", size, size // 2)
                    rnd = _with_pack_size(rnd, size // 2)  # back off; the same candidates again
                    yield Step(rnd)
                    continue
                for i, result in zip(chunk, results):
                    rnd = recorded(rnd, i, self._entry_of(entries[i], result), self.settings)
                for i in chunk:
                    log_entry(rnd, i, rnd.entries[i])
                    bar.update(1)
                yield Step(rnd, tuple(results))  # the pack's results together
                to_train = to_train[len(chunk):]
        finally:
            bar.close()


def _with_pack_size(rnd: Round, size: int) -> Round:
    return dataclasses.replace(rnd, packing=dataclasses.replace(rnd.packing, pack_size=size))


def recorded(rnd: Round, index: int, entry: Entry, settings: SearchSettings) -> Round:
    """The round with entry `index` recorded, with its reward when the round's reference is
    known (rounds >= 1: the base)."""
    if rnd.base is not None:
        entry = with_reward(entry, round_reference(rnd), settings.reward)
    return rnd.with_entry(index, entry)


def previous_result(earlier: Sequence[Round], arch_hash: str, settings: SearchSettings
                    ) -> tuple[int, Entry] | None:
    """(round, entry) of the first result of this architecture in the `earlier` rounds, when
    `search.reuse_trained`."""
    if not settings.search.reuse_trained:
        return None
    for rnd in earlier:
        for e in rnd.entries:
            if e.hash == arch_hash and e.trained:
                return rnd.round, e
    return None


_COPIED_FIELDS = ("status", "accuracy", "final_val_accuracy", "test_accuracy", "best_val_epoch",
                  "epochs_done", "message", "failure")


def reused_entry(entry: Entry, round_index: int, source: Entry) -> Entry:
    """The entry with the result its architecture got in round `round_index`."""
    return dataclasses.replace(
        entry, **{k: getattr(source, k) for k in _COPIED_FIELDS}, train_seconds=0.0,
        compile_seconds=0.0, images_per_second=0.0,
        reused_from_round=(source.reused_from_round if source.reused_from_round is not None
                           else round_index))
