"""The structure-correlation controller: learns a planted ranking rule, round-trips through orbax,
warm-starts, is deterministic and order-independent, and rejects bad input clearly."""

import dataclasses
import json

import chex
import numpy as np
import pytest

from memnas_jax import controller, ranking
from memnas_jax.encoding import TOKEN_WIDTH

# Small enough to compile and train in seconds on 2 CPU cores.
CONFIG = controller.ControllerConfig(embed_dim=16, encoder_hidden=32, ranker_hidden=32, set_size=16,
                                     sets_per_batch=8, learning_rate=1e-2, max_steps=300,
                                     eval_every=100, patience=2, seed=0)
# The ablation and the authors' loss in one config: one more compiled program, not two.
MSE_CONFIG = dataclasses.replace(CONFIG, loss="mse", cross_candidate=False)
OP_WEIGHT = np.array([0.2, 0.1, 0.8, 0.5, 1.0, 0.9, 1.2, -0.5])  # ops 0..6, 7 = removed


def planted_rule(tokens: np.ndarray) -> float:
    """Weighted count of the ops, plus a bonus for conv_3x3 (op 6) as op1 in blocks 4-5."""
    return float(OP_WEIGHT[tokens[:, 4]].sum() + OP_WEIGHT[tokens[:, 5]].sum()
                 + np.sum((tokens[:, 4] == 6) & (tokens[:, 0] >= 3)))


def random_candidates(n: int, seed: int) -> list[np.ndarray]:
    """MemNAS-style token arrays (Architecture.to_tokens() layout): 5 blocks of 1-2 cells."""
    rng = np.random.default_rng(seed)
    candidates = []
    for _ in range(n):
        rows = [[block, position, rng.integers(0, position + 1), rng.integers(0, position + 1),
                 rng.integers(0, 8), rng.integers(0, 8), rng.integers(0, 2), rng.integers(0, 2)]
                for block in range(5) for position in range(rng.integers(1, 3))]
        candidates.append(np.array(rows, np.int32))
    return candidates


VOCAB = (5, 2, 2, 2, 8, 8, 2, 2)  # blocks 0-4, positions 0-1, inputs 0-1, ops 0-7, two flags


@pytest.fixture(scope="module")
def synthetic():
    candidates = random_candidates(900, seed=0)
    targets = np.array([planted_rule(c) for c in candidates])
    return candidates[:600], targets[:600], candidates[600:], targets[600:]


@pytest.fixture(scope="module")
def trained(synthetic):
    train_x, train_y, _, _ = synthetic
    return controller.fit(train_x, train_y, config=CONFIG)


def test_learns_a_planted_ranking_rule(trained, synthetic):
    _, _, test_x, test_y = synthetic
    scores = controller.predict(trained, test_x)
    chex.assert_shape(scores, (300,))
    assert trained.vocab_sizes == VOCAB
    assert ranking.kendall_tau(test_y, scores) > 0.9
    assert trained.holdout_tau > 0.9 and 100 <= trained.steps <= 300


def test_top_k_is_the_best_scored(trained, synthetic):
    _, _, test_x, _ = synthetic
    scores = controller.predict(trained, test_x)
    top = controller.top_k(trained, test_x, 10)
    np.testing.assert_array_equal(top, np.argsort(-scores, kind="stable")[:10])
    assert len(controller.top_k(trained, test_x[:5], 100)) == 5  # k beyond n: all, ordered


def test_predict_does_not_depend_on_input_order(trained, synthetic):
    _, _, test_x, _ = synthetic
    scores = controller.predict(trained, test_x)
    order = np.random.default_rng(1).permutation(len(test_x))
    np.testing.assert_array_equal(controller.predict(trained, [test_x[i] for i in order]),
                                  scores[order])
    with_copies = controller.predict(trained, test_x + test_x[:50])  # copies are scored once
    np.testing.assert_array_equal(with_copies[300:], with_copies[:50])
    np.testing.assert_array_equal(with_copies[:300], scores)


def test_cross_candidate_scores_see_the_other_candidates(trained, synthetic):
    """The structure correlation: a score depends on the candidates it is ranked with."""
    _, _, test_x, _ = synthetic
    alone = controller.predict(trained, test_x[:20])
    with_others = controller.predict(trained, test_x[:20] + test_x[200:212])[:20]
    assert np.max(np.abs(alone - with_others)) > 1e-4


def test_without_cross_candidate_lstm_scores_are_per_candidate(synthetic):
    train_x, _, test_x, _ = synthetic
    state = controller.initialize(VOCAB, MSE_CONFIG)
    assert set(state.params) == {"field_embeddings", "encoder_cell", "score"}
    assert "ranker_forward_cell" in controller.initialize(VOCAB, CONFIG).params
    alone = controller.predict(state, test_x[:20])
    with_others = controller.predict(state, test_x[:20] + train_x[:100])[:20]
    np.testing.assert_allclose(alone, with_others, rtol=1e-6, atol=1e-6)


def test_save_restore_gives_identical_predictions(trained, synthetic, tmp_path):
    _, _, test_x, _ = synthetic
    path = controller.save(trained, tmp_path / "ctl")
    meta = json.loads((path / "controller.json").read_text())
    assert meta["vocab_sizes"] == list(VOCAB) and meta["config"]["encoder_hidden"] == 32
    restored = controller.restore(path)
    assert restored.config == trained.config and restored.vocab_sizes == trained.vocab_sizes
    assert restored.steps == trained.steps and restored.holdout_tau == trained.holdout_tau
    chex.assert_trees_all_equal(restored.params, trained.params)
    np.testing.assert_array_equal(controller.predict(restored, test_x),
                                  controller.predict(trained, test_x))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        controller.save(trained, path)
    controller.save(trained, path, overwrite=True)
    with pytest.raises(FileNotFoundError, match="controller.json"):
        controller.restore(tmp_path / "nowhere")
    params = path / controller.PARAMS_FILE
    params.write_bytes(params.read_bytes()[:-10])  # a write cut short
    with pytest.raises(ValueError, match="params.msgpack is missing or corrupt"):
        controller.restore(path)
    (path / controller.META_FILE).write_text('{"format": ')
    with pytest.raises(ValueError, match="controller.json is corrupt"):
        controller.restore(path)


def test_warm_start_keeps_what_was_learned(trained, synthetic):
    """Refitting from the trained state starts where it left off: its step-0 parameters are a
    candidate (same held-out split), so it never ends worse on held-out data, and it beats a cold
    start given the same 100 steps."""
    train_x, train_y, test_x, test_y = synthetic
    short = dataclasses.replace(CONFIG, max_steps=100)
    warm = controller.fit(train_x, train_y, init_state=trained, config=short)
    cold = controller.fit(train_x, train_y, config=short)
    assert warm.holdout_tau >= trained.holdout_tau
    assert warm.holdout_tau > cold.holdout_tau
    assert ranking.kendall_tau(test_y, controller.predict(warm, test_x)) > 0.9


def test_fit_is_deterministic_given_the_seed(synthetic):
    train_x, train_y, _, _ = synthetic
    config = dataclasses.replace(CONFIG, max_steps=100)  # same shapes: no new compile
    first = controller.fit(train_x, train_y, config=config)
    second = controller.fit(train_x, train_y, config=config)
    chex.assert_trees_all_equal(first.params, second.params)
    other_seed = controller.initialize(VOCAB, dataclasses.replace(CONFIG, seed=1))
    same_seed = controller.initialize(VOCAB, CONFIG)
    chex.assert_trees_all_equal(same_seed.params, controller.initialize(VOCAB, CONFIG).params)
    assert not np.array_equal(other_seed.params["encoder_cell"]["ii"]["kernel"],
                              same_seed.params["encoder_cell"]["ii"]["kernel"])


def test_groups_compare_only_within_a_group(synthetic):
    """Two rounds whose targets are on different scales: ranked within each round."""
    train_x, train_y, _, _ = synthetic
    groups = np.arange(len(train_x)) % 2
    shifted = train_y + 100.0 * groups  # across rounds the targets would mislead
    state = controller.fit(train_x, shifted, groups=groups,
                           config=dataclasses.replace(CONFIG, max_steps=100))
    assert state.holdout_tau > 0.8  # mean within-round tau
    assert controller.grouped_tau(np.array([1.0, 2, 3, 10, 30, 20]),
                                   np.array([1.0, 2, 3, 1, 3, 2]),
                                   np.array([0, 0, 0, 1, 1, 1])) == pytest.approx(1.0)


def test_mse_loss_predicts_in_target_units(synthetic):
    train_x, train_y, test_x, test_y = synthetic
    state = controller.fit(train_x, train_y, config=MSE_CONFIG)
    scores = controller.predict(state, test_x)
    assert ranking.kendall_tau(test_y, scores) > 0.8
    assert abs(scores.mean() - test_y.mean()) < 0.5 * test_y.std()
    assert state.target_mean == pytest.approx(train_y.mean())


# --------------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors(trained, synthetic):
    train_x, train_y, _, _ = synthetic
    with pytest.raises(ValueError, match="empty"):
        controller.fit([], [])
    with pytest.raises(ValueError, match="empty"):
        controller.predict(trained, [])
    with pytest.raises(ValueError, match="candidate 1: has 7 token fields, expected 8"):
        controller.predict(trained, [train_x[0], train_x[1][:, :7]])
    with pytest.raises(ValueError, match=r"candidate 0: expected a \(rows >= 1, fields\) array"):
        controller.predict(trained, [np.arange(TOKEN_WIDTH)])
    with pytest.raises(TypeError, match="integers"):
        controller.predict(trained, [train_x[0].astype(float)])
    with pytest.raises(ValueError, match="negative"):
        controller.predict(trained, [train_x[0] - 10])
    too_big = train_x[0].copy()
    too_big[0, 4] = 8
    with pytest.raises(ValueError, match="field 4 has value 8, outside the controller's vocab"):
        controller.predict(trained, [too_big])
    with pytest.raises(ValueError, match="targets must be 3 finite numbers"):
        controller.fit(train_x[:3], train_y[:2])
    with pytest.raises(ValueError, match="finite"):
        controller.fit(train_x[:3], [1.0, np.nan, 2.0])
    with pytest.raises(ValueError, match="at least 2 candidates"):
        controller.fit(train_x[:1], train_y[:1])
    with pytest.raises(ValueError, match="different model"):
        controller.fit(train_x[:10], train_y[:10], init_state=trained,
                       config=dataclasses.replace(CONFIG, encoder_hidden=8))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        controller.top_k(trained, train_x[:5], 0)
    with pytest.raises(ValueError, match="loss must be one of"):
        controller.ControllerConfig(loss="hinge")
    with pytest.raises(ValueError, match="set_size must be a positive integer"):
        controller.ControllerConfig(set_size=0)
