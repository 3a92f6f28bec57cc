"""The MemNAS network: an `Architecture` (cells per block) on a `Skeleton` (docs/method.md §2).

    image -> [stem] -> block 1 -> ... -> block B -> head -> logits

Inside a block, node 0 is the block input and node j the output of cell j. A cell applies op1 to
node input1 and op2 to node input2 (each op maps to the block width C_b; in a stride-2 block only
ops reading node 0 use stride 2) and adds the two branches (width C_b) or concatenates them
(2 C_b). The block output is the channel concat of the linked cells, in cell order. Unlinked
cells are still built and run (later cells may read them), as in the authors' networks.

The channel bookkeeping (`network_plan`) and the parameter counts (`param_count`) are pure
Python, in `memnas_jax.plan` (re-exported here).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from memnas_jax.encoding import Architecture, Cell
from memnas_jax.ops import ConvBN, OpSettings, make_op
from memnas_jax.plan import (  # re-exported: the plan is what the modules build
    BlockPlan,
    BranchPlan,
    block_input_channels,
    block_output_channels,
    branch_param_count,
    cell_output_channels,
    check_architecture,
    head_input_features,
    head_param_count,
    network_plan,
    op_param_count,
    param_count,
    stem_param_count,
)
from memnas_jax.space import Skeleton

Dtype = Any


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
    # The key is made inside the traced function: shapes only, nothing put on a device.
    return module, jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)


__all__ = [
    "Block", "BlockPlan", "BranchPlan", "MemNASNetwork", "abstract_variables",
    "block_input_channels", "block_output_channels",
    "branch_param_count", "cell_output_channels", "check_architecture", "count_params",
    "head_input_features", "head_param_count", "init_network", "input_shape", "network_plan",
    "op_param_count", "param_count", "stem_param_count",
]
