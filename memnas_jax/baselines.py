"""The hand-designed baselines, by name: CIFAR ResNet-20/56/110 (He et al., shortcut A) and
MobileNetV2 for 32x32 inputs, as in the MemNAS tables, and ResNet-8/14 for the low-memory end.
`experiments/train_final.py --baseline=NAME` trains them with the same recipe and data as a
searched architecture, and measures their memory with the same accounting (`memory.analyze` at
batch 1)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from memnas_jax.mobilenet import CIFARMobileNetV2
from memnas_jax.resnet import CIFARResNet

BASELINES = ("resnet8", "resnet14", "resnet20", "resnet56", "resnet110", "mobilenetv2")


def baseline_model(name: str, num_classes: int = 10, dtype: Any = jnp.float32) -> nn.Module:
    """The linen module of baseline `name` (`__call__(x, train)`, BatchNorm in `batch_stats`)."""
    if name.startswith("resnet") and name in BASELINES:
        return CIFARResNet(depth=int(name[len("resnet"):]), num_classes=num_classes, dtype=dtype)
    if name == "mobilenetv2":
        return CIFARMobileNetV2(num_classes=num_classes, dtype=dtype)
    raise ValueError(f"unknown baseline {name!r}; use one of {BASELINES}")


__all__ = ["BASELINES", "baseline_model"]
