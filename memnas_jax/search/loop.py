"""The round state machine: `run_search(config, workdir) -> SearchResult` and `run_experiment`
(the package docstring describes a round and exact resume)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from memnas_jax import data as data_lib
from memnas_jax import distributed, preemption
from memnas_jax import train as train_lib
from memnas_jax.errors import ConfigError
from memnas_jax.io import atomic_write
from memnas_jax.memory import memory_report
from memnas_jax.search import reports
from memnas_jax.search.config import ConfigMismatchError, config_diff, config_fingerprint, to_plain
from memnas_jax.search.fitting import ControllerFitter
from memnas_jax.search.policy import plan_round, planned_candidates, select_winner, stop_reason
from memnas_jax.search.progress import duration_text, log_round
from memnas_jax.search.settings import SearchSettings
from memnas_jax.search.state import (
    CONFIG_FILE,
    Base,
    Entry,
    Round,
    SearchResult,
    SearchState,
    load_state,
    save_state,
    search_result,
)
from memnas_jax.search.trainer import CandidateTrainer, Trainer, TrainFn, as_trainer
from memnas_jax.search.training import RoundTrainer
from memnas_jax.space import Skeleton
from memnas_jax.workdir_lock import WorkdirLock, prepare_workdir

# Called after every save of the state: (the state, whether a round just ended). The reports
# (tables after every candidate; plots and TensorBoard at round ends) are one such hook.
UpdateHook = Callable[[SearchState, bool], None]


ESTIMATE_AFTER = 3  # candidates trained in this process before the duration is estimated
OOM_STOP = "candidates in a row ran out of accelerator memory"


@dataclasses.dataclass
class _Search:
    """The mutable run of one search (kept private: `run_search` is the API). It alone replaces
    the search state; its collaborators (`RoundTrainer`, `ControllerFitter`) take what they
    need and return what they produce."""

    settings: SearchSettings
    workdir: pathlib.Path
    state: SearchState  # replaced, never edited, at each step
    skeleton: Skeleton
    round_trainer: RoundTrainer
    fitter: ControllerFitter
    writer: bool
    on_save: tuple[UpdateHook, ...] = ()  # after each save: (state, round ended)
    seconds_trained: list = dataclasses.field(default_factory=list)  # this process's candidates
    run_start: float = dataclasses.field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0  # wall seconds of the earlier runs of this search

    # ----- persistence
    def save(self, plots: bool = False) -> None:
        """Saves the state (process 0) and calls the update hooks; `plots`: a round ended."""
        self.state = dataclasses.replace(self.state, elapsed_seconds=self.elapsed_seconds())
        if not self.writer:
            return
        save_state(self.state, self.workdir)
        for hook in self.on_save:
            hook(self.state, plots)

    @property
    def current_round(self) -> Round:
        return self.state.rounds[-1]

    def set_round(self, rnd: Round) -> None:
        self.state = self.state.with_round(rnd)

    # ----- one round
    def log_plan(self) -> None:
        """The whole run's plan and, once a few candidates have trained here, its duration."""
        counts = planned_candidates(self.state, self.settings)
        trained = len(self.state.trained_entries())
        remaining = max(sum(counts) - trained, 0)
        text = (f"plan: up to {len(counts)} rounds, about {sum(counts)} candidates "
                f"({', '.join(str(c) for c in counts)}) x {self.settings.train.epochs} epochs; "
                f"{remaining} to go")
        if self.seconds_trained:
            per = float(np.mean(self.seconds_trained))
            text += (f"; at {per:.1f} s per candidate so far, about "
                     f"{duration_text(per * remaining)} more (later rounds train larger networks: "
                     "expect more; the round cap and the stopping rules may end it sooner)")
        logging.info("%s", text)

    def finish(self, reason: str) -> None:
        self.state = dataclasses.replace(self.state, status="finished", stop_reason=reason)
        logging.info("search finished: %s", reason)
        self.save(plots=True)

    def elapsed_seconds(self) -> float:
        """Wall time spent on this search, all runs and resumes together."""
        return self.elapsed_before + time.perf_counter() - self.run_start

    def over_time_budget(self) -> bool:
        """Whether `search.time_budget_minutes` is spent (process 0's clock decides for all)."""
        budget = self.settings.search.time_budget_seconds
        over = np.asarray(budget > 0 and self.elapsed_seconds() >= budget)
        return bool(distributed.same_on_all_processes(over))

    def run(self) -> None:
        settings = self.settings
        while not self.state.finished:
            rounds = self.state.rounds
            if rounds and rounds[-1].phase == "done" and self.over_time_budget():
                # Between rounds, the controller fitted: a larger budget resumes exactly here.
                self.finish(f"{TIME_BUDGET_STOP} ({settings.search.time_budget_minutes:g} minutes)"
                            f" after round {rounds[-1].round}, "
                            f"{self.elapsed_seconds() / 60:.1f} minutes in")
                break
            if not rounds or rounds[-1].phase == "done":
                self.plan_next_round()
            if self.current_round.phase == "training":
                self.train_pending()
                reason = self.out_of_memory_stop()
                if reason:  # the round stays in training: a rerun with a smaller batch goes on
                    self.finish(reason)
                    break
                self.set_round(select_winner(self.current_round, settings))
                log_round(self.current_round)
                self.save()
            rnd = self.current_round
            reason = stop_reason(self.state, settings)
            # The controller is first fitted after the last fully trained round (nothing uses
            # it before), then refitted after every round, warm-started; never when the
            # rounds are ranked at random (the random-search control).
            if (reason is None and rnd.phase == "selected"
                    and settings.search.ranking == "controller"
                    and rnd.round + 1 >= settings.search.full_train_rounds):
                self.state = self.fitter.fit(self.state, rnd.round)
            self.set_round(dataclasses.replace(self.current_round, phase="done"))
            if reason is not None:
                self.finish(reason)
            else:
                self.save(plots=True)

    def train_pending(self) -> None:
        """Trains the current round's pending candidates, recording and saving each step."""
        if not self.seconds_trained:
            self.log_plan()
        if not self.current_round.packing_decided:
            self.set_round(self.round_trainer.decide_packing(self.current_round))
            self.save()
        steps = self.round_trainer.steps(self.current_round, self.state.rounds[:-1])
        try:
            for step in steps:
                self.set_round(step.round)
                for result in step.trained:
                    self.state = dataclasses.replace(self.state,
                                                     num_trained=self.state.num_trained + 1)
                    self.seconds_trained.append(result.wall_seconds)
                    if len(self.seconds_trained) == ESTIMATE_AFTER:
                        self.log_plan()
                self.save()
                if step.trained and self.out_of_memory_stop():
                    return
                preemption.check()  # between candidates: the state is saved
        finally:
            steps.close()

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

    def plan_next_round(self) -> None:
        rounds, settings = self.state.rounds, self.settings
        r = len(rounds)
        base = Base.of(rounds[-1].winner_entry, rounds[-1].round) if rounds else None
        controller_state = None
        if r >= settings.search.full_train_rounds and settings.search.ranking == "controller":
            controller_state, self.state = self.fitter.latest(self.state)
        rnd = plan_round(r, base, settings, self.skeleton, controller_state,
                         self.state.controller.round if controller_state else None)
        self.set_round(rnd)
        logging.info("round %d: %d candidates generated, %d over the memory budget, "
                     "%d to train (%s)", r, rnd.num_generated, rnd.num_over_budget,
                     len(rnd.entries), rnd.mode)
        self.save()


TIME_BUDGET_STOP = "time budget reached"


def _reopen_if_stopped_for_a_retry(state: SearchState, settings: SearchSettings
                                   ) -> SearchState:
    """A finished search that stopped for a reason a rerun can lift runs on: its time budget
    (when the budget is now larger or off), or out-of-memory failures (their candidates of the
    round in flight train again, with the rerun's settings)."""
    reason, budget = str(state.stop_reason), settings.search.time_budget_seconds
    if reason.startswith(TIME_BUDGET_STOP):
        if budget and budget <= state.elapsed_seconds:
            return state
        logging.info("the search stopped on its time budget; continuing it with %s",
                     f"{budget / 60:g} minutes" if budget else "no budget")
    elif OOM_STOP in reason:
        rnd = state.rounds[-1]
        retry = [i for i, e in enumerate(rnd.entries) if e.failure == "out_of_memory"]
        for i in retry:
            rnd = rnd.with_entry(i, rnd.entries[i].untrained())
        state = dataclasses.replace(state.with_round(rnd),
                                    num_trained=state.num_trained - len(retry))
        logging.info("the search stopped on out-of-memory failures: training its %d "
                     "candidates again", len(retry))
    else:
        return state
    return dataclasses.replace(state, status="running", stop_reason=None)


def _with_both_memory_figures(state: SearchState, skeleton: Skeleton) -> SearchState:
    """Entries of a state written before they kept both memory figures get them (paper and
    deployed working memory: pure functions of the architecture and the skeleton)."""
    def filled(entry: Entry) -> Entry:
        if entry.working_bytes_deployed is not None:
            return entry
        report = memory_report(entry.architecture, skeleton)
        return dataclasses.replace(entry, working_bytes_paper=report.working_bytes_paper,
                                   working_bytes_deployed=report.working_bytes_deployed)
    return dataclasses.replace(state, rounds=tuple(
        dataclasses.replace(rnd, entries=tuple(filled(e) for e in rnd.entries))
        for rnd in state.rounds))


def _summary(settings: SearchSettings, skeleton: Skeleton) -> dict:
    """The few settings the leaderboard states."""
    s = settings.search
    return {"lambda": settings.reward.lam,
            "memory budget MB": settings.memory.budget_mb or "none",
            "widths": list(skeleton.widths), "rounds cap": s.max_rounds,
            "cells cap": s.max_cells, "top-K": s.top_k, "dataset": settings.data.name,
            "epochs": settings.train.epochs, "seed": settings.seed}


def run_search(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
               train_fn: Trainer | TrainFn | None = None,
               on_update: Sequence[UpdateHook] = ()
               ) -> SearchResult:
    """Runs (or resumes) the MemNAS search of `config` in `workdir` and returns its answer.

    train_fn replaces candidate training (default: `CandidateTrainer`, `train.train_candidate`
    with `config.train` on `config.data`): a `Trainer` (search/trainer.py: its abilities to
    compile ahead and to train packs declared), or a plain function
    train_fn(architecture, skeleton, key) -> `train.TrainResult`, called with `mesh=` (the
    data mesh of the candidate's device group) when `parallel.candidate_groups` > 1.
    on_update: hooks `hook(state, round_ended)` called (in process 0) after each save of the
    `SearchState`, after the reports of the work directory are written.
    Raises ConfigMismatchError when `workdir` holds a search made with another config (unless
    `config.resume_with_changed_config`), StateError when its state files are unreadable,
    WorkdirLockedError when another live process runs a search there (all `UserError`s).
    """
    settings = SearchSettings.from_config(config)
    workdir = pathlib.Path(workdir).absolute()
    writer = jax.process_index() == 0
    if not writer:
        return _run_search(config, settings, workdir, writer, train_fn, on_update)
    prepare_workdir(workdir)
    with WorkdirLock(workdir, "search"):  # one owner: a second search here is refused
        return _run_search(config, settings, workdir, writer, train_fn, on_update)


def _report_writer(workdir: pathlib.Path, settings: SearchSettings) -> UpdateHook:
    out = settings.output

    def write(state: SearchState, round_ended: bool) -> None:
        reports.write_all(state, workdir, plots=round_ended and out.plots,
                          tensorboard=round_ended and out.tensorboard,
                          leaderboard_rows=out.leaderboard_rows)
    return write


def _run_search(config: ml_collections.ConfigDict, settings: SearchSettings,
                workdir: pathlib.Path, writer: bool, train_fn: Trainer | TrainFn | None,
                on_update: Sequence[UpdateHook]) -> SearchResult:
    relevant, config_hash = config_fingerprint(config)
    state = load_state(workdir) if workdir.exists() else None
    if state is not None and state.config_hash != config_hash:
        diff = config_diff(state.config, relevant)
        if not settings.run.resume_with_changed_config:
            raise ConfigMismatchError(
                f"{workdir} holds a search made with a different config ({diff}). Use another "
                "--workdir, or pass --allow_config_change (config.resume_with_changed_config "
                "= True) to resume it with the new settings.")
        logging.warning("resuming %s with a changed config: %s", workdir, diff)
        state = dataclasses.replace(state, config=relevant, config_hash=config_hash,
                                    config_changes=(*state.config_changes, diff))
    dataset = data_lib.load_dataset(settings.data)
    if not settings.search.evaluate_test:
        dataset = dataclasses.replace(dataset, test=None)
    if settings.search.accuracy_metric != "test_accuracy" and dataset.validation is None:
        raise ConfigError(f"dataset {dataset.name!r} has no validation split to select "
                         "candidates on: set config.data.validation_size > 0")
    skeleton = train_lib.skeleton_from_config(settings.skeleton, dataset)
    if state is None:
        state = SearchState(config=relevant, config_hash=config_hash)
        logging.info("new search in %s: %s; %s", workdir, dataset.describe(), skeleton)
    else:
        logging.info("resuming the search in %s at round %d (%d candidates trained)", workdir,
                     len(state.rounds) - 1, state.num_trained)
    state = dataclasses.replace(_with_both_memory_figures(state, skeleton),
                                summary=_summary(settings, skeleton))
    if writer:
        atomic_write(workdir / CONFIG_FILE,
                     json.dumps(to_plain(config), indent=1, sort_keys=True) + "\n")
    if state.finished:
        state = _reopen_if_stopped_for_a_retry(state, settings)
    trainer = as_trainer(train_fn) if train_fn is not None else CandidateTrainer(
        settings, dataset, workdir)
    search = _Search(settings, workdir, state, skeleton,
                     RoundTrainer(settings, skeleton, trainer,
                                  show_progress=writer and settings.output.progress_bar),
                     ControllerFitter(settings, skeleton, workdir, writer), writer,
                     on_save=(_report_writer(workdir, settings), *on_update),
                     elapsed_before=state.elapsed_seconds)
    if state.finished:
        search.save(plots=True)  # regenerate the outputs, nothing to run
    else:
        search.run()
    return search_result(search.state, workdir)
