"""The MemNAS network: an `Architecture` (cells per block) on a `Skeleton` (docs/method.md §2).

    image -> [stem] -> block 1 -> ... -> block B -> head -> logits

Inside a block, node 0 is the block input and node j the output of cell j. A cell applies op1 to
node input1 and op2 to node input2 (each op maps to the block width C_b; in a stride-2 block only
ops reading node 0 use stride 2) and adds the two branches (width C_b) or concatenates them
(2 C_b). The block output is the channel concat of the linked cells, in cell order. Unlinked
cells are still built and run (later cells may read them), as in the authors' networks.

The channel bookkeeping (`network_plan`) and the parameter counts (`param_count`) are pure
Python, so the search can size hundreds of candidates before anything is traced.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from memnas_jax.encoding import Architecture, Cell, EncodingError, validate
from memnas_jax.ops import (
    ConvBN,
    OpSettings,
    bn_param_count,
    conv_param_count,
    make_op,
    op_param_count,
)
from memnas_jax.space import Skeleton

Dtype = Any


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


def count_params(tree: Any) -> int:
    """Total size of the leaves of a pytree of arrays or `jax.ShapeDtypeStruct`s (pass
    `variables["params"]` to count trainable parameters)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------------------------
# Flax modules


class Block(nn.Module):
    """The cells of one block; returns the concat of the linked cells."""

    cells: tuple[Cell, ...]
    width: int
    stride: int
    settings: OpSettings

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        nodes = [x]
        for j, cell in enumerate(self.cells):
            outs = [make_op(op, self.width, self.stride if node == 0 else 1, self.settings,
                            name=f"cell{j + 1}_op{k + 1}")(nodes[node], train)
                    for k, (node, op) in enumerate(((cell.input1, cell.op1),
                                                    (cell.input2, cell.op2)))]
            nodes.append(jnp.concatenate(outs, axis=-1) if cell.concat else outs[0] + outs[1])
        linked = [nodes[j + 1] for j, cell in enumerate(self.cells) if cell.linked]
        return linked[0] if len(linked) == 1 else jnp.concatenate(linked, axis=-1)


class MemNASNetwork(nn.Module):
    """`arch` on `skeleton`: NHWC float images (B, image_size, image_size, in_channels) ->
    float32 logits (B, num_classes). BatchNorm statistics live in the `batch_stats` collection:
    apply with `train=True, mutable=["batch_stats"]` to train, `train=False` to evaluate.

    depthwise_impl: "xla" or "shifted" (faster gradients on XLA:CPU, see memnas_jax.ops);
    dtype: compute dtype (e.g. jnp.bfloat16 on accelerators); parameters are float32.
    """

    arch: Architecture
    skeleton: Skeleton
    depthwise_impl: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        sk = self.skeleton
        arch = check_architecture(self.arch, sk)
        expected = (sk.image_size, sk.image_size, sk.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"MemNASNetwork expects NHWC images of shape (batch, "
                             f"{', '.join(map(str, expected))}), got {tuple(x.shape)}")
        settings = OpSettings.from_skeleton(sk, self.depthwise_impl, self.dtype)
        x = jnp.asarray(x, self.dtype)
        if sk.stem_width:
            x = ConvBN(sk.stem_width, (3, 3), sk.stem_stride, settings=settings, name="stem")(
                x, train)
        for b, (cells, width, stride) in enumerate(zip(arch, sk.widths, sk.strides)):
            x = Block(cells, width, stride, settings, name=f"block{b + 1}")(x, train)
        if sk.head == "maxpool_dense":
            # PyTorch MaxPool2d(p) (floor mode), then flatten. Flattening is NHWC (h, w, c)
            # where PyTorch flattens (c, h, w): same count, permuted Dense rows.
            x = nn.max_pool(x, (sk.head_pool,) * 2, (sk.head_pool,) * 2, "VALID")
            x = x.reshape(x.shape[0], -1)
        else:
            x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(sk.num_classes, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)


def input_shape(skeleton: Skeleton, batch_size: int = 1) -> tuple[int, int, int, int]:
    return (batch_size, skeleton.image_size, skeleton.image_size, skeleton.in_channels)


def init_network(rng: jax.Array, arch: Iterable[Iterable[Cell]], skeleton: Skeleton, *,
                 batch_size: int = 1, **module_kwargs: Any) -> tuple[MemNASNetwork, dict]:
    """Builds the module and initialises its variables ({"params", "batch_stats"}).

    The init runs eagerly on purpose: a jitted init compiles one program per architecture, while
    eager init compiles each (initialiser, shape) once and reuses it for every later candidate
    with the same widths (figures: benchmarks/README.md)."""
    module = MemNASNetwork(check_architecture(arch, skeleton), skeleton, **module_kwargs)
    x = jnp.zeros(input_shape(skeleton, batch_size), module.dtype)
    return module, module.init(rng, x, train=False)


def abstract_variables(arch: Iterable[Iterable[Cell]], skeleton: Skeleton, *,
                       batch_size: int = 1, **module_kwargs: Any
                       ) -> tuple[MemNASNetwork, dict]:
    """Like `init_network` but only shapes (`jax.ShapeDtypeStruct` leaves): no compute."""
    module = MemNASNetwork(check_architecture(arch, skeleton), skeleton, **module_kwargs)
    x = jax.ShapeDtypeStruct(input_shape(skeleton, batch_size), module.dtype)
    return module, jax.eval_shape(functools.partial(module.init, train=False),
                                  jax.random.key(0), x)


__all__ = [
    "Block", "BlockPlan", "BranchPlan", "MemNASNetwork", "abstract_variables",
    "block_input_channels", "block_output_channels",
    "branch_param_count", "cell_output_channels", "check_architecture", "count_params",
    "head_input_features", "head_param_count", "init_network", "input_shape", "network_plan",
    "op_param_count", "param_count", "stem_param_count",
]
