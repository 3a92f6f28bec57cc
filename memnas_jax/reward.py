"""The memory-efficient reward and the memory budget (docs/method.md §6).

numpy-only. For a round's base network b and a candidate c:

    R(c | b) = lam * (A_c - A_b) / A_b
             + (1 - lam) * [w_P * (P_b - P_c) / P_b + w_I * (I_b - I_c) / I_b]

with A the accuracy, P the parameter memory and I the working (peak activation) memory, each in
any unit as long as the candidate and the base use the same one. lam = 1 ranks by accuracy gain
alone, lam = 0 by memory savings alone; the paper reports lam = 0.5 and 0.8. w_P = 0.3 and
w_I = 0.7 are the authors' (`general.py::score`).

The authors' controller labels are this reward with lam = 0.7 (their k1 = 0.7, k2 = 0.3 = 1 - k1),
times 100: `AUTHORS_LABEL_CONFIG`.

The budget drops candidates whose total memory (parameters + working memory, from a callable
such as `lambda arch: memory.memory_report(arch, skeleton).total_bytes`) exceeds a limit, before
anything is trained or compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from memnas_jax.encoding import Architecture
from memnas_jax.grow_trim import Candidate


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """lam weighs the relative accuracy gain against the memory terms (1 - lam); the memory
    terms are param_weight x the relative parameter-memory saving + working_weight x the
    relative working-memory saving."""

    lam: float = 0.5
    param_weight: float = 0.3
    working_weight: float = 0.7

    def __post_init__(self):
        for name in ("lam", "param_weight", "working_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"RewardConfig: {name} must be a finite number, got {value!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"RewardConfig: lam must be in [0, 1], got {self.lam}")
        if self.param_weight < 0 or self.working_weight < 0:
            raise ValueError(f"RewardConfig: param_weight and working_weight must be >= 0, got "
                             f"{self.param_weight}, {self.working_weight}")


AUTHORS_LABEL_CONFIG = RewardConfig(lam=0.7)  # their controller targets (x 100)


def memory_efficient_reward(accuracy: Any, param_memory: Any, working_memory: Any, *,
                            base_accuracy: float, base_param_memory: float,
                            base_working_memory: float,
                            config: RewardConfig = RewardConfig()) -> np.ndarray:
    """The reward of each candidate relative to the base, as a float64 array of the broadcast
    shape of the three candidate arrays. A NaN accuracy (a failed candidate) gives a NaN reward;
    non-positive base values and negative or non-finite memories raise ValueError."""
    base_accuracy = _positive_scalar(base_accuracy, "base_accuracy")
    base_param_memory = _positive_scalar(base_param_memory, "base_param_memory")
    base_working_memory = _positive_scalar(base_working_memory, "base_working_memory")
    arrays = {"accuracy": accuracy, "param_memory": param_memory,
              "working_memory": working_memory}
    try:
        arrays = {name: np.asarray(value, dtype=np.float64) for name, value in arrays.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"accuracy and memories must be numbers or arrays of numbers: {e}"
                         ) from None
    try:
        acc, params, working = np.broadcast_arrays(*arrays.values())
    except ValueError:
        raise ValueError("accuracy, param_memory and working_memory must broadcast together, "
                         f"got shapes {[a.shape for a in arrays.values()]}") from None
    if np.any(acc < 0) or np.any(np.isinf(acc)):
        raise ValueError("accuracy must be >= 0 and finite (NaN marks a failed candidate)")
    for name in ("param_memory", "working_memory"):
        if not np.all(np.isfinite(arrays[name]) & (arrays[name] >= 0)):
            raise ValueError(f"{name} must be finite and >= 0")
    accuracy_gain = (acc - base_accuracy) / base_accuracy
    param_saving = (base_param_memory - params) / base_param_memory
    working_saving = (base_working_memory - working) / base_working_memory
    memory_saving = config.param_weight * param_saving + config.working_weight * working_saving
    return config.lam * accuracy_gain + (1.0 - config.lam) * memory_saving


def _scalar(value: Any, name: str) -> float:
    if isinstance(value, (bool, str, bytes)) or np.ndim(value) != 0:
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _positive_scalar(value: Any, name: str) -> float:
    value = _scalar(value, name)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (the reward is relative to it), "
                         f"got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Memory budget

MemoryFn = Callable[[Architecture], float]


def _architecture(candidate: Candidate | Architecture) -> Architecture:
    return candidate.architecture if isinstance(candidate, Candidate) else candidate


def total_memories(candidates: Sequence[Candidate | Architecture], memory_fn: MemoryFn
                   ) -> np.ndarray:
    """memory_fn(architecture) of each candidate (`Candidate`s or `Architecture`s), float64."""
    values = np.empty(len(candidates), dtype=np.float64)
    for i, candidate in enumerate(candidates):
        value = _scalar(memory_fn(_architecture(candidate)), f"memory_fn(candidate {i})")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"memory_fn returned {value!r} for candidate {i}; expected a "
                             "finite number of bytes >= 0")
        values[i] = value
    return values


def within_budget(candidates: Sequence[Candidate | Architecture], memory_fn: MemoryFn,
                  budget_bytes: float | None) -> np.ndarray:
    """A bool mask: True where the candidate's total memory is at most `budget_bytes`
    (None = no budget: all True, and memory_fn is not called)."""
    if budget_bytes is None:
        return np.ones(len(candidates), dtype=bool)
    budget_bytes = _positive_scalar(budget_bytes, "budget_bytes")
    return total_memories(candidates, memory_fn) <= budget_bytes


def filter_by_budget(candidates: Sequence[Candidate | Architecture], memory_fn: MemoryFn,
                     budget_bytes: float | None) -> list:
    """The candidates within the budget, in their order (see `within_budget`)."""
    mask = within_budget(candidates, memory_fn, budget_bytes)
    return [c for c, keep in zip(candidates, mask) if keep]


__all__ = [
    "AUTHORS_LABEL_CONFIG", "MemoryFn", "RewardConfig", "filter_by_budget",
    "memory_efficient_reward", "total_memories", "within_budget",
]
