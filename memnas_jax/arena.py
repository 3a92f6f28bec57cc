"""TFLite Micro's activation arena, computed in pure Python (docs/deploy.md).

A `RuntimeGraph` is the graph a runtime executes: tensors with byte sizes, and ops in execution
order, each reading some tensors and writing one, possibly with kernel scratch buffers.
`tflm_arena_bytes` plans it as TFLite Micro (tflite-micro, `micro_allocation_info.cc` and
`memory_planner/greedy_memory_planner.cc`) does, and returns the "head" of its arena:

* every non-constant tensor is a buffer of its size rounded up to 16 bytes (the arena's
  alignment); it lives from the op that writes it (graph inputs: 0) to the last op that reads
  it, both inclusive (graph outputs: to the last op); op i counts as time i + 1;
* a scratch buffer lives during its op only, and comes after all tensors;
* buffers are placed largest first (ties: the later buffer first, as TFLite Micro fills its
  sort array from the end and sorts stably), each at the lowest offset where it overlaps no
  placed buffer that is live at the same time;
* the head is the highest end offset.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

TFLM_ALIGNMENT = 16


class RuntimeOp(NamedTuple):
    kind: str  # the runtime's op name, e.g. "CONV_2D"
    inputs: tuple[int, ...]  # tensor ids read (constants are not tensors here)
    output: int  # tensor id written
    scratch: tuple[int, ...] = ()  # bytes of each scratch buffer the kernel asks for


@dataclasses.dataclass(frozen=True)
class RuntimeGraph:
    """Tensors (byte sizes, in the runtime's tensor order) and ops (in execution order)."""

    tensor_bytes: tuple[int, ...]
    tensor_names: tuple[str, ...]
    ops: tuple[RuntimeOp, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def op_kinds(self) -> tuple[str, ...]:
        return tuple(op.kind for op in self.ops)


class Buffer(NamedTuple):
    size: int
    first: int  # first time it is live (inclusive)
    last: int  # last time it is live (inclusive)


def _align(size: int, alignment: int = TFLM_ALIGNMENT) -> int:
    return -(-size // alignment) * alignment


def tflm_buffers(graph: RuntimeGraph) -> list[Buffer]:
    """The buffers TFLite Micro plans for `graph`, in the order it adds them."""
    first = [-1] * len(graph.tensor_bytes)
    last = [-1] * len(graph.tensor_bytes)
    for t in (*graph.inputs, *graph.outputs):
        first[t] = last[t] = 0
    scratch = []
    for i, op in enumerate(graph.ops):
        time = i + 1
        first[op.output] = last[op.output] = time
        for t in op.inputs:
            last[t] = time
        scratch += [Buffer(_align(size), time, time) for size in op.scratch]
    end = len(graph.ops)
    for t in graph.outputs:
        last[t] = end
    tensors = [Buffer(_align(size), first[t], last[t])
               for t, size in enumerate(graph.tensor_bytes) if size > 0]
    return tensors + scratch


def greedy_offsets(buffers: Sequence[Buffer]) -> list[int]:
    """TFLite Micro's GreedyMemoryPlanner: each buffer's offset in the arena."""
    order = sorted(range(len(buffers)), key=lambda i: (-buffers[i].size, -i))
    placed: list[tuple[int, int, int, int]] = []  # (offset, size, first, last), by offset
    offsets = [0] * len(buffers)
    for i in order:
        size, first, last = buffers[i]
        offset = 0
        for other_offset, other_size, other_first, other_last in placed:
            if other_first > last or first > other_last:
                continue  # not live at the same time
            if other_offset - offset >= size:
                break  # the gap before this buffer fits
            offset = max(offset, other_offset + other_size)
        offsets[i] = offset
        position = len(placed)
        while position and placed[position - 1][0] > offset:
            position -= 1
        placed.insert(position, (offset, size, first, last))
    return offsets


def tflm_arena_bytes(graph: RuntimeGraph) -> int:
    """The head of TFLite Micro's arena for `graph`: its planned activations and scratch."""
    buffers = tflm_buffers(graph)
    offsets = greedy_offsets(buffers)
    return max((o + b.size for o, b in zip(offsets, buffers)), default=0)


__all__ = ["Buffer", "RuntimeGraph", "RuntimeOp", "TFLM_ALIGNMENT", "greedy_offsets",
           "tflm_arena_bytes", "tflm_buffers"]
