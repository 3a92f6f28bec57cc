"""The pure rules of a round: what to train, the reference and reward, the winner, when to stop.
Each takes records and returns new ones (`memnas_jax.search.state`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from memnas_jax import controller as controller_lib
from memnas_jax import ranking
from memnas_jax.grow_trim import Candidate, generate_candidates, initial_candidates
from memnas_jax.memory import MB, memory_report
from memnas_jax.reward import RewardConfig, filter_by_budget, memory_efficient_reward
from memnas_jax.search.seeds import seeded_sample
from memnas_jax.search.settings import SearchSettings
from memnas_jax.search.state import Base, Entry, Reference, Round, SearchState
from memnas_jax.space import Skeleton

# A reference accuracy of 0 would make the relative accuracy gain undefined.
_MIN_REFERENCE_ACCURACY = 1e-6


def _new_entry(candidate: Candidate, skeleton: Skeleton, convention: str,
               predicted_score: float | None = None) -> Entry:
    report = memory_report(candidate.architecture, skeleton, convention=convention)
    return Entry(
        hash=candidate.arch_hash, kind=candidate.kind, description=candidate.describe(),
        cells_per_block=tuple(candidate.architecture.cells_per_block),
        architecture=candidate.architecture, param_count=report.param_count,
        param_bytes=report.param_bytes, working_bytes=report.working_bytes,
        total_bytes=report.total_bytes, predicted_score=predicted_score,
        working_bytes_paper=report.working_bytes_paper,
        working_bytes_deployed=report.working_bytes_deployed)


def plan_round(round_index: int, base: Base | None, settings: SearchSettings,
               skeleton: Skeleton, controller_state: controller_lib.ControllerState | None,
               controller_round: int | None) -> Round:
    """A new round: its candidates, the budget filter and the training plan (entries in
    training order, all pending)."""
    options = settings.grow_trim_options(round_index)
    if base is None:
        candidates = initial_candidates(skeleton.num_blocks, options)
    else:
        candidates = generate_candidates(base.architecture, options)
    num_generated = len(candidates)
    convention = settings.memory.convention
    entries: dict[str, Entry] = {}  # memory analysed once per candidate
    if settings.memory.budget_mb > 0:
        entries = {c.arch_hash: _new_entry(c, skeleton, convention) for c in candidates}
        candidates = filter_by_budget(
            candidates, lambda arch: entries[arch.canonical_hash()].total_bytes,
            settings.memory.budget_mb * MB)
    s = settings.search
    scores = None
    if round_index < s.full_train_rounds:
        cap = s.full_train_cap or len(candidates)
        mode = "full" if cap >= len(candidates) else "sampled"
        chosen = seeded_sample([c.arch_hash for c in candidates], cap, settings.seed, round_index)
    elif controller_state is not None and candidates and s.ranking == "controller":
        mode = "controller"
        scores = controller_lib.predict(controller_state,
                                        [c.architecture.to_tokens() for c in candidates])
        chosen = [int(i) for i in ranking.predicted_top_k(scores, min(s.top_k, len(candidates)))]
    else:  # random ranking, or no controller fitted yet (too few successful candidates)
        mode = "sampled"
        chosen = seeded_sample([c.arch_hash for c in candidates], s.top_k, settings.seed,
                               round_index)
    planned = []
    for i in chosen:
        c = candidates[i]
        entry = entries.get(c.arch_hash) or _new_entry(c, skeleton, convention)
        if scores is not None:
            entry = dataclasses.replace(entry, predicted_score=float(scores[i]))
        planned.append(entry)
    return Round(round=round_index, base=base, mode=mode, num_generated=num_generated,
                 num_over_budget=num_generated - len(candidates),
                 controller_round=controller_round if mode == "controller" else None,
                 entries=tuple(planned))


def round_reference(rnd: Round) -> Reference | None:
    """What the round's rewards are relative to: the base, or for round 0 the medians of its
    successful candidates (None while it has none)."""
    if rnd.base is not None:
        b = rnd.base
        return Reference(accuracy=b.accuracy, param_bytes=b.param_bytes,
                         working_bytes=b.working_bytes, kind="base")
    ok = [e for e in rnd.entries if e.ok]
    if not ok:
        return None
    return Reference(accuracy=float(np.median([e.accuracy for e in ok])),
                     param_bytes=float(np.median([e.param_bytes for e in ok])),
                     working_bytes=float(np.median([e.working_bytes for e in ok])),
                     kind="median of round 0")


def entry_reward(entry: Entry, reference: Reference, reward_config: RewardConfig) -> float:
    value = memory_efficient_reward(
        entry.accuracy, entry.param_bytes, entry.working_bytes,
        base_accuracy=max(reference.accuracy, _MIN_REFERENCE_ACCURACY),
        base_param_memory=reference.param_bytes,
        base_working_memory=reference.working_bytes, config=reward_config)
    return float(value)


def with_reward(entry: Entry, reference: Reference | None,
                reward_config: RewardConfig) -> Entry:
    """The entry with its reward, when it succeeded and the reference is known."""
    if reference is None or not entry.ok:
        return entry
    return dataclasses.replace(entry, reward=entry_reward(entry, reference, reward_config))


def select_winner(rnd: Round, settings: SearchSettings) -> Round:
    """The round with its reference, every successful entry's reward, its best candidate and
    its winner (None when nothing improved on the base and the search stops on that), in phase
    "selected"."""
    reference = round_reference(rnd)
    reward_config = settings.reward
    rnd = dataclasses.replace(
        rnd, reference=reference, phase="selected",
        entries=tuple(with_reward(e, reference, reward_config) for e in rnd.entries))
    ok = [e for e in rnd.entries if e.ok]
    if not ok:
        return rnd
    if rnd.base is None and settings.search.round0_selection == "accuracy":
        best = max(ok, key=lambda e: e.accuracy)  # max keeps the first of equals
    else:
        best = max(ok, key=lambda e: e.reward)
    improves = rnd.base is None or best.reward > 0
    winner = best.hash if improves or not settings.search.stop_when_no_improvement else None
    tau = None
    scored = [e for e in ok if e.predicted_score is not None]
    if len(scored) >= 2:
        tau = ranking.kendall_tau([e.reward for e in scored],
                                  [e.predicted_score for e in scored])
        tau = tau if math.isfinite(tau) else None
    return dataclasses.replace(rnd, best_reward=best.reward, winner=winner, controller_tau=tau)


def stop_reason(state: SearchState, settings: SearchSettings) -> str | None:
    """Why no further round follows the last (selected) round, or None."""
    rnd = state.rounds[-1]
    r, s = rnd.round, settings.search
    if not any(e.ok for e in rnd.entries):
        if not rnd.entries:
            return f"no candidate of round {r} is within the memory budget"
        return f"no candidate of round {r} trained successfully"
    if rnd.winner is None:
        return (f"no candidate of round {r} improves on its base (best reward "
                f"{rnd.best_reward:+.4f} <= 0)")
    if r + 1 >= s.max_rounds:
        return f"round cap reached ({s.max_rounds} rounds)"
    if min(rnd.winner_entry.cells_per_block) >= s.max_cells:
        return f"cell cap reached ({s.max_cells} cells per block)"
    return None


def planned_candidates(state: SearchState, settings: SearchSettings) -> list[int]:
    """Candidates to train in each round up to the round cap: the planned rounds' entries, then
    `full_train_cap` (else as many as the last round generated) while rounds are trained in
    full, `top_k` after."""
    s, rounds = settings.search, state.rounds
    counts = [len(r.entries) for r in rounds]
    generated = rounds[-1].num_generated if rounds else 0
    for r in range(len(rounds), s.max_rounds):
        counts.append((s.full_train_cap or generated) if r < s.full_train_rounds else s.top_k)
    return counts


def _ops_by_block(arch) -> frozenset[tuple[int, int]]:
    return frozenset((b, op) for b, block in enumerate(arch) for cell in block
                     for op in (cell.op1, cell.op2) if op is not None)


def training_order(archs) -> list[int]:
    """The order to train `archs` in (indices): first a few that together use every op of every
    block (greedy cover: each next adds the most (block, op) pairs not met yet, ties to the
    earlier), then the rest in their order. On a GPU, XLA autotunes each new fusion once and
    keeps the result (in the compilation cache), so the rest compile on tuned ops; the results
    do not depend on the order (each candidate's key is its own)."""
    ops = [_ops_by_block(a) for a in archs]
    order, met, left = [], set(), list(range(len(archs)))
    while left:
        best = max(left, key=lambda i: (len(ops[i] - met), -i))
        if not ops[best] - met:
            break
        order.append(best)
        met |= ops[best]
        left.remove(best)
    return order + left
