"""The memory-efficient reward (hand-computed values) and the memory budget filter."""

import chex
import numpy as np
import pytest

from memnas_jax import encoding as enc
from memnas_jax.grow_trim import GrowTrimOptions, generate_candidates, initial_candidates
from memnas_jax.reward import (
    AUTHORS_LABEL_CONFIG,
    RewardConfig,
    filter_by_budget,
    memory_efficient_reward,
    total_memories,
    within_budget,
)

# Base: accuracy 80 %, 1000 B of parameters, 2000 B of working memory. The candidate gains
# 10/80 = 0.125 in accuracy, saves 250/1000 = 0.25 of the parameters and spends 500/2000 = 0.25
# more working memory. Weights 1/4, 3/4 keep every product exact in binary.
BASE = dict(base_accuracy=80.0, base_param_memory=1000.0, base_working_memory=2000.0)
QUARTERS = dict(param_weight=0.25, working_weight=0.75)


@pytest.mark.parametrize("lam, expected", [
    (1.0, 0.125),                        # accuracy gain only
    (0.0, 0.25 * 0.25 - 0.75 * 0.25),    # memory only: -0.125
    (0.75, 0.75 * 0.125 - 0.25 * 0.125),  # 0.0625
    (0.5, 0.0),
])
def test_hand_computed_exact(lam, expected):
    reward = memory_efficient_reward(90.0, 750.0, 2500.0, **BASE,
                                     config=RewardConfig(lam=lam, **QUARTERS))
    assert reward.shape == () and reward.dtype == np.float64
    assert float(reward) == expected


def test_default_weights_and_vectorised():
    accuracy = np.array([90.0, 80.0, 72.0, 80.0])
    params = np.array([750.0, 1000.0, 500.0, 1000.0])
    working = np.array([2500.0, 2000.0, 1000.0, 2000.0])
    reward = memory_efficient_reward(accuracy, params, working, **BASE)  # lam 0.5, 0.3 / 0.7
    # [0]: 0.5 * 0.125 + 0.5 * (0.3 * 0.25 - 0.7 * 0.25) = 0.0625 - 0.05
    # [1], [3]: the base itself -> exactly 0
    # [2]: 0.5 * (-0.1) + 0.5 * (0.3 * 0.5 + 0.7 * 0.5) = -0.05 + 0.25
    chex.assert_shape(reward, (4,))
    np.testing.assert_allclose(reward, [0.0125, 0.0, 0.2, 0.0], rtol=1e-14, atol=1e-16)
    assert reward[1] == 0.0 and reward[3] == 0.0
    # Scalars broadcast against arrays; lam = 1 ignores memory entirely.
    only_acc = memory_efficient_reward(accuracy, 1.0, 1.0, **BASE, config=RewardConfig(lam=1.0))
    np.testing.assert_array_equal(only_acc, [0.125, 0.0, -0.1, 0.0])


def test_authors_label_on_their_round1_winner(golden_estimator):
    """net179 (87.55 %) relative to its base net53 (87.0 %), with the authors' estimator values
    from the golden file: cal_weight 155040 vs 78240 and cal_in 425984 vs 262144."""
    values = {b["name"]: b for b in golden_estimator["base_networks"]}
    net53, net179 = values["net53"], values["net179"]
    assert (net53["cal_weight"], net53["cal_in"]) == (78240, 262144)
    assert (net179["cal_weight"], net179["cal_in"]) == (155040, 425984)
    reward = memory_efficient_reward(
        87.55, net179["cal_weight"], net179["cal_in"], base_accuracy=87.0,
        base_param_memory=net53["cal_weight"], base_working_memory=net53["cal_in"],
        config=AUTHORS_LABEL_CONFIG)
    # 0.7 * 0.55/87 + 0.3 * (0.3 * -76800/78240 + 0.7 * -163840/262144) = -2441041/11344800
    assert float(reward) == pytest.approx(-2441041 / 11344800, rel=1e-14)
    assert AUTHORS_LABEL_CONFIG == RewardConfig(lam=0.7, param_weight=0.3, working_weight=0.7)


def test_nan_accuracy_marks_a_failed_candidate():
    reward = memory_efficient_reward([np.nan, 88.0], 1000.0, 2000.0, **BASE)
    assert np.isnan(reward[0]) and reward[1] == 0.5 * 0.1


@pytest.mark.parametrize("override, message", [
    ({"base_accuracy": 0.0}, "base_accuracy must be a finite number > 0"),
    ({"base_param_memory": -1.0}, "base_param_memory must be a finite number > 0"),
    ({"base_working_memory": np.inf}, "base_working_memory must be a finite number > 0"),
    ({"base_working_memory": np.nan}, "base_working_memory must be a finite number > 0"),
    ({"base_accuracy": [80.0]}, "base_accuracy must be a number"),
    ({"base_accuracy": "80"}, "base_accuracy must be a number"),
])
def test_bad_base_values(override, message):
    kwargs = {**BASE, **override}
    with pytest.raises(ValueError, match=message):
        memory_efficient_reward(80.0, 1000.0, 2000.0, **kwargs)


@pytest.mark.parametrize("args, message", [
    (([90.0, 80.0], [1.0, 2.0, 3.0], 1.0), "must broadcast together"),
    ((-1.0, 1.0, 1.0), "accuracy must be >= 0"),
    ((np.inf, 1.0, 1.0), "accuracy must be >= 0 and finite"),
    ((90.0, -1.0, 1.0), "param_memory must be finite and >= 0"),
    ((90.0, 1.0, np.nan), "working_memory must be finite and >= 0"),
    ((90.0, "big", 1.0), "must be numbers"),
])
def test_bad_candidate_values(args, message):
    with pytest.raises(ValueError, match=message):
        memory_efficient_reward(*args, **BASE)


@pytest.mark.parametrize("kwargs, message", [
    ({"lam": 1.5}, "lam must be in"),
    ({"lam": -0.1}, "lam must be in"),
    ({"lam": float("nan")}, "lam must be a finite number"),
    ({"param_weight": -0.3}, "must be >= 0"),
    ({"working_weight": True}, "working_weight must be a finite number"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Budget


def cells_times_1k(arch):
    """A stand-in memory function: 1000 bytes per cell, plus 1 per non-removed op."""
    return 1000.0 * sum(arch.cells_per_block) + sum(
        (c.op1 is not None) + (c.op2 is not None) for block in arch for c in block)


def test_budget_filter():
    base = enc.uniform_architecture([(0, 0, "fac_conv_7", "sep_conv_3x3"),
                                     (1, 0, "fac_conv_7", "max_pool_3x3")])
    candidates = generate_candidates(base)  # 441 grows (15 cells) + 20 + 5 trims (10 cells)
    memories = total_memories(candidates, cells_times_1k)
    assert memories[0] == 15000 + 30 and memories[441] == 10000 + 19
    assert memories[-1] == 10000 + 20
    mask = within_budget(candidates, cells_times_1k, budget_bytes=10020)
    chex.assert_shape(mask, (466,))
    assert mask.sum() == 25 and not mask[:441].any()
    kept = filter_by_budget(candidates, cells_times_1k, 10020)
    assert [c.kind for c in kept] == ["trim_op"] * 20 + ["trim_edge"] * 5
    # An op trim (10019 B) fits a budget that the edge trims (10020 B) exceed.
    assert [c.kind for c in filter_by_budget(candidates, cells_times_1k, 10019.5)] == (
        ["trim_op"] * 20)
    assert filter_by_budget(candidates, cells_times_1k, 1e9) == candidates
    # Plain architectures work too; no budget keeps everything without calling memory_fn.
    archs = [c.architecture for c in candidates[:3]]
    assert filter_by_budget(archs, cells_times_1k, 20000) == archs
    assert within_budget(archs, lambda a: 1 / 0, None).all()


def test_budget_errors():
    archs = [c.architecture for c in initial_candidates(1, GrowTrimOptions(ops=(0, 1)))]
    with pytest.raises(ValueError, match="budget_bytes must be a finite number > 0"):
        within_budget(archs, cells_times_1k, 0)
    with pytest.raises(ValueError, match="memory_fn returned -5.0 for candidate 0"):
        within_budget(archs, lambda a: -5.0, 100)
    with pytest.raises(ValueError, match=r"memory_fn\(candidate 0\) must be a number"):
        within_budget(archs, lambda a: [1, 2], 100)


def test_budget_with_the_real_memory_module():
    memory = pytest.importorskip("memnas_jax.memory", reason="memnas_jax.memory not written yet")
    from memnas_jax.space import cifar_skeleton
    skeleton = cifar_skeleton(32, "uniform")
    fn = lambda arch: memory.memory_report(arch, skeleton).total_bytes  # noqa: E731
    small, large = (c.architecture for c in initial_candidates(
        5, GrowTrimOptions(ops=("avg_pool_3x3", "conv_3x3")))[::3])
    small_bytes, large_bytes = total_memories([small, large], fn)
    assert 0 < small_bytes < large_bytes  # 1x1 conv + pool vs two 3x3 convs per cell
    budget = (small_bytes + large_bytes) / 2
    assert filter_by_budget([small, large], fn, budget) == [small]
