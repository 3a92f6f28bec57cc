"""The authors' memory estimators, ported literally: `paper_proxy(arch) -> (weights, input values)`.

Everything here mirrors `Network.cal_weight()` / `Network.cal_in()` of their
utils/generate_uni.py, quirks included (conv weights at C = 32, block 1 only, a 32 x 32 input);
do not "fix" it: it exists to reproduce the paper's curves, and `tests/test_memory.py` checks it
against the authors' numbers for every network of their golden data. Our own accounting is
`memnas_jax.memory`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from memnas_jax.encoding import Architecture, EncodingError

PROXY_CHANNELS = 32  # their blobk{1..5}_channel
PROXY_SIZE = 32  # cal_in's hard-coded 32 x 32
_LOCATIONS = 15  # their max_location: index 14 = block input, 14 - j = cell j
_STALE_INPUT_INDEX = 6  # their block-input test (a leftover of an 8-location encoding)
_PROXY_ITERATIONS = 10


class _ProxyCell(NamedTuple):
    in1: int  # location index (14 = block input)
    in2: int
    op1: int | None
    op2: int | None
    link: tuple[int, ...]


def _first_one(vector: Any, what: str, b: int, i: int) -> int:
    try:
        return list(vector).index(1)
    except (ValueError, TypeError):
        raise EncodingError(f"{what} has no 1 (the authors' .index(1) fails)", b, i, what
                            ) from None


def _proxy_feature(arch_or_feature: Any) -> list[list[_ProxyCell]]:
    if isinstance(arch_or_feature, Architecture):
        try:
            feature = arch_or_feature.to_memnas_feature("link")
        except EncodingError as e:
            raise EncodingError(f"paper_proxy converts an Architecture with the authors' "
                                f"round-2 'link' convention (add-only cells); pass their raw "
                                f"feature for concat cells: {e}") from None
    else:
        feature = arch_or_feature
    if not isinstance(feature, (list, tuple)) or len(feature) != 5:
        raise EncodingError("paper_proxy expects an Architecture or the authors' feature: a "
                            "list of 5 blocks")
    blocks = []
    for b, block in enumerate(feature):
        if not isinstance(block, (list, tuple)) or not block:
            raise EncodingError("empty block: the authors' estimator fails on it (IndexError in "
                                "Network.output_channel)", b)
        cells = []
        for i, cell in enumerate(block):
            if not isinstance(cell, (list, tuple)) or len(cell) != 6:
                raise EncodingError("a cell has 6 fields [in1, in2, out, op1, op2, link]", b, i)
            locs = []
            for k, field in ((0, "in1"), (1, "in2")):
                loc = _first_one(cell[k], field, b, i)
                if len(cell[k]) != _LOCATIONS or not _LOCATIONS - 1 - i <= loc <= _LOCATIONS - 1:
                    raise EncodingError(f"location {loc} is not the block input or an earlier "
                                        f"cell in a {_LOCATIONS}-location vector", b, i, field)
                locs.append(loc)
            ops = [None if 1 not in list(cell[k]) else list(cell[k]).index(1) for k in (3, 4)]
            _first_one(cell[5], "link", b, i)
            cells.append(_ProxyCell(locs[0], locs[1], ops[0], ops[1], tuple(cell[5])))
        blocks.append(cells)
    return blocks


def _block_output_channels(block: Sequence[_ProxyCell]) -> int:
    # Network.output_channel: cells whose link has its first 1 at index 0 ([1,0] and [1,1]).
    return PROXY_CHANNELS * sum(1 for c in block if list(c.link).index(1) == 0)


def _op_weights(op: int, p: int, c: int) -> int:
    """Their conv weight model of op `op` from p to c channels (no biases, BN, 1x1s in Fac)."""
    return (p * c, p * c, 9 * p * c, 7 * p * c + 7 * c * c, 25 * p + p * c, 9 * p + p * c,
            9 * p * c)[op]


def _proxy_weight_count(blocks: Sequence[Sequence[_ProxyCell]]) -> int:
    c = PROXY_CHANNELS
    outputs = [_block_output_channels(block) for block in blocks]
    total = 0
    for b, block in enumerate(blocks):
        for cell in block:
            for slot, (loc, op) in enumerate(((cell.in1, cell.op1), (cell.in2, cell.op2))):
                if op is None:
                    continue
                if loc != _STALE_INPUT_INDEX:  # always, with 15 locations: everything is c -> c
                    total += _op_weights(op, c, c)
                elif b > 0:  # the dead branch: input width = the previous block's output
                    total += _op_weights(op, outputs[b - 1], c)
                else:  # the dead branch in block 1 (3-channel image), with its typos
                    typo = {(0, 5): 3 * 3 * 3 * 3 + 3 * c, (1, 0): c * c, (1, 1): c * c}
                    total += typo.get((slot, op), _op_weights(op, 3, c))
    return total


def _proxy_intermediate_trace(blocks: Sequence[Sequence[_ProxyCell]]) -> list[int]:
    """The 11 evaluations of cal_in (initial live list, then 10 iterations) on block 1."""
    block = blocks[0]
    channel1, channel2 = _block_output_channels(block), PROXY_CHANNELS
    # Nodes 1..3n: per cell j, 3j-2 = op1, 3j-1 = op2, 3j = combine; node id 0 = block input
    # (or, as an output, the block output); a cell output at location l is node 3 * (14 - l).
    inputs: list[list[int]] = []
    outputs: list[list[int]] = []
    for j, cell in enumerate(block, start=1):
        for loc in (cell.in1, cell.in2):
            inputs.append([0 if loc == _LOCATIONS - 1 else 3 * (_LOCATIONS - 1 - loc)])
            outputs.append([3 * j])
        inputs.append([3 * j - 2, 3 * j - 1])
        outputs.append([] if list(cell.link) == [1, 1] else [0])
    ids = range(1, len(inputs) + 1)
    for o in ids:
        outputs[o - 1] += [t for t in ids if inputs[t - 1] == [o]]

    def state_of(states: list[int], node: int) -> int:
        return states[node - 1]  # node 0 reads states[-1], the last node: their quirk

    def score(live: list[int]) -> int:
        per_input = lambda x: channel1 + channel2 if x == 0 else 2 * channel2
        return sum(per_input(x) for n in live for x in inputs[n - 1]) * PROXY_SIZE * PROXY_SIZE

    states = [1 if inputs[n - 1] == [0] else 0 for n in ids]
    live = [n for n in ids if inputs[n - 1] == [0]]  # a list: duplicates are part of the port
    trace = [score(live)]
    for _ in range(_PROXY_ITERATIONS):
        new = list(states)
        for n in ids:  # becomes live when its inputs were live (again and again: duplicates)
            if all(state_of(states, x) == 1 for x in inputs[n - 1]):
                new[n - 1] = 1
                live.append(n)
        trace.append(score(live))
        states = list(new)
        for n in ids:  # retire; only a node with one non-block-output consumer leaves `live`
            if states[n - 1] != 1:
                continue
            outs = outputs[n - 1]
            if len(outs) == 1 and outs[0] != 0:
                if state_of(new, outs[0]) == 1:
                    states[n - 1] = 2
                    live.remove(n)
            elif len(outs) == 1:
                states[n - 1] = 2
            elif not outs:
                raise EncodingError("a block-1 cell with link [1,1] that no cell reads: the "
                                    "authors' cal_in fails on it (IndexError)", 0, (n - 1) // 3)
            elif state_of(new, outs[1]) == 1:
                states[n - 1] = 2
    return trace


def paper_proxy_trace(arch_or_feature: Any) -> list[int]:
    """The 11 values cal_in takes the maximum of (see `paper_proxy`)."""
    return _proxy_intermediate_trace(_proxy_feature(arch_or_feature))


def paper_proxy(arch_or_feature: Any) -> tuple[int, int]:
    """(weight_count, intermediate_values) of the authors' `cal_weight()` and `cal_in()`.

    Takes an `Architecture` (converted with `to_memnas_feature("link")`) or the authors' raw
    feature (needed for their rounds 0-1, where link meant add/concat, and for [1,1] links).
    Multiply by 4 for their MB figures (float32 bytes / 1e6). Coarse by design: conv weights at
    C = 32 everywhere; activations of block 1 only, at 32 x 32, with their liveness quirks.
    """
    blocks = _proxy_feature(arch_or_feature)
    return _proxy_weight_count(blocks), max(_proxy_intermediate_trace(blocks))


__all__ = ["PROXY_CHANNELS", "PROXY_SIZE", "paper_proxy", "paper_proxy_trace"]
