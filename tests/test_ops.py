"""The seven ops, the removed op and the two depthwise implementations (memnas_jax.ops)."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import numpy_variables  # tests/ is on sys.path (rootdir conftest)

from memnas_jax.encoding import NUM_OPS
from memnas_jax.network import count_params
from memnas_jax.ops import (
    DepthwiseConv,
    OpSettings,
    PoolOp,
    depthwise_conv_shifted,
    make_op,
    op_param_count,
    same_padding,
)

ALL_OPS = list(range(NUM_OPS)) + [None]


# (in_channels, width, stride): shape-preserving, channel change, stride 2, both.
SHAPES = [(8, 8, 1), (3, 8, 1), (8, 8, 2), (12, 5, 2)]
OP_STYLES = [(op, "identity") for op in ALL_OPS] + [(None, "conv1x1")]


def _normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("op,removed_op", OP_STYLES)
def test_flax_param_count_equals_closed_form(op, removed_op, conv_bias):
    settings = OpSettings(conv_bias=conv_bias, removed_op=removed_op)
    for in_channels, width, stride in SHAPES:
        module = make_op(op, width, stride, settings)
        x = jax.ShapeDtypeStruct((1, 9, 9, in_channels), jnp.float32)
        variables = jax.eval_shape(functools.partial(module.init, train=False),
                                   jax.random.key(0), x)
        expected = op_param_count(op, in_channels, width, stride, conv_bias=conv_bias,
                                  removed_op=removed_op)
        assert count_params(variables.get("params", {})) == expected, (in_channels, width, stride)
        # An odd 9x9 input: PyTorch padding gives ceil(9 / s) at stride s.
        out = jax.eval_shape(functools.partial(module.apply, train=False), variables, x)
        out_side = math.ceil(9 / stride)
        assert out.shape == (1, out_side, out_side, width)


def test_closed_forms_by_hand():
    # in = 3 channels, width 8, conv bias: conv k*k*3*8 + 8, BN 2*8 = 16.
    expected = {
        0: 3 * 8 + 8 + 16,  # avg pool: 1x1 conv + BN
        1: 3 * 8 + 8 + 16,  # max pool
        2: 9 * 3 * 8 + 8 + 16,  # dilated 3x3
        3: (3 * 8 + 8 + 16) + 2 * (7 * 8 * 8 + 8 + 16),  # 1x1, then 1x7 and 7x1 at width 8
        4: (25 * 3 + 3 + 6) + (3 * 8 + 8 + 16),  # depthwise 5x5 + BN(3), pointwise + BN(8)
        5: (9 * 3 + 3 + 6) + (3 * 8 + 8 + 16),
        6: 9 * 3 * 8 + 8 + 16,
    }
    assert {op: op_param_count(op, 3, 8) for op in range(NUM_OPS)} == expected
    assert [op_param_count(op, 3, 8, conv_bias=False) for op in (0, 3, 5)] == [
        3 * 8 + 16, (3 * 8 + 16) + 2 * (7 * 64 + 16), (9 * 3 + 6) + (3 * 8 + 16)]
    # The removed op: identity only when the input already has the branch's shape.
    assert op_param_count(None, 8, 8, 1) == 0
    assert op_param_count(None, 8, 8, 2) == 8 * 8 + 8
    assert op_param_count(None, 3, 8, 1, conv_bias=False) == 24
    assert op_param_count(None, 8, 8, 1, removed_op="conv1x1") == 72
    assert op_param_count(None, 8, 8, 2, removed_op="conv1x1") == 72


def test_removed_op_identity_and_conv():
    x = _normal((2, 6, 6, 4))
    identity = make_op(None, 4, 1, OpSettings())
    assert numpy_variables(identity, x, train=False) == {}
    np.testing.assert_array_equal(identity.apply({}, x, train=False), x)
    # A 1x1 conv with the right stride: always in the conv1x1 style, and in the identity style
    # when the shape changes (the authors dropped the stride, which broke stride-2 blocks).
    for removed_op, stride in (("conv1x1", 1), ("conv1x1", 2), ("identity", 2)):
        op = make_op(None, 4, stride, OpSettings(removed_op=removed_op))
        variables = numpy_variables(op, x, train=False)
        y = op.apply(variables, x, train=False)
        conv = variables["params"]["conv"]
        np.testing.assert_allclose(
            y, x[:, ::stride, ::stride] @ conv["kernel"][0, 0] + conv["bias"], rtol=1e-5,
            atol=1e-5)


def _pool_with_identity_conv(kind, x, stride=1):
    """PoolOp whose 1x1 conv is the identity and BN (eval, fresh statistics, epsilon 0) too."""
    c = x.shape[-1]
    op = PoolOp(c, stride, OpSettings(bn_epsilon=0.0), kind=kind)
    variables = numpy_variables(op, x, train=False)
    variables["params"]["conv_bn"] = {"conv": {"kernel": jnp.eye(c)[None, None],
                                               "bias": jnp.zeros(c)},
                                      "bn": {"scale": jnp.ones(c), "bias": jnp.zeros(c)}}
    return op.apply(variables, x, train=False)


def test_avg_pool_counts_padding_like_pytorch():
    # PyTorch AvgPool2d(3, s, 1) divides by 9 even at the border (count_include_pad=True).
    y = _pool_with_identity_conv("avg", jnp.ones((1, 4, 4, 2)))
    np.testing.assert_allclose(y[0, :, :, 0], [[4 / 9, 6 / 9, 6 / 9, 4 / 9],
                                               [6 / 9, 1, 1, 6 / 9],
                                               [6 / 9, 1, 1, 6 / 9],
                                               [4 / 9, 6 / 9, 6 / 9, 4 / 9]], rtol=1e-6)
    y = _pool_with_identity_conv("avg", jnp.ones((1, 5, 5, 2)), stride=2)
    np.testing.assert_allclose(y[0, :, :, 0], [[4 / 9, 6 / 9, 4 / 9], [6 / 9, 1, 6 / 9],
                                               [4 / 9, 6 / 9, 4 / 9]], rtol=1e-6)


@pytest.mark.parametrize("stride,size", [(1, 8), (2, 8), (2, 7)])
def test_avg_pool_written_for_tflite_micro_gives_the_same_numbers(stride, size):
    """The pool op pads then averages VALID (TFLite Micro runs PAD + AVERAGE_POOL_2D); that
    is bit for bit flax's padded average with count_include_pad, forward and backward."""
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    written = lambda x: nn.avg_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3),
                                    (stride, stride), "VALID")
    reference = lambda x: nn.avg_pool(x, (3, 3), (stride, stride), ((1, 1), (1, 1)),
                                      count_include_pad=True)
    np.testing.assert_array_equal(jax.jit(written)(x), jax.jit(reference)(x))
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(written(x) ** 2))(x),
                               jax.grad(lambda x: jnp.sum(reference(x) ** 2))(x), rtol=1e-6)
    y = _pool_with_identity_conv("avg", x, stride=stride)
    np.testing.assert_allclose(y, reference(x), rtol=1e-5, atol=1e-6)


def test_max_pool_ignores_padding():
    # Padding is -inf: all-negative inputs keep their own maxima at the border.
    x = -1.0 - jnp.arange(16.0).reshape(1, 4, 4, 1)
    y = _pool_with_identity_conv("max", x, stride=2)
    np.testing.assert_allclose(y[0, :, :, 0], [[-1, -2], [-5, -6]], rtol=1e-6)


def test_same_padding_is_pytorchs():
    assert same_padding((3, 3)) == ((1, 1), (1, 1))
    assert same_padding((3, 3), dilation=2) == ((2, 2), (2, 2))
    assert same_padding((5, 5)) == ((2, 2), (2, 2))
    assert same_padding((1, 7)) == ((0, 0), (3, 3))
    assert same_padding((7, 1)) == ((3, 3), (0, 0))
    assert same_padding((1, 1)) == ((0, 0), (0, 0))


# ---------------------------------------------------------------------------------------------
# Depthwise conv: "xla" vs "shifted" vs a numpy reference


def _depthwise_reference(x, kernel, stride, pad):
    """Direct loops: out[n, h, w, c] = sum_ij xpad[n, s*h + i, s*w + j, c] * kernel[i, j, c],
    and the kernel gradient for cotangent g: sum_nhw g[n, h, w, c] * xpad[n, s*h + i, ...]."""
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = kernel.shape[0]
    out_h, out_w = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    windows = np.stack([np.stack([
        xp[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
        for j in range(k)]) for i in range(k)])  # (k, k, n, out_h, out_w, c)
    out = np.einsum("ijnhwc,ijc->nhwc", windows, np.asarray(kernel, np.float64))
    return out, lambda g: np.einsum("ijnhwc,nhwc->ijc", windows, np.asarray(g, np.float64))


# (kernel, stride, input side): odd and even sides at stride 2.
@pytest.mark.parametrize("kernel_size,stride,size", [(3, 1, 8), (3, 2, 7), (5, 2, 8), (5, 1, 7)])
def test_depthwise_impls_match_reference_and_each_other(kernel_size, stride, size):
    x = _normal((2, size, size, 6), seed=size)
    modules = {impl: DepthwiseConv(kernel_size, stride, impl=impl) for impl in ("xla", "shifted")}
    params = numpy_variables(modules["xla"], x, seed=kernel_size)["params"]
    out_side = math.ceil(size / stride)
    cotangent = _normal((2, out_side, out_side, 6), seed=1)

    @jax.jit
    def outputs_and_grads(params, x):
        def loss(impl, params, x):
            y = modules[impl].apply({"params": params}, x)
            return jnp.sum(y * cotangent), y
        return {impl: jax.grad(functools.partial(loss, impl), argnums=(0, 1), has_aux=True)(
            params, x) for impl in modules}

    results = outputs_and_grads(params, x)
    chex.assert_trees_all_close(results["shifted"], results["xla"], rtol=1e-4, atol=1e-4)
    reference, kernel_grad = _depthwise_reference(x, params["kernel"][:, :, 0], stride,
                                                  kernel_size // 2)
    (grads, y) = results["shifted"]
    chex.assert_shape(y, (2, out_side, out_side, 6))
    np.testing.assert_allclose(y, reference + np.asarray(params["bias"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0]["kernel"][:, :, 0], kernel_grad(cotangent), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(grads[0]["bias"], np.sum(cotangent, axis=(0, 1, 2)), rtol=1e-4)


def test_depthwise_shifted_bfloat16_gradients():
    # The custom VJP must return cotangents in the primal dtypes (bfloat16 here), close to the
    # float32 ones.
    x, kernel = _normal((2, 8, 8, 4)), _normal((3, 3, 4), seed=1) / 3
    padding = ((1, 1), (1, 1))

    @jax.jit
    def grads(x, kernel):
        loss = lambda x, k: jnp.sum(jnp.sin(depthwise_conv_shifted(x, k, 2, padding)))
        return (jax.grad(loss, argnums=(0, 1))(x, kernel),
                jax.grad(loss, argnums=(0, 1))(x.astype(jnp.bfloat16),
                                               kernel.astype(jnp.bfloat16)))

    full, half = grads(x, kernel)
    assert [g.dtype for g in half] == [jnp.bfloat16, jnp.bfloat16]
    for g32, g16 in zip(full, half):
        np.testing.assert_allclose(np.asarray(g16, np.float32), g32, rtol=0.05, atol=0.05)


def test_depthwise_xla_is_nn_conv_with_groups():
    x = _normal((2, 7, 7, 5))
    ours = DepthwiseConv(3, 2)
    flax_conv = nn.Conv(5, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=5)
    variables = numpy_variables(ours, x)
    chex.assert_trees_all_equal_shapes(variables, numpy_variables(flax_conv, x))
    np.testing.assert_allclose(ours.apply(variables, x), flax_conv.apply(variables, x),
                               rtol=1e-5, atol=1e-5)


def test_sep_conv_impls_agree_in_train_mode():
    x = _normal((2, 8, 8, 4))
    ops = {impl: make_op(5, 6, 2, OpSettings(depthwise_impl=impl)) for impl in
           ("xla", "shifted")}
    variables = numpy_variables(ops["xla"], x, train=False)

    @jax.jit
    def values_and_grads(params):
        def loss(impl, params):
            y, _ = ops[impl].apply({**variables, "params": params}, x, train=True,
                                   mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y))
        return {impl: jax.value_and_grad(functools.partial(loss, impl))(params) for impl in ops}

    values = values_and_grads(variables["params"])
    chex.assert_trees_all_close(values["shifted"], values["xla"], rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_float32_params():
    x = jnp.ones((1, 8, 8, 3))
    settings = OpSettings(dtype=jnp.bfloat16, depthwise_impl="shifted")
    families = [0, 1, 3, 5, 6, None]  # one op of each family, both pools
    modules = [make_op(op, 4, 2, settings) for op in families]
    variables = [numpy_variables(m, x, train=False) for m in modules]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    outs = jax.jit(lambda vs: [m.apply(v, x, train=False) for m, v in zip(modules, vs)])(
        variables)
    for op, y in zip(families, outs):
        assert y.dtype == jnp.bfloat16, op
        chex.assert_shape(y, (1, 4, 4, 4))


def test_bad_op_and_settings_are_clear_errors():
    with pytest.raises(ValueError, match="op 7 is not an index"):
        make_op(7, 4, 1, OpSettings())
    with pytest.raises(ValueError, match="op True is not an index"):
        op_param_count(True, 4, 4)
    with pytest.raises(ValueError, match="depthwise_impl 'cuda'"):
        OpSettings(depthwise_impl="cuda")
    with pytest.raises(ValueError, match="removed_op 'zero'"):
        OpSettings(removed_op="zero")
