"""The controller's fits during a search: refitted after each round on every successful
candidate so far, warm-started, saved per round, restored (or refitted) after a resume.

`ControllerFitter` is a collaborator of the search loop: it takes the search state and returns
the state with the fit recorded; it keeps only the newest fitted controller in memory."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

import numpy as np
from absl import logging

from memnas_jax import controller as controller_lib
from memnas_jax import distributed
from memnas_jax.search.settings import SearchSettings
from memnas_jax.search.state import ControllerFit, ControllerRef, SearchState
from memnas_jax.space import Skeleton

CONTROLLER_DIR = "controller"


@dataclasses.dataclass
class ControllerFitter:
    """Fits, saves and restores the search's controller."""

    settings: SearchSettings
    skeleton: Skeleton
    workdir: pathlib.Path
    writer: bool  # process 0 saves the fits
    fitted: controller_lib.ControllerState | None = None  # the newest fit in memory
    fitted_round: int | None = None

    def latest(self, state: SearchState
               ) -> tuple[controller_lib.ControllerState | None, SearchState]:
        """The controller of the state's newest fit: in memory, else read from the work
        directory (after a resume); an unreadable one is refitted from scratch, with a warning,
        and the state returned records that fit."""
        info = state.controller
        if info is None:
            return None, state
        if self.fitted_round != info.round:
            try:
                self.fitted = controller_lib.restore(self.workdir / info.path)
                self.fitted_round = info.round
            except (OSError, ValueError) as e:
                logging.warning("controller of round %d unreadable (%s): refitting it on the "
                                "candidates so far, without its warm start", info.round, e)
                state = self.fit(state, info.round, warm_start=False)
        return self.fitted, state

    def fit(self, state: SearchState, round_index: int, warm_start: bool = True
            ) -> SearchState:
        """Refits the controller on every successful candidate of the rounds up to
        `round_index`, warm-started from the previous fit; the state with the fit recorded."""
        target = self.settings.search.controller_target
        tokens, targets, groups = [], [], []
        for r in state.rounds[:round_index + 1]:
            for e in r.entries:
                if e.ok and e.reward is not None:
                    tokens.append(e.architecture.to_tokens())
                    targets.append(e.reward if target == "reward" else e.accuracy)
                    groups.append(r.round if target == "reward" else 0)
        if len(tokens) < 2:
            logging.warning("round %d: %d successful candidates so far, too few to fit the "
                            "controller", round_index, len(tokens))
            return state
        init = None
        if warm_start:
            init, state = self.latest(state)
        start = time.perf_counter()
        fitted = controller_lib.fit(
            tokens, np.asarray(targets), np.asarray(groups), init_state=init,
            config=self.settings.controller_config(round_index, self.skeleton.num_blocks))
        # Every process fits the same controller; process 0's copy is the one all use, so a
        # last-bit difference between hosts (GPU atomics) cannot make them plan different rounds.
        fitted = dataclasses.replace(fitted, params=distributed.same_on_all_processes(
            fitted.params))
        path = pathlib.Path(CONTROLLER_DIR) / f"round_{round_index:03d}"
        if self.writer:
            controller_lib.save(fitted, self.workdir / path, overwrite=True)
        holdout_tau = fitted.holdout_tau if math.isfinite(fitted.holdout_tau) else None
        fit = ControllerFit(num_candidates=len(tokens), steps=fitted.steps,
                            seconds=time.perf_counter() - start)
        state = state.with_round(dataclasses.replace(
            state.rounds[round_index], controller_fit=fit, controller_holdout_tau=holdout_tau))
        state = dataclasses.replace(state, controller=ControllerRef(round_index, str(path)))
        self.fitted, self.fitted_round = fitted, round_index
        logging.info("round %d: controller fitted on %d candidates in %.1f s (%d steps, "
                     "held-out Kendall tau %s)", round_index, len(tokens),
                     time.perf_counter() - start, fitted.steps,
                     "n/a" if holdout_tau is None else f"{holdout_tau:+.3f}")
        return state
