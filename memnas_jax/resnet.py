"""The CIFAR ResNets of He et al. (2016, section 4.2): the manual baselines of the MemNAS tables.

    3x3 conv (16) -> BN -> ReLU -> 3 stages of n basic blocks (16, 32, 64 channels; the first
    block of stages 2 and 3 has stride 2) -> global average pool -> Dense, depth = 6n + 2.

Shortcut "A" (the paper's CIFAR choice): identity, and where the shape changes the input is
subsampled with stride 2 and its channels are zero-padded: no parameters. ResNet-20/56/110 then
have 269,722 / 853,018 / 1,727,962 parameters (ResNet-56 = 0.85 M = 3.4 MB, as in the MemNAS
table). Shortcut "B": a 1x1 strided conv + BN projection where the shape changes
(272,474 / 855,770 / 1,730,714).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

SHORTCUTS = ("A", "B")
Dtype = Any

# PyTorch-style explicit padding: a stride-2 3x3 conv maps 32 -> 16 reading the same pixels as
# the reference implementations (XLA's "SAME" would pad (0, 1) instead of (1, 1)).
_PAD3 = ((1, 1), (1, 1))
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # He et al. init


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, -> ReLU."""

    features: int
    stride: int = 1
    shortcut: str = "A"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = lambda stride, name: nn.Conv(self.features, (3, 3), stride, padding=_PAD3,
                                            use_bias=False, kernel_init=_conv_init,
                                            dtype=self.dtype, name=name)
        norm = lambda name: nn.BatchNorm(use_running_average=not train,
                                         momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                                         dtype=self.dtype, name=name)
        y = nn.relu(norm("bn1")(conv(self.stride, "conv1")(x)))
        y = norm("bn2")(conv(1, "conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            if self.shortcut == "A":
                x = x[:, ::self.stride, ::self.stride, :]
                extra = self.features - x.shape[-1]
                # Zero channels split on both sides, as the common PyTorch CIFAR ResNets.
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
            else:
                x = nn.Conv(self.features, (1, 1), self.stride, padding="VALID", use_bias=False,
                            kernel_init=_conv_init, dtype=self.dtype, name="proj")(x)
                x = norm("proj_bn")(x)
        return nn.relu(y + x)


class CIFARResNet(nn.Module):
    """ResNet-`depth` for 32x32 images: NHWC (B, H, W, C) -> float32 logits (B, num_classes).

    BatchNorm statistics live in `batch_stats`: apply with `train=True,
    mutable=["batch_stats"]` to train, `train=False` to evaluate.
    """

    depth: int = 56
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)
    shortcut: str = "A"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @property
    def blocks_per_stage(self) -> int:
        if not isinstance(self.depth, int) or self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, "
                             f"110, ...), got {self.depth!r}")
        return (self.depth - 2) // 6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        n = self.blocks_per_stage
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut {self.shortcut!r} is not one of {SHORTCUTS}")
        if x.ndim != 4:
            raise ValueError(f"CIFARResNet expects NHWC images (batch, height, width, "
                             f"channels), got shape {tuple(x.shape)}")
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(self.widths[0], (3, 3), padding=_PAD3, use_bias=False,
                    kernel_init=_conv_init, dtype=self.dtype, name="stem")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                         epsilon=self.bn_epsilon, dtype=self.dtype, name="stem_bn")(x)
        x = nn.relu(x)
        for s, features in enumerate(self.widths):
            for i in range(n):
                x = BasicBlock(features, 2 if s > 0 and i == 0 else 1, self.shortcut,
                               self.bn_momentum, self.bn_epsilon, self.dtype,
                               name=f"stage{s + 1}_block{i + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


__all__ = ["BasicBlock", "CIFARResNet", "SHORTCUTS"]
