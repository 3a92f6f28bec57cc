"""The search space: the op table and the network skeletons (docs/method.md §2).

numpy-free and jax-free: a `Skeleton` is a frozen dataclass that configs build and every other
module (network, memory, grow-trim) reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from memnas_jax.encoding import DEFAULT_MAX_CELLS, NUM_OPS, OP_NAMES

# What each op is, in the authors' index order (reference/golden op_index). Used by docs and
# by the closed-form parameter counts in memnas_jax.network.
OP_TABLE: tuple[tuple[int, str, str], ...] = (
    (0, "avg_pool_3x3", "1x1 conv -> BN -> 3x3 avg pool (stride s); no ReLU"),
    (1, "max_pool_3x3", "1x1 conv -> BN -> 3x3 max pool (stride s); no ReLU"),
    (2, "dil_conv_3x3", "3x3 conv, dilation 2, stride s -> BN -> ReLU"),
    (3, "fac_conv_7",
     "1x1 conv (stride s) -> BN -> ReLU -> 1x7 -> BN -> ReLU -> 7x1 -> BN -> ReLU"),
    (4, "sep_conv_5x5", "5x5 depthwise (stride s) -> BN -> 1x1 conv -> BN -> ReLU"),
    (5, "sep_conv_3x3", "3x3 depthwise (stride s) -> BN -> 1x1 conv -> BN -> ReLU"),
    (6, "conv_3x3", "3x3 conv (stride s) -> BN -> ReLU"),
)
assert tuple(name for _, name, _ in OP_TABLE) == OP_NAMES and len(OP_TABLE) == NUM_OPS

# How a removed (trimmed) op is realised:
#   "identity": identity when the input already has the branch's shape, else a 1x1 conv with the
#               right stride (docs/method.md §2; Fig. 1(c) draws a wire);
#   "conv1x1":  always a bare 1x1 conv with bias, as the authors' generated networks, but with
#               the right stride (their missing stride broke stride-2 blocks).
REMOVED_OP_STYLES = ("identity", "conv1x1")
HEADS = ("maxpool_dense", "global_avg_dense")


@dataclasses.dataclass(frozen=True)
class Skeleton:
    """Everything about a network that is not in the cell encoding.

    widths: the op output width C_b of each block; strides: each block's stride (only ops reading
    the block input use it); head "maxpool_dense" is the authors' CIFAR head (2x2 max pool ->
    flatten -> Dense), "global_avg_dense" global average pooling -> Dense.
    """

    widths: tuple[int, ...] = (64, 64, 64, 64, 64)
    strides: tuple[int, ...] = (1, 2, 1, 2, 1)
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    head: str = "maxpool_dense"
    head_pool: int = 2
    stem_width: int = 0  # 0 = no stem: block 1 reads the image, as the authors' forward()
    stem_stride: int = 1
    max_cells: int = DEFAULT_MAX_CELLS
    removed_op: str = "identity"
    conv_bias: bool = True  # the authors' PyTorch convs all have a bias
    bn_momentum: float = 0.9  # flax convention; PyTorch momentum 0.1
    bn_epsilon: float = 1e-5

    def __post_init__(self):
        widths, strides = tuple(int(w) for w in self.widths), tuple(int(s) for s in self.strides)
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "strides", strides)
        if len(widths) != len(strides) or not widths:
            raise ValueError(f"Skeleton: {len(widths)} widths but {len(strides)} strides")
        if any(w < 1 for w in widths) or any(s not in (1, 2) for s in strides):
            raise ValueError(f"Skeleton: widths must be >= 1 and strides 1 or 2, got "
                             f"{widths}, {strides}")
        if self.head not in HEADS:
            raise ValueError(f"Skeleton: head {self.head!r} is not one of {HEADS}")
        if self.removed_op not in REMOVED_OP_STYLES:
            raise ValueError(f"Skeleton: removed_op {self.removed_op!r} is not one of "
                             f"{REMOVED_OP_STYLES}")
        if self.max_cells < 1:
            raise ValueError("Skeleton: max_cells must be >= 1")
        size = self.image_size // self.stem_stride
        for s in strides:
            size = -(-size // s)
        if self.head == "maxpool_dense" and size < self.head_pool:
            raise ValueError(f"Skeleton: final feature map {size}x{size} is smaller than the "
                             f"head pool {self.head_pool}")

    @property
    def num_blocks(self) -> int:
        return len(self.widths)

    def spatial_sizes(self) -> tuple[int, ...]:
        """The feature-map side of each block's output (SAME padding: ceil division)."""
        size, out = -(-self.image_size // self.stem_stride), []
        for s in self.strides:
            size = -(-size // s)
            out.append(size)
        return tuple(out)

    def replace(self, **changes: Any) -> "Skeleton":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Skeleton":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"Skeleton: unknown fields {sorted(unknown)}")
        return cls(**d)


def block_widths(width: int, schedule: str | Sequence[int] = "uniform",
                 num_blocks: int = 5) -> tuple[int, ...]:
    """Per-block widths: "uniform" (w in every block, the authors' round 2 on), "doubling"
    (w, w, 2w, 2w, 4w, their rounds 0-1) or explicit multipliers."""
    if schedule == "uniform":
        mults: Sequence[int] = (1,) * num_blocks
    elif schedule == "doubling":
        if num_blocks != 5:
            raise ValueError("the doubling schedule is defined for 5 blocks")
        mults = (1, 1, 2, 2, 4)
    elif isinstance(schedule, str):
        raise ValueError(f"unknown width schedule {schedule!r}; use 'uniform', 'doubling' or a "
                         f"list of multipliers")
    else:
        mults = tuple(schedule)
        if len(mults) != num_blocks:
            raise ValueError(f"{len(mults)} width multipliers for {num_blocks} blocks")
    return tuple(int(width * m) for m in mults)


def cifar_skeleton(width: int = 64, schedule: str | Sequence[int] = "uniform",
                   num_classes: int = 10, **overrides: Any) -> Skeleton:
    """The authors' CIFAR skeleton: 5 blocks with strides 1,2,1,2,1, no stem (their stem is
    built but never called), 2x2 max pool -> flatten -> Dense head."""
    return Skeleton(widths=block_widths(width, schedule), strides=(1, 2, 1, 2, 1), image_size=32,
                    num_classes=num_classes, head="maxpool_dense", **overrides)


def imagenet_skeleton(width: int = 32, image_size: int = 224, num_classes: int = 1000,
                      schedule: str | Sequence[int] = (1, 2, 4, 8, 8), **overrides: Any
                      ) -> Skeleton:
    """Our ImageNet skeleton (the paper's is unknown): a 3x3 stride-2 stem conv of width w for
    images >= 128 px (none below, e.g. the 32/64 px imagenet_resized proxies), 5 blocks with
    strides 2,2,2,2,1 (224 -> 112 -> 56 -> 28 -> 14 -> 7 -> 7) and widths w,2w,4w,8w,8w, then
    global average pooling and a Dense classifier."""
    big = image_size >= 128
    return Skeleton(widths=block_widths(width, schedule), strides=(2, 2, 2, 2, 1),
                    image_size=image_size, num_classes=num_classes, head="global_avg_dense",
                    stem_width=width if big else 0, stem_stride=2 if big else 1, **overrides)


__all__ = ["HEADS", "OP_TABLE", "REMOVED_OP_STYLES", "Skeleton", "block_widths",
           "cifar_skeleton", "imagenet_skeleton"]
