"""The MemNAS cell encoding: five binary vectors per cell (docs/method.md §3).

This module needs numpy only (no jax, no flax), so any research code can import it.

A cell reads two nodes of its block, applies one op to each (a *branch*) and combines the two
branch outputs by add or concat. Node 0 is the block input, node j (j >= 1) is the output of cell j.
The five binary vectors of a cell are

    I1 (max_cells + 1)  one-hot: node read by branch 1 (bit j = node j)
    I2 (max_cells + 1)  one-hot: node read by branch 2
    O1 (7)              one-hot: op of branch 1 (all zeros = op removed)
    O2 (7)              one-hot: op of branch 2
    C  (3)              [linked to block output, combine by concat, not linked]

In memory a cell is the compact `Cell` named tuple (indices, not bits); an architecture is a tuple
of blocks and a block a tuple of cells (`Architecture` is a tuple subclass with the converters).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from memnas_jax.errors import UserError

OP_NAMES: tuple[str, ...] = (
    "avg_pool_3x3",
    "max_pool_3x3",
    "dil_conv_3x3",
    "fac_conv_7",
    "sep_conv_5x5",
    "sep_conv_3x3",
    "conv_3x3",
)
NUM_OPS = len(OP_NAMES)
REMOVED = None  # op value of a trimmed branch
REMOVED_NAME = "none"
DEFAULT_MAX_CELLS = 14  # the authors' 15 output locations: block input + 14 cells
C_WIDTH = 3
JSON_FORMAT = "memnas_jax.architecture/v1"

# The authors' format (reference/golden):
# cell = [in1(15), in2(15), out(15), op1(7), op2(7), link(2)].
MEMNAS_LOCATIONS = 15
# The meaning of the authors' 2-bit `link` changed during their project (golden README):
#   "combine": rounds 0-1, link [1,0] = add, [0,1] = concat; every cell feeds the block output.
#   "link":    round 2 on, the cell always adds; link [1,0] = in the block output, [0,1] (or [1,1],
#              used by their hand-edited net6) = edge to the block output removed.
MEMNAS_CONVENTIONS = ("link", "combine")

TOKEN_FIELDS = ("block", "position", "input1", "input2", "op1", "op2", "linked", "concat")
TOKEN_WIDTH = len(TOKEN_FIELDS)
TOKEN_REMOVED_OP = NUM_OPS  # token value of a removed op (ops are 0..6)


class EncodingError(UserError, ValueError):
    """An invalid encoding; the message names the block, cell and field (1-based block/cell)."""

    def __init__(self, message: str, block: int | None = None, cell: int | None = None,
                 field: str | None = None):
        where = []
        if block is not None:
            where.append(f"block {block + 1}")
        if cell is not None:
            where.append(f"cell {cell + 1}")
        if field is not None:
            where.append(f"field {field}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.block, self.cell, self.field = block, cell, field


class Cell(NamedTuple):
    """One two-branch cell. Inputs are node indices (0 = block input, j = cell j); ops index
    `OP_NAMES` or are None (removed); `linked` puts the cell output in the block-output concat;
    `concat` combines the two branches by channel concat instead of add."""

    input1: int
    input2: int
    op1: int | None
    op2: int | None
    linked: bool = True
    concat: bool = False

    def describe(self) -> str:
        combine = "cat" if self.concat else "+"
        link = "" if self.linked else " (not linked)"
        return (f"{op_name(self.op1)}({_node_name(self.input1)}) {combine} "
                f"{op_name(self.op2)}({_node_name(self.input2)}){link}")


Block = tuple  # tuple[Cell, ...]


def op_name(op: int | None) -> str:
    return REMOVED_NAME if op is None else OP_NAMES[op]


def op_index(name: str | int | None) -> int | None:
    """Op index from a name ('conv_3x3'), an index, or None/'none' for a removed op."""
    if name is None or name == REMOVED_NAME:
        return None
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if 0 <= int(name) < NUM_OPS:
            return int(name)
        raise EncodingError(f"op index {name} is not in 0..{NUM_OPS - 1}")
    if isinstance(name, str) and name in OP_NAMES:
        return OP_NAMES.index(name)
    raise EncodingError(f"unknown op {name!r}; expected one of {OP_NAMES} or 'none'")


def _node_name(node: int) -> str:
    return "in" if node == 0 else f"c{node}"


# ---------------------------------------------------------------------------------------------
# Validation


def _check_int(value: Any, what: str, block: int, cell: int, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise EncodingError(f"{what} must be an integer, got {value!r}", block, cell, field)
    return int(value)


def _check_cell(cell: Any, block: int, index: int, max_cells: int) -> Cell:
    if not isinstance(cell, Cell):
        raise EncodingError(f"expected a Cell, got {type(cell).__name__}", block, index)
    for field, node in (("I1", cell.input1), ("I2", cell.input2)):
        node = _check_int(node, "input node", block, index, field)
        if not 0 <= node <= index:
            raise EncodingError(
                f"input node {node} is not an earlier node (allowed 0..{index}: 0 = block input, "
                f"j = cell j)", block, index, field)
    for field, op in (("O1", cell.op1), ("O2", cell.op2)):
        if op is not None:
            op = _check_int(op, "op", block, index, field)
            if not 0 <= op < NUM_OPS:
                raise EncodingError(f"op {op} is not in 0..{NUM_OPS - 1} or None", block, index,
                                    field)
    for name in ("linked", "concat"):
        if not isinstance(getattr(cell, name), (bool, np.bool_)):
            raise EncodingError(f"{name} must be a bool, got {getattr(cell, name)!r}", block,
                                index, "C")
    return Cell(int(cell.input1), int(cell.input2),
                None if cell.op1 is None else int(cell.op1),
                None if cell.op2 is None else int(cell.op2),
                bool(cell.linked), bool(cell.concat))


def validate(blocks: Iterable[Iterable[Cell]], max_cells: int = DEFAULT_MAX_CELLS,
             num_blocks: int | None = None) -> "Architecture":
    """Checks an architecture and returns it as a normalised `Architecture`.

    Raises `EncodingError` naming the block, cell and field of the first problem.
    """
    blocks = tuple(tuple(b) for b in blocks)
    if num_blocks is not None and len(blocks) != num_blocks:
        raise EncodingError(f"expected {num_blocks} blocks, got {len(blocks)}")
    if not blocks:
        raise EncodingError("an architecture needs at least one block")
    checked = []
    for b, block in enumerate(blocks):
        if not block:
            raise EncodingError("a block needs at least one cell", b)
        if len(block) > max_cells:
            raise EncodingError(f"{len(block)} cells exceed the cap of {max_cells}", b)
        cells = tuple(_check_cell(c, b, i, max_cells) for i, c in enumerate(block))
        if not any(c.linked for c in cells):
            raise EncodingError("no cell is linked to the block output (C bit 0)", b)
        checked.append(cells)
    return Architecture(checked, _validated=True)


# ---------------------------------------------------------------------------------------------
# The architecture type


class Architecture(tuple):
    """A validated tuple of blocks; each block a tuple of `Cell`s."""

    def __new__(cls, blocks: Iterable[Iterable[Cell]] = (), _validated: bool = False):
        if not _validated:
            return validate(blocks)
        return super().__new__(cls, tuple(tuple(b) for b in blocks))

    # ----- shape
    @property
    def num_blocks(self) -> int:
        return len(self)

    @property
    def cells_per_block(self) -> tuple[int, ...]:
        return tuple(len(b) for b in self)

    def __repr__(self) -> str:
        return f"Architecture({[list(b) for b in self]!r})"

    def __str__(self) -> str:
        lines = []
        for b, block in enumerate(self):
            lines.append(f"block {b + 1}:")
            for i, cell in enumerate(block):
                lines.append(f"  c{i + 1} = {cell.describe()}")
            out = " ++ ".join(f"c{i + 1}" for i, c in enumerate(block) if c.linked)
            lines.append(f"  out = {out}")
        return "\n".join(lines)

    # ----- JSON
    def to_dict(self) -> dict:
        return {
            "format": JSON_FORMAT,
            "blocks": [[{"inputs": [c.input1, c.input2], "ops": [op_name(c.op1), op_name(c.op2)],
                         "linked": c.linked, "concat": c.concat} for c in block]
                       for block in self],
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | dict, max_cells: int = DEFAULT_MAX_CELLS
                  ) -> "Architecture":
        return from_json(text, max_cells)

    def canonical_hash(self) -> str:
        """SHA-256 of the canonical JSON: stable across processes, machines and Python versions."""
        canonical = json.dumps([[[c.input1, c.input2, c.op1, c.op2, c.linked, c.concat]
                                 for c in block] for block in self], separators=(",", ":"))
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    # ----- binary vectors
    def to_vectors(self, max_cells: int = DEFAULT_MAX_CELLS) -> list[list[tuple[np.ndarray, ...]]]:
        """Per block, per cell: the five binary vectors (I1, I2, O1, O2, C) as uint8 arrays."""
        self._check_cap(max_cells)
        return [[cell_to_vectors(c, max_cells) for c in block] for block in self]

    def to_bits(self, max_cells: int = DEFAULT_MAX_CELLS) -> list[np.ndarray]:
        """Per block, a (cells, 2 * (max_cells + 1) + 17) uint8 array: I1|I2|O1|O2|C per row."""
        return [np.stack([np.concatenate(v) for v in block]) for block in
                self.to_vectors(max_cells)]

    # ----- controller tokens
    def to_tokens(self) -> np.ndarray:
        """A (total cells, 8) int32 array, one row per cell in block order, columns
        `TOKEN_FIELDS`: block, position in block, input1, input2, op1, op2 (7 = removed),
        linked, concat."""
        rows = [(b, i, c.input1, c.input2,
                 TOKEN_REMOVED_OP if c.op1 is None else c.op1,
                 TOKEN_REMOVED_OP if c.op2 is None else c.op2, int(c.linked), int(c.concat))
                for b, block in enumerate(self) for i, c in enumerate(block)]
        return np.asarray(rows, dtype=np.int32).reshape(-1, TOKEN_WIDTH)

    # ----- the authors' format
    def to_memnas_feature(self, convention: str = "link",
                          unlinked_code: Sequence[int] = (0, 1)) -> list:
        return to_memnas_feature(self, convention, unlinked_code)

    def _check_cap(self, max_cells: int) -> None:
        for b, block in enumerate(self):
            if len(block) > max_cells:
                raise EncodingError(f"{len(block)} cells exceed the cap of {max_cells}", b)

    # ----- edits (used by grow/trim)
    def replace_cell(self, block: int, index: int, cell: Cell) -> "Architecture":
        blocks = [list(b) for b in self]
        blocks[block][index] = cell
        return validate(blocks)

    def append_cell(self, cell: Cell, blocks: Iterable[int] | None = None) -> "Architecture":
        targets = set(range(len(self)) if blocks is None else blocks)
        return validate([list(b) + [cell] if i in targets else list(b)
                         for i, b in enumerate(self)])


def make_architecture(blocks: Iterable[Iterable[Any]], max_cells: int = DEFAULT_MAX_CELLS
                      ) -> Architecture:
    """Builds an architecture from cells given as `Cell`s or plain tuples
    `(input1, input2, op1, op2[, linked[, concat]])`; ops may be names or indices."""
    converted = []
    for b, block in enumerate(blocks):
        cells = []
        for i, c in enumerate(block):
            if not isinstance(c, Cell):
                if not isinstance(c, (tuple, list)) or not 4 <= len(c) <= 6:
                    raise EncodingError(
                        "a cell is (input1, input2, op1, op2[, linked[, concat]])", b, i)
                try:
                    ops = [op_index(c[2]), op_index(c[3])]
                except EncodingError as e:
                    raise EncodingError(str(e), b, i, "O1/O2") from None
                c = Cell(c[0], c[1], ops[0], ops[1], *c[4:])
            cells.append(c)
        converted.append(cells)
    return validate(converted, max_cells)


def uniform_architecture(cells: Sequence[Any], num_blocks: int = 5) -> Architecture:
    """The same cells in every block (CIFAR-10 grows this way)."""
    return make_architecture([list(cells)] * num_blocks)


def random_architecture(rng: np.random.Generator, num_blocks: int = 5, max_cells: int = 4,
                        removed_probability: float = 0.2, linked_probability: float = 0.7,
                        concat_probability: float = 0.3) -> Architecture:
    """A random valid architecture: 1..max_cells cells per block, each reading earlier nodes,
    ops uniform over the seven or removed, linked and concat at the given rates (at least one
    linked cell per block). Every choice comes from `rng`."""
    blocks = []
    for _ in range(num_blocks):
        cells = []
        for j in range(int(rng.integers(1, max_cells + 1))):
            ops = [None if rng.random() < removed_probability else int(rng.integers(0, NUM_OPS))
                   for _ in range(2)]
            cells.append(Cell(int(rng.integers(0, j + 1)), int(rng.integers(0, j + 1)), *ops,
                              bool(rng.random() < linked_probability),
                              bool(rng.random() < concat_probability)))
        if not any(c.linked for c in cells):
            cells[-1] = cells[-1]._replace(linked=True)
        blocks.append(cells)
    return validate(blocks, max(DEFAULT_MAX_CELLS, max_cells))


# ---------------------------------------------------------------------------------------------
# JSON decoding


def read_architecture(path: str, flag: str = "--arch") -> Architecture:
    """The architecture in the JSON file `path` (`Architecture.to_json`), or a one-line
    `UserError` naming `flag` when the file cannot be read or is not one."""
    import pathlib
    try:
        text = pathlib.Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read {flag}={path} ({e.strerror or e})") from None
    try:
        return from_json(text)
    except EncodingError as e:
        raise UserError(f"{flag}={path} is not a valid architecture JSON "
                        f"(Architecture.to_json, e.g. a search's best_architecture.json): {e}"
                        ) from None


def from_json(text: str | bytes | dict, max_cells: int = DEFAULT_MAX_CELLS) -> Architecture:
    """Parses `Architecture.to_json()` output; any malformed input raises `EncodingError`."""
    if isinstance(text, dict):
        data = text
    else:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise EncodingError(f"not valid JSON: {e}") from None
    if not isinstance(data, dict) or "blocks" not in data:
        raise EncodingError('expected a JSON object with a "blocks" list')
    if data.get("format", JSON_FORMAT) != JSON_FORMAT:
        raise EncodingError(f"unknown format {data.get('format')!r}, expected {JSON_FORMAT!r}")
    blocks = data["blocks"]
    if not isinstance(blocks, list):
        raise EncodingError('"blocks" must be a list of blocks')
    out = []
    for b, block in enumerate(blocks):
        if not isinstance(block, list):
            raise EncodingError("a block must be a list of cells", b)
        cells = []
        for i, cell in enumerate(block):
            if not isinstance(cell, dict):
                raise EncodingError("a cell must be a JSON object", b, i)
            inputs, ops = cell.get("inputs"), cell.get("ops")
            if not isinstance(inputs, list) or len(inputs) != 2:
                raise EncodingError('"inputs" must be a list of two node indices', b, i, "I1/I2")
            if not isinstance(ops, list) or len(ops) != 2:
                raise EncodingError('"ops" must be a list of two op names', b, i, "O1/O2")
            parsed_ops = []
            for field, op in zip(("O1", "O2"), ops):
                try:
                    parsed_ops.append(op_index(op))
                except EncodingError as e:
                    raise EncodingError(str(e), b, i, field) from None
            linked, concat = cell.get("linked", True), cell.get("concat", False)
            cells.append(Cell(inputs[0], inputs[1], parsed_ops[0], parsed_ops[1], linked, concat))
        out.append(cells)
    return validate(out, max_cells)


# ---------------------------------------------------------------------------------------------
# Binary vectors


def _one_hot(index: int | None, width: int) -> np.ndarray:
    v = np.zeros(width, dtype=np.uint8)
    if index is not None:
        v[index] = 1
    return v


def cell_to_vectors(cell: Cell, max_cells: int = DEFAULT_MAX_CELLS
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(I1, I2, O1, O2, C) of one cell as uint8 arrays."""
    c = np.array([cell.linked, cell.concat, not cell.linked], dtype=np.uint8)
    return (_one_hot(cell.input1, max_cells + 1), _one_hot(cell.input2, max_cells + 1),
            _one_hot(cell.op1, NUM_OPS), _one_hot(cell.op2, NUM_OPS), c)


def _decode_one_hot(bits: np.ndarray, width: int, allow_zero: bool, block: int, cell: int,
                    field: str) -> int | None:
    if bits.shape != (width,):
        raise EncodingError(f"width {bits.shape[0] if bits.ndim == 1 else bits.shape}, "
                            f"expected {width}", block, cell, field)
    if not np.all((bits == 0) | (bits == 1)):
        raise EncodingError(f"bits must be 0 or 1, got {bits.tolist()}", block, cell, field)
    hot = np.flatnonzero(bits)
    if len(hot) == 0 and allow_zero:
        return None
    if len(hot) != 1:
        raise EncodingError(f"not one-hot: {bits.astype(int).tolist()}", block, cell, field)
    return int(hot[0])


def _as_bit_array(value: Any, block: int, cell: int, field: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged input
        raise EncodingError(f"not an array of bits: {e}", block, cell, field) from None
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_
                             or np.issubdtype(arr.dtype, np.floating)):
        raise EncodingError(f"expected a 1-D array of bits, got {arr.dtype} shape {arr.shape}",
                            block, cell, field)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isin(arr, (0.0, 1.0))):
            raise EncodingError(f"bits must be 0 or 1, got {arr.tolist()}", block, cell, field)
    return arr.astype(np.int64)


def cell_from_vectors(vectors: Sequence[Any], max_cells: int = DEFAULT_MAX_CELLS,
                      block: int = 0, cell: int = 0) -> Cell:
    """Decodes (I1, I2, O1, O2, C); errors name the given block and cell."""
    if len(vectors) != 5:
        raise EncodingError(f"a cell has 5 vectors (I1, I2, O1, O2, C), got {len(vectors)}",
                            block, cell)
    names = ("I1", "I2", "O1", "O2", "C")
    arrs = [_as_bit_array(v, block, cell, f) for v, f in zip(vectors, names)]
    in1 = _decode_one_hot(arrs[0], max_cells + 1, False, block, cell, "I1")
    in2 = _decode_one_hot(arrs[1], max_cells + 1, False, block, cell, "I2")
    op1 = _decode_one_hot(arrs[2], NUM_OPS, True, block, cell, "O1")
    op2 = _decode_one_hot(arrs[3], NUM_OPS, True, block, cell, "O2")
    c = arrs[4]
    if c.shape != (C_WIDTH,):
        raise EncodingError(f"width {c.shape[0]}, expected {C_WIDTH}", block, cell, "C")
    if not np.all((c == 0) | (c == 1)):
        raise EncodingError(f"bits must be 0 or 1, got {c.tolist()}", block, cell, "C")
    if c[0] == c[2]:
        raise EncodingError(
            f"link bits 0 and 2 must be one-hot (linked / not linked), got {c.tolist()}",
            block, cell, "C")
    return Cell(in1, in2, op1, op2, bool(c[0]), bool(c[1]))


def from_vectors(blocks: Sequence[Sequence[Sequence[Any]]], max_cells: int = DEFAULT_MAX_CELLS
                 ) -> Architecture:
    """Inverse of `Architecture.to_vectors`."""
    if not isinstance(blocks, (list, tuple)):
        raise EncodingError("expected a list of blocks")
    out = []
    for b, block in enumerate(blocks):
        if not isinstance(block, (list, tuple)):
            raise EncodingError("a block must be a list of cells", b)
        cells = []
        for i, vecs in enumerate(block):
            if not isinstance(vecs, (list, tuple)):
                raise EncodingError("a cell must be a list of 5 vectors", b, i)
            cells.append(cell_from_vectors(vecs, max_cells, b, i))
        out.append(cells)
    return validate(out, max_cells)


def from_bits(blocks: Sequence[Any], max_cells: int = DEFAULT_MAX_CELLS) -> Architecture:
    """Inverse of `Architecture.to_bits`: per block a (cells, 2 * (max_cells + 1) + 17) array."""
    n = max_cells + 1
    splits = np.cumsum([n, n, NUM_OPS, NUM_OPS])
    width = 2 * n + 2 * NUM_OPS + C_WIDTH
    if not isinstance(blocks, (list, tuple)):
        raise EncodingError("expected a list of per-block bit arrays")
    vectors = []
    for b, rows in enumerate(blocks):
        try:
            rows = np.asarray(rows)
        except (ValueError, TypeError) as e:
            raise EncodingError(f"not an array of bits: {e}", b) from None
        if rows.ndim != 2 or rows.shape[1] != width:
            raise EncodingError(f"expected shape (cells, {width}), got {rows.shape}", b)
        vectors.append([np.split(row, splits) for row in rows])
    return from_vectors(vectors, max_cells)


# ---------------------------------------------------------------------------------------------
# The authors' 61-dim format


def to_memnas_feature(arch: Architecture, convention: str = "link",
                      unlinked_code: Sequence[int] = (0, 1)) -> list:
    """The authors' `#network feature:` list: per cell [in1(15), in2(15), out(15), op1(7),
    op2(7), link(2)] with location 14 = block input and 14 - j = cell j.

    convention "link" (their round 2 on) needs add-only cells and writes the output edge into
    `link` ([1,0] linked, `unlinked_code` otherwise); "combine" (rounds 0-1) needs every cell
    linked and writes [1,0] for add, [0,1] for concat.
    """
    if convention not in MEMNAS_CONVENTIONS:
        raise EncodingError(f"unknown convention {convention!r}; use one of {MEMNAS_CONVENTIONS}")
    arch = validate(arch, max_cells=MEMNAS_LOCATIONS - 1)
    feature = []
    for b, block in enumerate(arch):
        cells = []
        for i, c in enumerate(block):
            if convention == "link":
                if c.concat:
                    raise EncodingError("the 'link' convention has add-only cells", b, i, "C")
                link = [1, 0] if c.linked else list(unlinked_code)
            else:
                if not c.linked:
                    raise EncodingError("the 'combine' convention links every cell", b, i, "C")
                link = [0, 1] if c.concat else [1, 0]
            loc = lambda node: _one_hot(MEMNAS_LOCATIONS - 1 - node, MEMNAS_LOCATIONS).tolist()
            cells.append([loc(c.input1), loc(c.input2), loc(i + 1),
                          _one_hot(c.op1, NUM_OPS).tolist(), _one_hot(c.op2, NUM_OPS).tolist(),
                          link])
        feature.append(cells)
    return feature


def from_memnas_feature(feature: Sequence[Any], convention: str = "link") -> Architecture:
    """Decodes the authors' format (see `to_memnas_feature`). In the "link" convention both
    [0,1] and [1,1] mean "not linked" (the authors' net6 uses [1,1])."""
    if convention not in MEMNAS_CONVENTIONS:
        raise EncodingError(f"unknown convention {convention!r}; use one of {MEMNAS_CONVENTIONS}")
    if not isinstance(feature, (list, tuple)):
        raise EncodingError("expected a list of blocks")
    blocks = []
    for b, block in enumerate(feature):
        if not isinstance(block, (list, tuple)):
            raise EncodingError("a block must be a list of cells", b)
        cells = []
        for i, cell in enumerate(block):
            if not isinstance(cell, (list, tuple)) or len(cell) != 6:
                raise EncodingError("a cell has 6 fields [in1, in2, out, op1, op2, link]", b, i)
            arrs = [_as_bit_array(v, b, i, f) for v, f in
                    zip(cell, ("in1", "in2", "out", "op1", "op2", "link"))]
            locs = [_decode_one_hot(a, MEMNAS_LOCATIONS, False, b, i, f)
                    for a, f in zip(arrs[:3], ("in1", "in2", "out"))]
            if locs[2] != MEMNAS_LOCATIONS - 2 - i:
                raise EncodingError(f"output location {locs[2]} should be "
                                    f"{MEMNAS_LOCATIONS - 2 - i} for cell {i + 1}", b, i, "out")
            op1 = _decode_one_hot(arrs[3], NUM_OPS, True, b, i, "op1")
            op2 = _decode_one_hot(arrs[4], NUM_OPS, True, b, i, "op2")
            link = arrs[5]
            if link.shape != (2,) or not np.all((link == 0) | (link == 1)) or link.sum() == 0:
                raise EncodingError(f"expected [1,0], [0,1] or [1,1], got {link.tolist()}", b, i,
                                    "link")
            if convention == "combine":
                if link.sum() != 1:
                    raise EncodingError(f"expected [1,0] (add) or [0,1] (concat), got "
                                        f"{link.tolist()}", b, i, "link")
                linked, concat = True, bool(link[1])
            else:
                linked, concat = bool(link[0] == 1 and link[1] == 0), False
            nodes = [MEMNAS_LOCATIONS - 1 - loc for loc in locs[:2]]
            cells.append(Cell(nodes[0], nodes[1], op1, op2, linked, concat))
        blocks.append(cells)
    return validate(blocks, max_cells=MEMNAS_LOCATIONS - 1)


__all__ = [
    "Architecture", "Block", "Cell", "EncodingError", "OP_NAMES", "NUM_OPS", "DEFAULT_MAX_CELLS",
    "TOKEN_FIELDS", "TOKEN_WIDTH", "TOKEN_REMOVED_OP", "MEMNAS_CONVENTIONS", "cell_from_vectors",
    "cell_to_vectors", "from_bits", "from_json", "from_memnas_feature", "from_vectors",
    "make_architecture", "op_index", "op_name", "random_architecture", "read_architecture",
    "to_memnas_feature", "uniform_architecture", "validate",
]
