"""A round's candidates as data: the plan of one template network that can run any of them.

All candidates of a round share the base network and differ by a grown cell, a removed op or an
unlinked cell. `RoundTemplate.from_architectures` takes the union: for every branch slot (block,
cell, branch) the alternatives the round uses (op, the stride it runs at, and for a removed op
whether it is the identity or the bare 1x1 conv), for every cell slot the combines used, for
every block the widest block output. `RoundTemplate.code(arch)` is what picks one candidate out
of it: small integer arrays, so one compiled program trains every candidate of the round
(`memnas_jax.template_network`, `memnas_jax.packed`).

Layouts are compact: every node holds its candidate's real channels first and zeros after. A cell
output is C or 2C channels (add / concat) in a slot as wide as the round's widest; a block output
is gathered into the linked cells' channels, in cell order, then zeros. So a candidate's
parameters sit in the leading rows of the template's (`embed` / `extract`).

Pure Python and numpy, like `memnas_jax.plan`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from memnas_jax.encoding import Architecture, Cell
from memnas_jax.plan import (
    cell_output_channels,
    check_architecture,
    network_plan,
    removed_op_needs_conv,
)
from memnas_jax.space import Skeleton


@dataclasses.dataclass(frozen=True)
class Alternative:
    """One way a branch slot runs: op index (None = removed), its stride, and for a removed op
    whether it is the bare 1x1 conv (`plan.removed_op_needs_conv`) or the identity."""

    op: int | None
    stride: int
    conv: bool = False

    @property
    def is_identity(self) -> bool:
        return self.op is None and not self.conv


@dataclasses.dataclass(frozen=True)
class InputGroup:
    """The input nodes a branch slot reads at one stride (in a stride-2 block, the block input
    is read at stride 2 and the cell outputs at stride 1), padded to the widest of them."""

    stride: int
    nodes: tuple[int, ...]
    channels: int


@dataclasses.dataclass(frozen=True)
class BranchSlot:
    alternatives: tuple[Alternative, ...]
    groups: tuple[InputGroup, ...]
    optional: bool = False  # some candidates lack the cell: their code selects no alternative

    @property
    def selected(self) -> bool:
        """Whether the code chooses the alternative (else the one alternative always runs)."""
        return len(self.alternatives) > 1 or self.optional

    def group_of(self, alternative: Alternative) -> InputGroup:
        return next(g for g in self.groups if g.stride == alternative.stride)


@dataclasses.dataclass(frozen=True)
class CellSlot:
    branches: tuple[BranchSlot, BranchSlot]
    combines: tuple[bool, ...]  # the concat flags the round uses, (False,), (True,) or both
    channels: int  # the slot's width: 2C when some candidate concatenates, else C


@dataclasses.dataclass(frozen=True)
class BlockSlot:
    width: int  # C_b
    stride: int
    in_channels: int  # the template's block input (previous block's `out_channels`)
    cells: tuple[CellSlot, ...]
    out_channels: int  # the widest block output of the round
    static_links: tuple[bool, ...] | None  # the same full-width linked cells in every candidate

    def node_channels(self) -> tuple[int, ...]:
        return (self.in_channels, *(c.channels for c in self.cells))


def branch_key(block: int, cell: int, branch: int, what: str) -> str:
    return f"b{block}c{cell}k{branch}_{what}"


def concat_key(block: int, cell: int) -> str:
    return f"b{block}c{cell}_concat"


def output_key(block: int) -> str:
    return f"b{block}_output"


def _alternative(op: int | None, in_channels: int, width: int, stride: int,
                 skeleton: Skeleton) -> Alternative:
    conv = op is None and removed_op_needs_conv(in_channels, width, stride, skeleton.removed_op)
    return Alternative(op, stride, conv)


@dataclasses.dataclass(frozen=True)
class RoundTemplate:
    """The plan of the template network of a set of architectures on one skeleton."""

    skeleton: Skeleton
    blocks: tuple[BlockSlot, ...]

    @classmethod
    def from_architectures(cls, archs: Iterable[Iterable[Iterable[Cell]]], skeleton: Skeleton
                           ) -> "RoundTemplate":
        archs = [check_architecture(a, skeleton) for a in archs]
        if not archs:
            raise ValueError("a round template needs at least one architecture")
        plans = [network_plan(a, skeleton) for a in archs]
        in_channels = skeleton.stem_width or skeleton.in_channels
        blocks = []
        for b, (width, stride) in enumerate(zip(skeleton.widths, skeleton.strides)):
            num_cells = max(len(a[b]) for a in archs)
            cells, node_channels = [], [in_channels]
            for j in range(num_cells):
                present = [(a[b][j], p[b]) for a, p in zip(archs, plans) if j < len(a[b])]
                combines = tuple(sorted({cell.concat for cell, _ in present}))
                branches = []
                for k in range(2):
                    alternatives, nodes = [], {}
                    for _, block_plan in present:
                        br = block_plan.branches[2 * j + k]
                        alt = _alternative(br.op, br.in_channels, width, br.stride, skeleton)
                        if alt not in alternatives:
                            alternatives.append(alt)
                        nodes.setdefault(br.stride, set()).add(br.input_node)
                    groups = tuple(InputGroup(s, tuple(sorted(n)),
                                              max(node_channels[i] for i in n))
                                   for s, n in sorted(nodes.items()))
                    branches.append(BranchSlot(tuple(alternatives), groups,
                                               optional=len(present) < len(archs)))
                channels = 2 * width if True in combines else width
                cells.append(CellSlot(tuple(branches), combines, channels))
                node_channels.append(channels)
            block = BlockSlot(width, stride, in_channels, tuple(cells), 0, None)
            outputs = [_output_channels(a[b], block) for a in archs]
            links = {tuple(c.linked for c in a[b]) for a in archs}
            full = all(cell_output_channels(c, width) == s.channels
                       for a in archs for c, s in zip(a[b], cells) if c.linked)
            static = (next(iter(links)) if len(links) == 1 and full
                      and all(len(a[b]) == num_cells for a in archs) else None)
            block = dataclasses.replace(block, out_channels=max(len(o) for o in outputs),
                                        static_links=static)
            blocks.append(block)
            in_channels = block.out_channels
        return cls(skeleton, tuple(blocks))

    # ----- one candidate in the template
    def alternative_index(self, arch: Architecture, block: int, cell: int, branch: int) -> int:
        """Which alternative of slot (block, cell, branch) `arch` runs (0-based indices)."""
        br = network_plan(arch, self.skeleton)[block].branches[2 * cell + branch]
        slot = self.blocks[block].cells[cell].branches[branch]
        alt = _alternative(br.op, br.in_channels, self.skeleton.widths[block], br.stride,
                           self.skeleton)
        try:
            return slot.alternatives.index(alt)
        except ValueError:
            raise ValueError(f"block {block + 1} cell {cell + 1} branch {branch + 1} of the "
                             "architecture is not in this round template: build the template "
                             "from every candidate it runs") from None

    def code(self, arch: Iterable[Iterable[Cell]] | None) -> dict[str, np.ndarray]:
        """The int32 arrays that select `arch` in the template network (keys `branch_key`,
        `concat_key`, `output_key`; only for what varies in the round). None: a code of the
        right shapes that selects nothing (every cell absent)."""
        if arch is None:
            arch, plan = tuple(() for _ in self.blocks), None
        else:
            arch = check_architecture(arch, self.skeleton)
            plan = network_plan(arch, self.skeleton)
        code: dict[str, np.ndarray] = {}
        for b, (block, cells) in enumerate(zip(self.blocks, arch)):
            if len(cells) > len(block.cells):
                raise ValueError(f"block {b + 1} has {len(cells)} cells, the template "
                                 f"{len(block.cells)}")
            for j, slot in enumerate(block.cells):
                cell = cells[j] if j < len(cells) else None
                for k, branch in enumerate(slot.branches):
                    # An absent cell selects none of the alternatives (an index past them).
                    alt, node = len(branch.alternatives), branch.groups[0].nodes[0]
                    group = branch.groups[0]
                    if cell is not None:
                        alt = self.alternative_index(arch, b, j, k)
                        node = plan[b].branches[2 * j + k].input_node
                        group = branch.group_of(branch.alternatives[alt])
                    if branch.selected:
                        code[branch_key(b, j, k, "alternative")] = np.int32(alt)
                    for g in branch.groups:
                        if len(g.nodes) > 1:
                            chosen = g.nodes.index(node) if g is group else 0
                            code[branch_key(b, j, k, f"node_s{g.stride}")] = np.int32(chosen)
                if len(slot.combines) > 1:
                    code[concat_key(b, j)] = np.int32(bool(cell is not None and cell.concat))
            if block.static_links is None:
                index = _output_channels(cells, block)
                sentinel = sum(c.channels for c in block.cells)  # a zero channel
                code[output_key(b)] = np.asarray(
                    index + [sentinel] * (block.out_channels - len(index)), np.int32)
        return code

    def codes(self, archs: Sequence[Iterable[Iterable[Cell]]]) -> dict[str, np.ndarray]:
        """The codes of `archs` stacked on a leading axis (what a packed step vmaps over)."""
        per = [self.code(a) for a in archs]
        return {k: np.stack([c[k] for c in per]) for k in per[0]}

    def real_in_channels(self, arch: Architecture, block: int, cell: int, branch: int) -> int:
        return network_plan(arch, self.skeleton)[block].branches[2 * cell + branch].in_channels

    def head_in_channels(self) -> int:
        return self.blocks[-1].out_channels


def _output_channels(cells: Sequence[Cell], block: BlockSlot) -> list[int]:
    """Where a candidate's block output channels sit in the concat of all the cell slots."""
    index, offset = [], 0
    for cell, slot in zip(cells, block.cells):
        if cell.linked:
            index.extend(range(offset, offset + cell_output_channels(cell, block.width)))
        offset += slot.channels
    return index


__all__ = ["Alternative", "BlockSlot", "BranchSlot", "CellSlot", "InputGroup", "RoundTemplate",
           "branch_key", "concat_key", "output_key"]
