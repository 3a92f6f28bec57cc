"""Ranking-quality metrics for a predictor: Kendall tau-b, Spearman rho, precision@K, NDCG@K.

numpy only. Every function takes the true values and the predicted scores of the same items (1-D,
equal length, finite); higher is better for both. Conventions:

* Kendall tau is tau-b (ties in either argument handled as in scipy.stats.kendalltau), computed in
  O(n log^2 n) so it scales to all 15,625 NAS-Bench-201 architectures.
* Spearman rho is the Pearson correlation of average ranks (as scipy.stats.spearmanr).
* A rank is 1-based with 1 = the largest value; tied values share the best (smallest) rank.
* The predicted top-K breaks ties between equal scores by the lower index (a stable sort).
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


def _dense_ranks(x: np.ndarray) -> np.ndarray:
    """0-based dense ranks in ascending order: equal values get equal ranks."""
    _, inverse = np.unique(x, return_inverse=True)
    return inverse.reshape(-1)


def _tie_pairs(x: np.ndarray) -> int:
    """Number of pairs tied in x: sum over tie groups of t (t - 1) / 2."""
    _, counts = np.unique(x, return_counts=True, axis=0)
    return int(np.sum(counts * (counts - 1) // 2))


def _count_inversions(ranks: np.ndarray) -> int:
    """Pairs i < j with ranks[i] > ranks[j], by a bottom-up merge sort vectorised per level.

    At each level runs of `width` sorted values are merged pairwise. Keying each value by
    (pair of runs, value) makes all left runs one globally sorted array, so one searchsorted counts,
    for every right-run value, the larger values in its own left run."""
    n = ranks.size
    m = int(ranks.max()) + 1 if n else 1
    keys = ranks.astype(np.int64)
    position = np.arange(n)
    inversions = 0
    width = 1
    while width < n:
        pair = position // (2 * width)
        composite = pair * m + keys
        is_right = (position // width) % 2 == 1
        left, right = composite[~is_right], composite[is_right]
        right_pair = pair[is_right]
        end_of_pair = np.searchsorted(left, right_pair * m + (m - 1), side="right")
        not_larger = np.searchsorted(left, right, side="right")
        inversions += int(np.sum(end_of_pair - not_larger))
        keys = np.sort(composite) - pair * m  # each pair occupies the same positions after sorting
        width *= 2
    return inversions


def kendall_tau(true_values: Any, predicted: Any) -> float:
    """Kendall tau-b between true values and predicted scores, in [-1, 1].

    tau_b = (P - Q) / sqrt((n0 - n1) (n0 - n2)) with P/Q the concordant/discordant pairs, n0 all
    pairs, n1/n2 the pairs tied in the true values/predictions (Knight's algorithm). Returns nan
    when either argument is constant, as scipy does."""
    y, s = _as_pair(true_values, predicted)
    n = y.size
    order = np.lexsort((s, y))  # by y, ties in y by s: pairs tied in y then add no inversions
    s_ranks = _dense_ranks(s)[order]
    discordant = _count_inversions(s_ranks)
    all_pairs = n * (n - 1) // 2
    tied_y, tied_s = _tie_pairs(y), _tie_pairs(s)
    tied_both = _tie_pairs(np.stack([y, s], axis=1))
    concordant_minus_discordant = all_pairs - tied_y - tied_s + tied_both - 2 * discordant
    denominator = np.sqrt(float(all_pairs - tied_y) * float(all_pairs - tied_s))
    if denominator == 0.0:
        return float("nan")
    return float(concordant_minus_discordant / denominator)


def average_ranks(x: Any) -> np.ndarray:
    """1-based ascending ranks with ties given their average rank (scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    group_start = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group_id = np.cumsum(group_start) - 1
    starts = np.flatnonzero(group_start)
    ends = np.r_[starts[1:], x.size]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of 1-based positions start+1 .. end
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = mean_rank[group_id]
    return ranks


def spearman_rho(true_values: Any, predicted: Any) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); nan if one is constant."""
    y, s = _as_pair(true_values, predicted)
    ry, rs = average_ranks(y), average_ranks(s)
    ry -= ry.mean()
    rs -= rs.mean()
    denominator = np.sqrt(np.sum(ry * ry) * np.sum(rs * rs))
    if denominator == 0.0:
        return float("nan")
    return float(np.sum(ry * rs) / denominator)


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
