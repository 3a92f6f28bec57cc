"""The network: channel bookkeeping, exact parameter counts (closed form, Flax, the authors'
PyTorch networks) and forward passes (memnas_jax.network)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import numpy_variables  # tests/ is on sys.path (rootdir conftest)

from memnas_jax.encoding import (
    Cell,
    EncodingError,
    from_memnas_feature,
    make_architecture,
    validate,
)
from memnas_jax.network import (
    MemNASNetwork,
    abstract_variables,
    block_input_channels,
    block_output_channels,
    count_params,
    init_network,
    network_plan,
    param_count,
)
from memnas_jax.space import Skeleton, cifar_skeleton


def random_architecture(rng: np.random.Generator, num_blocks: int = 5, max_cells: int = 3):
    """A random valid architecture: any earlier input node, ~20% removed ops, ~30% concat
    cells, ~30% unlinked cells (at least one linked per block), 1..max_cells cells per block."""
    blocks = []
    for _ in range(num_blocks):
        cells = []
        for j in range(int(rng.integers(1, max_cells + 1))):
            ops = [None if rng.random() < 0.2 else int(rng.integers(7)) for _ in range(2)]
            cells.append(Cell(int(rng.integers(j + 1)), int(rng.integers(j + 1)), *ops,
                              linked=bool(rng.random() < 0.7), concat=bool(rng.random() < 0.3)))
        if not any(c.linked for c in cells):
            k = int(rng.integers(len(cells)))
            cells[k] = cells[k]._replace(linked=True)
        blocks.append(cells)
    return validate(blocks)


SKELETONS = {
    "cifar_uniform": cifar_skeleton(4),
    "cifar_doubling_conv1x1": cifar_skeleton(4, "doubling", removed_op="conv1x1"),
    "cifar_no_bias": cifar_skeleton(3, conv_bias=False),
    # A stem and a global-average head (the ImageNet layout) on small images.
    "stem_gap": Skeleton(widths=(4, 8, 8, 16, 16), strides=(2, 2, 1, 2, 1), image_size=32,
                         head="global_avg_dense", stem_width=6, stem_stride=2, num_classes=7),
}
# Two blocks on 8x8 images: for behaviour that does not need the whole CIFAR network.
TINY = Skeleton(widths=(4, 4), strides=(1, 2), image_size=8)


def _images(batch=2, seed=0, skeleton=SKELETONS["cifar_uniform"]):
    shape = (batch, skeleton.image_size, skeleton.image_size, skeleton.in_channels)
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _random_archs(seed, count):
    rng = np.random.default_rng(seed)
    return [random_architecture(rng) for _ in range(count)]


# Three per skeleton in the count test.
COUNT_ARCHS = _random_archs(0, 3 * len(SKELETONS))


def test_random_architectures_cover_the_space():
    # The count test's architectures must reach the cases that matter, or it proves little.
    archs = COUNT_ARCHS
    cells = [(b, j, c) for a in archs for b, block in enumerate(a) for j, c in enumerate(block)]
    assert any(c.concat for _, _, c in cells)
    assert any(not c.linked for _, _, c in cells)
    assert any(max(c.input1, c.input2) >= 2 for _, _, c in cells)  # reads a non-adjacent node
    assert any(b in (1, 3) and ((c.op1 is None and c.input1 == 0) or
                                (c.op2 is None and c.input2 == 0)) for b, _, c in cells)
    assert any(len(set(a.cells_per_block)) > 1 for a in archs)


@pytest.mark.parametrize("skeleton_name", sorted(SKELETONS))
def test_flax_param_count_equals_closed_form(skeleton_name):
    skeleton = SKELETONS[skeleton_name]
    i = sorted(SKELETONS).index(skeleton_name)
    for arch in COUNT_ARCHS[3 * i:3 * i + 3]:
        _, variables = abstract_variables(arch, skeleton)
        assert count_params(variables["params"]) == param_count(arch, skeleton), str(arch)


def test_channel_bookkeeping():
    # Block 1: c1 = conv(in) cat avg(in) (2w), c2 = removed(c1) + sep3(in), unlinked;
    # c3 = max(c2) + conv(c1). Linked: c1 (2w) and c3 (w) -> 3w.
    cells = [(0, 0, "conv_3x3", "avg_pool_3x3", True, True),
             (1, 0, None, "sep_conv_3x3", False),
             (2, 1, "max_pool_3x3", "conv_3x3")]
    arch = make_architecture([cells] + [[(0, 0, None, None)]] * 4)
    skeleton = cifar_skeleton(4, "doubling")
    assert block_input_channels(arch, skeleton) == (3, 12, 4, 8, 8)
    assert block_output_channels(arch, skeleton) == (12, 4, 8, 8, 16)
    plan = network_plan(arch, skeleton)
    assert plan[0].node_channels == (3, 8, 4, 4)
    assert [(br.input_node, br.in_channels, br.stride) for br in plan[0].branches] == [
        (0, 3, 1), (0, 3, 1), (1, 8, 1), (0, 3, 1), (2, 4, 1), (1, 8, 1)]
    # Block 2 (stride 2): both removed ops read the 12-channel block input at 32x32 -> 16x16.
    assert [(br.in_channels, br.stride, br.in_size, br.out_size) for br in plan[1].branches] == [
        (12, 2, 32, 16)] * 2
    # Identity-style removed ops: a strided 1x1 conv where the shape changes, else nothing.
    # Blocks 2-5 hold one removed+removed cell: 12->4 (s2), 4->8 (s1), 8->8 (s2), 8->16 (s1).
    removed = 2 * ((12 * 4 + 4) + (4 * 8 + 8) + (8 * 8 + 8) + (8 * 16 + 16))
    block1 = ((9 * 3 * 4 + 4 + 8) + (3 * 4 + 4 + 8)  # c1: conv_3x3(3), avg_pool(3)
              + (8 * 4 + 4) + (9 * 3 + 3 + 6 + 3 * 4 + 4 + 8)  # c2: removed(8->4), sep3(3)
              + (4 * 4 + 4 + 8) + (9 * 8 * 4 + 4 + 8))  # c3: max_pool(4), conv_3x3(8)
    head = 4 * 4 * 16 * 10 + 10
    assert param_count(arch, skeleton) == block1 + removed + head
    # Uniform widths: the removed ops of blocks 3 and 5 read a same-shaped input (identity, no
    # parameters); blocks 2 (12 -> 4) and 4 (4 -> 4, stride 2) still need the 1x1 conv.
    assert param_count(arch, cifar_skeleton(4)) == (
        block1 + 2 * (12 * 4 + 4) + 0 + 2 * (4 * 4 + 4) + 0 + (4 * 4 * 4 * 10 + 10))


def test_removed_op_reading_block_input_in_stride_2_block_runs(golden_candidates,
                                                                golden_convention):
    # The authors' round-2 nets 446, 447, 449 (block 2) and 454, 455, 457 (block 4) remove an op
    # that reads the block input of a stride-2 block; their 1x1 replacement had no stride and
    # the forward failed. Ours has the stride.
    net446 = golden_candidates["rounds"]["round2"][445]
    assert (net446["name"], net446["forward_ok_w32"]) == ("net446", False)
    arch = from_memnas_feature(net446["feature"], golden_convention["round2"])
    assert arch[1][0].op1 is None and arch[1][0].input1 == 0  # block 2, cell 1, op 1
    runs = [(arch, cifar_skeleton(2, removed_op="conv1x1"))]
    # The identity style on a small two-block skeleton: the shapes match in channels but not
    # in space, so the removed op must become a strided 1x1 conv.
    runs.append((make_architecture([[(0, 0, "conv_3x3", None)], [(0, 0, None, "max_pool_3x3")]]),
                 TINY))
    for arch, skeleton in runs:
        variables = _checked_forward(arch, skeleton)
    assert variables["params"]["block2"]["cell1_op1"]["conv"]["kernel"].shape == (1, 1, 4, 4)


# ---------------------------------------------------------------------------------------------
# The authors' generated PyTorch networks (reference/golden/memnas_candidates.json)

# The authors' width schedules: w, w, 2w, 2w, 4w in rounds 0-1, w everywhere from round 2.
GOLDEN_SCHEDULE = {"round0": "doubling", "round1": "doubling", "round2": "uniform"}
# Excluded from the count comparison, with the reason:
#   round1/net179: the authors' file builds block 3's cell 1 with w instead of 2w channels
#   (golden README quirk 4; the only mixed-width file, and its forward fails). Our network
#   gives the fixed file's count, which the README reports from a scratch experiment:
#   918,734 (w=32) and 3,565,934 (w=64) parameters with the unused stem (896 / 1,792).
# Not excluded: round2/net466 has a correct Linear(1 * w * 16) head (only its forward's view()
# is wrong), and nets 446-457 (stride-less removed op) fail only in forward, not in counts.
GOLDEN_EXCLUDED = {("round1", "net179")}
NET179_FIXED_NO_STEM = {32: 918_734 - 896, 64: 3_565_934 - 1_792}


def _golden_arch(entry, round_name, convention):
    return from_memnas_feature(entry["feature"], convention[round_name])


def test_closed_form_equals_authors_counts_for_every_net(golden_candidates, golden_convention):
    compared = 0
    for round_name, entries in golden_candidates["rounds"].items():
        for entry in entries:
            arch = _golden_arch(entry, round_name, golden_convention)
            for width in (32, 64):
                skeleton = cifar_skeleton(width, GOLDEN_SCHEDULE[round_name],
                                          removed_op="conv1x1")
                ours = param_count(arch, skeleton)
                if (round_name, entry["name"]) in GOLDEN_EXCLUDED:
                    assert ours == NET179_FIXED_NO_STEM[width]
                    assert ours != entry[f"params_w{width}_no_stem"]
                    continue
                assert ours == entry[f"params_w{width}_no_stem"], (round_name, entry["name"])
                compared += 1
    assert compared == 2 * (98 + 392 + 466 - 1)


def _flax_breakdown(params):
    """Split the Flax parameters like the golden breakdown fields."""
    out = {"bn": 0, "conv_weight": 0, "conv_bias": 0, "linear": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [p.key for p in path]
        size = int(np.prod(leaf.shape))
        if keys[0] == "head":
            out["linear"] += size
        elif keys[-2].endswith("bn"):
            out["bn"] += size
        else:
            out["conv_weight" if keys[-1] == "kernel" else "conv_bias"] += size
    return out


def test_flax_counts_equal_authors_breakdown_for_a_sample(golden_candidates, golden_convention):
    rng = np.random.default_rng(0)
    rounds = golden_candidates["rounds"]
    # Always the remove / remove_fin nets of round 2 (stride-2 removals, unlinked cells, net466).
    sample = [("round2", i) for i in (445, 446, 453, 461, 462, 463, 464, 465)]
    for round_name, count in (("round0", 4), ("round1", 3), ("round2", 3)):
        sample += [(round_name, int(i)) for i in
                   rng.choice(len(rounds[round_name]), count, replace=False)]
    for round_name, i in sample:
        entry = rounds[round_name][i]
        if (round_name, entry["name"]) in GOLDEN_EXCLUDED:
            continue
        arch = _golden_arch(entry, round_name, golden_convention)
        skeleton = cifar_skeleton(32, GOLDEN_SCHEDULE[round_name], removed_op="conv1x1")
        _, variables = abstract_variables(arch, skeleton)
        assert count_params(variables["params"]) == entry["params_w32_no_stem"]
        assert _flax_breakdown(variables["params"]) == {
            "bn": entry["bn_params_w32"],
            "conv_weight": entry["conv_weight_params_w32_no_stem"],
            "conv_bias": entry["conv_bias_params_w32_no_stem"],
            "linear": entry["linear_params_w32"],
        }, (round_name, entry["name"])


# ---------------------------------------------------------------------------------------------
# Forward passes


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_random_architectures(seed):
    skeleton = SKELETONS["cifar_doubling_conv1x1" if seed else "cifar_uniform"]
    _checked_forward(_random_archs(100 + seed, 1)[0], skeleton)


def _checked_forward(arch, skeleton: Skeleton) -> dict:
    """Runs `arch` on two images; checks the logits' shape and finiteness; its variables."""
    module = MemNASNetwork(arch, skeleton)
    x = _images(skeleton=skeleton)
    variables = numpy_variables(module, x, train=False)
    logits = jax.jit(functools.partial(module.apply, train=False))(variables, x)
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite(logits)
    return variables


def test_batchnorm_train_updates_stats_and_eval_uses_them():
    arch = make_architecture([[(0, 0, "conv_3x3", "max_pool_3x3", True, True)],
                              [(0, 0, "sep_conv_3x3", "avg_pool_3x3")]])
    # The real Flax init here (an "rbg" key compiles its RNG faster on CPU than threefry).
    module, variables = init_network(jax.random.key(0, impl="rbg"), arch, TINY)
    assert count_params(variables["params"]) == param_count(arch, TINY)
    x = _images(skeleton=TINY)

    @jax.jit
    def train_then_eval(variables):
        train_logits, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
        updated = {**variables, **updates}
        return (train_logits, updates["batch_stats"], module.apply(updated, x),
                module.apply(updated, x), module.apply(variables, x))

    train_logits, stats, eval_logits, eval_again, eval_fresh = train_then_eval(variables)
    assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(
        variables["batch_stats"])
    # Momentum 0.9: the running means moved away from their initial zeros.
    means = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]
             if path[-1].key == "mean"]
    assert max(float(jnp.max(jnp.abs(m))) for m in means) > 1e-3
    np.testing.assert_array_equal(eval_logits, eval_again)  # eval is deterministic
    assert not np.allclose(train_logits, eval_logits, atol=1e-3)  # batch vs running stats
    assert not np.allclose(eval_logits, eval_fresh, atol=1e-3)  # eval reads the running stats


def test_shifted_depthwise_network_equals_xla():
    skeleton = SKELETONS["stem_gap"]
    arch = make_architecture([[(0, 0, "sep_conv_5x5", "sep_conv_3x3")]] * 5)
    x = _images(skeleton=skeleton)
    modules = {impl: MemNASNetwork(arch, skeleton, depthwise_impl=impl)
               for impl in ("xla", "shifted")}
    variables = numpy_variables(modules["xla"], x, train=False)
    logits = jax.jit(lambda v: {k: m.apply(v, x) for k, m in modules.items()})(variables)
    chex.assert_shape(logits["xla"], (2, 7))
    np.testing.assert_allclose(logits["shifted"], logits["xla"], rtol=1e-4, atol=1e-4)


def test_bfloat16_network_has_float32_params_and_logits():
    # Op-level bfloat16 numerics are in test_ops; here the stem, blocks and head only need to
    # agree on dtypes, which tracing shows without compiling.
    skeleton = SKELETONS["stem_gap"]
    arch = _random_archs(5, 1)[0]
    module, variables = abstract_variables(arch, skeleton, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {
        jnp.dtype(jnp.float32)}
    for train in (False, True):
        logits = jax.eval_shape(functools.partial(module.apply, train=train,
                                                  mutable=["batch_stats"] if train else False),
                                variables, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
        logits = logits[0] if train else logits
        assert (logits.shape, logits.dtype) == ((2, 7), jnp.float32)


def test_bad_inputs_are_clear_errors():
    skeleton = cifar_skeleton(4)
    arch = _random_archs(3, 1)[0]
    with pytest.raises(ValueError, match="6 blocks but the skeleton has 5"):
        param_count(list(arch) + [arch[0]], skeleton)
    with pytest.raises(ValueError, match="4 blocks but the skeleton has 5"):
        MemNASNetwork(arch[:4], skeleton).init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    many = make_architecture([[(0, 0, 6, 6)] * 3] * 5)
    with pytest.raises(EncodingError, match="3 cells exceed the cap of 2"):
        abstract_variables(many, skeleton.replace(max_cells=2))
    with pytest.raises(ValueError, match=r"expects NHWC images of shape \(batch, 32, 32, 3\)"):
        MemNASNetwork(arch, skeleton).init(jax.random.key(0), jnp.ones((1, 3, 32, 32)))
