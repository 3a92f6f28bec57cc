"""The controller's hyperparameters (`ControllerConfig`) and a trained controller
(`ControllerState`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

LOSSES = ("pairwise", "mse")
FIELD_MERGES = ("sum", "concat")


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """Hyperparameters of the controller and of its training.

    vocab_sizes: per token field, the number of values (tokens must lie in [0, size)); None infers
      max + 1 from the training data. Give it explicitly when later rounds may bring larger values
      (e.g. more cells per block), since a warm start cannot grow an embedding.
    set_size: candidates per ranking-LSTM sequence, in training and in `predict`.
    patience: held-out evaluations (every `eval_every` steps) without improvement before stopping.
    holdout_fraction: share of the candidates held out for early stopping; with fewer than 2
      held-out (or 2 training) candidates, training runs `max_steps` with no early stopping.
    predict_batch: candidates per compiled `predict` call (rounded to whole sets).
    """

    embed_dim: int = 32
    field_merge: str = "sum"
    encoder_hidden: int = 64
    ranker_hidden: int = 64
    cross_candidate: bool = True
    loss: str = "pairwise"
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    max_steps: int = 3000  # rounded up to a multiple of eval_every
    eval_every: int = 100
    patience: int = 5
    set_size: int = 32
    sets_per_batch: int = 8
    holdout_fraction: float = 0.1
    vocab_sizes: tuple[int, ...] | None = None
    predict_batch: int = 4096
    seed: int = 0

    def __post_init__(self):
        positive = ("embed_dim", "encoder_hidden", "ranker_hidden", "max_steps", "eval_every",
                    "patience", "set_size", "sets_per_batch", "predict_batch")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ControllerConfig.{name} must be a positive integer, "
                                 f"got {value!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"ControllerConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.field_merge not in FIELD_MERGES:
            raise ValueError(f"ControllerConfig.field_merge must be one of {FIELD_MERGES}, "
                             f"got {self.field_merge!r}")
        if not self.learning_rate > 0 or not self.weight_decay >= 0:
            raise ValueError("ControllerConfig needs learning_rate > 0 and weight_decay >= 0, got "
                             f"{self.learning_rate!r} and {self.weight_decay!r}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"ControllerConfig.holdout_fraction must be in [0, 1), "
                             f"got {self.holdout_fraction!r}")
        if self.vocab_sizes is not None:
            sizes = tuple(self.vocab_sizes)
            if not sizes or any(not isinstance(v, (int, np.integer)) or v < 1 for v in sizes):
                raise ValueError("ControllerConfig.vocab_sizes must be positive integers, "
                                 f"got {sizes!r}")
            object.__setattr__(self, "vocab_sizes", tuple(int(v) for v in sizes))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ControllerConfig":
        values = dict(values)
        if values.get("vocab_sizes") is not None:
            values["vocab_sizes"] = tuple(values["vocab_sizes"])
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class ControllerState:
    """A trained controller: its config, the vocabulary it was built for and its parameters.

    target_mean/target_scale standardise the targets for the MSE loss (predict maps scores back to
    target units). steps: the optimizer steps of the fit that produced the returned (best)
    parameters; holdout_tau: their held-out Kendall tau (nan without a held-out split)."""

    config: ControllerConfig
    vocab_sizes: tuple[int, ...]
    params: Any
    target_mean: float = 0.0
    target_scale: float = 1.0
    steps: int = 0
    holdout_tau: float = float("nan")

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)
