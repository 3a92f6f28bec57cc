"""Tests of the five-vector encoding: golden round-trips, validation messages, fuzzed decoders."""

import json
import subprocess
import sys

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from memnas_jax import encoding as enc
from memnas_jax.encoding import Architecture, Cell, EncodingError

NET53 = [(0, 0, "fac_conv_7", "sep_conv_3x3")]


def test_import_needs_numpy_only():
    code = ("import sys; import memnas_jax.encoding, memnas_jax.space; "
            "bad = [m for m in ('jax', 'flax', 'optax', 'tensorflow') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_golden_round_trip_every_candidate(golden_candidates, golden_convention):
    count = 0
    for round_name, entries in golden_candidates["rounds"].items():
        convention = golden_convention[round_name]
        for entry in entries:
            arch = enc.from_memnas_feature(entry["feature"], convention)
            assert arch.to_memnas_feature(convention) == entry["feature"], entry["name"]
            assert arch.cells_per_block == tuple(entry["cells_per_block"])
            # the other forms round-trip too
            assert enc.from_json(arch.to_json()) == arch
            assert enc.from_bits(arch.to_bits()) == arch
            assert enc.from_vectors(arch.to_vectors()) == arch
            count += 1
    assert count == 98 + 392 + 466


def test_golden_round_trip_base_networks(golden_estimator):
    names = []
    for base in golden_estimator["base_networks"]:
        if not base["cells_per_block"][0]:
            with pytest.raises(EncodingError, match="block 1: a block needs at least one cell"):
                enc.from_memnas_feature(base["feature"])
            continue
        arch = enc.from_memnas_feature(base["feature"], "link")
        # the authors' hand-edited net6 writes a dropped edge as [1,1] rather than [0,1]
        unlinked = (1, 1) if base["name"] == "net6" else (0, 1)
        assert arch.to_memnas_feature("link", unlinked) == base["feature"], base["name"]
        names.append(base["name"])
    assert len(names) == 10


def test_golden_decoding_matches_index_form(golden_candidates):
    entry = golden_candidates["rounds"]["round2"][461]  # net462: remove_fin in block 1
    arch = enc.from_memnas_feature(entry["feature"], "link")
    for block, index_block in zip(arch, entry["cells_index_form"]):
        for j, (cell, (in1, in2, out, op1, op2, link)) in enumerate(zip(block, index_block)):
            assert (cell.input1, cell.input2) == (14 - in1, 14 - in2)
            assert out == 13 - j
            assert (cell.op1, cell.op2) == (op1, op2)
            assert cell.linked == (link == [1, 0]) and not cell.concat
    assert [c.linked for c in arch[0]] == [False, True]
    assert all(c.linked for block in arch[1:] for c in block)


def test_combine_convention_round0(golden_candidates):
    # round0 net2: link [0,1] meant concat in the authors' rounds 0-1
    arch = enc.from_memnas_feature(golden_candidates["rounds"]["round0"][1]["feature"], "combine")
    assert arch[0][0] == Cell(0, 0, 0, 0, linked=True, concat=True)
    with pytest.raises(EncodingError, match="'link' convention has add-only cells"):
        arch.to_memnas_feature("link")


def test_vectors_match_paper_figure():
    # Fig. 1(b): C2 = r6 (c) r5 with C = 110 (linked, concat); C1 = 001 (not linked, add)
    c1 = Cell(0, 0, 5, 3, linked=False)
    c2 = Cell(1, 0, 0, 4, linked=True, concat=True)
    i1, i2, o1, o2, c = enc.cell_to_vectors(c2, max_cells=3)
    assert i1.tolist() == [0, 1, 0, 0] and i2.tolist() == [1, 0, 0, 0]
    assert o1.tolist() == [1, 0, 0, 0, 0, 0, 0] and o2.tolist() == [0, 0, 0, 0, 1, 0, 0]
    assert c.tolist() == [1, 1, 0]
    assert enc.cell_to_vectors(c1, max_cells=3)[4].tolist() == [0, 0, 1]
    bits = enc.make_architecture([[c1, c2]]).to_bits(max_cells=3)
    assert bits[0].shape == (2, 2 * 4 + 17)


def test_tokens():
    arch = enc.make_architecture([[(0, 0, 3, 5)], [(0, 0, 1, None), (1, 0, 6, 2, True, True)]])
    tokens = arch.to_tokens()
    assert tokens.dtype == np.int32 and tokens.shape == (3, enc.TOKEN_WIDTH)
    np.testing.assert_array_equal(tokens, [[0, 0, 0, 0, 3, 5, 1, 0],
                                           [1, 0, 0, 0, 1, 7, 1, 0],
                                           [1, 1, 1, 0, 6, 2, 1, 1]])


def test_hash_is_stable_and_discriminates():
    arch = enc.uniform_architecture(NET53)
    # a fixed value: the hash must never change across processes, machines or versions
    assert arch.canonical_hash() == (
        "3a5dadff13ac9d0845c6f066519bbf72979d08779ab034d441081b51694e9d68")
    other = enc.uniform_architecture([(0, 0, "sep_conv_3x3", "fac_conv_7")])
    assert arch.canonical_hash() != other.canonical_hash()
    code = ("from memnas_jax import encoding as e; "
            "print(e.uniform_architecture([(0, 0, 'fac_conv_7', 'sep_conv_3x3')])"
            ".canonical_hash())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == arch.canonical_hash()


def test_str_is_readable():
    arch = enc.make_architecture([[(0, 0, 3, 5, False), (1, 0, "max_pool_3x3", None)]])
    assert str(arch) == ("block 1:\n"
                         "  c1 = fac_conv_7(in) + sep_conv_3x3(in) (not linked)\n"
                         "  c2 = max_pool_3x3(c1) + none(in)\n"
                         "  out = c2")


@pytest.mark.parametrize("blocks, message", [
    ([[(1, 0, 0, 0)]], r"block 1, cell 1, field I1: input node 1 is not an earlier node"),
    ([[(0, 0, 0, 0)], [(0, 0, 0, 0), (0, 3, 0, 0)]],
     r"block 2, cell 2, field I2: input node 3 is not an earlier node"),
    ([[(0, 0, 9, 0)]], r"block 1, cell 1, field O1/O2: op index 9 is not in 0..6"),
    ([[(0, 0, 0, 0, False)]], r"block 1: no cell is linked to the block output"),
    ([[(0, 0, 0, 0)], []], r"block 2: a block needs at least one cell"),
    ([[(0, 0, 0, 0)] * 15], r"block 1: 15 cells exceed the cap of 14"),
    ([[(0, 0, "conv_9x9", 0)]], r"block 1, cell 1, field O1/O2: unknown op 'conv_9x9'"),
])
def test_validation_names_block_cell_field(blocks, message):
    with pytest.raises(EncodingError, match=message):
        enc.make_architecture(blocks)


def test_vector_validation_messages():
    good = [list(v) for v in enc.cell_to_vectors(Cell(0, 0, 1, 2), max_cells=2)]
    cases = {
        "I1": ([1, 1, 0], r"block 2, cell 1, field I1: not one-hot"),
        "I2": ([1, 0], r"block 2, cell 1, field I2: width 2, expected 3"),
        "O1": ([0, 2, 0, 0, 0, 0, 0], r"block 2, cell 1, field O1: bits must be 0 or 1"),
        "O2": ([1, 1, 0, 0, 0, 0, 0], r"block 2, cell 1, field O2: not one-hot"),
        "C": ([1, 0, 1], r"block 2, cell 1, field C: link bits 0 and 2 must be one-hot"),
    }
    names = ["I1", "I2", "O1", "O2", "C"]
    for field, (value, message) in cases.items():
        cell = list(good)
        cell[names.index(field)] = value
        with pytest.raises(EncodingError, match=message):
            enc.from_vectors([[good], [cell]], max_cells=2)
    # neither link bit
    cell = list(good)
    cell[4] = [0, 1, 0]
    with pytest.raises(EncodingError, match="field C: link bits"):
        enc.from_vectors([[cell]], max_cells=2)
    assert issubclass(EncodingError, ValueError)


def test_memnas_feature_validation():
    feature = enc.uniform_architecture(NET53).to_memnas_feature()
    feature[2][0][2] = [0] * 14 + [1]  # output location of cell 1 must be 13
    with pytest.raises(EncodingError, match="block 3, cell 1, field out: output location 14"):
        enc.from_memnas_feature(feature)
    with pytest.raises(EncodingError, match="unknown convention"):
        enc.from_memnas_feature(feature, "paper")


def test_json_errors():
    with pytest.raises(EncodingError, match="not valid JSON"):
        enc.from_json("{")
    with pytest.raises(EncodingError, match='"blocks"'):
        enc.from_json("[]")
    text = json.loads(enc.uniform_architecture(NET53).to_json())
    text["blocks"][4][0]["ops"] = ["conv_3x3", "bogus"]
    with pytest.raises(EncodingError, match="block 5, cell 1, field O2: unknown op 'bogus'"):
        enc.from_json(json.dumps(text))


# ---- fuzzing: decoders either return a valid architecture or raise EncodingError

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.floats(allow_nan=True),
                       st.text(max_size=12), st.sampled_from(enc.OP_NAMES + ("none",)))
_json = st.recursive(_json_leaf, lambda children: st.one_of(
    st.lists(children, max_size=5),
    st.dictionaries(st.sampled_from(["blocks", "inputs", "ops", "linked", "concat", "format", "x"]),
                    children, max_size=5)), max_leaves=40)

_cell_dict = st.fixed_dictionaries({
    "inputs": st.lists(st.integers(-1, 4), min_size=0, max_size=3),
    "ops": st.lists(st.one_of(st.sampled_from(enc.OP_NAMES + ("none",)), st.integers(-1, 8),
                              st.none()), min_size=1, max_size=3),
    "linked": st.one_of(st.booleans(), st.integers(0, 1)),
    "concat": st.booleans(),
})
_structured_json = st.builds(lambda blocks: {"blocks": blocks},
                             st.lists(st.lists(_cell_dict, max_size=4), max_size=6))


def _decodes_or_encoding_error(fn, *args):
    try:
        arch = fn(*args)
    except EncodingError:
        return None
    assert isinstance(arch, Architecture)
    assert enc.validate(arch) == arch  # whatever decodes is valid
    return arch


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_json, _structured_json))
def test_fuzz_from_json(data):
    arch = _decodes_or_encoding_error(enc.from_json, json.dumps(data))
    if arch is not None:
        assert enc.from_json(arch.to_json()) == arch


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_from_json_bytes(data):
    _decodes_or_encoding_error(enc.from_json, data)


_bits = st.lists(st.integers(0, 1), min_size=0, max_size=9)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.lists(_bits, min_size=4, max_size=6), max_size=4), max_size=6))
def test_fuzz_from_vectors(blocks):
    _decodes_or_encoding_error(enc.from_vectors, blocks, 3)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(1, 4))
def test_fuzz_from_bits_random_arrays(seed, num_blocks, cells):
    rng = np.random.default_rng(seed)
    width = 2 * 4 + 17
    # sparse random bits: some fraction decode to valid architectures
    blocks = [(rng.random((cells, width)) < 0.12).astype(np.uint8) for _ in range(num_blocks)]
    arch = _decodes_or_encoding_error(enc.from_bits, blocks, 3)
    if arch is not None:
        assert all(np.array_equal(a, b) for a, b in zip(arch.to_bits(3), blocks))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.lists(st.lists(st.integers(0, 1), max_size=16), min_size=5,
                                  max_size=7), max_size=3), max_size=6),
       st.sampled_from(enc.MEMNAS_CONVENTIONS))
def test_fuzz_from_memnas_feature(feature, convention):
    _decodes_or_encoding_error(enc.from_memnas_feature, feature, convention)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_fuzz_valid_architectures_round_trip(seed):
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(rng.integers(1, 6)):
        cells = []
        for j in range(rng.integers(1, 6)):
            ops = [None if rng.random() < 0.15 else int(rng.integers(7)) for _ in range(2)]
            cells.append(Cell(int(rng.integers(j + 1)), int(rng.integers(j + 1)), *ops,
                              linked=bool(rng.random() < 0.7), concat=bool(rng.random() < 0.3)))
        cells[-1] = cells[-1]._replace(linked=True)
        blocks.append(cells)
    arch = enc.validate(blocks)
    assert enc.from_json(arch.to_json()) == arch
    assert enc.from_bits(arch.to_bits(6), 6) == arch
    assert enc.from_json(arch.to_json()).canonical_hash() == arch.canonical_hash()
    if not any(c.concat for b in arch for c in b):
        assert enc.from_memnas_feature(arch.to_memnas_feature()) == arch
