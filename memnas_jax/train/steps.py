"""The train state and the jitted steps of one model: loss, data order, the train and evaluation
steps (data parallel over a 1-D mesh) and the initialiser."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from memnas_jax import augment, sharding


class TrainState(flax.struct.PyTreeNode):
    """Everything a resumed run needs. `rng` is the raw uint32 data key (epoch keys fold in
    the epoch), `epoch` the number of finished epochs."""

    step: jax.Array
    epoch: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def fresh(cls, tx: optax.GradientTransformation, variables: Any, data_key: jax.Array
              ) -> TrainState:
        """Epoch and step 0 from freshly initialised `variables`."""
        params = variables["params"]
        return cls(step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), params=params,
                   batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                   rng=data_key)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
    """Per-example softmax cross-entropy, in float32."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def epoch_keys(rng: jax.Array, epoch: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(shuffling key, augmentation key) of an epoch: a function of the data key and the epoch
    alone, so a resumed run sees the same data as an uninterrupted one."""
    keys = jax.random.split(jax.random.fold_in(rng, epoch))
    return keys[0], keys[1]


@functools.partial(jax.jit, static_argnums=2)
def permutation(rng: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
    return augment.epoch_permutation(epoch_keys(rng, epoch)[0], num_examples)


@dataclasses.dataclass(frozen=True)
class StepFactory:
    """Builds the jitted train and eval steps for one model / optimizer / mesh."""

    model: nn.Module
    tx: optax.GradientTransformation
    mesh: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool
    cutout: int
    label_smoothing: float
    batch_size: int

    def _train_on_batch(self, state: TrainState, metrics: dict, images: jax.Array,
                        labels: jax.Array) -> tuple[TrainState, dict]:
        images, labels = sharding.constrain_batch((images, labels), self.mesh)
        key = jax.random.fold_in(epoch_keys(state.rng, state.epoch)[1], metrics["steps"])
        x = augment.augment_batch(key, images, mean=self.mean, std=self.std,
                                   crop_padding=self.crop_padding, flip=self.flip,
                                   cutout_length=self.cutout)

        def loss_fn(params):
            logits, updates = self.model.apply(
                {"params": params, "batch_stats": state.batch_stats}, x, train=True,
                mutable=["batch_stats"])
            loss = jnp.mean(cross_entropy(logits, labels, self.label_smoothing))
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params,
                              updates), batch_stats=batch_stats, opt_state=opt_state)
        metrics = dict(loss_sum=metrics["loss_sum"] + loss, steps=metrics["steps"] + 1)
        return state, metrics

    def resident_train_step(self) -> Callable:
        """(state, metrics, all images, all labels, permutation) -> (state, metrics); the
        batch is the `steps`-th slice of the epoch's permutation."""
        def step(state, metrics, images, labels, permutation):
            idx = jax.lax.dynamic_slice_in_dim(permutation, metrics["steps"] * self.batch_size,
                                               self.batch_size)
            return self._train_on_batch(state, metrics, images[idx], labels[idx])
        return self._jit_train(step)

    def streamed_train_step(self) -> Callable:
        """(state, metrics, batch images, batch labels) -> (state, metrics)."""
        return self._jit_train(self._train_on_batch)

    def init_fn(self, sample_shape: tuple[int, ...]) -> Callable:
        """raw uint32 key -> a fresh `TrainState`."""
        def init(rng):
            init_key, data_key = jax.random.split(rng)
            variables = self.model.init(init_key, jnp.zeros(sample_shape, jnp.float32),
                                        train=False)
            return TrainState.fresh(self.tx, variables, data_key)
        return init

    def _jit_train(self, step: Callable) -> Callable:
        repl = sharding.replicated(self.mesh)
        return jax.jit(step, donate_argnums=(0, 1), out_shardings=(repl, repl))

    def eval_step(self) -> Callable:
        """(variables, totals, images (B,...), labels, mask) -> totals with correct / loss sums."""
        def step(variables, totals, images, labels, mask):
            images, labels, mask = sharding.constrain_batch((images, labels, mask), self.mesh)
            logits = self.model.apply(variables, augment.normalize(images, self.mean, self.std),
                                      train=False)
            correct = (jnp.argmax(logits, -1) == labels) & mask
            loss = jnp.where(mask, cross_entropy(logits, labels), 0.0)
            return dict(correct=totals["correct"] + jnp.sum(correct, dtype=jnp.int32),
                        loss_sum=totals["loss_sum"] + jnp.sum(loss),
                        batches=totals["batches"] + 1)
        return jax.jit(step, donate_argnums=(1,), out_shardings=sharding.replicated(self.mesh))

    def resident_eval_step(self) -> Callable:
        """Like `eval_step` on the `batches`-th batch of (batches, B, ...) device arrays."""
        inner = self.eval_step()

        def step(variables, totals, images, labels, mask):
            i = totals["batches"]
            return inner(variables, totals, images[i], labels[i], mask[i])
        return jax.jit(step, donate_argnums=(1,),
                       out_shardings=sharding.replicated(self.mesh))
