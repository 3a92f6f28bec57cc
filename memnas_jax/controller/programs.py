"""The controller's compiled programs (train step, scores), cached per model shape."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from memnas_jax.controller.config import ControllerConfig
from memnas_jax.controller.model import make_model


class Programs(NamedTuple):
    init_params: Any  # key -> params
    optimizer: optax.GradientTransformation
    train_chunk: Any  # (params, opt_state, key, data) -> (params, opt_state, key, mean loss)
    score_sets: Any  # (params, tokens, lengths, set_sizes) -> scores


# Fields that change no compiled program: reset them in the cache key so that e.g. a new seed
# reuses the compiled train step.
_RUN_ONLY_FIELDS = dict(max_steps=1, patience=1, holdout_fraction=0.0, predict_batch=1, seed=0,
                        vocab_sizes=None)


def programs_for(config: ControllerConfig, vocab_sizes: tuple[int, ...]) -> Programs:
    return _build_programs(dataclasses.replace(config, **_RUN_ONLY_FIELDS), vocab_sizes)


@functools.lru_cache(maxsize=32)
def _build_programs(config: ControllerConfig, vocab_sizes: tuple[int, ...]) -> Programs:
    model = make_model(config, vocab_sizes)

    @jax.jit  # eager init of the scanned LSTMs takes seconds; compiled, a fraction of that
    def init_params(key):
        dummy = jnp.zeros((1, 1, 1, len(vocab_sizes)), jnp.int32)
        one = jnp.ones((1, 1), jnp.int32)
        return model.init(key, dummy, one, one[0])["params"]

    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(config.learning_rate, weight_decay=config.weight_decay))

    def sample_sets(key, data):
        """Random sets of one group each, members first and in random order."""
        group_key, order_key = jax.random.split(key)
        valid = data["valid"]
        anchors = jax.random.choice(group_key, valid.shape[0], (config.sets_per_batch,),
                                    p=valid / valid.sum())
        set_group = data["groups"][anchors]
        priority = jax.random.uniform(order_key, (config.sets_per_batch, valid.shape[0]))
        eligible = valid[None, :] & (data["groups"][None, :] == set_group[:, None])
        priority = jnp.where(eligible, priority, -1.0)
        top, members = jax.lax.top_k(priority, config.set_size)
        return members, top >= 0.0

    def loss_fn(params, key, data):
        members, is_member = sample_sets(key, data)
        lengths = jnp.where(is_member, data["lengths"][members], 1)
        scores = model.apply({"params": params}, data["tokens"][members], lengths,
                             is_member.sum(axis=1))
        scores, targets = scores.reshape(-1), data["targets"][members].reshape(-1)
        groups, mask = data["groups"][members].reshape(-1), is_member.reshape(-1)
        if config.loss == "mse":
            return jnp.sum(mask * (scores - targets) ** 2) / jnp.maximum(mask.sum(), 1)
        # every ordered pair (i better than j) of the batch within a group, across sets too, so
        # that scores of different sets share one scale
        better = ((targets[:, None] > targets[None, :]) & mask[:, None] & mask[None, :]
                  & (groups[:, None] == groups[None, :]))
        pair_loss = jax.nn.softplus(scores[None, :] - scores[:, None])
        return jnp.sum(jnp.where(better, pair_loss, 0.0)) / jnp.maximum(better.sum(), 1)

    @jax.jit
    def train_chunk(params, opt_state, key, data):
        def step(carry, _):
            params, opt_state, key = carry
            key, step_key = jax.random.split(key)
            loss, grads = jax.value_and_grad(loss_fn)(params, step_key, data)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, key), loss

        (params, opt_state, key), losses = jax.lax.scan(
            step, (params, opt_state, key), None, length=config.eval_every)
        return params, opt_state, key, losses.mean()

    @jax.jit
    def score_sets(params, tokens, lengths, set_sizes):
        return model.apply({"params": params}, tokens, lengths, set_sizes)

    return Programs(init_params, optimizer, train_chunk, score_sets)
