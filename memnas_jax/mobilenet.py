"""MobileNetV2 (Sandler et al., 2018) for 32x32 images: the mobile baseline of the MemNAS tables.

The ImageNet network with the CIFAR ports' changes (e.g. kuangliu/pytorch-cifar): the stem and
the first stride-2 stage run at stride 1, so a 32x32 image reaches the last stages at 4x4 as a
224x224 one reaches them at 7x7; global average pool; a 10- or 100-way head.

    3x3 conv (32), stride 1 -> inverted residual stages (t, c, n, s):
    (1, 16, 1, 1) (6, 24, 2, 1) (6, 32, 3, 2) (6, 64, 4, 2) (6, 96, 3, 1) (6, 160, 3, 2)
    (6, 320, 1, 1) -> 1x1 conv (1280) -> global average pool -> Dense

An inverted residual: 1x1 expansion (t x) -> BN -> ReLU6 -> 3x3 depthwise (stride s) -> BN ->
ReLU6 -> 1x1 projection -> BN, plus the input when the shape is unchanged (stride 1, same width).
With 10 classes: 2,236,682 parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# (expansion t, output channels c, blocks n, stride s of the first block): the CIFAR setting.
CIFAR_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))
_PAD3 = ((1, 1), (1, 1))  # PyTorch-style: a stride-2 3x3 conv reads the same pixels
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class InvertedResidual(nn.Module):
    in_channels: int
    out_channels: int
    stride: int
    expansion: int
    dtype: Dtype = jnp.float32
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        def norm(name):
            return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                epsilon=1e-5, dtype=self.dtype, name=name)
        hidden = self.in_channels * self.expansion
        y = x
        if self.expansion != 1:
            y = nn.Conv(hidden, (1, 1), use_bias=False, kernel_init=_conv_init, dtype=self.dtype,
                        name="expand")(y)
            y = nn.relu6(norm("expand_bn")(y))
        y = nn.Conv(hidden, (3, 3), self.stride, padding=_PAD3, feature_group_count=hidden,
                    use_bias=False, kernel_init=_conv_init, dtype=self.dtype, name="depthwise")(y)
        y = nn.relu6(norm("depthwise_bn")(y))
        y = nn.Conv(self.out_channels, (1, 1), use_bias=False, kernel_init=_conv_init,
                    dtype=self.dtype, name="project")(y)
        y = norm("project_bn")(y)
        if self.stride == 1 and self.in_channels == self.out_channels:
            y = y + x
        return y


class CIFARMobileNetV2(nn.Module):
    """NHWC (B, 32, 32, C) -> float32 logits (B, num_classes); BatchNorm in `batch_stats`."""

    num_classes: int = 10
    stages: tuple[tuple[int, int, int, int], ...] = CIFAR_STAGES
    stem_channels: int = 32
    last_channels: int = 1280
    dtype: Dtype = jnp.float32
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"CIFARMobileNetV2 expects NHWC images, got shape {tuple(x.shape)}")

        def norm(name):
            return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                epsilon=1e-5, dtype=self.dtype, name=name)
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(self.stem_channels, (3, 3), padding=_PAD3, use_bias=False,
                    kernel_init=_conv_init, dtype=self.dtype, name="stem")(x)
        x = nn.relu6(norm("stem_bn")(x))
        channels = self.stem_channels
        for s, (t, c, n, stride) in enumerate(self.stages):
            for i in range(n):
                x = InvertedResidual(channels, c, stride if i == 0 else 1, t, self.dtype,
                                     self.bn_momentum, name=f"stage{s + 1}_block{i + 1}")(x, train)
                channels = c
        x = nn.Conv(self.last_channels, (1, 1), use_bias=False, kernel_init=_conv_init,
                    dtype=self.dtype, name="last")(x)
        x = nn.relu6(norm("last_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


__all__ = ["CIFAR_STAGES", "CIFARMobileNetV2", "InvertedResidual"]
