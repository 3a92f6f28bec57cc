"""Training a round's candidates: standalone (one at a time, compiled ahead, or in candidate
groups) or packed (`memnas_jax.packed`), recording each result in the round and saving.

`RoundTraining` is the part of the search run (`loop._Search`) that does this; it reads the run's
`settings`, `state`, `skeleton`, `train_fn` and `writer`, replaces its `state` with each result and
calls its `save`."""

from __future__ import annotations

import dataclasses
import math
import time

import jax
from absl import logging

from memnas_jax import candidate_parallel, distributed, preemption
from memnas_jax import packed as packed_lib
from memnas_jax import train as train_lib
from memnas_jax.compile_ahead import CompileAhead, resolve_depth
from memnas_jax.errors import ConfigError
from memnas_jax.search.policy import round_reference, with_reward
from memnas_jax.search.progress import log_entry, progress_bar
from memnas_jax.search.seeds import candidate_key
from memnas_jax.search.state import Entry, Packing, Round
from memnas_jax.search.trainer import AUTO_MAX_PACK
from memnas_jax.template import RoundTemplate

ESTIMATE_AFTER = 3  # candidates trained in this process before the duration is estimated
OOM_STOP = "candidates in a row ran out of accelerator memory"

# Backends where packing = "auto" packs. Empty: packing has been measured faster than
# compile-ahead standalone training on none (on a CPU it runs every alternative's FLOPs:
# docs/performance.md; on a GPU it is not measured yet). Add a backend with its measurement.
PACKING_WINS_ON: tuple[str, ...] = ()


class RoundTraining:
    """Mixin of `loop._Search`: a round's candidates trained and recorded."""

    @property
    def current_round(self) -> Round:
        return self.state.rounds[-1]

    def set_round(self, rnd: Round) -> None:
        self.state = self.state.with_round(rnd)

    def set_entry(self, index: int, entry: Entry) -> None:
        """Records the current round's entry `index`, with its reward when the round's
        reference is known (rounds >= 1: the base)."""
        rnd = self.current_round
        if rnd.base is not None:
            entry = with_reward(entry, round_reference(rnd), self.settings.reward)
        self.set_round(rnd.with_entry(index, entry))

    def train_pending(self) -> None:
        if not self.seconds_trained:
            self.log_plan()
        if self.round_packing() is not None:
            self.train_pending_packed()
            return
        rnd = self.current_round
        bar = progress_bar(len(rnd.entries), rnd.num_trained, f"round {rnd.round} ({rnd.mode})",
                           self.writer and self.settings.output.progress_bar)
        # With candidate groups, G pending candidates train at once (candidate_parallel); each
        # result is what training it alone gives, so the state after each save is the same as
        # in a one-by-one run and a resume stays exact.
        groups = self.settings.parallel.candidate_groups
        entries = rnd.entries
        pending = [i for i, e in enumerate(entries) if not e.trained]
        previous = {i: self.previous_result(entries[i].hash, rnd.round) for i in pending}
        ahead = CompileAhead(lambda i: self.train_fn.compile(entries[i].architecture,
                                                             self.skeleton),
                             [i for i in pending if previous[i] is None],
                             self.compile_ahead_depth())
        try:
            for start in range(0, len(pending), groups):
                chunk = pending[start:start + groups]
                to_train = [i for i in chunk if previous[i] is None]
                results = dict(zip(to_train, candidate_parallel.map_on_device_groups(
                    lambda i, mesh: self.train_result(entries[i], ahead.take(i),
                                                      mesh if groups > 1 else None),
                    to_train, groups)))
                # Multi-process: all processes finished these candidates (raises if one died,
                # before any of its collective failures is recorded as a failed candidate).
                distributed.sync_processes(f"round {rnd.round} candidates {chunk}")
                for i in chunk:
                    if previous[i] is not None:
                        self.set_entry(i, reused_entry(entries[i], *previous[i]))
                    else:
                        self.set_entry(i, self.recorded_entry(entries[i], results[i]))
                        self.count_trained(results[i])
                        if self.out_of_memory_stop():
                            return
                        if len(self.seconds_trained) == ESTIMATE_AFTER:
                            self.log_plan()
                    self.save()
                    log_entry(rnd, i, self.current_round.entries[i])
                    bar.update(1)
                    preemption.check()  # between candidates: the state is saved
                ok = [e.accuracy for e in self.current_round.entries if e.ok]
                if ok:
                    bar.set_postfix(best_acc=f"{100 * max(ok):.2f}%")
        finally:
            ahead.close()
            bar.close()

    def count_trained(self, result: train_lib.TrainResult) -> None:
        self.state = dataclasses.replace(self.state, num_trained=self.state.num_trained + 1)
        self.seconds_trained.append(result.wall_seconds)

    # ----- packed training
    def round_packing(self) -> Packing | None:
        """How the current round trains: its `Packing`, or None standalone. Decided when the
        round first trains and recorded there, so a resume keeps it. A round that trained
        candidates without a record (a work directory from before packing) goes on standalone,
        so one round never mixes the two."""
        rnd = self.current_round
        if not rnd.packing_decided:
            started = any(e.trained and e.reused_from_round is None for e in rnd.entries)
            self.set_round(dataclasses.replace(
                rnd, packing=None if started else self.resolve_packing(rnd),
                packing_decided=True))
            self.save()
        return self.current_round.packing

    def resolve_packing(self, rnd: Round) -> Packing | None:
        p = self.settings.parallel
        mode, pack_size, selection = p.packing, p.pack_size, p.pack_selection
        if mode == "standalone":
            return None
        why_not = (self.train_fn.why_not_packed() if hasattr(self.train_fn, "why_not_packed")
                   else "the search's train_fn trains one candidate at a time")
        if why_not is None and p.candidate_groups > 1:
            why_not = "parallel.candidate_groups > 1"
        if why_not is not None:
            if mode == "packed":
                raise ConfigError(f"config.parallel.packing = 'packed', but {why_not}: use "
                                  "packing = 'standalone' (or 'auto')")
            return None
        on_cpu = jax.default_backend() == "cpu"
        if mode == "auto" and jax.default_backend() not in PACKING_WINS_ON:
            return None  # standalone until a measurement shows packing winning (PACKING_WINS_ON)
        count = sum(e.reused_from_round is None for e in rnd.entries)
        size = pack_size or (1 if on_cpu else min(AUTO_MAX_PACK, max(count, 1)))
        return Packing(pack_size=size, selection=packed_lib.resolve_selection(selection, size))

    def round_template(self, rnd: Round) -> RoundTemplate:
        """The template of every candidate of the round that trains (not the reused ones):
        the same however much of the round a previous run finished."""
        archs = [e.architecture for e in rnd.entries
                 if e.reused_from_round is None and not (
                     not e.trained and self.previous_result(e.hash, rnd.round))]
        return RoundTemplate.from_architectures(archs, self.skeleton)

    def set_pack_size(self, size: int) -> None:
        rnd = self.current_round
        self.set_round(dataclasses.replace(
            rnd, packing=dataclasses.replace(rnd.packing, pack_size=size)))
        self.save()

    def train_pending_packed(self) -> None:
        """Trains the current round's pending candidates in packs of its pack size, saving each
        pack's results together (a killed run trains the pack in flight again, the same pack,
        since the packs are cut from the pending candidates in order)."""
        rnd = self.current_round
        entries = rnd.entries
        pending = [i for i, e in enumerate(entries) if not e.trained]
        bar = progress_bar(len(entries), len(entries) - len(pending),
                           f"round {rnd.round} ({rnd.mode}, packed)",
                           self.writer and self.settings.output.progress_bar)
        template = self.round_template(rnd)

        def finish_entry(i: int) -> None:
            log_entry(rnd, i, self.current_round.entries[i])
            bar.update(1)

        try:
            to_train = []
            for i in pending:  # results met in earlier rounds first
                previous = self.previous_result(entries[i].hash, rnd.round)
                if previous is None:
                    to_train.append(i)
                    continue
                self.set_entry(i, reused_entry(entries[i], *previous))
                self.save()
                finish_entry(i)
            programs = None
            while to_train:
                packing = self.current_round.packing
                size = packing.pack_size
                chunk = to_train[:size]
                archs = [entries[i].architecture for i in chunk]
                keys = [candidate_key(self.settings.seed, entries[i].hash) for i in chunk]
                compile_seconds = 0.0
                try:
                    if programs is None or programs.pack_size != size:
                        programs = self.train_fn.compile_pack(template, size, packing.selection)
                        compile_seconds = programs.compile_seconds
                except Exception as e:  # recorded, search goes on
                    results = [train_lib.failed_result(e, time.perf_counter()) for _ in chunk]
                else:
                    if programs.pack_size != size:  # sized down to the device's memory
                        self.set_pack_size(programs.pack_size)
                        continue
                    results = self.train_fn.train_pack(archs, self.skeleton, keys, programs)
                    share = compile_seconds / len(chunk)  # the round's compile, on its 1st pack
                    results = [dataclasses.replace(r, compile_seconds=share,
                                                   wall_seconds=r.wall_seconds + share)
                               for r in results]
                distributed.sync_processes(f"round {rnd.round} pack {chunk}")
                if size > 1 and all(r.failure == "out_of_memory" for r in results):
                    logging.warning("a pack of %d ran out of device memory: packs of %d from "
                                    "now on", size, size // 2)
                    self.set_pack_size(size // 2)  # back off; the same candidates again
                    continue
                for i, result in zip(chunk, results):
                    self.set_entry(i, self.recorded_entry(entries[i], result))
                    self.count_trained(result)
                self.save()  # the pack's results together
                for i in chunk:
                    finish_entry(i)
                to_train = to_train[len(chunk):]
                if self.out_of_memory_stop():
                    return
                preemption.check()
        finally:
            bar.close()

    def out_of_memory_stop(self) -> str | None:
        """Why to stop when the last `search.max_consecutive_oom` trained candidates all ran
        out of device memory (counted over the state, so a resume keeps the streak)."""
        limit = self.settings.search.max_consecutive_oom
        streak = 0
        for _, entry in self.state.trained_entries():
            if entry.reused_from_round is not None:
                continue
            streak = streak + 1 if entry.failure == "out_of_memory" else 0
        if not limit or streak < limit:
            return None
        return (f"{streak} {OOM_STOP}: the setting, not "
                "the candidates, is too large for the device. Try a smaller train.batch_size, "
                "a memory.budget_mb, fewer parallel.candidate_groups or parallel.compile_ahead "
                "(compiled programs wait in memory); then rerun the same command with "
                "--allow_config_change")

    def compile_ahead_depth(self) -> int:
        """Candidates to compile ahead: with one candidate group and a trainer that can compile
        (candidate groups overlap their compiles already)."""
        if self.settings.parallel.candidate_groups > 1 or not hasattr(self.train_fn, "compile"):
            return 0
        return resolve_depth(self.settings.parallel.compile_ahead)

    def previous_result(self, arch_hash: str, round_index: int) -> tuple[int, Entry] | None:
        """(round, entry) of the first earlier result of this architecture, when
        `search.reuse_trained`."""
        if not self.settings.search.reuse_trained:
            return None
        for rnd in self.state.rounds[:round_index]:
            for e in rnd.entries:
                if e.hash == arch_hash and e.trained:
                    return rnd.round, e
        return None

    def train_result(self, entry: Entry, programs=None, mesh=None) -> train_lib.TrainResult:
        """Trains an entry's candidate (thread-safe: reads the entry, changes nothing), with its
        programs when they were compiled ahead, on its candidate group's mesh with groups."""
        extra = {k: v for k, v in dict(programs=programs, mesh=mesh).items() if v is not None}
        return self.train_fn(entry.architecture, self.skeleton,
                             candidate_key(self.settings.seed, entry.hash), **extra)

    def recorded_entry(self, entry: Entry, result: train_lib.TrainResult) -> Entry:
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
            failure=(getattr(result, "failure", "") or "error") if status == "failed" else None)


_COPIED_FIELDS = ("status", "accuracy", "final_val_accuracy", "test_accuracy", "best_val_epoch",
                  "epochs_done", "message", "failure")


def reused_entry(entry: Entry, round_index: int, source: Entry) -> Entry:
    """The entry with the result its architecture got in round `round_index`."""
    return dataclasses.replace(
        entry, **{k: getattr(source, k) for k in _COPIED_FIELDS}, train_seconds=0.0,
        compile_seconds=0.0, images_per_second=0.0,
        reused_from_round=(source.reused_from_round if source.reused_from_round is not None
                           else round_index))
