"""Grow-trim candidate generation (docs/method.md §1, §4; the authors' `Network.gen_big`,
`remove` and `remove_fin`).

numpy-free and jax-free: it only rewrites `memnas_jax.encoding` architectures.

From a base network with n cells per block and L = {block input} U {outputs of the n cells}:

- grow: for every op1, op2 (in `ops`), combine mode (in `combine_modes`), input1, input2 in L,
  append that cell, linked to the block output, to every block ("all_blocks": CIFAR-10 and the
  paper) or to one block at a time ("per_block": one cell in one block, for ImageNet-style search);
- trim op: for each block, cell and branch whose op is not removed yet, remove it in that block;
- trim edge: for each block and each linked cell whose output a later cell of the block reads,
  unlink it from the block output in that block. (Unlinking a cell that nothing reads would leave
  dead computation, so, like the authors, we do not generate those.)

Candidates come in the authors' order: grow (op1, op2, combine, input1, input2, from the outermost
loop to the innermost, inputs in node order: block input first), then every op trim (block, cell,
branch 1 before 2), then every edge trim (block, cell). The pool is deduplicated by canonical hash
(the first one is kept); candidates equal to the base or invalid (a block with no linked cell, a
block over the cell cap) are dropped. This reproduces the authors' candidate sets, in order
(reference/golden, tests/test_grow_trim.py): round 0 (98 networks), round 1 (392, from net53, with
combine modes add+concat and no trims) and round 2 (466, from net179).

Where we differ from the authors' code, and why:

- Round 1: the authors produced it with `gen_big` alone (add and concat searched, no trims); their
  code as committed would give 196 grows + 10 op trims instead. We search add only by default
  (their round 2 on); `combine_modes=("add", "concat"), trim_ops=False, trim_edges=False`
  reproduces their round 1. With trims on, the same base gives 392 + 10 op trims = 402.
- Round 0: their `Network([[], [], [], [], []])` raises IndexError; `initial_candidates` builds
  the 7 x 7 (x combine modes) single-cell networks directly, in the order of their files.
- `gen_big` reads L from block 1 only. With "all_blocks" growth we require the same number of
  cells in every block (trims never change it) and raise a clear error otherwise.
- Mirrored cells: an add cell (a, b, x, y) computes the same function as (b, a, y, x), yet the
  authors generate and train both (210 of their 441 round-2 grows are mirrors of others).
  `merge_mirrored_cells=True` keeps only the first of each such pair (231 grows instead of 441);
  it is off by default so the authors' sets are reproduced.
- Their trimmed op is a stride-less 1x1 conv, which breaks 6 of their 20 round-2 op trims in
  stride-2 blocks. That is a network-building bug (memnas_jax.space `removed_op`), not a
  generation one: we generate those candidates, and our networks give them the right stride.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from typing import Any, Iterable, Iterator, Sequence

from memnas_jax.encoding import (
    DEFAULT_MAX_CELLS,
    NUM_OPS,
    Architecture,
    Cell,
    EncodingError,
    op_index,
    validate,
)

COMBINE_MODES = ("add", "concat")
GROWTH_MODES = ("all_blocks", "per_block")
CANDIDATE_KINDS = ("grow", "trim_op", "trim_edge")


@dataclasses.dataclass(frozen=True)
class GrowTrimOptions:
    """How candidates are generated from a base network.

    combine_modes: the combines searched for a grown cell, in loop order; ("add", "concat")
        reproduces the authors' rounds 0-1, ("add",) their round 2 on.
    growth: "all_blocks" appends the same new cell to every block (CIFAR-10, the paper);
        "per_block" appends it to one block at a time.
    trim_ops / trim_edges: whether op trims / output-edge trims are generated.
    max_cells: the cap on cells per block; growth past it is not generated.
    ops: the op indices (or names) a grown cell may use, in loop order.
    merge_mirrored_cells: treat the add cells (a, b, x, y) and (b, a, y, x), which compute the
        same function, as one candidate (keeps the first; off reproduces the authors).
    """

    combine_modes: tuple[str, ...] = ("add",)
    growth: str = "all_blocks"
    trim_ops: bool = True
    trim_edges: bool = True
    max_cells: int = DEFAULT_MAX_CELLS
    ops: tuple[int, ...] = tuple(range(NUM_OPS))
    merge_mirrored_cells: bool = False

    def __post_init__(self):
        modes = _as_tuple(self.combine_modes, "combine_modes")
        if not modes or len(set(modes)) != len(modes) or not set(modes) <= set(COMBINE_MODES):
            raise ValueError(f"GrowTrimOptions: combine_modes must be distinct values out of "
                             f"{COMBINE_MODES}, got {self.combine_modes!r}")
        if self.growth not in GROWTH_MODES:
            raise ValueError(f"GrowTrimOptions: growth {self.growth!r} is not one of "
                             f"{GROWTH_MODES}")
        if isinstance(self.max_cells, bool) or not isinstance(self.max_cells, int) \
                or self.max_cells < 1:
            raise ValueError(f"GrowTrimOptions: max_cells must be an integer >= 1, got "
                             f"{self.max_cells!r}")
        try:
            ops = tuple(op_index(op) for op in _as_tuple(self.ops, "ops"))
        except EncodingError as e:
            raise ValueError(f"GrowTrimOptions: ops: {e}") from None
        if not ops or None in ops or len(set(ops)) != len(ops):
            raise ValueError(f"GrowTrimOptions: ops must be distinct ops (indices 0..{NUM_OPS - 1}"
                             f" or names), got {self.ops!r}")
        for name in ("trim_ops", "trim_edges", "merge_mirrored_cells"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GrowTrimOptions: {name} must be a bool, got "
                                 f"{getattr(self, name)!r}")
        object.__setattr__(self, "combine_modes", modes)
        object.__setattr__(self, "ops", ops)


def _as_tuple(value: Any, name: str) -> tuple:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"GrowTrimOptions: {name} must be a sequence, got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One generated architecture and how it was made from the base.

    kind: "grow", "trim_op" or "trim_edge".
    block: the block edited (0-based), or None for a cell grown in every block.
    cell: the position (0-based) of the grown, trimmed or unlinked cell in its block(s).
    branch: 1 or 2 (the op1 / op2 branch) for "trim_op", else None.
    new_cell: the grown `Cell` for "grow", else None.
    arch_hash: `architecture.canonical_hash()`, the key for dedupe and caches.
    """

    kind: str
    architecture: Architecture
    block: int | None
    cell: int
    branch: int | None = None
    new_cell: Cell | None = None
    arch_hash: str = ""

    def __post_init__(self):
        if not self.arch_hash:
            object.__setattr__(self, "arch_hash", self.architecture.canonical_hash())

    def describe(self) -> str:
        where = "all blocks" if self.block is None else f"block {self.block + 1}"
        if self.kind == "grow":
            return f"grow c{self.cell + 1} = {self.new_cell.describe()} in {where}"
        if self.kind == "trim_op":
            return f"remove op{self.branch} of c{self.cell + 1} in {where}"
        return f"unlink c{self.cell + 1} from the output of {where}"


# ---------------------------------------------------------------------------------------------
# Generation


def initial_candidates(num_blocks: int = 5, options: GrowTrimOptions = GrowTrimOptions()
                       ) -> list[Candidate]:
    """Round 0: the single-cell networks whose two branches both read the block input, the same
    cell in every block: len(ops)^2 x len(combine_modes) of them (98 with all 7 ops and
    add+concat), ordered op1, op2, combine from the outermost loop, as the authors' files."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
    candidates = []
    for op1, op2, mode in itertools.product(options.ops, options.ops, options.combine_modes):
        cell = Cell(0, 0, op1, op2, linked=True, concat=mode == "concat")
        candidates.append(_make("grow", [[cell]] * num_blocks, options, None, 0, new_cell=cell))
    return _dedupe(candidates, options, base=None)


def generate_candidates(base: Any, options: GrowTrimOptions = GrowTrimOptions()
                        ) -> list[Candidate]:
    """Every grow, op-trim and edge-trim candidate of `base`, deduplicated, in the authors'
    order (module docstring). `base` is an `Architecture` or anything `encoding.validate`
    takes; a base over `options.max_cells` raises `EncodingError`."""
    base = validate(base, max_cells=options.max_cells)
    pool = itertools.chain(
        _grow(base, options),
        _trim_ops(base, options) if options.trim_ops else (),
        _trim_edges(base, options) if options.trim_edges else (),
    )
    return _dedupe((c for c in pool if c is not None), options, base=base)


def _grow(base: Architecture, options: GrowTrimOptions) -> Iterator[Candidate | None]:
    if options.growth == "all_blocks":
        counts = set(base.cells_per_block)
        if len(counts) != 1:
            raise ValueError(f"'all_blocks' growth needs the same number of cells in every "
                             f"block, got {base.cells_per_block}; use growth='per_block'")
        targets = [None]
    else:
        targets = list(range(base.num_blocks))
    for target in targets:
        n = len(base[0 if target is None else target])
        if n + 1 > options.max_cells:
            continue
        nodes = range(n + 1)  # block input, then the outputs of cells 1..n
        for op1, op2, mode, in1, in2 in itertools.product(
                options.ops, options.ops, options.combine_modes, nodes, nodes):
            cell = Cell(in1, in2, op1, op2, linked=True, concat=mode == "concat")
            blocks = [list(b) + [cell] if target in (None, i) else list(b)
                      for i, b in enumerate(base)]
            yield _make("grow", blocks, options, target, n, new_cell=cell)


def _trim_ops(base: Architecture, options: GrowTrimOptions) -> Iterator[Candidate | None]:
    for b, block in enumerate(base):
        for i, cell in enumerate(block):
            for branch, field in ((1, "op1"), (2, "op2")):
                if getattr(cell, field) is not None:
                    yield _make("trim_op", _edit(base, b, i, cell._replace(**{field: None})),
                                options, b, i, branch=branch)


def _trim_edges(base: Architecture, options: GrowTrimOptions) -> Iterator[Candidate | None]:
    for b, block in enumerate(base):
        for i, cell in enumerate(block):
            node = i + 1
            read = any(node in (later.input1, later.input2) for later in block[i + 1:])
            if cell.linked and read:
                yield _make("trim_edge", _edit(base, b, i, cell._replace(linked=False)),
                            options, b, i)


def _edit(base: Architecture, block: int, index: int, cell: Cell) -> list[list[Cell]]:
    blocks = [list(b) for b in base]
    blocks[block][index] = cell
    return blocks


def _make(kind: str, blocks: Sequence[Sequence[Cell]], options: GrowTrimOptions,
          block: int | None, cell: int, branch: int | None = None,
          new_cell: Cell | None = None) -> Candidate | None:
    """A candidate, or None when the edit gives an invalid architecture (e.g. no linked cell)."""
    try:
        arch = validate(blocks, max_cells=options.max_cells)
    except EncodingError:
        return None
    return Candidate(kind, arch, block, cell, branch, new_cell, arch.canonical_hash())


def _dedupe(candidates: Iterable[Candidate], options: GrowTrimOptions,
            base: Architecture | None) -> list[Candidate]:
    """Keeps the first candidate of each key, and none with the base's key."""
    key = mirror_invariant_hash if options.merge_mirrored_cells else Architecture.canonical_hash
    seen = set() if base is None else {key(base)}
    kept = []
    for c in candidates:
        k = c.arch_hash if key is Architecture.canonical_hash else key(c.architecture)
        if k not in seen:
            seen.add(k)
            kept.append(c)
    return kept


def mirror_invariant_hash(arch: Architecture) -> str:
    """A hash equal for architectures that differ only by swapping the two branches of add
    cells ((a, b, x, y) -> (b, a, y, x) computes the same function). Concat cells are left as
    they are: swapping their branches permutes their output channels."""
    def branch_key(node: int, op: int | None) -> tuple[int, int]:
        return node, -1 if op is None else op

    normalised = []
    for block in arch:
        cells = []
        for c in block:
            branches = [branch_key(c.input1, c.op1), branch_key(c.input2, c.op2)]
            if not c.concat:
                branches.sort()
            cells.append([*branches[0], *branches[1], c.linked, c.concat])
        normalised.append(cells)
    text = json.dumps(normalised, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


__all__ = [
    "CANDIDATE_KINDS", "COMBINE_MODES", "GROWTH_MODES", "Candidate", "GrowTrimOptions",
    "generate_candidates", "initial_candidates", "mirror_invariant_hash",
]
