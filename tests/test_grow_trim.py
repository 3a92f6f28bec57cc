"""Grow-trim generation: the authors' round 0, 1 and 2 candidate sets, in order, and the rules."""

import collections
import subprocess
import sys

import numpy as np
import pytest

from memnas_jax import encoding as enc
from memnas_jax.encoding import Cell, EncodingError
from memnas_jax.grow_trim import (
    Candidate,
    GrowTrimOptions,
    generate_candidates,
    initial_candidates,
    mirror_invariant_hash,
)

AUTHORS_ROUND01 = GrowTrimOptions(combine_modes=("add", "concat"))
GEN_BIG_ONLY = GrowTrimOptions(combine_modes=("add", "concat"), trim_ops=False, trim_edges=False)
NET179 = [(0, 0, "fac_conv_7", "sep_conv_3x3"), (1, 0, "fac_conv_7", "max_pool_3x3")]


@pytest.fixture(scope="module")
def golden(golden_candidates, golden_convention):
    """Each golden round decoded: a list of (name, Architecture, generator)."""
    return {name: [(e["name"], enc.from_memnas_feature(e["feature"], golden_convention[name]),
                    e["generator"]) for e in entries]
            for name, entries in golden_candidates["rounds"].items()}


@pytest.fixture(scope="module")
def golden_base(golden_estimator):
    bases = {b["name"]: b for b in golden_estimator["base_networks"]}
    return lambda name, convention: enc.from_memnas_feature(bases[name]["feature"], convention)


def _archs(candidates):
    return [c.architecture for c in candidates]


def _hashes(archs):
    return {a.canonical_hash() for a in archs}


def test_import_needs_numpy_only():
    code = ("import sys; import memnas_jax.grow_trim, memnas_jax.reward; "
            "bad = [m for m in ('jax', 'flax', 'optax') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_round0_is_the_authors_98_in_order(golden):
    expected = [arch for _, arch, _ in golden["round0"]]
    candidates = initial_candidates(5, AUTHORS_ROUND01)
    assert len(candidates) == 98
    assert _hashes(_archs(candidates)) == _hashes(expected)
    assert _archs(candidates) == expected  # op1, op2, then add before concat
    assert all(c.kind == "grow" and c.block is None and c.cell == 0 for c in candidates)
    assert candidates[52].new_cell == Cell(0, 0, 3, 5)  # their round-0 winner net53


def test_round0_add_only_is_the_add_half(golden):
    candidates = initial_candidates()  # default: add only
    assert len(candidates) == 49
    assert _archs(candidates) == [arch for _, arch, _ in golden["round0"][::2]]
    assert not any(cell.concat for c in candidates for block in c.architecture for cell in block)


def test_round1_from_net53_is_gen_big_with_both_combines(golden, golden_base):
    net53 = golden_base("net53", "combine")
    assert net53 == golden["round0"][52][1]
    expected = [arch for _, arch, _ in golden["round1"]]
    candidates = generate_candidates(net53, GEN_BIG_ONLY)
    assert len(candidates) == 392 == 49 * 2 ** 2 * 2
    assert _hashes(_archs(candidates)) == _hashes(expected)
    assert _archs(candidates) == expected  # op1, op2, combine, input1, input2


def test_round1_with_trims_adds_the_ten_op_trims(golden, golden_base, golden_estimator):
    net53 = golden_base("net53", "combine")
    candidates = generate_candidates(net53, AUTHORS_ROUND01)
    kinds = collections.Counter(c.kind for c in candidates)
    # The authors' round 1 has no trims; with trims on, their one-cell base adds 2 ops x 5 blocks
    # (no edge trims: no cell reads another).
    assert kinds == {"grow": 392, "trim_op": 10}
    assert _archs(candidates[:392]) == [arch for _, arch, _ in golden["round1"]]
    # Their code as committed (add only, with trims): the golden generation check's 196 + 10.
    check = golden_estimator["generation_check"]["round1_from_net53_as_code_stands"]["counts"]
    kinds = collections.Counter(c.kind for c in generate_candidates(net53))
    assert (kinds["grow"], kinds["trim_op"], kinds["trim_edge"]) == (
        check["gen_big"], check["remove"], check["remove_fin"]) == (196, 10, 0)


def test_round2_from_net179_is_the_authors_466_in_order(golden, golden_base, golden_estimator):
    net179 = golden_base("net179", "link")
    assert net179 == golden["round1"][178][1] == enc.uniform_architecture(NET179)
    candidates = generate_candidates(net179)
    expected = [arch for _, arch, _ in golden["round2"]]
    assert len(candidates) == 466
    assert _hashes(_archs(candidates)) == _hashes(expected)
    assert _archs(candidates) == expected
    check = golden_estimator["generation_check"]["round2_from_net179"]["counts"]
    kinds = collections.Counter(c.kind for c in candidates)
    assert kinds == {"grow": check["gen_big"], "trim_op": check["remove"],
                     "trim_edge": check["remove_fin"]} == {"grow": 441, "trim_op": 20,
                                                           "trim_edge": 5}
    # Each candidate's kind is the authors' generator of the file at that index.
    kind_of = {"gen_big": "grow", "remove": "trim_op", "remove_fin": "trim_edge"}
    assert [c.kind for c in candidates] == [kind_of[g] for _, _, g in golden["round2"]]


def test_candidate_records_match_the_edit():
    base = enc.uniform_architecture(NET179)  # the authors' net179 (checked against
    # their golden data in test_round2_from_net179_is_the_authors_466_in_order)
    for c in generate_candidates(base):
        assert c.arch_hash == c.architecture.canonical_hash()
        if c.kind == "grow":
            assert c.block is None and c.branch is None and c.cell == 2
            assert all(block == base_block + (c.new_cell,)
                       for block, base_block in zip(c.architecture, base))
            continue
        changed = [(b, i) for b, (block, base_block) in enumerate(zip(c.architecture, base))
                   for i, (cell, base_cell) in enumerate(zip(block, base_block))
                   if cell != base_cell]
        assert changed == [(c.block, c.cell)]
        old, new = base[c.block][c.cell], c.architecture[c.block][c.cell]
        if c.kind == "trim_op":
            field = f"op{c.branch}"
            assert getattr(new, field) is None and getattr(old, field) is not None
            assert new == old._replace(**{field: None})
        else:
            assert c.branch is None and old.linked and new == old._replace(linked=False)
    assert generate_candidates(base)[0].describe() == (
        "grow c3 = avg_pool_3x3(in) + avg_pool_3x3(in) in all blocks")
    assert generate_candidates(base)[-1].describe() == "unlink c1 from the output of block 5"


def test_mirrored_add_cells_merge():
    base = enc.uniform_architecture(NET179)  # the authors' net179 (checked against
    # their golden data in test_round2_from_net179_is_the_authors_466_in_order)
    merged = generate_candidates(base, GrowTrimOptions(merge_mirrored_cells=True))
    kinds = collections.Counter(c.kind for c in merged)
    # 3 inputs x 7 ops give 21 symmetric cells; the other 420 pair up into 210 mirror pairs.
    assert kinds == {"grow": 231, "trim_op": 20, "trim_edge": 5}
    full = generate_candidates(base)
    kept = {c.arch_hash for c in merged}
    keys = {mirror_invariant_hash(c.architecture) for c in merged}
    for c in full:
        if c.arch_hash not in kept:  # every dropped one is the mirror of an earlier kept one
            cell = c.new_cell
            mirror = cell._replace(input1=cell.input2, input2=cell.input1, op1=cell.op2,
                                   op2=cell.op1)
            assert mirror != cell and mirror_invariant_hash(c.architecture) in keys
            assert base.append_cell(mirror).canonical_hash() in kept
    # Concat cells are not merged: swapping their branches permutes their output channels.
    concat = GrowTrimOptions(combine_modes=("concat",), merge_mirrored_cells=True,
                             trim_ops=False, trim_edges=False)
    assert len(generate_candidates(base, concat)) == 441


def test_per_block_growth():
    base = enc.uniform_architecture(NET179)  # the authors' net179 (checked against
    # their golden data in test_round2_from_net179_is_the_authors_466_in_order)
    candidates = generate_candidates(base, GrowTrimOptions(growth="per_block"))
    grows = [c for c in candidates if c.kind == "grow"]
    assert len(grows) == 5 * 441 and len(candidates) == 5 * 441 + 25
    assert [c.block for c in grows[::441]] == [0, 1, 2, 3, 4]
    for c in grows[::37]:
        assert c.architecture.cells_per_block == tuple(3 if b == c.block else 2
                                                       for b in range(5))
    # Blocks now differ in size: per-block growth reads each block's own nodes.
    uneven = grows[0].architecture
    again = generate_candidates(uneven, GrowTrimOptions(growth="per_block", trim_ops=False,
                                                        trim_edges=False))
    assert len(again) == 49 * (16 + 4 * 9)
    with pytest.raises(ValueError, match="same number of cells in every block"):
        generate_candidates(uneven)


def test_cell_cap_stops_growth():
    base = enc.uniform_architecture(NET179)  # the authors' net179 (checked against
    # their golden data in test_round2_from_net179_is_the_authors_466_in_order)
    candidates = generate_candidates(base, GrowTrimOptions(max_cells=2))
    assert collections.Counter(c.kind for c in candidates) == {"trim_op": 20, "trim_edge": 5}
    assert len(generate_candidates(base, GrowTrimOptions(max_cells=3))) == 466
    with pytest.raises(EncodingError, match="block 1: 2 cells exceed the cap of 1"):
        generate_candidates(base, GrowTrimOptions(max_cells=1))


def test_trims_only_where_valid():
    # Cell 2 reads cell 1 but is itself unlinked (dead): unlinking cell 1 would leave block 1
    # without a linked cell, so that edge trim is dropped; the other blocks keep theirs.
    dead = [(0, 0, "conv_3x3", "conv_3x3"), (1, 0, "conv_3x3", None, False)]
    live = [(0, 0, "conv_3x3", "conv_3x3"), (1, 0, "conv_3x3", None)]
    base = enc.make_architecture([dead] + [live] * 4)
    options = GrowTrimOptions(ops=("conv_3x3",))
    candidates = generate_candidates(base, options)
    kinds = collections.Counter(c.kind for c in candidates)
    assert kinds == {"grow": 9, "trim_op": 15, "trim_edge": 4}
    assert [c.block for c in candidates if c.kind == "trim_edge"] == [1, 2, 3, 4]
    # Removed ops are not removed again; a cell whose two ops are removed is valid.
    assert [(c.block, c.cell, c.branch) for c in candidates if c.kind == "trim_op"][:3] == [
        (0, 0, 1), (0, 0, 2), (0, 1, 1)]


def test_ops_option_and_order():
    options = GrowTrimOptions(ops=("conv_3x3", 1))
    assert options.ops == (6, 1)
    cells = [c.new_cell for c in initial_candidates(2, options)]
    assert cells == [Cell(0, 0, 6, 6), Cell(0, 0, 6, 1), Cell(0, 0, 1, 6), Cell(0, 0, 1, 1)]
    assert all(c.architecture.num_blocks == 2 for c in initial_candidates(2, options))


@pytest.mark.parametrize("kwargs, message", [
    ({"combine_modes": ()}, "combine_modes"),
    ({"combine_modes": ("add", "add")}, "combine_modes"),
    ({"combine_modes": "add"}, "combine_modes must be a sequence"),
    ({"combine_modes": ("mul",)}, "combine_modes"),
    ({"growth": "some_blocks"}, "growth"),
    ({"max_cells": 0}, "max_cells"),
    ({"ops": ("conv_9x9",)}, "unknown op"),
    ({"ops": (7,)}, "not in 0..6"),
    ({"ops": (1, 1)}, "distinct"),
    ({"ops": ("none",)}, "distinct"),
    ({"trim_ops": 1}, "trim_ops must be a bool"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GrowTrimOptions(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_blocks"):
        initial_candidates(0)
    with pytest.raises(EncodingError, match="block 2: a block needs at least one cell"):
        generate_candidates([[Cell(0, 0, 1, 1)], []])


def test_random_walk_invariants():
    """Over a seeded walk of grows and trims, every pool is valid, unique, excludes the base,
    and has the closed-form size."""
    rng = np.random.default_rng(0)
    options = GrowTrimOptions(max_cells=5)
    base = initial_candidates()[int(rng.integers(49))].architecture
    for _ in range(8):
        candidates = generate_candidates(base, options)
        hashes = [c.arch_hash for c in candidates]
        assert len(set(hashes)) == len(hashes) and base.canonical_hash() not in hashes
        assert all(isinstance(c, Candidate) and enc.validate(c.architecture) == c.architecture
                   for c in candidates)
        n = base.cells_per_block[0]
        ops_left = sum((c.op1 is not None) + (c.op2 is not None) for b in base for c in b)
        read = sum(c.linked and any(i + 1 in (d.input1, d.input2) for d in block[i + 1:])
                   for block in base for i, c in enumerate(block))
        kinds = collections.Counter(c.kind for c in candidates)
        assert kinds["grow"] == (49 * (n + 1) ** 2 if n < 5 else 0)
        assert kinds["trim_op"] == ops_left
        assert kinds["trim_edge"] == read  # the last cell stays linked: never invalid here
        base = candidates[int(rng.integers(len(candidates)))].architecture
