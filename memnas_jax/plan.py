"""The plan of a network, pure Python: channels, strides and spatial sizes of every block, node and
branch (`network_plan`), and the closed-form parameter counts of ops and whole networks
(`op_param_count`, `param_count`), so the search can size hundreds of candidates before anything is
traced. `memnas_jax.network` builds the Flax modules from the same plan; `tests/test_ops.py` and
`tests/test_network.py` check every count against the modules' parameters.

Imports numpy only (through the encoding), like `memnas_jax.encoding` and `memnas_jax.space`.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np

from memnas_jax.encoding import NUM_OPS, OP_NAMES, Architecture, Cell, EncodingError, validate
from memnas_jax.space import Skeleton

# ---------------------------------------------------------------------------------------------
# Closed-form parameter counts of the ops (memnas_jax.ops has the modules)


def conv_param_count(kernel_area: int, in_channels: int, out_channels: int,
                     conv_bias: bool) -> int:
    return kernel_area * in_channels * out_channels + int(conv_bias) * out_channels


def bn_param_count(channels: int) -> int:
    return 2 * channels  # scale and bias; running statistics live in batch_stats


def removed_op_needs_conv(in_channels: int, width: int, stride: int, removed_op: str) -> bool:
    """Whether a trimmed branch is a bare 1x1 conv (else the identity): always in the "conv1x1"
    style, and in the "identity" style when the input's shape differs from the branch's."""
    return removed_op == "conv1x1" or in_channels != width or stride != 1


def _pool_count(in_channels: int, width: int, conv_bias: bool) -> int:
    return conv_param_count(1, in_channels, width, conv_bias) + bn_param_count(width)


def _conv_count(kernel_size: int):
    def count(in_channels: int, width: int, conv_bias: bool) -> int:
        return (conv_param_count(kernel_size ** 2, in_channels, width, conv_bias)
                + bn_param_count(width))
    return count


def _fac_conv_count(kernel_size: int):
    def count(in_channels: int, width: int, conv_bias: bool) -> int:
        factor = conv_param_count(kernel_size, width, width, conv_bias) + bn_param_count(width)
        return (conv_param_count(1, in_channels, width, conv_bias) + bn_param_count(width)
                + 2 * factor)
    return count


def _sep_conv_count(kernel_size: int):
    def count(in_channels: int, width: int, conv_bias: bool) -> int:
        depthwise = (kernel_size ** 2 * in_channels + int(conv_bias) * in_channels
                     + bn_param_count(in_channels))
        return (depthwise + conv_param_count(1, in_channels, width, conv_bias)
                + bn_param_count(width))
    return count


# op index -> its count, in the authors' index order (encoding.OP_NAMES, ops.OP_FAMILIES).
_OP_COUNTS = (_pool_count, _pool_count, _conv_count(3), _fac_conv_count(7), _sep_conv_count(5),
              _sep_conv_count(3), _conv_count(3))
assert len(_OP_COUNTS) == NUM_OPS


def check_op(op: int | None) -> None:
    if op is not None and (isinstance(op, bool) or not isinstance(op, (int, np.integer))
                           or not 0 <= op < NUM_OPS):
        raise ValueError(f"op {op!r} is not an index in 0..{NUM_OPS - 1} ({OP_NAMES}) or None")


def op_param_count(op: int | None, in_channels: int, width: int, stride: int = 1, *,
                   conv_bias: bool = True, removed_op: str = "identity") -> int:
    """Closed-form parameter count of op `op` (None = removed) from `in_channels` to `width`
    channels (BatchNorm scale and bias included, running statistics not)."""
    check_op(op)
    if op is None:
        if not removed_op_needs_conv(in_channels, width, stride, removed_op):
            return 0
        return conv_param_count(1, in_channels, width, conv_bias)
    return _OP_COUNTS[op](in_channels, width, conv_bias)


# ---------------------------------------------------------------------------------------------
# Channel and shape bookkeeping (pure Python)


class BranchPlan(NamedTuple):
    """One branch (op slot) of a cell: which op reads which node, at which shapes."""

    block: int  # 0-based
    cell: int  # 0-based
    branch: int  # 0 = op1 on input1, 1 = op2 on input2
    op: int | None  # None = removed
    input_node: int  # 0 = block input, j = cell j
    in_channels: int
    width: int  # the block width C_b: every op outputs it
    stride: int
    in_size: int  # spatial side of the input node
    out_size: int


class BlockPlan(NamedTuple):
    in_channels: int
    in_size: int
    width: int
    stride: int
    out_size: int
    node_channels: tuple[int, ...]  # node 0 = block input, node j = cell j output
    out_channels: int  # channel concat of the linked cells
    branches: tuple[BranchPlan, ...]  # cell-major: (cell 1 op1, cell 1 op2, cell 2 op1, ...)


def check_architecture(arch: Iterable[Iterable[Cell]], skeleton: Skeleton) -> Architecture:
    """Validates `arch` against `skeleton` (same number of blocks, at most skeleton.max_cells
    cells per block); raises ValueError (`EncodingError`) saying what is wrong."""
    if not isinstance(skeleton, Skeleton):
        raise TypeError(f"expected a Skeleton, got {type(skeleton).__name__}")
    blocks = tuple(arch)
    if len(blocks) != skeleton.num_blocks:
        raise EncodingError(f"the architecture has {len(blocks)} blocks but the skeleton has "
                            f"{skeleton.num_blocks}")
    return validate(blocks, max_cells=skeleton.max_cells)


def cell_output_channels(cell: Cell, width: int) -> int:
    return 2 * width if cell.concat else width


def _linked_channels(block: Iterable[Cell], width: int) -> int:
    return sum(cell_output_channels(c, width) for c in block if c.linked)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def network_plan(arch: Iterable[Iterable[Cell]], skeleton: Skeleton) -> tuple[BlockPlan, ...]:
    """Channels, strides and spatial sizes of every block, node and branch."""
    arch = check_architecture(arch, skeleton)
    channels = skeleton.stem_width or skeleton.in_channels
    size = _ceil_div(skeleton.image_size, skeleton.stem_stride)
    plans = []
    for b, (block, width, stride) in enumerate(zip(arch, skeleton.widths, skeleton.strides)):
        out_size = _ceil_div(size, stride)
        nodes, branches = [channels], []
        for j, cell in enumerate(block):
            for k, (node, op) in enumerate(((cell.input1, cell.op1), (cell.input2, cell.op2))):
                s = stride if node == 0 else 1
                branches.append(BranchPlan(b, j, k, op, node, nodes[node], width, s,
                                           size if node == 0 else out_size, out_size))
            nodes.append(cell_output_channels(cell, width))
        out_channels = _linked_channels(block, width)
        plans.append(BlockPlan(channels, size, width, stride, out_size, tuple(nodes),
                               out_channels, tuple(branches)))
        channels, size = out_channels, out_size
    return tuple(plans)


def block_input_channels(arch: Iterable[Iterable[Cell]], skeleton: Skeleton
                         ) -> tuple[int, ...]:
    return tuple(p.in_channels for p in network_plan(arch, skeleton))


def block_output_channels(arch: Iterable[Iterable[Cell]], skeleton: Skeleton
                          ) -> tuple[int, ...]:
    return tuple(p.out_channels for p in network_plan(arch, skeleton))


def head_input_features(out_channels: int, skeleton: Skeleton) -> int:
    """Features entering the head's Dense layer for a last block with `out_channels`."""
    if skeleton.head == "maxpool_dense":
        return (skeleton.spatial_sizes()[-1] // skeleton.head_pool) ** 2 * out_channels
    return out_channels


# ---------------------------------------------------------------------------------------------
# Closed-form parameter counts


def stem_param_count(skeleton: Skeleton) -> int:
    if not skeleton.stem_width:
        return 0
    return (conv_param_count(9, skeleton.in_channels, skeleton.stem_width, skeleton.conv_bias)
            + bn_param_count(skeleton.stem_width))


def head_param_count(out_channels: int, skeleton: Skeleton) -> int:
    return (head_input_features(out_channels, skeleton) + 1) * skeleton.num_classes


def branch_param_count(branch: BranchPlan, skeleton: Skeleton) -> int:
    return op_param_count(branch.op, branch.in_channels, branch.width, branch.stride,
                          conv_bias=skeleton.conv_bias, removed_op=skeleton.removed_op)


def param_count(arch: Iterable[Iterable[Cell]], skeleton: Skeleton) -> int:
    """Exact number of trainable parameters of `MemNASNetwork(arch, skeleton)` (BatchNorm
    running statistics excluded), without tracing."""
    plan = network_plan(arch, skeleton)
    ops = sum(branch_param_count(br, skeleton) for block in plan for br in block.branches)
    return stem_param_count(skeleton) + ops + head_param_count(plan[-1].out_channels, skeleton)



__all__ = [
    "BlockPlan", "BranchPlan", "block_input_channels", "block_output_channels",
    "bn_param_count", "branch_param_count", "cell_output_channels", "check_architecture",
    "check_op", "conv_param_count", "head_input_features", "head_param_count", "network_plan",
    "op_param_count", "param_count", "removed_op_needs_conv", "stem_param_count",
]
