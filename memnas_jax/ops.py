"""The seven candidate ops and the removed op as Flax linen modules (docs/method.md §2).

Every op maps its input (any channel count) to the block width C_b; all its conv layers are
followed by BatchNorm, as in the authors' generated PyTorch networks (reference/golden README,
"Op index mapping"). Padding is explicit and symmetric, as PyTorch's, so a stride-2 op gives
ceil(n / 2) and reads the same pixels as the authors' modules:

| idx | family      | definition                                                             |
|-----|-------------|------------------------------------------------------------------------|
| 0,1 | `PoolOp`    | 1x1 conv -> BN -> 3x3 avg/max pool (stride s, pad 1); no ReLU           |
| 2,6 | `ConvOp`    | 3x3 conv (dilation 2 pad 2 / dilation 1 pad 1, stride s) -> BN -> ReLU  |
| 3   | `FacConvOp` | 1x1 conv (stride s) -> BN -> ReLU -> 1x7 -> BN -> ReLU -> 7x1 -> BN -> ReLU |
| 4,5 | `SepConvOp` | kxk depthwise (stride s, pad k//2) -> BN -> 1x1 conv -> BN -> ReLU      |
| -   | `RemovedOp` | identity, or a bare 1x1 conv with the right stride (skeleton.removed_op) |

Their closed-form parameter counts are pure Python, in `memnas_jax.plan` (`op_param_count`,
re-exported here), so the search counts parameters of hundreds of candidates without tracing.

The depthwise conv has two implementations behind `depthwise_impl`: "xla" (a grouped
`lax.conv_general_dilated`, exactly what `nn.Conv(feature_group_count=C)` runs) and "shifted"
(k*k shifted multiply-adds with a hand-written backward of shifted multiply-adds). XLA:CPU lowers
the weight gradient of a grouped conv to a dense conv, ~96x the needed work (docs/method.md
§11); "shifted" avoids that on CPU. Both own the same parameters, so checkpoints move freely.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from memnas_jax.encoding import NUM_OPS
from memnas_jax.plan import (  # re-exported: the counts of these modules
    bn_param_count,
    check_op,
    conv_param_count,
    op_param_count,
    removed_op_needs_conv,
)
from memnas_jax.space import REMOVED_OP_STYLES, Skeleton

DEPTHWISE_IMPLS = ("xla", "shifted")
Dtype = Any


@dataclasses.dataclass(frozen=True)
class OpSettings:
    """What every op needs besides its width and stride (taken from the `Skeleton`)."""

    conv_bias: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    removed_op: str = "identity"
    depthwise_impl: str = "xla"
    dtype: Dtype = jnp.float32  # compute dtype; parameters stay float32

    def __post_init__(self):
        if self.depthwise_impl not in DEPTHWISE_IMPLS:
            raise ValueError(f"depthwise_impl {self.depthwise_impl!r} is not one of "
                             f"{DEPTHWISE_IMPLS}")
        if self.removed_op not in REMOVED_OP_STYLES:
            raise ValueError(f"removed_op {self.removed_op!r} is not one of {REMOVED_OP_STYLES}")

    @classmethod
    def from_skeleton(cls, skeleton: Skeleton, depthwise_impl: str = "xla",
                      dtype: Dtype = jnp.float32) -> "OpSettings":
        return cls(conv_bias=skeleton.conv_bias, bn_momentum=skeleton.bn_momentum,
                   bn_epsilon=skeleton.bn_epsilon, removed_op=skeleton.removed_op,
                   depthwise_impl=depthwise_impl, dtype=dtype)


def same_padding(kernel: tuple[int, int], dilation: int = 1) -> tuple[tuple[int, int], ...]:
    """PyTorch-style symmetric padding d*(k-1)/2 per side (odd kernels)."""
    return tuple((dilation * (k - 1) // 2,) * 2 for k in kernel)


# ---------------------------------------------------------------------------------------------
# Depthwise convolution as shifted multiply-adds


def _shifted_window(xp: jax.Array, i: int, j: int, out_hw: tuple[int, int], stride: int
                    ) -> jax.Array:
    """xp[:, i + s*h, j + s*w, :] for h < out_h, w < out_w."""
    n, _, _, c = xp.shape
    return lax.slice(xp, (0, i, j, 0),
                     (n, i + (out_hw[0] - 1) * stride + 1, j + (out_hw[1] - 1) * stride + 1, c),
                     (1, stride, stride, 1))


def _depthwise_valid(xp: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Unpadded depthwise correlation: sum over taps of a strided window times a (C,) weight."""
    kh, kw, _ = kernel.shape
    out_hw = ((xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1)
    return sum(_shifted_window(xp, i, j, out_hw, stride) * kernel[i, j]
               for i in range(kh) for j in range(kw))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv_shifted(x: jax.Array, kernel: jax.Array, stride: int,
                           padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Depthwise conv of NHWC `x` with a (kh, kw, C) kernel, as k*k shifted multiply-adds."""
    return _depthwise_valid(jnp.pad(x, ((0, 0), *padding, (0, 0))), kernel, stride)


def _depthwise_fwd(x, kernel, stride, padding):
    return depthwise_conv_shifted(x, kernel, stride, padding), (x, kernel)


def _depthwise_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    kh, kw, _ = kernel.shape
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_hw = g.shape[1:3]
    # d kernel[i, j] = sum over batch and positions of g * the window tap (i, j) read.
    d_kernel = jnp.stack([
        jnp.stack([jnp.sum(g * _shifted_window(xp, i, j, out_hw, stride), axis=(0, 1, 2),
                           dtype=jnp.float32) for j in range(kw)])
        for i in range(kh)]).astype(kernel.dtype)
    # d x is a stride-1 correlation of g, dilated by the stride and padded so that it lines up
    # with the unpadded x, with the flipped kernel (negative lax.pad crops).
    h, w = x.shape[1:3]
    (top, _), (left, _) = padding
    config = [(0, 0, 0)]
    for size, k, before, out in ((h, kh, top, out_hw[0]), (w, kw, left, out_hw[1])):
        low = k - 1 - before
        config.append((low, size + k - 1 - low - ((out - 1) * stride + 1), stride - 1))
    config.append((0, 0, 0))
    g_dilated = lax.pad(g, jnp.zeros((), g.dtype), config)
    d_x = _depthwise_valid(g_dilated, kernel[::-1, ::-1], 1)
    return d_x.astype(x.dtype), d_kernel


depthwise_conv_shifted.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
    """k x k depthwise conv (channel multiplier 1), stride s, PyTorch padding k//2.

    Parameters `kernel` (kh, kw, 1, C) and `bias` (C,) have the same shapes and init as
    `nn.Conv(C, feature_group_count=C)`, whichever `impl` runs.
    """

    kernel_size: int
    stride: int = 1
    use_bias: bool = True
    impl: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, channels),
                            jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros_init(), (channels,), jnp.float32)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        padding = same_padding((k, k))
        if self.impl == "shifted":
            y = depthwise_conv_shifted(x, kernel[:, :, 0, :], self.stride, padding)
        elif self.impl == "xla":
            y = lax.conv_general_dilated(x, kernel, (self.stride,) * 2, padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=channels)
        else:
            raise ValueError(f"depthwise impl {self.impl!r} is not one of {DEPTHWISE_IMPLS}")
        return y if bias is None else y + bias


# ---------------------------------------------------------------------------------------------
# Building blocks


class ConvBN(nn.Module):
    """Conv (PyTorch padding) -> BatchNorm -> optional ReLU."""

    features: int
    kernel: tuple[int, int] = (3, 3)
    stride: int = 1
    dilation: int = 1
    relu: bool = True
    settings: OpSettings = OpSettings()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        s = self.settings
        x = nn.Conv(self.features, self.kernel, strides=self.stride,
                    padding=same_padding(self.kernel, self.dilation),
                    kernel_dilation=self.dilation, use_bias=s.conv_bias, dtype=s.dtype,
                    name="conv")(x)
        x = batch_norm(s, train, "bn")(x)
        return nn.relu(x) if self.relu else x


def batch_norm(settings: OpSettings, train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=settings.bn_momentum,
                        epsilon=settings.bn_epsilon, dtype=settings.dtype, name=name)


# ---------------------------------------------------------------------------------------------
# The op families. Each has fields (width, stride, settings) plus its family parameters and a
# __call__(x, train); plan.op_param_count has their counts.


class PoolOp(nn.Module):
    """1x1 conv -> BN -> 3x3 pool (stride s, pad 1). Average pooling divides by 9 at the
    border too, as PyTorch's AvgPool2d default (count_include_pad=True)."""

    width: int
    stride: int = 1
    settings: OpSettings = OpSettings()
    kind: str = "avg"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ConvBN(self.width, (1, 1), relu=False, settings=self.settings, name="conv_bn")(
            x, train)
        window, strides, pad = (3, 3), (self.stride,) * 2, ((1, 1), (1, 1))
        if self.kind == "avg":
            # Zero padding then a VALID average divides by 9 at the border, the same numbers
            # as count_include_pad=True, but lowers to PAD + AVERAGE_POOL_2D, which TFLite
            # Micro runs (a padded reduce_window does not convert to it).
            x = jnp.pad(x, ((0, 0), *pad, (0, 0)))
            return nn.avg_pool(x, window, strides, "VALID")
        if self.kind == "max":
            return nn.max_pool(x, window, strides, pad)
        raise ValueError(f"pool kind {self.kind!r} is not 'avg' or 'max'")



class ConvOp(nn.Module):
    """k x k conv (dilation d, stride s) -> BN -> ReLU."""

    width: int
    stride: int = 1
    settings: OpSettings = OpSettings()
    kernel_size: int = 3
    dilation: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return ConvBN(self.width, (self.kernel_size,) * 2, self.stride, self.dilation,
                      settings=self.settings, name="conv_bn")(x, train)



class FacConvOp(nn.Module):
    """1x1 conv (stride s) -> BN -> ReLU -> 1xk -> BN -> ReLU -> kx1 -> BN -> ReLU."""

    width: int
    stride: int = 1
    settings: OpSettings = OpSettings()
    kernel_size: int = 7

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        k, s = self.kernel_size, self.settings
        x = ConvBN(self.width, (1, 1), self.stride, settings=s, name="reduce")(x, train)
        x = ConvBN(self.width, (1, k), settings=s, name="conv_1xk")(x, train)
        return ConvBN(self.width, (k, 1), settings=s, name="conv_kx1")(x, train)



class SepConvOp(nn.Module):
    """k x k depthwise (stride s) -> BN -> 1x1 conv -> BN -> ReLU (one separable layer, not
    the DARTS double)."""

    width: int
    stride: int = 1
    settings: OpSettings = OpSettings()
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        s = self.settings
        x = DepthwiseConv(self.kernel_size, self.stride, s.conv_bias, s.depthwise_impl, s.dtype,
                          name="depthwise")(x)
        x = batch_norm(s, train, "depthwise_bn")(x)
        return ConvBN(self.width, (1, 1), settings=s, name="pointwise")(x, train)



class RemovedOp(nn.Module):
    """A trimmed branch. "identity" style: the input itself when it already has the branch's
    shape (width channels, stride 1), else a bare 1x1 conv with the right stride (no BN, no
    ReLU); "conv1x1" style: always that conv (the authors' choice, with the stride they forgot).
    """

    width: int
    stride: int = 1
    settings: OpSettings = OpSettings()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        if not removed_op_needs_conv(x.shape[-1], self.width, self.stride,
                                     self.settings.removed_op):
            return x
        s = self.settings
        return nn.Conv(self.width, (1, 1), strides=self.stride, padding=((0, 0), (0, 0)),
                       use_bias=s.conv_bias, dtype=s.dtype, name="conv")(x)




# op index -> (family, family parameters), in the authors' index order (encoding.OP_NAMES).
OP_FAMILIES: tuple[tuple[type[nn.Module], dict], ...] = (
    (PoolOp, {"kind": "avg"}),
    (PoolOp, {"kind": "max"}),
    (ConvOp, {"kernel_size": 3, "dilation": 2}),
    (FacConvOp, {"kernel_size": 7}),
    (SepConvOp, {"kernel_size": 5}),
    (SepConvOp, {"kernel_size": 3}),
    (ConvOp, {"kernel_size": 3, "dilation": 1}),
)
assert len(OP_FAMILIES) == NUM_OPS


def make_op(op: int | None, width: int, stride: int, settings: OpSettings,
            name: str | None = None, **module_kwargs: Any) -> nn.Module:
    """The module of op index `op` (None = removed) mapping any input to `width` channels
    (`module_kwargs`: e.g. parent=None for a module applied functionally)."""
    check_op(op)
    if op is None:
        return RemovedOp(width, stride, settings, name=name, **module_kwargs)
    family, params = OP_FAMILIES[op]
    return family(width, stride, settings, name=name, **params, **module_kwargs)


__all__ = [
    "ConvBN", "ConvOp", "DEPTHWISE_IMPLS", "DepthwiseConv", "FacConvOp", "OP_FAMILIES",
    "OpSettings", "PoolOp", "RemovedOp", "SepConvOp", "batch_norm", "bn_param_count",
    "conv_param_count", "depthwise_conv_shifted", "make_op", "op_param_count", "same_padding",
]
