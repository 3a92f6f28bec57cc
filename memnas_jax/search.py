"""The MemNAS search loop with exact resume: `run_search(config, workdir) -> SearchResult`.

One round (DESIGN.md sections 1, 6, 7; memnas_method.md 2.2):

1. generate: round 0 the single-cell networks (`grow_trim.initial_candidates`), later rounds every
   grow / trim of the base (`grow_trim.generate_candidates`);
2. drop the candidates over the memory budget (`config.memory.budget_mb`, total = parameter +
   working memory from `memory.memory_report`) before anything is compiled;
3. choose what to train: in the first `search.full_train_rounds` rounds every candidate (or, past
   `search.full_train_cap`, a seeded sample of that many); later the controller's top
   `search.top_k` of all remaining candidates (a seeded sample of that many while no controller
   could be fitted yet);
4. train them one by one (`train.train_candidate`), the next candidates' programs compiling in
   background threads meanwhile (`memnas_jax.compile_ahead`, `parallel.compile_ahead`) and every
   compiled program kept in the persistent compilation cache (`train.compilation_cache_dir`,
   default <workdir>/xla_cache); a failed or diverged candidate is recorded and the search goes
   on;
5. select: the reward (`reward.memory_efficient_reward`) of each candidate relative to the round's
   reference, the base network for rounds >= 1. Round 0 has no base: its reference is the median
   accuracy / parameter memory / working memory of the round's trained candidates, and its winner
   is the most accurate candidate (`search.round0_selection = "accuracy"`, as the authors, whose
   round-0 winner net53 was their most accurate) or the best reward against that median
   reference ("median_reward");
6. refit the controller on every trained candidate so far (targets: each candidate's reward
   relative to its own round's reference, or its accuracy; groups = rounds), warm-started from the
   previous round's controller; the winner is the next base. The first fit follows the last
   fully trained round: no round uses a controller before, and that fit sees all their data.

It stops at the round cap (`search.max_rounds` rounds, round 0 included), at the cell cap (the
base has `search.max_cells` cells in every block), when no candidate is within the budget, or when
no candidate of a round has a reward > 0 against its base (`search.stop_when_no_improvement`).
The answer is the last round winner.

Exact resume. Every random choice is a pure function of the config seed, the round and the
candidate hash (`derive_seed`): a candidate trains with the key of (seed, its hash), wherever and
whenever it is trained; capped rounds sample by the hashes; the controller of round r is seeded by
(seed, r). The state (each round's base, its training plan with every candidate's status and
results, the controller's location, the config and its hash) is rewritten atomically after every
trained candidate (`state.json`, the previous copy kept as `state.prev.json`); the controller
parameters are saved per round with `controller.save`. Rerunning the same command resumes; a run
killed at any moment and resumed trains the same candidates with the same results and ends on the
same architecture as an uninterrupted one, losing at most the candidate in flight.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shlex
import shutil
import sys
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from memnas_jax import candidate_parallel, distributed, preemption, ranking, reports
from memnas_jax import controller as controller_lib
from memnas_jax import data as data_lib
from memnas_jax import packed as packed_lib
from memnas_jax import train as train_lib
from memnas_jax.compile_ahead import CompileAhead, resolve_depth
from memnas_jax.encoding import NUM_OPS, Architecture, from_json
from memnas_jax.errors import ConfigError, UserError
from memnas_jax.grow_trim import Candidate, GrowTrimOptions, generate_candidates, initial_candidates
from memnas_jax.io import atomic_write
from memnas_jax.memory import CONVENTIONS, memory_report
from memnas_jax.reward import RewardConfig, memory_efficient_reward
from memnas_jax.space import Skeleton
from memnas_jax.template import RoundTemplate
from memnas_jax.workdir_lock import WorkdirLock, prepare_workdir

STATE_FILE = "state.json"
PREV_STATE_FILE = "state.prev.json"
CONFIG_FILE = "config.json"
CONTROLLER_DIR = "controller"
CANDIDATE_CHECKPOINT_DIR = "candidate_checkpoints"
STATE_FORMAT = "memnas_jax.search_state/v1"
ROUND0_SELECTIONS = ("accuracy", "median_reward")
CONTROLLER_TARGETS = ("reward", "accuracy")
ACCURACY_METRICS = ("best_val_accuracy", "final_val_accuracy", "test_accuracy")
# Config fields that change no result, so a workdir may be resumed with other values.
RUN_ONLY_FIELDS = ("resume_with_changed_config", "preemption_grace_seconds", "output",
                   "data.download",
                   "search.time_budget_minutes", "search.max_consecutive_oom",
                   "train.compilation_cache_dir",
                   "train.eval_compiler_options", "train.host_threads", "parallel",
                   "distributed")
# A reference accuracy of 0 would make the relative accuracy gain undefined.
_MIN_REFERENCE_ACCURACY = 1e-6

TrainFn = Callable[[Architecture, Skeleton, jax.Array], train_lib.TrainResult]


class ConfigMismatchError(UserError, ValueError):
    """The work directory holds a search made with another config."""


class StateError(UserError, RuntimeError):
    """The work directory's state files cannot be read."""


# ---------------------------------------------------------------------------------------------
# Config


def default_config() -> ml_collections.ConfigDict:
    """The authors' CIFAR-10 search as far as known (memnas_method.md 2, 3, 6): 13 rounds, the
    first two fully trained, top-100 from the controller after, lambda 0.5, 150-epoch candidates
    (train.default_config). Presets live in experiments/configs/."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.resume_with_changed_config = False  # resume a workdir made with another config anyway
    c.host_device_count = 0  # > 0: this many XLA CPU devices (set by the experiment mains)
    c.cpu_ynn_fusions = False  # keep XLA:CPU's YNNPACK fusions (~6x slower convs on our CPUs)
    # SIGTERM / Ctrl-C: stop after the current step, save, exit 75; at the latest after this
    c.preemption_grace_seconds = preemption.DEFAULT_GRACE_SECONDS
    trainer = train_lib.default_config()
    c.data = trainer.data
    c.skeleton = trainer.skeleton
    del trainer["data"], trainer["skeleton"]
    trainer.compilation_cache_dir = train_lib.AUTO_CACHE  # <workdir>/xla_cache
    c.train = trainer
    c.grow_trim = ml_collections.ConfigDict(dict(
        round0_combine_modes=("add", "concat"),  # the authors' 98 round-0 networks
        combine_modes=("add",),  # later rounds (the authors' round 2 on)
        growth="all_blocks",  # or "per_block"
        trim_ops=True,
        trim_edges=True,
        ops=tuple(range(NUM_OPS)),
        merge_mirrored_cells=False,
    ))
    c.reward = ml_collections.ConfigDict(dict(lam=0.5, param_weight=0.3, working_weight=0.7))
    c.memory = ml_collections.ConfigDict(dict(
        convention="paper",  # working-memory liveness convention: "paper" or "strict"
        budget_mb=0.0,  # > 0: drop candidates whose total memory exceeds this (1 MB = 1e6 B)
    ))
    c.search = ml_collections.ConfigDict(dict(
        max_rounds=13,  # rounds, round 0 included (the paper's lambda=0.5 search ran 13)
        max_cells=14,  # cell cap per block: stop once the base has it in every block
        full_train_rounds=2,  # rounds that train every candidate (the controller's first data)
        full_train_cap=0,  # > 0: train a seeded sample of at most this many in those rounds
        top_k=100,  # candidates the controller picks for training in later rounds
        round0_selection="accuracy",  # or "median_reward" (module docstring)
        controller_target="reward",  # or "accuracy"
        stop_when_no_improvement=True,
        # Stop when this many candidates in a row ran out of device memory (0 = never): the
        # batch, not the candidates, is too large for the device.
        max_consecutive_oom=5,
        # > 0: stop at the first round boundary after this much wall time (all runs of the
        # search together); rerun with a larger budget to continue exactly where it stopped.
        time_budget_minutes=0.0,
        accuracy_metric="best_val_accuracy",  # or "final_val_accuracy", "test_accuracy"
        evaluate_test=False,  # also evaluate each candidate on the test split
        reuse_trained=True,  # a candidate met again in a later round keeps its results
        candidate_checkpoints=False,  # checkpoint candidates (train.checkpoint_every_epochs)
    ))
    ctrl = controller_lib.ControllerConfig().to_dict()
    del ctrl["seed"], ctrl["vocab_sizes"]  # derived from config.seed / search.max_cells
    c.controller = ml_collections.ConfigDict(ctrl)
    c.output = ml_collections.ConfigDict(dict(
        progress_bar=True, plots=True, tensorboard=True, leaderboard_rows=20))
    # How the work is spread; results do not depend on it (so resuming with other values is fine).
    c.parallel = ml_collections.ConfigDict(dict(
        candidate_groups=1,  # > 1: train this many candidates at once on disjoint device groups
        # Candidates compiled in background threads while one trains (candidate_groups = 1):
        # -1 = auto (compile_ahead.auto_depth: one per 4 host cores, 1 to 4), 0 = off.
        compile_ahead=-1,
        # Train a round's candidates packed into one compiled program (memnas_jax.packed):
        # "auto" (packed on GPU/TPU, standalone on a CPU: README, "Packed training"),
        # "packed" or "standalone". Packed candidates start from other draws of the same
        # initialisers, so the choice is recorded in each round and kept when it resumes.
        packing="auto",
        pack_size=0,  # candidates per pack; 0 = auto (1 on a CPU, else sized to device memory)
        pack_selection="auto",  # "select" (vmap), "switch" (pack size 1) or "auto"
    ))
    c.distributed = distributed.default_config()  # multi-process job layout ("" = auto)
    return c


def _check_choice(value: Any, allowed: Sequence[Any], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"config.{name} = {value!r} is not one of {tuple(allowed)}")


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.{name} must be an integer >= {minimum}, got {value!r}")


def candidate_groups(config: ml_collections.ConfigDict) -> int:
    """config.parallel.candidate_groups (1 in configs made before the field existed)."""
    return (config.get("parallel") or {}).get("candidate_groups", 1)


def compile_ahead(config: ml_collections.ConfigDict) -> int:
    """config.parallel.compile_ahead (0 in configs made before the field existed)."""
    return (config.get("parallel") or {}).get("compile_ahead", 0)


PACKING_MODES = ("auto", "packed", "standalone")


def packing_options(config: ml_collections.ConfigDict) -> tuple[str, int, str]:
    """(packing, pack_size, pack_selection) of config.parallel (standalone in configs made
    before the fields existed)."""
    parallel = config.get("parallel") or {}
    return (parallel.get("packing", "standalone"), parallel.get("pack_size", 0),
            parallel.get("pack_selection", "auto"))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field for settings no search could run with."""
    s = config.search
    for name, minimum in (("max_rounds", 1), ("max_cells", 1), ("full_train_rounds", 0),
                          ("full_train_cap", 0), ("top_k", 1)):
        _check_int(s[name], f"search.{name}", minimum)
    _check_int(config.seed, "seed", 0)
    if not time_budget_seconds(config) >= 0:
        raise ValueError("config.search.time_budget_minutes must be >= 0 (0 = no budget), got "
                         f"{config.search.time_budget_minutes!r}")
    _check_int(candidate_groups(config), "parallel.candidate_groups", 1)
    _check_int(compile_ahead(config), "parallel.compile_ahead", -1)
    mode, pack_size, selection = packing_options(config)
    _check_choice(mode, PACKING_MODES, "parallel.packing")
    _check_int(pack_size, "parallel.pack_size", 0)
    _check_choice(selection, ("auto", *packed_lib.SELECTIONS), "parallel.pack_selection")
    if mode == "packed" and candidate_groups(config) > 1:
        raise ValueError("config.parallel.packing = 'packed' trains one pack on all devices: "
                         "set parallel.candidate_groups = 1, or packing = 'standalone'")
    if selection == "switch" and pack_size > 1:
        raise ValueError("config.parallel.pack_selection = 'switch' runs one candidate at a "
                         "time: set parallel.pack_size = 1 (or 0), or pack_selection = 'select'")
    _check_choice(s.round0_selection, ROUND0_SELECTIONS, "search.round0_selection")
    _check_choice(s.controller_target, CONTROLLER_TARGETS, "search.controller_target")
    _check_choice(s.accuracy_metric, ACCURACY_METRICS, "search.accuracy_metric")
    if s.accuracy_metric == "test_accuracy" and not s.evaluate_test:
        raise ValueError("config.search.accuracy_metric = 'test_accuracy' needs "
                         "config.search.evaluate_test = True")
    _check_choice(config.memory.convention, CONVENTIONS, "memory.convention")
    if not config.memory.budget_mb >= 0:
        raise ValueError(f"config.memory.budget_mb must be >= 0 (0 = no budget), got "
                         f"{config.memory.budget_mb!r}")
    RewardConfig(**config.reward)
    grow_trim_options(config, 0)
    grow_trim_options(config, 1)
    controller_config(config, 0)
    train_lib.check_config(config.train)


def grow_trim_options(config: ml_collections.ConfigDict, round_index: int) -> GrowTrimOptions:
    g = config.grow_trim
    modes = g.round0_combine_modes if round_index == 0 else g.combine_modes
    try:
        return GrowTrimOptions(combine_modes=tuple(modes), growth=g.growth,
                               trim_ops=g.trim_ops, trim_edges=g.trim_edges,
                               max_cells=config.search.max_cells, ops=tuple(g.ops),
                               merge_mirrored_cells=g.merge_mirrored_cells)
    except ValueError as e:
        raise ValueError(f"config.grow_trim: {e}") from None


def controller_vocab_sizes(num_blocks: int, max_cells: int) -> tuple[int, ...]:
    """Vocabulary of each `Architecture.to_tokens()` field up to the cell cap (fixed, so that a
    warm start never meets a token it has no embedding for): block, position, input1, input2,
    op1, op2 (7 = removed), linked, concat."""
    return (num_blocks, max_cells, max_cells + 1, max_cells + 1, NUM_OPS + 1, NUM_OPS + 1, 2, 2)


def controller_config(config: ml_collections.ConfigDict, round_index: int,
                      num_blocks: int = 5) -> controller_lib.ControllerConfig:
    """The controller settings of the fit after `round_index`, its seed derived from it."""
    values = dict(config.controller.to_dict())
    try:
        return controller_lib.ControllerConfig(
            **values, seed=derive_seed(config.seed, "controller", round_index),
            vocab_sizes=controller_vocab_sizes(num_blocks, config.search.max_cells))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.controller: {e}") from None


def _plain(value: Any) -> Any:
    """JSON-ready copy of a config value (ConfigDicts and tuples become dicts and lists)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_fingerprint(config: ml_collections.ConfigDict) -> tuple[dict, str]:
    """(the config's result-relevant fields flattened, their SHA-256): what a workdir is bound
    to. `RUN_ONLY_FIELDS` (output options, caches) are left out."""
    flat = _flatten(_plain(config))
    relevant = {k: v for k, v in flat.items()
                if not any(k == f or k.startswith(f + ".") for f in RUN_ONLY_FIELDS)}
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return relevant, hashlib.sha256(text.encode()).hexdigest()


def _config_diff(old: dict, new: dict, limit: int = 12) -> str:
    keys = sorted(set(old) | set(new))
    changes = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
               for k in keys if old.get(k, "<absent>") != new.get(k, "<absent>")]
    more = f"; and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(changes[:limit]) + more


# ---------------------------------------------------------------------------------------------
# Seeds


def derive_seed(seed: int, *parts: Any) -> int:
    """A 31-bit integer that is a pure function of the config seed and `parts` (e.g. a tag, a
    round, a candidate hash): the same in every process, run and resume."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def candidate_key(seed: int, arch_hash: str) -> jax.Array:
    """The training key of a candidate: from the seed and its hash only, so the same network
    trains the same way in any round."""
    return jax.random.key(derive_seed(seed, "train", arch_hash))


def seeded_sample(hashes: Sequence[str], count: int, seed: int, round_index: int) -> list[int]:
    """Indices of `count` of the candidates, chosen by a hash of (seed, round, candidate hash)
    (so independent of their order), returned in their original order."""
    if count >= len(hashes):
        return list(range(len(hashes)))
    keys = [hashlib.sha256(f"{seed}/sample/{round_index}/{h}".encode()).hexdigest()
            for h in hashes]
    chosen = sorted(range(len(hashes)), key=lambda i: keys[i])[:count]
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------
# State files


def _dump_state(state: dict) -> str:
    body = json.dumps(state, sort_keys=True, allow_nan=False)
    checksum = hashlib.sha256(body.encode()).hexdigest()
    return json.dumps({"format": STATE_FORMAT, "sha256": checksum, "state": state},
                      sort_keys=True, allow_nan=False)


def _parse_state(text: str) -> dict:
    outer = json.loads(text)
    if not isinstance(outer, dict) or outer.get("format") != STATE_FORMAT:
        raise ValueError(f"not a {STATE_FORMAT} file")
    body = json.dumps(outer["state"], sort_keys=True, allow_nan=False)
    if hashlib.sha256(body.encode()).hexdigest() != outer.get("sha256"):
        raise ValueError("checksum mismatch")
    return outer["state"]


def save_state(state: dict, workdir: pathlib.Path) -> None:
    """Writes state.json atomically, keeping the previous good copy as state.prev.json: a kill
    at any moment leaves at least one of the two complete (a missing state.json falls back to
    state.prev.json)."""
    atomic_write(workdir / STATE_FILE, _dump_state(state), previous=workdir / PREV_STATE_FILE)


def load_state(workdir: pathlib.Path) -> dict | None:
    """The newest readable state of `workdir` (None for a new search). A corrupt state.json is
    reported and state.prev.json used; if neither is readable, StateError."""
    problems = []
    for name in (STATE_FILE, PREV_STATE_FILE):
        path = workdir / name
        if not path.exists():
            continue
        try:
            state = _parse_state(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{path} is unreadable ({type(e).__name__}: {e})")
            logging.error("%s", problems[-1])
            continue
        if problems or name == PREV_STATE_FILE:
            logging.warning("resuming from %s (%s); at most the last trained candidate is "
                            "lost", path, "; ".join(problems) or f"no {STATE_FILE}")
        return state
    if problems:
        raise StateError("cannot resume: " + "; ".join(problems) + ". Move the work directory "
                         "away to start a new search.")
    return None


# ---------------------------------------------------------------------------------------------
# Rounds


def _memory_entry(candidate: Candidate, skeleton: Skeleton, convention: str) -> dict:
    report = memory_report(candidate.architecture, skeleton, convention=convention)
    return dict(param_count=report.param_count, param_bytes=report.param_bytes,
                working_bytes=report.working_bytes, total_bytes=report.total_bytes)


# The result fields of an entry, as they are before it trains.
_RESULT_FIELDS = dict(status="pending", accuracy=None, reward=None, reused_from_round=None,
                      final_val_accuracy=None, test_accuracy=None, best_val_epoch=None,
                      epochs_done=None, train_seconds=None, compile_seconds=None,
                      images_per_second=None, message="", failure=None)


def _new_entry(candidate: Candidate, memory: dict, predicted_score: float | None) -> dict:
    return dict(
        hash=candidate.arch_hash, kind=candidate.kind, description=candidate.describe(),
        cells_per_block=list(candidate.architecture.cells_per_block),
        architecture=candidate.architecture.to_dict(), **memory,
        predicted_score=predicted_score, **_RESULT_FIELDS)


def _base_summary(entry: dict, round_index: int) -> dict:
    keys = ("hash", "architecture", "accuracy", "param_count", "param_bytes", "working_bytes",
            "total_bytes", "description")
    return dict({k: entry[k] for k in keys}, round=round_index)


def plan_round(round_index: int, base: dict | None, config: ml_collections.ConfigDict,
               skeleton: Skeleton, controller_state: controller_lib.ControllerState | None,
               controller_round: int | None) -> dict:
    """A new round record: its candidates, the budget filter and the training plan (entries in
    training order, all pending)."""
    options = grow_trim_options(config, round_index)
    if base is None:
        candidates = initial_candidates(skeleton.num_blocks, options)
    else:
        candidates = generate_candidates(from_json(base["architecture"]), options)
    num_generated = len(candidates)
    convention = config.memory.convention
    memories: dict[str, dict] = {}
    if config.memory.budget_mb > 0:
        budget = config.memory.budget_mb * reports.MB
        for c in candidates:
            memories[c.arch_hash] = _memory_entry(c, skeleton, convention)
        candidates = [c for c in candidates if memories[c.arch_hash]["total_bytes"] <= budget]
    s = config.search
    scores = None
    if round_index < s.full_train_rounds:
        cap = s.full_train_cap or len(candidates)
        mode = "full" if cap >= len(candidates) else "sampled"
        chosen = seeded_sample([c.arch_hash for c in candidates], cap, config.seed, round_index)
    elif controller_state is not None and candidates:
        mode = "controller"
        scores = controller_lib.predict(controller_state,
                                        [c.architecture.to_tokens() for c in candidates])
        chosen = [int(i) for i in ranking.predicted_top_k(scores, min(s.top_k, len(candidates)))]
    else:  # no controller could be fitted yet (too few successful candidates)
        mode = "sampled"
        chosen = seeded_sample([c.arch_hash for c in candidates], s.top_k, config.seed,
                               round_index)
    entries = []
    for i in chosen:
        c = candidates[i]
        memory = memories.get(c.arch_hash) or _memory_entry(c, skeleton, convention)
        entries.append(_new_entry(c, memory, None if scores is None else float(scores[i])))
    return dict(round=round_index, base=base, mode=mode, num_generated=num_generated,
                num_over_budget=num_generated - len(candidates),
                controller_round=controller_round if mode == "controller" else None,
                entries=entries, phase="training", reference=None, winner=None,
                best_reward=None, controller_tau=None, controller_holdout_tau=None,
                controller_fit=None)


def _reference(rnd: dict) -> dict | None:
    """What the round's rewards are relative to: the base, or for round 0 the medians of its
    successful candidates (None while it has none)."""
    if rnd["base"] is not None:
        b = rnd["base"]
        return dict(accuracy=b["accuracy"], param_bytes=b["param_bytes"],
                    working_bytes=b["working_bytes"], kind="base")
    ok = [e for e in rnd["entries"] if e["status"] == "ok"]
    if not ok:
        return None
    return dict(accuracy=float(np.median([e["accuracy"] for e in ok])),
                param_bytes=float(np.median([e["param_bytes"] for e in ok])),
                working_bytes=float(np.median([e["working_bytes"] for e in ok])),
                kind="median of round 0")


def _reward(entry: dict, reference: dict, reward_config: RewardConfig) -> float:
    value = memory_efficient_reward(
        entry["accuracy"], entry["param_bytes"], entry["working_bytes"],
        base_accuracy=max(reference["accuracy"], _MIN_REFERENCE_ACCURACY),
        base_param_memory=reference["param_bytes"],
        base_working_memory=reference["working_bytes"], config=reward_config)
    return float(value)


def select_winner(rnd: dict, config: ml_collections.ConfigDict) -> None:
    """Fills the round's reference, every successful entry's reward, its best candidate and its
    winner (None when nothing improved on the base and the search stops on that)."""
    reward_config = RewardConfig(**config.reward)
    reference = _reference(rnd)
    rnd["reference"] = reference
    ok = [e for e in rnd["entries"] if e["status"] == "ok"]
    for e in ok:
        e["reward"] = _reward(e, reference, reward_config)
    if not ok:
        return
    if rnd["base"] is None and config.search.round0_selection == "accuracy":
        best = max(ok, key=lambda e: e["accuracy"])  # max keeps the first of equals
    else:
        best = max(ok, key=lambda e: e["reward"])
    rnd["best_reward"] = best["reward"]
    improves = rnd["base"] is None or best["reward"] > 0
    if improves or not config.search.stop_when_no_improvement:
        rnd["winner"] = best["hash"]
    tau_entries = [e for e in ok if e["predicted_score"] is not None]
    if len(tau_entries) >= 2:
        tau = ranking.kendall_tau([e["reward"] for e in tau_entries],
                                  [e["predicted_score"] for e in tau_entries])
        rnd["controller_tau"] = tau if math.isfinite(tau) else None


def _winner_entry(rnd: dict) -> dict | None:
    return next((e for e in rnd["entries"] if e["hash"] == rnd["winner"]), None)


def stop_reason(state: dict, config: ml_collections.ConfigDict) -> str | None:
    """Why no further round follows the last (selected) round, or None."""
    rnd = state["rounds"][-1]
    r, s = rnd["round"], config.search
    if not any(e["status"] == "ok" for e in rnd["entries"]):
        if not rnd["entries"]:
            return f"no candidate of round {r} is within the memory budget"
        return f"no candidate of round {r} trained successfully"
    if rnd["winner"] is None:
        return (f"no candidate of round {r} improves on its base (best reward "
                f"{rnd['best_reward']:+.4f} <= 0)")
    if r + 1 >= s.max_rounds:
        return f"round cap reached ({s.max_rounds} rounds)"
    cells = _winner_entry(rnd)["cells_per_block"]
    if min(cells) >= s.max_cells:
        return f"cell cap reached ({s.max_cells} cells per block)"
    return None


# ---------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The answer of a search: the last round winner (None if no round produced one)."""

    architecture: Architecture | None
    arch_hash: str | None
    accuracy: float | None
    param_bytes: int | None
    working_bytes: int | None
    total_bytes: int | None
    winner_round: int | None
    stop_reason: str | None
    finished: bool
    num_rounds: int
    num_trained: int
    workdir: str
    winners: tuple[dict, ...]  # per round: round, hash, accuracy, memory, reward


def _result(state: dict, workdir: pathlib.Path) -> SearchResult:
    won = reports.winners(state)
    last = won[-1] if won else None
    return SearchResult(
        architecture=from_json(last["architecture"]) if last else None,
        arch_hash=last["hash"] if last else None,
        accuracy=last["accuracy"] if last else None,
        param_bytes=last["param_bytes"] if last else None,
        working_bytes=last["working_bytes"] if last else None,
        total_bytes=last["total_bytes"] if last else None,
        winner_round=last["round"] if last else None,
        stop_reason=state.get("stop_reason"), finished=state["status"] == "finished",
        num_rounds=len(state["rounds"]), num_trained=state["num_trained"],
        workdir=str(workdir),
        winners=tuple({k: w[k] for k in ("round", "hash", "description", "accuracy",
                                          "param_bytes", "working_bytes", "total_bytes",
                                          "reward")} for w in won))


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class _Search:
    """The mutable run of one search (kept private: `run_search` is the API)."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    state: dict
    skeleton: Skeleton
    train_fn: TrainFn
    writer: bool
    controller_state: controller_lib.ControllerState | None = None
    controller_state_round: int | None = None
    seconds_trained: list = dataclasses.field(default_factory=list)  # this process's candidates
    run_start: float = dataclasses.field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0  # wall seconds of the earlier runs of this search

    # ----- persistence
    def save(self, plots: bool = False) -> None:
        self.state["elapsed_seconds"] = self.elapsed_seconds()
        if not self.writer:
            return
        save_state(self.state, self.workdir)
        out = self.config.output
        reports.write_all(self.state, self.workdir, plots=plots and out.plots,
                          tensorboard=plots and out.tensorboard,
                          leaderboard_rows=out.leaderboard_rows)

    def latest_controller(self) -> controller_lib.ControllerState | None:
        """The controller of the newest fit: in memory, else read from the work directory
        (after a resume); an unreadable one is refitted from scratch, with a warning."""
        info = self.state.get("controller")
        if info is None:
            return None
        if self.controller_state_round != info["round"]:
            try:
                self.controller_state = controller_lib.restore(self.workdir / info["path"])
                self.controller_state_round = info["round"]
            except (OSError, ValueError) as e:
                logging.warning("controller of round %d unreadable (%s): refitting it on the "
                                "candidates so far, without its warm start", info["round"], e)
                self.fit_controller(self.state["rounds"][info["round"]], warm_start=False)
        return self.controller_state

    # ----- one round
    def log_plan(self) -> None:
        """The whole run's plan and, once a few candidates have trained here, its duration."""
        counts = planned_candidates(self.state, self.config)
        trained = sum(e["status"] != "pending" for r in self.state["rounds"]
                      for e in r["entries"])
        remaining = max(sum(counts) - trained, 0)
        text = (f"plan: up to {len(counts)} rounds, about {sum(counts)} candidates "
                f"({', '.join(str(c) for c in counts)}) x {self.config.train.epochs} epochs; "
                f"{remaining} to go")
        if self.seconds_trained:
            per = float(np.mean(self.seconds_trained))
            text += (f"; at {per:.1f} s per candidate so far, about "
                     f"{_duration(per * remaining)} more (later rounds train larger networks: "
                     "expect more; the round cap and the stopping rules may end it sooner)")
        logging.info("%s", text)

    def train_pending(self, rnd: dict) -> None:
        if not self.seconds_trained:
            self.log_plan()
        if self.round_packing(rnd) is not None:
            self.train_pending_packed(rnd)
            return
        entries = rnd["entries"]
        done = sum(e["status"] != "pending" for e in entries)
        bar = _progress_bar(len(entries), done, f"round {rnd['round']} ({rnd['mode']})",
                            self.writer and self.config.output.progress_bar)
        reference = _reference(rnd) if rnd["base"] is not None else None
        reward_config = RewardConfig(**self.config.reward)
        # With candidate groups, G pending candidates train at once (candidate_parallel); each
        # result is what training it alone gives, so the state after each save is the same as
        # in a one-by-one run and a resume stays exact.
        groups = candidate_groups(self.config)
        pending = [i for i, e in enumerate(entries) if e["status"] == "pending"]
        previous = {i: self.previous_result(entries[i]["hash"], rnd["round"]) for i in pending}
        ahead = CompileAhead(lambda i: self.train_fn.compile(
            from_json(entries[i]["architecture"]), self.skeleton),
            [i for i in pending if previous[i] is None], self.compile_ahead_depth())
        try:
            for start in range(0, len(pending), groups):
                chunk = pending[start:start + groups]
                to_train = [i for i in chunk if previous[i] is None]
                results = dict(zip(to_train, candidate_parallel.map_on_device_groups(
                    lambda i: self.train_result(entries[i], ahead.take(i)), to_train, groups)))
                # Multi-process: all processes finished these candidates (raises if one died,
                # before any of its collective failures is recorded as a failed candidate).
                distributed.sync_processes(f"round {rnd['round']} candidates {chunk}")
                for i in chunk:
                    entry = entries[i]
                    if previous[i] is not None:
                        self.copy_result(entry, previous[i])
                    else:
                        self.record_result(entry, results[i])
                        self.state["num_trained"] += 1
                        self.seconds_trained.append(results[i].wall_seconds)
                        if self.out_of_memory_stop():
                            return
                        if len(self.seconds_trained) == _ESTIMATE_AFTER:
                            self.log_plan()
                    if reference is not None and entry["status"] == "ok":
                        entry["reward"] = _reward(entry, reference, reward_config)
                    self.save()
                    _log_entry(rnd, i, entry)
                    bar.update(1)
                    preemption.check()  # between candidates: the state is saved
                ok = [e["accuracy"] for e in entries if e["status"] == "ok"]
                if ok:
                    bar.set_postfix(best_acc=f"{100 * max(ok):.2f}%")
        finally:
            ahead.close()
            bar.close()

    # ----- packed training
    def round_packing(self, rnd: dict) -> dict | None:
        """How this round trains: {"pack_size", "selection"} when packed, None standalone.
        Decided when the round first trains and recorded there, so a resume keeps it."""
        if "packing" not in rnd:
            rnd["packing"] = self.resolve_packing(rnd)
            self.save()
        return rnd["packing"]

    def resolve_packing(self, rnd: dict) -> dict | None:
        mode, pack_size, selection = packing_options(self.config)
        if mode == "standalone":
            return None
        why_not = (self.train_fn.why_not_packed() if hasattr(self.train_fn, "why_not_packed")
                   else "the search's train_fn trains one candidate at a time")
        if why_not is None and candidate_groups(self.config) > 1:
            why_not = "parallel.candidate_groups > 1"
        if why_not is not None:
            if mode == "packed":
                raise ConfigError(f"config.parallel.packing = 'packed', but {why_not}: use "
                                  "packing = 'standalone' (or 'auto')")
            return None
        on_cpu = jax.default_backend() == "cpu"
        if mode == "auto" and on_cpu:
            return None  # README, "Packed training": a CPU runs the alternatives' FLOPs
        count = sum(e.get("reused_from_round") is None for e in rnd["entries"])
        size = pack_size or (1 if on_cpu else min(AUTO_MAX_PACK, max(count, 1)))
        return dict(pack_size=size, selection=packed_lib.resolve_selection(selection, size))

    def round_template(self, rnd: dict) -> RoundTemplate:
        """The template of every candidate of the round that trains (not the reused ones):
        the same however much of the round a previous run finished."""
        archs = [from_json(e["architecture"]) for e in rnd["entries"]
                 if e.get("reused_from_round") is None and not (
                     e["status"] == "pending" and self.previous_result(e["hash"], rnd["round"]))]
        return RoundTemplate.from_architectures(archs, self.skeleton)

    def train_pending_packed(self, rnd: dict) -> None:
        """Trains the round's pending candidates in packs of `rnd["packing"]["pack_size"]`,
        saving each pack's results together (a killed run trains the pack in flight again, the
        same pack, since the packs are cut from the pending candidates in order)."""
        entries, packing = rnd["entries"], rnd["packing"]
        reference = _reference(rnd) if rnd["base"] is not None else None
        reward_config = RewardConfig(**self.config.reward)
        pending = [i for i, e in enumerate(entries) if e["status"] == "pending"]
        bar = _progress_bar(len(entries), len(entries) - len(pending),
                            f"round {rnd['round']} ({rnd['mode']}, packed)",
                            self.writer and self.config.output.progress_bar)
        template = self.round_template(rnd)

        def finish_entry(i: int) -> None:
            entry = entries[i]
            if reference is not None and entry["status"] == "ok":
                entry["reward"] = _reward(entry, reference, reward_config)
            _log_entry(rnd, i, entry)
            bar.update(1)

        try:
            to_train = []
            for i in pending:  # results met in earlier rounds first
                previous = self.previous_result(entries[i]["hash"], rnd["round"])
                if previous is None:
                    to_train.append(i)
                    continue
                self.copy_result(entries[i], previous)
                self.save()
                finish_entry(i)
            programs = None
            while to_train:
                size = packing["pack_size"]
                chunk = to_train[:size]
                archs = [from_json(entries[i]["architecture"]) for i in chunk]
                keys = [candidate_key(self.config.seed, entries[i]["hash"]) for i in chunk]
                compile_seconds = 0.0
                try:
                    if programs is None or programs.pack_size != size:
                        programs = self.train_fn.compile_pack(template, size,
                                                              packing["selection"])
                        compile_seconds = programs.compile_seconds
                except Exception as e:  # pylint: disable=broad-except  # recorded, search goes on
                    results = [train_lib.failed_result(e, time.perf_counter()) for _ in chunk]
                else:
                    if programs.pack_size != size:  # sized down to the device's memory
                        packing["pack_size"] = programs.pack_size
                        self.save()
                        continue
                    results = self.train_fn.train_pack(archs, self.skeleton, keys, programs)
                    share = compile_seconds / len(chunk)  # the round's compile, on its 1st pack
                    results = [dataclasses.replace(r, compile_seconds=share,
                                                   wall_seconds=r.wall_seconds + share)
                               for r in results]
                distributed.sync_processes(f"round {rnd['round']} pack {chunk}")
                if size > 1 and all(r.failure == "out_of_memory" for r in results):
                    packing["pack_size"] = size // 2  # back off; the same candidates again
                    logging.warning("a pack of %d ran out of device memory: packs of %d from "
                                    "now on", size, size // 2)
                    self.save()
                    continue
                for i, result in zip(chunk, results):
                    self.record_result(entries[i], result)
                    self.state["num_trained"] += 1
                    self.seconds_trained.append(result.wall_seconds)
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
        limit = self.config.search.get("max_consecutive_oom", 0)
        streak = 0
        for _, entry in reports.trained_entries(self.state):
            if entry.get("reused_from_round") is not None:
                continue
            streak = streak + 1 if entry.get("failure") == "out_of_memory" else 0
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
        if candidate_groups(self.config) > 1 or not hasattr(self.train_fn, "compile"):
            return 0
        return resolve_depth(compile_ahead(self.config))

    def previous_result(self, arch_hash: str, round_index: int) -> tuple[int, dict] | None:
        if not self.config.search.reuse_trained:
            return None
        for rnd in self.state["rounds"]:
            if rnd["round"] >= round_index:
                break
            for e in rnd["entries"]:
                if e["hash"] == arch_hash and e["status"] != "pending":
                    return rnd["round"], e
        return None

    @staticmethod
    def copy_result(entry: dict, previous: tuple[int, dict]) -> None:
        round_index, source = previous
        for key in ("status", "accuracy", "final_val_accuracy", "test_accuracy",
                    "best_val_epoch", "epochs_done", "message", "failure"):
            entry[key] = source.get(key)
        entry.update(train_seconds=0.0, compile_seconds=0.0, images_per_second=0.0,
                     reused_from_round=source["reused_from_round"] if source[
                         "reused_from_round"] is not None else round_index)

    def train_result(self, entry: dict, programs=None):
        """Trains an entry's candidate (thread-safe: reads the entry, changes nothing), with its
        programs when they were compiled ahead."""
        arch = from_json(entry["architecture"])
        extra = {} if programs is None else {"programs": programs}
        return self.train_fn(arch, self.skeleton, candidate_key(self.config.seed, entry["hash"]),
                             **extra)

    def record_result(self, entry: dict, result) -> None:
        accuracy = getattr(result, self.config.search.accuracy_metric)
        status = result.status
        message = result.message
        if status == "ok" and (accuracy is None or not math.isfinite(accuracy)):
            status = "failed"
            message = (f"no {self.config.search.accuracy_metric} in the training result; "
                       + message).strip("; ")
        entry.update(
            status=status, accuracy=accuracy if status == "ok" else None,
            final_val_accuracy=result.final_val_accuracy, test_accuracy=result.test_accuracy,
            best_val_epoch=result.best_val_epoch, epochs_done=result.epochs_done,
            train_seconds=result.wall_seconds, compile_seconds=result.compile_seconds,
            images_per_second=result.images_per_second, message=message,
            failure=(getattr(result, "failure", "") or "error") if status == "failed" else None)

    def fit_controller(self, rnd: dict, warm_start: bool = True) -> None:
        """Refits the controller on every successful candidate of the rounds up to `rnd`,
        warm-started from the previous fit."""
        target = self.config.search.controller_target
        tokens, targets, groups = [], [], []
        for r in self.state["rounds"][:rnd["round"] + 1]:
            for e in r["entries"]:
                if e["status"] == "ok" and e["reward"] is not None:
                    tokens.append(from_json(e["architecture"]).to_tokens())
                    targets.append(e["reward"] if target == "reward" else e["accuracy"])
                    groups.append(r["round"] if target == "reward" else 0)
        if len(tokens) < 2:
            logging.warning("round %d: %d successful candidates so far, too few to fit the "
                            "controller", rnd["round"], len(tokens))
            return
        start = time.perf_counter()
        fitted = controller_lib.fit(
            tokens, np.asarray(targets), np.asarray(groups),
            init_state=self.latest_controller() if warm_start else None,
            config=controller_config(self.config, rnd["round"], self.skeleton.num_blocks))
        # Every process fits the same controller; process 0's copy is the one all use, so a
        # last-bit difference between hosts (GPU atomics) cannot make them plan different rounds.
        fitted = dataclasses.replace(fitted, params=distributed.same_on_all_processes(
            fitted.params))
        path = pathlib.Path(CONTROLLER_DIR) / f"round_{rnd['round']:03d}"
        if self.writer:
            controller_lib.save(fitted, self.workdir / path, overwrite=True)
        holdout_tau = fitted.holdout_tau if math.isfinite(fitted.holdout_tau) else None
        rnd["controller_holdout_tau"] = holdout_tau
        rnd["controller_fit"] = dict(num_candidates=len(tokens), steps=fitted.steps,
                                     seconds=time.perf_counter() - start)
        self.state["controller"] = dict(round=rnd["round"], path=str(path))
        self.controller_state, self.controller_state_round = fitted, rnd["round"]
        logging.info("round %d: controller fitted on %d candidates in %.1f s (%d steps, "
                     "held-out Kendall tau %s)", rnd["round"], len(tokens),
                     time.perf_counter() - start, fitted.steps,
                     "n/a" if holdout_tau is None else f"{holdout_tau:+.3f}")

    def finish(self, reason: str) -> None:
        self.state["status"] = "finished"
        self.state["stop_reason"] = reason
        logging.info("search finished: %s", reason)
        self.save(plots=True)

    def elapsed_seconds(self) -> float:
        """Wall time spent on this search, all runs and resumes together."""
        return self.elapsed_before + time.perf_counter() - self.run_start

    def over_time_budget(self) -> bool:
        """Whether `search.time_budget_minutes` is spent (process 0's clock decides for all)."""
        budget = time_budget_seconds(self.config)
        over = np.asarray(budget > 0 and self.elapsed_seconds() >= budget)
        return bool(distributed.same_on_all_processes(over))

    def run(self) -> None:
        config = self.config
        while self.state["status"] != "finished":
            rounds = self.state["rounds"]
            if rounds and rounds[-1]["phase"] == "done" and self.over_time_budget():
                # Between rounds, the controller fitted: a larger budget resumes exactly here.
                self.finish(f"{TIME_BUDGET_STOP} ({time_budget_seconds(config) / 60:g} minutes)"
                            f" after round {rounds[-1]['round']}, "
                            f"{self.elapsed_seconds() / 60:.1f} minutes in")
                break
            if not rounds or rounds[-1]["phase"] == "done":
                r = len(rounds)
                base = None
                if rounds:
                    base = _base_summary(_winner_entry(rounds[-1]), rounds[-1]["round"])
                controller_state = (self.latest_controller()
                                    if r >= config.search.full_train_rounds else None)
                rnd = plan_round(r, base, config, self.skeleton, controller_state,
                                 self.state["controller"]["round"] if controller_state else None)
                rounds.append(rnd)
                logging.info("round %d: %d candidates generated, %d over the memory budget, "
                             "%d to train (%s)", r, rnd["num_generated"],
                             rnd["num_over_budget"], len(rnd["entries"]), rnd["mode"])
                self.save()
            rnd = rounds[-1]
            if rnd["phase"] == "training":
                self.train_pending(rnd)
                reason = self.out_of_memory_stop()
                if reason:  # the round stays in training: a rerun with a smaller batch goes on
                    self.finish(reason)
                    break
                select_winner(rnd, config)
                rnd["phase"] = "selected"
                _log_round(rnd)
                self.save()
            reason = stop_reason(self.state, config)
            # The controller is first fitted after the last fully trained round (nothing uses
            # it before), then refitted after every round, warm-started.
            if (reason is None and rnd["phase"] == "selected"
                    and rnd["round"] + 1 >= config.search.full_train_rounds):
                self.fit_controller(rnd)
            rnd["phase"] = "done"
            if reason is not None:
                self.finish(reason)
            else:
                self.save(plots=True)


_ESTIMATE_AFTER = 3  # candidates trained in this process before the duration is estimated
AUTO_MAX_PACK = 16  # packing "auto" on an accelerator: the largest pack before memory sizing
TIME_BUDGET_STOP = "time budget reached"
OOM_STOP = "candidates in a row ran out of accelerator memory"


def _reopen_if_stopped_for_a_retry(state: dict, config: ml_collections.ConfigDict) -> None:
    """A finished search that stopped for a reason a rerun can lift runs on: its time budget
    (when the budget is now larger or off), or out-of-memory failures (their candidates of the
    round in flight train again, with the rerun's settings)."""
    reason, budget = str(state.get("stop_reason")), time_budget_seconds(config)
    if reason.startswith(TIME_BUDGET_STOP):
        if budget and budget <= state.get("elapsed_seconds", 0.0):
            return
        logging.info("the search stopped on its time budget; continuing it with %s",
                     f"{budget / 60:g} minutes" if budget else "no budget")
    elif OOM_STOP in reason:
        retry = [e for e in state["rounds"][-1]["entries"]
                 if e.get("failure") == "out_of_memory"]
        for entry in retry:
            entry.update(_RESULT_FIELDS)
        state["num_trained"] -= len(retry)
        logging.info("the search stopped on out-of-memory failures: training its %d "
                     "candidates again", len(retry))
    else:
        return
    state["status"], state["stop_reason"] = "running", None


def time_budget_seconds(config: ml_collections.ConfigDict) -> float:
    return 60.0 * float(config.search.get("time_budget_minutes", 0.0) or 0.0)


def planned_candidates(state: dict, config: ml_collections.ConfigDict) -> list[int]:
    """Candidates to train in each round up to the round cap: the planned rounds' entries, then
    `full_train_cap` (else as many as the last round generated) while rounds are trained in
    full, `top_k` after."""
    s, rounds = config.search, state["rounds"]
    counts = [len(r["entries"]) for r in rounds]
    generated = rounds[-1]["num_generated"] if rounds else 0
    for r in range(len(rounds), s.max_rounds):
        counts.append((s.full_train_cap or generated) if r < s.full_train_rounds else s.top_k)
    return counts


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _progress_bar(total: int, initial: int, description: str, enabled: bool):
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    return tqdm(total=total, initial=initial, desc=description, unit="candidate",
                disable=not enabled, dynamic_ncols=True)


def _log_entry(rnd: dict, index: int, entry: dict) -> None:
    where = f"round {rnd['round']} [{index + 1}/{len(rnd['entries'])}] {entry['hash'][:10]}"
    if entry["status"] != "ok":
        logging.warning("%s %s: %s (%s)", where, entry["description"], entry["status"].upper(),
                        entry["message"])
        return
    reward = "" if entry["reward"] is None else f", reward {entry['reward']:+.4f}"
    reused = ("" if entry["reused_from_round"] is None
              else f", reused from round {entry['reused_from_round']}")
    logging.info("%s %s: accuracy %.2f %%, memory %.3f MB (params %.3f + working %.3f)%s, "
                 "%.1f s%s", where, entry["description"], 100 * entry["accuracy"],
                 entry["total_bytes"] / reports.MB, entry["param_bytes"] / reports.MB,
                 entry["working_bytes"] / reports.MB, reward, entry["train_seconds"], reused)


def _log_round(rnd: dict) -> None:
    w = _winner_entry(rnd)
    if w is None:
        logging.info("round %d: no winner (best reward %s)", rnd["round"], rnd["best_reward"])
        return
    tau = rnd["controller_tau"]
    logging.info("round %d winner %s %s: accuracy %.2f %%, memory %.3f MB, reward %+.4f%s",
                 rnd["round"], w["hash"][:10], w["description"], 100 * w["accuracy"],
                 w["total_bytes"] / reports.MB, w["reward"],
                 "" if tau is None else f"; controller Kendall tau on the trained top-K "
                 f"{tau:+.3f}")


def _summary(config: ml_collections.ConfigDict, skeleton: Skeleton) -> dict:
    """The few settings the leaderboard states."""
    return {"lambda": config.reward.lam,
            "memory budget MB": config.memory.budget_mb or "none",
            "widths": list(skeleton.widths), "rounds cap": config.search.max_rounds,
            "cells cap": config.search.max_cells, "top-K": config.search.top_k,
            "dataset": config.data.name, "epochs": config.train.epochs, "seed": config.seed}


class CandidateTrainer:
    """The search's trainer: `train.train_candidate` with `config.train` on the dataset.
    `compile` makes a candidate's programs without training it, so that the search can compile
    the next candidates while one trains (`memnas_jax.compile_ahead`)."""

    def __init__(self, config: ml_collections.ConfigDict, dataset: data_lib.Dataset,
                 workdir: pathlib.Path):
        self.train_config = config.train.copy_and_resolve_references()
        self.train_config.compilation_cache_dir = train_lib.compilation_cache_path(
            config.train.compilation_cache_dir, workdir)
        self.dataset, self.workdir = dataset, workdir
        self.candidate_checkpoints = config.search.candidate_checkpoints

    def compile(self, arch: Architecture, skeleton: Skeleton) -> train_lib.CandidatePrograms:
        return train_lib.compile_candidate(arch, self.train_config, self.dataset,
                                           skeleton=skeleton)

    def why_not_packed(self) -> str | None:
        """Why this trainer cannot train packs (None: it can)."""
        if not self.dataset.on_device:
            return f"the {self.dataset.name} data streams from the host (packs need it resident)"
        return None

    def compile_pack(self, template: RoundTemplate, pack_size: int, selection: str
                     ) -> packed_lib.PackedPrograms:
        return packed_lib.compile_fitting_pack(template, self.train_config, self.dataset,
                                               pack_size, selection)

    def train_pack(self, archs: Sequence[Architecture], skeleton: Skeleton,
                   keys: Sequence[jax.Array], programs: packed_lib.PackedPrograms
                   ) -> list[train_lib.TrainResult]:
        del skeleton  # the programs' template has it
        return packed_lib.train_packed(archs, self.train_config, self.dataset, keys,
                                       programs=programs)

    def __call__(self, arch: Architecture, skeleton: Skeleton, key: jax.Array,
                 programs=None) -> train_lib.TrainResult:
        train_config, checkpoint_dir = self.train_config, None
        if self.candidate_checkpoints:
            train_config = self.train_config.copy_and_resolve_references()
            checkpoint_dir = self.workdir / CANDIDATE_CHECKPOINT_DIR / arch.canonical_hash()[:16]
            train_config.checkpoint_dir = str(checkpoint_dir)
        result = train_lib.train_candidate(arch, train_config, self.dataset, key,
                                           skeleton=skeleton, programs=programs)
        if checkpoint_dir is not None and jax.process_index() == 0:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return result


def run_search(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
               train_fn: TrainFn | None = None) -> SearchResult:
    """Runs (or resumes) the MemNAS search of `config` in `workdir` and returns its answer.

    train_fn(architecture, skeleton, key) -> `train.TrainResult` replaces candidate training
    (default: `CandidateTrainer`, `train.train_candidate` with `config.train` on `config.data`).
    A train_fn with a `compile(architecture, skeleton)` method, like `CandidateTrainer`, gets
    its candidates compiled ahead (`config.parallel.compile_ahead`), the programs passed back
    as `train_fn(..., programs=future)`.
    Raises ConfigMismatchError when `workdir` holds a search made with another config (unless
    `config.resume_with_changed_config`), StateError when its state files are unreadable,
    WorkdirLockedError when another live process runs a search there (all `UserError`s).
    """
    try:
        check_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    workdir = pathlib.Path(workdir).absolute()
    writer = jax.process_index() == 0
    if not writer:
        return _run_search(config, workdir, writer, train_fn)
    prepare_workdir(workdir)
    with WorkdirLock(workdir, "search"):  # one owner: a second search here is refused
        return _run_search(config, workdir, writer, train_fn)


def _run_search(config: ml_collections.ConfigDict, workdir: pathlib.Path, writer: bool,
                train_fn: TrainFn | None) -> SearchResult:
    relevant, config_hash = config_fingerprint(config)
    state = load_state(workdir) if workdir.exists() else None
    if state is not None and state["config_hash"] != config_hash:
        diff = _config_diff(state["config"], relevant)
        if not config.resume_with_changed_config:
            raise ConfigMismatchError(
                f"{workdir} holds a search made with a different config ({diff}). Use another "
                "--workdir, or pass --allow_config_change (config.resume_with_changed_config "
                "= True) to resume it with the new settings.")
        logging.warning("resuming %s with a changed config: %s", workdir, diff)
        state.setdefault("config_changes", []).append(diff)
        state["config"], state["config_hash"] = relevant, config_hash
    dataset = data_lib.load_dataset(config.data)
    if not config.search.evaluate_test:
        dataset = dataclasses.replace(dataset, test=None)
    if config.search.accuracy_metric != "test_accuracy" and dataset.validation is None:
        raise ConfigError(f"dataset {dataset.name!r} has no validation split to select "
                         "candidates on: set config.data.validation_size > 0")
    skeleton = train_lib.skeleton_from_config(config, dataset)
    if state is None:
        state = dict(config=relevant, config_hash=config_hash, status="running",
                     stop_reason=None, rounds=[], controller=None, num_trained=0)
        logging.info("new search in %s: %s; %s", workdir, dataset.describe(), skeleton)
    else:
        logging.info("resuming the search in %s at round %d (%d candidates trained)", workdir,
                     len(state["rounds"]) - 1, state["num_trained"])
    state["summary"] = _summary(config, skeleton)
    if writer:
        atomic_write(workdir / CONFIG_FILE,
                     json.dumps(_plain(config), indent=1, sort_keys=True) + "\n")
    if state["status"] == "finished":
        _reopen_if_stopped_for_a_retry(state, config)
    search = _Search(config, workdir, state, skeleton,
                     train_fn or CandidateTrainer(config, dataset, workdir), writer,
                     elapsed_before=float(state.get("elapsed_seconds", 0.0)))
    if state["status"] == "finished":
        search.save(plots=True)  # regenerate the outputs, nothing to run
    else:
        search.run()
    return _result(state, workdir)


def _quiet_orbax_info() -> None:
    """orbax logs a dozen INFO lines per checkpoint save through absl: keep its warnings only."""
    import logging as py_logging  # pylint: disable=import-outside-toplevel

    class _DropOrbaxInfo(py_logging.Filter):
        def filter(self, record: py_logging.LogRecord) -> bool:
            return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname

    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
        handler.addFilter(_DropOrbaxInfo())


def run_experiment(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                   allow_config_change: bool = False) -> SearchResult:
    """What the experiment mains run: joins a multi-process job when launched as one
    (`jax.distributed`), asks for `config.host_device_count` CPU devices and, unless
    `config.cpu_ynn_fusions`, turns XLA:CPU's slow YNNPACK fusions off (both before JAX starts its
    backends), then `run_search` and a closing log line."""
    from memnas_jax import sharding  # pylint: disable=import-outside-toplevel
    _quiet_orbax_info()
    distributed.initialize_from_config(config)
    if not config.cpu_ynn_fusions:
        sharding.disable_cpu_ynn_fusions()
    if config.host_device_count:
        if not sharding.set_host_device_count(config.host_device_count):
            logging.warning("could not set %d host devices (XLA_FLAGS already names a count, "
                            "or JAX has started)", config.host_device_count)
    if allow_config_change:
        with config.unlocked():
            config.resume_with_changed_config = True
    logging.info("JAX %s on %s: %d process(es), %d local device(s)", jax.__version__,
                 jax.default_backend(), jax.process_count(), jax.local_device_count())
    start = time.perf_counter()
    preemption.install(config.get("preemption_grace_seconds", preemption.DEFAULT_GRACE_SECONDS))
    try:
        result = run_search(config, workdir)
    except preemption.Preempted:
        command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        logging.warning("search stopped on request after %.1f s; its state is saved. Resume "
                        "it with the same command:\n  %s", time.perf_counter() - start, command)
        raise SystemExit(preemption.EXIT_PREEMPTED) from None
    if result.architecture is None:
        logging.info("search stopped without a result: %s", result.stop_reason)
    else:
        logging.info("search %s in %.1f s (%d candidates trained, %d rounds): %s; best %s, "
                     "accuracy %.2f %%, total memory %.3f MB (params %.3f + working %.3f)\n%s",
                     "finished" if result.finished else "stopped",
                     time.perf_counter() - start, result.num_trained, result.num_rounds,
                     result.stop_reason, result.arch_hash[:12], 100 * result.accuracy,
                     result.total_bytes / reports.MB, result.param_bytes / reports.MB,
                     result.working_bytes / reports.MB, result.architecture)
    return result


__all__ = [
    "ACCURACY_METRICS", "CONTROLLER_TARGETS", "ConfigMismatchError", "ROUND0_SELECTIONS",
    "SearchResult", "StateError", "candidate_key", "check_config", "config_fingerprint",
    "controller_config", "controller_vocab_sizes", "default_config", "derive_seed",
    "grow_trim_options", "load_state", "plan_round", "run_experiment", "run_search", "save_state",
    "seeded_sample", "select_winner", "stop_reason",
]
