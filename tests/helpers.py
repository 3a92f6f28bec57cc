"""Helpers shared by several test files (tests/ is on sys.path; subprocess scripts insert it)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _accelerator() -> str:
    """"cpu", "gpu" or "tpu", read without starting JAX (experiments/configs/common.py)."""
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    from configs import common
    return common.detect_accelerator()[0]


ACCELERATOR = _accelerator()
# Tests whose assertions are about a CPU host (the auto preset, unknown device memory, forced
# host devices): on a GPU or TPU they skip, saying so.
cpu_only = pytest.mark.skipif(ACCELERATOR != "cpu", reason=f"asserts a CPU host; this "
                              f"machine has a {ACCELERATOR}")


class TinyCNN(nn.Module):
    """conv (stride 4) -> BatchNorm -> ReLU -> Dense: 5,370 parameters on 32x32x3."""
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)


def numpy_variables(module, x, seed=0, **apply_kwargs):
    """Variables of `module` for input `x` (an array or ShapeDtypeStruct), filled from numpy.

    Shapes come from `jax.eval_shape`; the values are drawn with numpy because flax's
    initialisers compile one RNG kernel per parameter shape, which takes tens of seconds for a
    network on 2 cores. Kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.1), BN scales ~ 1 + N(0, 0.1),
    running means 0 and variances 1 (a fresh BatchNorm)."""
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct(x.shape, x.dtype)
    abstract = jax.eval_shape(functools.partial(module.init, **apply_kwargs), jax.random.key(0), x)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(rng.normal(size=leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1])),
                               leaf.dtype)
        if name == "mean":
            return jnp.zeros(leaf.shape, leaf.dtype)
        if name == "var":
            return jnp.ones(leaf.shape, leaf.dtype)
        offset = 1.0 if name == "scale" else 0.0
        return jnp.asarray(offset + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)
