"""The pure rules of a round: seeds, what to train, the reference and reward, the winner, when to
stop."""

from __future__ import annotations

import math

import ml_collections
import numpy as np

from memnas_jax import controller as controller_lib
from memnas_jax import ranking, reports
from memnas_jax.encoding import from_json
from memnas_jax.grow_trim import Candidate, generate_candidates, initial_candidates
from memnas_jax.memory import memory_report
from memnas_jax.reward import RewardConfig, filter_by_budget, memory_efficient_reward
from memnas_jax.search.config import grow_trim_options, reward_config_of
from memnas_jax.search.seeds import seeded_sample
from memnas_jax.space import Skeleton

# A reference accuracy of 0 would make the relative accuracy gain undefined.
_MIN_REFERENCE_ACCURACY = 1e-6


def _memory_entry(candidate: Candidate, skeleton: Skeleton, convention: str) -> dict:
    report = memory_report(candidate.architecture, skeleton, convention=convention)
    return dict(param_count=report.param_count, param_bytes=report.param_bytes,
                working_bytes=report.working_bytes, total_bytes=report.total_bytes)


# The result fields of an entry, as they are before it trains.
RESULT_FIELDS = dict(status="pending", accuracy=None, reward=None, reused_from_round=None,
                      final_val_accuracy=None, test_accuracy=None, best_val_epoch=None,
                      epochs_done=None, train_seconds=None, compile_seconds=None,
                      images_per_second=None, message="", failure=None)


def _new_entry(candidate: Candidate, memory: dict, predicted_score: float | None) -> dict:
    return dict(
        hash=candidate.arch_hash, kind=candidate.kind, description=candidate.describe(),
        cells_per_block=list(candidate.architecture.cells_per_block),
        architecture=candidate.architecture.to_dict(), **memory,
        predicted_score=predicted_score, **RESULT_FIELDS)


def base_summary(entry: dict, round_index: int) -> dict:
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
        for c in candidates:
            memories[c.arch_hash] = _memory_entry(c, skeleton, convention)
        candidates = filter_by_budget(
            candidates, lambda arch: memories[arch.canonical_hash()]["total_bytes"],
            config.memory.budget_mb * reports.MB)
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


def round_reference(rnd: dict) -> dict | None:
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


def entry_reward(entry: dict, reference: dict, reward_config: RewardConfig) -> float:
    value = memory_efficient_reward(
        entry["accuracy"], entry["param_bytes"], entry["working_bytes"],
        base_accuracy=max(reference["accuracy"], _MIN_REFERENCE_ACCURACY),
        base_param_memory=reference["param_bytes"],
        base_working_memory=reference["working_bytes"], config=reward_config)
    return float(value)


def select_winner(rnd: dict, config: ml_collections.ConfigDict) -> None:
    """Fills the round's reference, every successful entry's reward, its best candidate and its
    winner (None when nothing improved on the base and the search stops on that)."""
    reward_config = reward_config_of(config)
    reference = round_reference(rnd)
    rnd["reference"] = reference
    ok = [e for e in rnd["entries"] if e["status"] == "ok"]
    for e in ok:
        e["reward"] = entry_reward(e, reference, reward_config)
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


def winner_entry(rnd: dict) -> dict | None:
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
    cells = winner_entry(rnd)["cells_per_block"]
    if min(cells) >= s.max_cells:
        return f"cell cap reached ({s.max_cells} cells per block)"
    return None


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
