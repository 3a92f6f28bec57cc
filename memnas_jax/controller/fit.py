"""Fitting the controller on trained candidates: random sets per group, early stopping on the
held-out Kendall tau, warm starts."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memnas_jax import ranking
from memnas_jax.controller.config import ControllerConfig, ControllerState
from memnas_jax.controller.model import model_fields
from memnas_jax.controller.predict import raw_scores
from memnas_jax.controller.programs import programs_for
from memnas_jax.controller.tokens import bucket, check_vocab, pad_tokens, vocab_for


def initialize(vocab_sizes: Sequence[int], config: ControllerConfig | None = None
               ) -> ControllerState:
    """An untrained controller for tokens with these per-field vocabulary sizes (config.seed)."""
    config = config or ControllerConfig()
    vocab_sizes = tuple(int(v) for v in vocab_sizes)
    if not vocab_sizes or min(vocab_sizes) < 1:
        raise ValueError("vocab_sizes must be positive integers, one per token field, "
                         f"got {vocab_sizes}")
    params = programs_for(config, vocab_sizes).init_params(
        jax.random.fold_in(jax.random.key(config.seed), 0))
    return ControllerState(config=config, vocab_sizes=vocab_sizes, params=params)


def grouped_tau(targets: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Kendall tau within each group, averaged with weights = group size (groups of >= 2)."""
    taus, weights = [], []
    for g in np.unique(groups):
        in_group = groups == g
        if in_group.sum() >= 2:
            tau = ranking.kendall_tau(targets[in_group], scores[in_group])
            if np.isfinite(tau):
                taus.append(tau)
                weights.append(in_group.sum())
    return float(np.average(taus, weights=weights)) if taus else float("nan")


def fit(token_sequences: Sequence[Any], targets: Any, groups: Any = None,
        init_state: ControllerState | None = None,
        config: ControllerConfig | None = None) -> ControllerState:
    """Trains a controller on candidates with known targets (higher = better).

    groups: optional label per candidate; only candidates of the same group are compared (e.g. the
      round that produced them, when targets are relative to that round's base network).
    init_state: warm start from these parameters (refit each round); its vocabulary is kept and the
      model shape of `config` must match it. The optimizer state starts afresh.
    config: defaults to init_state.config, else ControllerConfig().
    Returns the parameters with the best held-out Kendall tau (the last ones without a held-out
    split).
    """
    if config is None:
        config = init_state.config if init_state is not None else ControllerConfig()
    if init_state is not None and (model_fields(config) != model_fields(init_state.config)):
        raise ValueError("config describes a different model than init_state.config: a warm start "
                         "needs the same embed_dim, field_merge, hidden sizes and cross_candidate")
    tokens, lengths = pad_tokens(token_sequences,
                                  init_state.num_fields if init_state is not None else None)
    n = tokens.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 candidates to learn a ranking, got {n}")
    targets = np.asarray(targets)
    if (targets.shape != (n,) or targets.dtype.kind not in "biuf"
            or not np.all(np.isfinite(targets))):
        raise ValueError(f"targets must be {n} finite numbers (one per candidate), got shape "
                         f"{targets.shape}, dtype {targets.dtype}")
    targets = targets.astype(np.float64)
    groups = np.zeros(n, np.int64) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},) (one label per candidate), "
                         f"got {groups.shape}")
    groups = np.unique(groups, return_inverse=True)[1].reshape(-1).astype(np.int32)
    vocab_sizes = vocab_for(tokens, config, init_state)
    check_vocab(tokens, vocab_sizes)

    target_mean, target_scale = float(targets.mean()), float(targets.std()) or 1.0
    standardized = (targets - target_mean) / target_scale

    rng = np.random.default_rng(config.seed)
    n_holdout = int(round(config.holdout_fraction * n))
    if n_holdout < 2 or n - n_holdout < 2:
        n_holdout = 0
    permutation = rng.permutation(n)
    holdout, train = permutation[:n_holdout], permutation[n_holdout:]

    padded_n = bucket(train.size, config.set_size)
    data = {"tokens": np.zeros((padded_n,) + tokens.shape[1:], np.int32),
            "lengths": np.ones(padded_n, np.int32),
            "targets": np.zeros(padded_n, np.float32),
            "groups": np.zeros(padded_n, np.int32),
            "valid": np.zeros(padded_n, bool)}
    for name, values in (("tokens", tokens), ("lengths", lengths), ("targets", standardized),
                         ("groups", groups),
                         ("valid", np.ones(n, bool))):
        data[name][:train.size] = values[train]
    data = jax.tree.map(jnp.asarray, data)

    programs = programs_for(config, vocab_sizes)
    if init_state is None:
        init_state = initialize(vocab_sizes, config)
    params = init_state.params
    train_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    opt_state = programs.optimizer.init(params)

    def holdout_tau(params) -> float:
        if n_holdout == 0:
            return float("nan")
        scores = raw_scores(programs, params, config, tokens[holdout], lengths[holdout])
        return grouped_tau(targets[holdout], scores, groups[holdout])

    best_params, best_tau, best_step = params, holdout_tau(params), 0
    steps, evaluations_without_gain = 0, 0
    while steps < config.max_steps:  # whole chunks: max_steps rounds up to a multiple of eval_every
        params, opt_state, train_key, _ = programs.train_chunk(params, opt_state, train_key, data)
        steps += config.eval_every
        if n_holdout == 0:
            best_params, best_step = params, steps
            continue
        tau = holdout_tau(params)
        if tau > best_tau or not np.isfinite(best_tau):
            best_params, best_tau, best_step = params, tau, steps
            evaluations_without_gain = 0
        else:
            evaluations_without_gain += 1
            if evaluations_without_gain >= config.patience:
                break
    return ControllerState(config=config, vocab_sizes=vocab_sizes, params=best_params,
                           target_mean=target_mean if config.loss == "mse" else 0.0,
                           target_scale=target_scale if config.loss == "mse" else 1.0,
                           steps=best_step, holdout_tau=best_tau)
