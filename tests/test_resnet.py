"""Tests of memnas_jax.resnet: the CIFAR ResNet baselines of the MemNAS tables."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memnas_jax.memory import analyze
from memnas_jax.network import count_params
from memnas_jax.resnet import CIFARResNet

IMAGE = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)


def abstract_variables(model: CIFARResNet, x=IMAGE) -> dict:
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def host_variables(model: CIFARResNet, seed: int = 0) -> dict:
    """He-normal kernels, unit BatchNorm, drawn with numpy: XLA:CPU spends 10-30 s compiling a
    jitted init's random number generation, the forward pass takes a few seconds."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
        return np.ones(leaf.shape) if "scale" in name or "var" in name else np.zeros(leaf.shape)

    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(draw(path, leaf), leaf.dtype), abstract_variables(model))


@pytest.mark.parametrize("depth, shortcut, expected", [
    # Option A (identity + zero padding, He et al.'s CIFAR choice): ResNet-56 = 0.85 M params,
    # the 3.4 MB of the MemNAS table.
    (20, "A", 269_722), (56, "A", 853_018), (110, "A", 1_727_962),
    # Option B adds two 1x1 projections + BN: 16*32 + 32*64 + 2*(32 + 64) = 2,752 more.
    (20, "B", 272_474), (56, "B", 855_770), (110, "B", 1_730_714),
])
def test_parameter_counts(depth, shortcut, expected):
    variables = abstract_variables(CIFARResNet(depth=depth, shortcut=shortcut))
    assert count_params(variables["params"]) == expected


def test_forward_train_and_eval():
    model = CIFARResNet(depth=8)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = host_variables(model)
    logits = jax.jit(model.apply)(variables, x)
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite(logits)
    # train mode uses batch statistics and updates the running ones
    train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    train_logits, updates = train(variables, x)
    chex.assert_shape(train_logits, (2, 10))
    assert not jnp.allclose(train_logits, logits)
    old = variables["batch_stats"]["stem_bn"]["mean"]
    assert not jnp.allclose(updates["batch_stats"]["stem_bn"]["mean"], old)
    # option A's shortcut has no parameters: stage 2's first block has two convs and two BNs
    assert set(variables["params"]["stage2_block1"]) == {"conv1", "bn1", "conv2", "bn2"}
    b_params = abstract_variables(CIFARResNet(depth=8, shortcut="B"))["params"]
    assert set(b_params["stage2_block1"]) == {"conv1", "bn1", "conv2", "bn2", "proj", "proj_bn"}


def test_zero_padded_shortcut_keeps_the_subsampled_input():
    # With both convs' BN scale and bias at zero, a block outputs relu(shortcut): option A
    # subsamples the input with stride 2 and puts it between zero channels (8 + 16 + 8).
    model = CIFARResNet(depth=8)
    x = jax.random.uniform(jax.random.key(2), (1, 32, 32, 3))
    variables = host_variables(model)
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.zeros_like(p) if "block" in jax.tree_util.keystr(path) and
        "bn" in jax.tree_util.keystr(path) else p, variables["params"])
    capture = jax.jit(functools.partial(model.apply, capture_intermediates=True,
                                        mutable=["intermediates"]))
    _, state = capture({**variables, "params": params}, x)
    inter = state["intermediates"]
    stage1 = inter["stage1_block1"]["__call__"][0]
    stage2 = inter["stage2_block1"]["__call__"][0]
    chex.assert_shape(stage2, (1, 16, 16, 32))
    assert float(jnp.abs(stage1).max()) > 0
    chex.assert_trees_all_close(stage2[..., 8:24], stage1[:, ::2, ::2, :])
    chex.assert_trees_all_close(stage2[..., :8], jnp.zeros((1, 16, 16, 8)))
    chex.assert_trees_all_close(stage2[..., 24:], jnp.zeros((1, 16, 16, 8)))


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        abstract_variables(CIFARResNet(depth=22))
    with pytest.raises(ValueError, match="shortcut"):
        abstract_variables(CIFARResNet(depth=20, shortcut="C"))
    with pytest.raises(ValueError, match="NHWC"):
        abstract_variables(CIFARResNet(depth=20), jax.ShapeDtypeStruct((32, 32, 3), jnp.float32))


def test_analyze_resnet56_batch1_eval():
    model = CIFARResNet(depth=56)
    variables = abstract_variables(model)
    report = analyze(lambda v, x: model.apply(v, x, train=False), variables, IMAGE)
    # non-activation inputs: the 853,018 parameters + 2 x 2,032 BatchNorm running statistics
    assert report.param_count == 853_018 + 2 * (16 + 18 * 16 + 18 * 32 + 18 * 64)
    assert report.param_bytes == 4 * report.param_count
    # Eval-mode BatchNorm and ReLU are chains of elementwise ops, so the peak is in stage 1:
    # the block input held for the shortcut plus the op being computed (paper), plus that op's
    # input (strict); each a 32 x 32 x 16 float32 map of 64 KiB.
    fmap = 32 * 32 * 16 * 4
    assert report.working_bytes == report.working_bytes_paper == 2 * fmap
    assert report.working_bytes_strict == 3 * fmap
    assert report.total_bytes == report.param_bytes + 2 * fmap
    # one equation per step in a residual chain: ~5 per conv (conv + 3 BN ops + ReLU)
    assert 250 < report.num_steps < 400
