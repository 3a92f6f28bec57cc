"""Ranking-quality metrics for a predictor: Kendall tau-b, Spearman rho, precision@K, NDCG@K.

numpy and scipy. Every function takes the true values and the predicted scores of the same items
(1-D, equal length, finite); higher is better for both. Conventions:

* Kendall tau is tau-b and Spearman rho the Pearson correlation of average ranks, both from
  scipy.stats (nan, without scipy's warning, when an argument is constant).
* A rank is 1-based with 1 = the largest value; tied values share the best (smallest) rank.
* The predicted top-K breaks ties between equal scores by the lower index (a stable sort).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.stats

NDCG_RELEVANCES = ("linear", "reciprocal_rank")


def _as_pair(true_values: Any, predicted: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(true_values, dtype=np.float64)
    s = np.asarray(predicted, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"expected two 1-D arrays, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"true values and predictions differ in length: {y.size} != {s.size}")
    if y.size < 2:
        raise ValueError(f"need at least 2 items to rank, got {y.size}")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(s))):
        raise ValueError("true values and predictions must be finite (no NaN or inf)")
    return y, s


def _check_k(k: int, n: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}], got {k!r}")
    return int(k)


def kendall_tau(true_values: Any, predicted: Any) -> float:
    """Kendall tau-b between true values and predicted scores, in [-1, 1] (scipy.stats, Knight's
    O(n log n) algorithm); nan when either argument is constant."""
    y, s = _as_pair(true_values, predicted)
    if np.all(y == y[0]) or np.all(s == s[0]):
        return float("nan")
    return float(scipy.stats.kendalltau(y, s).statistic)


def average_ranks(x: Any) -> np.ndarray:
    """1-based ascending ranks with ties given their average rank (scipy.stats.rankdata)."""
    return scipy.stats.rankdata(np.asarray(x, dtype=np.float64))


def spearman_rho(true_values: Any, predicted: Any) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); nan if one is constant."""
    y, s = _as_pair(true_values, predicted)
    if np.all(y == y[0]) or np.all(s == s[0]):
        return float("nan")
    return float(scipy.stats.spearmanr(y, s).statistic)


def true_ranks(true_values: Any) -> np.ndarray:
    """1-based ranks, 1 = largest value; tied values share the best (smallest) rank."""
    y = np.asarray(true_values, dtype=np.float64)
    # rank = 1 + number of strictly larger values
    sorted_y = np.sort(y)
    return (y.size - np.searchsorted(sorted_y, y, side="right") + 1).astype(np.int64)


def predicted_top_k(predicted: Any, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first; equal scores ordered by lower index."""
    s = np.asarray(predicted, dtype=np.float64)
    k = _check_k(k, s.size)
    return np.argsort(-s, kind="stable")[:k]


def precision_at_k(true_values: Any, predicted: Any, k: int) -> float:
    """Fraction of the predicted top-k that is in the true top-k.

    An item is in the true top-k when its true value is at least the k-th largest true value, so
    items tied at the boundary all count (the true top-k may then hold more than k items)."""
    y, s = _as_pair(true_values, predicted)
    k = _check_k(k, y.size)
    kth_largest = np.sort(y)[::-1][k - 1]
    return float(np.mean(y[predicted_top_k(s, k)] >= kth_largest))


def ndcg_at_k(true_values: Any, predicted: Any, k: int, relevance: str = "linear") -> float:
    """Normalised discounted cumulative gain of the predicted top-k, in [0, 1].

    DCG@k = sum_{i=1..k} rel(item at predicted position i) / log2(i + 1), divided by the DCG of the
    ideal order. The relevance of an item with true rank r (`true_ranks`: 1 = best) is
      "linear" (default):      max(0, k + 1 - r) / k  -- graded over the true top-k, 0 outside it;
      "reciprocal_rank":       1 / r                  -- the authors' controller_evl.py.
    """
    y, s = _as_pair(true_values, predicted)
    k = _check_k(k, y.size)
    ranks = true_ranks(y)
    if relevance == "linear":
        gains = np.maximum(0, k + 1 - ranks) / k
    elif relevance == "reciprocal_rank":
        gains = 1.0 / ranks
    else:
        raise ValueError(f"relevance must be one of {NDCG_RELEVANCES}, got {relevance!r}")
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = np.sum(gains[predicted_top_k(s, k)] * discounts)
    ideal = np.sum(np.sort(gains)[::-1][:k] * discounts)
    return float(dcg / ideal)


def ranking_report(true_values: Any, predicted: Any, k: int = 50) -> dict[str, float]:
    """All the metrics at once (the keys name them), for tables and logs."""
    return {
        "kendall_tau": kendall_tau(true_values, predicted),
        "spearman": spearman_rho(true_values, predicted),
        f"precision@{k}": precision_at_k(true_values, predicted, k),
        f"ndcg@{k}": ndcg_at_k(true_values, predicted, k),
    }
