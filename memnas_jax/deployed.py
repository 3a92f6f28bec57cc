"""The graph a deployment runtime executes for a network, predicted in pure Python.

What the LiteRT converter makes of our Flax networks (batch 1, float32, inference), found by
converting them and reading the flatbuffers (docs/deploy.md):

* a convolution with its BatchNorm and ReLU is one op (BN folds into weights and bias, ReLU
  and ReLU6 fuse); a depthwise convolution is DEPTHWISE_CONV_2D, Dense FULLY_CONNECTED;
* padding that is not TFLite's SAME (our symmetric PyTorch padding of a stride-2 op on an even
  side) becomes an explicit PAD op, a padded copy of the input (PADV2 with -inf before a max
  pool); identical pads of one tensor are made once; the average pool always pads explicitly
  (it divides by 9 at the border);
* an add is ADD, a channel concat CONCATENATION: both write a new tensor; a removed op that is
  an identity, a one-input concat and a flatten of a (1, 1, C) map make no op; the head's
  flatten is a RESHAPE, global average pooling a MEAN (with two small scratch buffers);
* tensors and ops come in program order; what no output depends on (an unlinked cell nobody
  reads) is dropped.

`arena.tflm_arena_bytes` of these graphs is `memory.memory_report(..., convention="deployed")`.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from memnas_jax import plan as plan_lib
from memnas_jax.arena import RuntimeGraph, RuntimeOp
from memnas_jax.encoding import Cell
from memnas_jax.space import Skeleton

FLOAT32_BYTES = 4
# MEAN's kernel asks for int32 scratch: one per input dimension (4), one per reduced axis (2).
_MEAN_SCRATCH = (4 * 4, 2 * 4)

Shape = tuple[int, int, int]  # (H, W, C) at batch 1


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TFLite's SAME padding (before, after) of one spatial axis."""
    effective = dilation * (kernel - 1) + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class GraphBuilder:
    """Collects tensors and ops in program order (the order the converter keeps)."""

    def __init__(self, bytes_per_value: int = FLOAT32_BYTES):
        self.bytes_per_value = bytes_per_value
        self.names: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.ops: list[RuntimeOp] = []

    def tensor(self, name: str, shape: tuple[int, ...]) -> int:
        self.names.append(name)
        self.shapes.append(tuple(shape))
        return len(self.names) - 1

    def op(self, kind: str, inputs: Sequence[int], name: str, shape: tuple[int, ...],
           scratch: tuple[int, ...] = ()) -> int:
        out = self.tensor(name, shape)
        self.ops.append(RuntimeOp(kind, tuple(inputs), out, scratch))
        return out

    def shape(self, t: int) -> tuple[int, ...]:
        return self.shapes[t]

    def pad(self, x: int, before: int, after: int, name: str, value: str = "zero") -> int:
        """A padded copy of NHWC tensor x (spatial axes). Identical pads of one tensor are
        merged when the graph is made, after dead code is dropped, as the converter does."""
        h, w, c = self.shape(x)
        kind = "PAD" if value == "zero" else "PADV2"
        return self.op(kind, [x], name, (h + before + after, w + before + after, c))

    def padded(self, x: int, kernel: int, stride: int, dilation: int, padding: int, name: str
               ) -> tuple[int, bool]:
        """(x padded explicitly when the symmetric `padding` is not TFLite's SAME, whether it
        was): a padded copy is read VALID."""
        if padding == 0 or (padding, padding) == same_padding(self.shape(x)[0], kernel, stride,
                                                             dilation):
            return x, False
        return self.pad(x, padding, padding, name + ".pad"), True

    def conv(self, x: int, features: int, kernel: tuple[int, int], stride: int, name: str,
             dilation: int = 1, depthwise: bool = False) -> int:
        """A convolution with symmetric PyTorch padding dilation * (k - 1) / 2 per side
        (`features` is ignored for a depthwise one, which keeps the channels)."""
        kh, kw = kernel
        side = self.shape(x)[0]
        padded = False
        if kh == kw:  # the 1x7 and 7x1 convolutions run at stride 1: always SAME
            x, padded = self.padded(x, kh, stride, dilation, dilation * (kh - 1) // 2, name)
        out = ((self.shape(x)[0] - dilation * (kh - 1) - 1) // stride + 1 if padded
               else -(-side // stride))
        channels = self.shape(x)[2] if depthwise else features
        return self.op("DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", [x], name,
                       (out, out, channels))

    def pool(self, x: int, kind: str, stride: int, name: str) -> int:
        """A 3x3 pool, stride s, padding 1 (PyTorch); average divides by 9 everywhere."""
        side, _, channels = self.shape(x)
        if kind == "avg":
            x, op = self.pad(x, 1, 1, name + ".pad"), "AVERAGE_POOL_2D"
            out = (side - 1) // stride + 1
        else:
            op, out = "MAX_POOL_2D", -(-side // stride)
            if (1, 1) != same_padding(side, 3, stride):
                x = self.pad(x, 1, 1, name + ".pad", value="-inf")
        return self.op(op, [x], name, (out, out, channels))

    def add(self, a: int, b: int, name: str) -> int:
        return self.op("ADD", [a, b], name, self.shape(a))

    def concat(self, parts: Sequence[int], name: str) -> int:
        if len(parts) == 1:
            return parts[0]
        h, w, _ = self.shape(parts[0])
        return self.op("CONCATENATION", parts, name,
                       (h, w, sum(self.shape(p)[2] for p in parts)))

    def graph(self, inputs: Sequence[int], outputs: Sequence[int]) -> RuntimeGraph:
        """The graph with what no output depends on dropped and tensors renumbered in order."""
        ops = _merge_pads(_live_ops(self.ops, outputs), self.shapes)
        ops = _flatten_concats(ops, outputs)
        needed = set(outputs)
        for op in ops:
            needed.update(op.inputs)
        keep = [t for t in range(len(self.names)) if t in needed or t in inputs]
        index = {t: i for i, t in enumerate(keep)}
        ops = tuple(RuntimeOp(op.kind, tuple(index[t] for t in op.inputs), index[op.output],
                              op.scratch) for op in ops)
        return RuntimeGraph(
            tensor_bytes=tuple(math.prod(self.shapes[t]) * self.bytes_per_value for t in keep),
            tensor_names=tuple(self.names[t] for t in keep), ops=ops,
            inputs=tuple(index[t] for t in inputs), outputs=tuple(index[t] for t in outputs))

    def head(self, x: int, num_classes: int, kind: str = "global_avg_dense", pool: int = 2
             ) -> int:
        h, w, c = self.shape(x)
        if kind == "maxpool_dense":
            pooled = h // pool
            x = self.op("MAX_POOL_2D", [x], "head.pool", (pooled, pooled, c))
            if pooled > 1:
                x = self.op("RESHAPE", [x], "head.flatten", (pooled * pooled * c,))
        else:
            x = self.op("MEAN", [x], "head.pool", (c,), scratch=_MEAN_SCRATCH)
        return self.op("FULLY_CONNECTED", [x], "logits", (num_classes,))


def _live_ops(ops: Sequence[RuntimeOp], outputs: Sequence[int]) -> list[RuntimeOp]:
    """The ops some output depends on (the converter drops the others)."""
    needed, live = set(outputs), []
    for op in reversed(ops):
        if op.output in needed:
            needed.update(op.inputs)
            live.append(op)
    return live[::-1]


def _merge_pads(ops: Sequence[RuntimeOp], shapes: Sequence[tuple[int, ...]]
                ) -> list[RuntimeOp]:
    """Identical pads of one tensor become the first of them (common subexpressions)."""
    first: dict[tuple, int] = {}
    alias: dict[int, int] = {}
    merged = []
    for op in ops:
        op = op._replace(inputs=tuple(alias.get(t, t) for t in op.inputs))
        if op.kind in ("PAD", "PADV2"):
            key = (op.kind, op.inputs, shapes[op.output])
            if key in first:
                alias[op.output] = first[key]
                continue
            first[key] = op.output
        merged.append(op)
    return merged


def _flatten_concats(ops: Sequence[RuntimeOp], outputs: Sequence[int]) -> list[RuntimeOp]:
    """A concat read only by another concat is spliced into it (the converter's folding)."""
    readers: dict[int, int] = {}
    for op in ops:
        for t in op.inputs:
            readers[t] = readers.get(t, 0) + 1
    producer = {op.output: op for op in ops}
    spliced: set[int] = set()

    def parts(t: int) -> list[int]:
        op = producer.get(t)
        if (op is not None and op.kind == "CONCATENATION" and readers[t] == 1
                and t not in outputs):
            spliced.add(t)
            return [p for q in op.inputs for p in parts(q)]
        return [t]

    flat = [op._replace(inputs=tuple(p for t in op.inputs for p in parts(t)))
            if op.kind == "CONCATENATION" else op for op in ops]
    return [op for op in flat if op.output not in spliced]


# ---------------------------------------------------------------------------------------------
# MemNAS networks


def _branch(g: GraphBuilder, x: int, op: int | None, width: int, stride: int,
            removed_op: str, name: str) -> int:
    if op is None:
        if not plan_lib.removed_op_needs_conv(g.shape(x)[2], width, stride, removed_op):
            return x
        return g.conv(x, width, (1, 1), stride, name)
    if op in (0, 1):  # 1x1 conv -> BN, then the 3x3 pool
        y = g.conv(x, width, (1, 1), 1, name + ".conv")
        return g.pool(y, "avg" if op == 0 else "max", stride, name)
    if op in (2, 6):  # 3x3 conv, dilation 2 or 1
        return g.conv(x, width, (3, 3), stride, name, dilation=2 if op == 2 else 1)
    if op == 3:  # 1x1 (stride s) -> 1x7 -> 7x1
        y = g.conv(x, width, (1, 1), stride, name + ".reduce")
        y = g.conv(y, width, (1, 7), 1, name + ".conv_1x7")
        return g.conv(y, width, (7, 1), 1, name + ".conv_7x1")
    kernel = 5 if op == 4 else 3  # separable: depthwise (stride s) -> 1x1
    y = g.conv(x, 0, (kernel, kernel), stride, name + ".depthwise", depthwise=True)
    return g.conv(y, width, (1, 1), 1, name + ".pointwise")


def memnas_graph(arch: Iterable[Iterable[Cell]], skeleton: Skeleton,
                 bytes_per_value: int = FLOAT32_BYTES) -> RuntimeGraph:
    """The runtime graph of `MemNASNetwork(arch, skeleton)`."""
    plans = plan_lib.network_plan(arch, skeleton)  # validates arch against skeleton
    arch = plan_lib.check_architecture(arch, skeleton)
    g = GraphBuilder(bytes_per_value)
    size = skeleton.image_size
    image = x = g.tensor("input", (size, size, skeleton.in_channels))
    if skeleton.stem_width:
        x = g.conv(x, skeleton.stem_width, (3, 3), skeleton.stem_stride, "stem")
    for b, (plan, cells) in enumerate(zip(plans, arch)):
        nodes = [x]
        for j, cell in enumerate(cells):
            outs = [_branch(g, nodes[branch.input_node], branch.op, branch.width,
                            branch.stride, skeleton.removed_op,
                            f"block{b + 1}.cell{j + 1}.op{branch.branch + 1}")
                    for branch in plan.branches[2 * j:2 * j + 2]]
            name = f"block{b + 1}.cell{j + 1}"
            nodes.append(g.concat(outs, name) if cell.concat else g.add(*outs, name))
        x = g.concat([nodes[j + 1] for j, cell in enumerate(cells) if cell.linked],
                     f"block{b + 1}.out")
    logits = g.head(x, skeleton.num_classes, skeleton.head, skeleton.head_pool)
    return g.graph([image], [logits])


# ---------------------------------------------------------------------------------------------
# The baselines


def resnet_graph(depth: int, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
                 image_size: int = 32, bytes_per_value: int = FLOAT32_BYTES) -> RuntimeGraph:
    """The runtime graph of `CIFARResNet(depth)` with shortcut A."""
    blocks = (depth - 2) // 6
    g = GraphBuilder(bytes_per_value)
    image = g.tensor("input", (image_size, image_size, 3))
    x = g.conv(image, widths[0], (3, 3), 1, "stem")
    for s, features in enumerate(widths):
        for i in range(blocks):
            stride = 2 if s > 0 and i == 0 else 1
            name = f"stage{s + 1}_block{i + 1}"
            y = g.conv(x, features, (3, 3), stride, name + ".conv1")
            y = g.conv(y, features, (3, 3), 1, name + ".conv2")
            shortcut = x
            h, _, c = g.shape(x)
            if stride != 1 or c != features:
                side = -(-h // stride)
                shortcut = g.op("STRIDED_SLICE", [x], name + ".subsample", (side, side, c))
                shortcut = g.op("PAD", [shortcut], name + ".pad", (side, side, features))
            x = g.add(y, shortcut, name)
    logits = g.head(x, num_classes)
    return g.graph([image], [logits])


def mobilenetv2_graph(num_classes: int = 10, image_size: int = 32,
                      bytes_per_value: int = FLOAT32_BYTES) -> RuntimeGraph:
    """The runtime graph of `CIFARMobileNetV2()`."""
    from memnas_jax.mobilenet import CIFAR_STAGES
    g = GraphBuilder(bytes_per_value)
    image = g.tensor("input", (image_size, image_size, 3))
    x = g.conv(image, 32, (3, 3), 1, "stem")
    channels = 32
    for s, (t, c, n, stride) in enumerate(CIFAR_STAGES):
        for i in range(n):
            name = f"stage{s + 1}_block{i + 1}"
            block_stride = stride if i == 0 else 1
            y = x if t == 1 else g.conv(x, channels * t, (1, 1), 1, name + ".expand")
            y = g.conv(y, 0, (3, 3), block_stride, name + ".depthwise", depthwise=True)
            y = g.conv(y, c, (1, 1), 1, name + ".project")
            x = g.add(y, x, name) if block_stride == 1 and channels == c else y
            channels = c
    x = g.conv(x, 1280, (1, 1), 1, "last")
    logits = g.head(x, num_classes)
    return g.graph([image], [logits])


def baseline_graph(name: str, num_classes: int = 10, bytes_per_value: int = FLOAT32_BYTES
                   ) -> RuntimeGraph:
    """The runtime graph of baseline `name` (`memnas_jax.baselines`)."""
    from memnas_jax.baselines import BASELINES
    if name == "mobilenetv2":
        return mobilenetv2_graph(num_classes, bytes_per_value=bytes_per_value)
    if name in BASELINES and name.startswith("resnet"):
        return resnet_graph(int(name[len("resnet"):]), num_classes,
                            bytes_per_value=bytes_per_value)
    raise ValueError(f"unknown baseline {name!r}; use one of {BASELINES}")


__all__ = ["FLOAT32_BYTES", "GraphBuilder", "baseline_graph", "memnas_graph",
           "mobilenetv2_graph", "resnet_graph", "same_padding"]
