"""Ranking metrics against scipy.stats and hand-computed values."""

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from memnas_jax import ranking


# ----------------------------------------------------------------------------------- Kendall tau
def test_kendall_tau_hand_computed():
    # one discordant pair out of 6: P = 5, Q = 1 -> (5 - 1) / 6
    assert ranking.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6, abs=1e-15)
    # ties: pairs (0,1) tied in y, (1,2) tied in s; P = 4, Q = 0, n0 = 6, n1 = n2 = 1 -> 4/5
    assert ranking.kendall_tau([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8, abs=1e-15)
    assert ranking.kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert ranking.kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0


def test_kendall_tau_constant_input_is_nan_as_in_scipy():
    assert math.isnan(ranking.kendall_tau([1, 2, 3], [5, 5, 5]))
    assert math.isnan(ranking.kendall_tau([2, 2], [1, 3]))


@pytest.mark.parametrize("n, levels", [(2, 0), (7, 3), (50, 0), (300, 5), (2001, 40)])
def test_kendall_tau_matches_scipy(n, levels):
    rng = np.random.default_rng(n)
    y = rng.integers(0, levels, n) if levels else rng.normal(size=n)
    s = y + rng.normal(size=n) if not levels else rng.integers(0, levels, n) + (y > levels // 2)
    assert ranking.kendall_tau(y, s) == pytest.approx(scipy.stats.kendalltau(y, s).statistic,
                                                       abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(-3, 3)), min_size=2, max_size=40))
def test_kendall_tau_matches_scipy_with_heavy_ties(pairs):
    y, s = np.array(pairs, dtype=float).T
    expected = scipy.stats.kendalltau(y, s).statistic
    got = ranking.kendall_tau(y, s)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-12)


def test_kendall_tau_is_fast_on_all_nasbench201_sized_inputs():
    rng = np.random.default_rng(0)
    y = np.round(rng.normal(size=15_625), 2)  # ties, like accuracies
    s = y + rng.normal(size=15_625)
    assert ranking.kendall_tau(y, s) == pytest.approx(scipy.stats.kendalltau(y, s).statistic,
                                                       abs=1e-12)


# ------------------------------------------------------------------------------------- Spearman
def test_spearman_hand_computed():
    # rank differences d = (0, -1, 1): rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert ranking.spearman_rho([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5, abs=1e-15)
    assert ranking.spearman_rho([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0, abs=1e-15)


def test_average_ranks_match_scipy_rankdata():
    x = [3.0, 1.0, 3.0, 2.0, 3.0, 1.0]
    np.testing.assert_array_equal(ranking.average_ranks(x), [5, 1.5, 5, 3, 5, 1.5])
    np.testing.assert_array_equal(ranking.average_ranks(x), scipy.stats.rankdata(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 20, 500).astype(float)
    s = y + rng.integers(-5, 5, 500)
    assert ranking.spearman_rho(y, s) == pytest.approx(scipy.stats.spearmanr(y, s).statistic,
                                                        abs=1e-12)


# --------------------------------------------------------------------------------- precision@K
def test_precision_at_k_hand_computed():
    y = [10, 9, 8, 7, 6]
    s = [1, 5, 4, 3, 2]  # predicted top-2 = items 1, 2; true top-2 = items 0, 1
    assert ranking.precision_at_k(y, s, 2) == 0.5
    assert ranking.precision_at_k(y, s, 5) == 1.0
    assert ranking.precision_at_k(y, y, 3) == 1.0


def test_precision_at_k_counts_ties_at_the_true_boundary():
    y = [3, 2, 2, 1]  # true top-2 holds item 0 and both tied items 1, 2
    s = [0, 1, 0.5, 2]  # predicted top-2 = items 3 (miss), 1 (hit)
    assert ranking.precision_at_k(y, s, 2) == 0.5
    assert ranking.precision_at_k(y, [0, 0.5, 1, -1], 2) == 1.0


def test_predicted_top_k_breaks_score_ties_by_index():
    np.testing.assert_array_equal(ranking.predicted_top_k([1, 3, 3, 2, 3], 4), [1, 2, 4, 3])


# -------------------------------------------------------------------------------------- NDCG@K
def test_ndcg_hand_computed():
    y = [3, 2, 1]  # true ranks 1, 2, 3
    s = [1, 2, 3]  # predicted order: items 2, 1, 0
    # linear relevance at k = 2: max(0, 3 - r) / 2 = (1, 0.5, 0)
    dcg, ideal = 0.0 + 0.5 / math.log2(3), 1.0 + 0.5 / math.log2(3)
    assert ranking.ndcg_at_k(y, s, 2) == pytest.approx(dcg / ideal, abs=1e-15)
    # the authors' relevance 1 / r = (1, 1/2, 1/3)
    dcg, ideal = 1 / 3 + 0.5 / math.log2(3), 1.0 + 0.5 / math.log2(3)
    assert ranking.ndcg_at_k(y, s, 2, relevance="reciprocal_rank") == pytest.approx(
        dcg / ideal, abs=1e-15)


def test_ndcg_is_one_for_the_true_order_and_zero_when_top_k_is_missed():
    rng = np.random.default_rng(0)
    y = rng.normal(size=100)
    for relevance in ranking.NDCG_RELEVANCES:
        assert ranking.ndcg_at_k(y, 2 * y + 1, 10, relevance) == pytest.approx(1.0, abs=1e-12)
    assert ranking.ndcg_at_k(y, -y, 10) == 0.0  # linear relevance is 0 outside the true top-10


def test_true_ranks_share_the_best_rank_on_ties():
    np.testing.assert_array_equal(ranking.true_ranks([5, 9, 5, 1]), [2, 1, 2, 4])


def test_ranking_report_keys_and_values():
    report = ranking.ranking_report([1, 2, 3, 4], [1, 3, 2, 4], k=2)
    assert set(report) == {"kendall_tau", "spearman", "precision@2", "ndcg@2"}
    assert report["kendall_tau"] == pytest.approx(4 / 6)
    assert report["precision@2"] == 0.5  # predicted top-2 = items 3, 1; true top-2 = items 3, 2


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, message", [
    (lambda: ranking.kendall_tau([1, 2, 3], [1, 2]), "differ in length"),
    (lambda: ranking.kendall_tau([1], [1]), "at least 2"),
    (lambda: ranking.spearman_rho([[1, 2]], [[1, 2]]), "1-D"),
    (lambda: ranking.kendall_tau([1, np.nan], [1, 2]), "finite"),
    (lambda: ranking.precision_at_k([1, 2, 3], [1, 2, 3], 0), "k must be"),
    (lambda: ranking.precision_at_k([1, 2, 3], [1, 2, 3], 4), "k must be"),
    (lambda: ranking.ndcg_at_k([1, 2, 3], [1, 2, 3], 2, relevance="gain"), "relevance"),
])
def test_bad_input_gives_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
