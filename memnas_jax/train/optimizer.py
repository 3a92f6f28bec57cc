"""The optimizer and learning-rate schedule of `config.train` (optax)."""

from __future__ import annotations

import ml_collections
import optax


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    lr, total = config.learning_rate, config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    if config.schedule == "step":
        # Like PyTorch MultiStepLR stepped at each epoch start: epoch m is the first at lr*gamma.
        main = optax.piecewise_constant_schedule(
            lr, {max(m * steps_per_epoch - warmup, 1): config.gamma for m in config.milestones})
    else:
        main = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
    schedule = make_schedule(config, steps_per_epoch)
    if config.optimizer == "sgd":
        parts = [optax.add_decayed_weights(config.weight_decay)] if config.weight_decay else []
        parts.append(optax.sgd(schedule, momentum=config.momentum or None,
                               nesterov=config.nesterov))
    else:
        parts = [optax.adamw(schedule, weight_decay=config.weight_decay)]
    if config.grad_clip_norm:
        parts.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
    return optax.chain(*parts)
