"""The structure-correlation controller: a learned ranker of architectures (docs/method.md §7).

Model (the paper's figure, with LSTMs):
  token rows -> one embedding per categorical field, summed (or concatenated)
             -> encoder LSTM over a candidate's rows -> one feature per candidate
             -> bidirectional ranking LSTM across a *set* of candidates ("structure correlation":
                every score sees all the others of its set)
             -> Dense -> score.
`ControllerConfig.cross_candidate=False` drops the ranking LSTM (the ablation: score =
Dense(feature)).

Training: random sets of `set_size` candidates of one group (a group = the candidates of one round,
whose targets are comparable), `sets_per_batch` sets a step, pairwise logistic loss over every pair
of the batch in the same group with different targets (default) or MSE on standardised targets (the
authors' code). optax AdamW, early stopping on the Kendall tau of a held-out split.

Order robustness of the ranking LSTM: training sets are random subsets in random order, so the LSTM
learns a function of the set that does not rely on a particular order. `predict` must be
deterministic and independent of the order the caller lists candidates in, so it sorts the
distinct candidates into a canonical order (lexicographic on the tokens; copies are scored once),
shuffles that with a fixed seed (so a set looks like a training set: a random sample, not a run of
near-identical architectures), and cuts it into sets of about `set_size`. Because the loss also
compares pairs drawn from different sets of a batch, scores are comparable across sets, which is
what ranking a long list chunk by chunk needs. A score
therefore depends on the candidate and on the (fixed) set it lands in, not on the input order.
Chunking also keeps `predict` fast: the ranking LSTM scans `set_size` steps over many sets in
parallel instead of one 10,000-step scan.

Public API (generic over search spaces with integer token fields, e.g. `Architecture.to_tokens()`):
`fit(token_sequences, targets, groups=None, init_state=None, config=None) -> ControllerState`,
`predict(state, token_sequences) -> scores`, `top_k(state, token_sequences, k) -> indices`,
`initialize(vocab_sizes, config)`, `save(state, path)`, `restore(path)`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import shutil
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from memnas_jax import ranking
from memnas_jax.io import atomic_write

LOSSES = ("pairwise", "mse")
FIELD_MERGES = ("sum", "concat")
CHECKPOINT_FORMAT = "memnas_jax.controller/v2"
META_FILE = "controller.json"
PARAMS_FILE = "params.msgpack"


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """Hyperparameters of the controller and of its training.

    vocab_sizes: per token field, the number of values (tokens must lie in [0, size)); None infers
      max + 1 from the training data. Give it explicitly when later rounds may bring larger values
      (e.g. more cells per block), since a warm start cannot grow an embedding.
    set_size: candidates per ranking-LSTM sequence, in training and in `predict`.
    patience: held-out evaluations (every `eval_every` steps) without improvement before stopping.
    holdout_fraction: share of the candidates held out for early stopping; with fewer than 2
      held-out (or 2 training) candidates, training runs `max_steps` with no early stopping.
    predict_batch: candidates per compiled `predict` call (rounded to whole sets).
    """

    embed_dim: int = 32
    field_merge: str = "sum"
    encoder_hidden: int = 64
    ranker_hidden: int = 64
    cross_candidate: bool = True
    loss: str = "pairwise"
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    max_steps: int = 3000  # rounded up to a multiple of eval_every
    eval_every: int = 100
    patience: int = 5
    set_size: int = 32
    sets_per_batch: int = 8
    holdout_fraction: float = 0.1
    vocab_sizes: tuple[int, ...] | None = None
    predict_batch: int = 4096
    seed: int = 0

    def __post_init__(self):
        positive = ("embed_dim", "encoder_hidden", "ranker_hidden", "max_steps", "eval_every",
                    "patience", "set_size", "sets_per_batch", "predict_batch")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ControllerConfig.{name} must be a positive integer, "
                                 f"got {value!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"ControllerConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.field_merge not in FIELD_MERGES:
            raise ValueError(f"ControllerConfig.field_merge must be one of {FIELD_MERGES}, "
                             f"got {self.field_merge!r}")
        if not self.learning_rate > 0 or not self.weight_decay >= 0:
            raise ValueError("ControllerConfig needs learning_rate > 0 and weight_decay >= 0, got "
                             f"{self.learning_rate!r} and {self.weight_decay!r}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"ControllerConfig.holdout_fraction must be in [0, 1), "
                             f"got {self.holdout_fraction!r}")
        if self.vocab_sizes is not None:
            sizes = tuple(self.vocab_sizes)
            if not sizes or any(not isinstance(v, (int, np.integer)) or v < 1 for v in sizes):
                raise ValueError("ControllerConfig.vocab_sizes must be positive integers, "
                                 f"got {sizes!r}")
            object.__setattr__(self, "vocab_sizes", tuple(int(v) for v in sizes))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ControllerConfig":
        values = dict(values)
        if values.get("vocab_sizes") is not None:
            values["vocab_sizes"] = tuple(values["vocab_sizes"])
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class ControllerState:
    """A trained controller: its config, the vocabulary it was built for and its parameters.

    target_mean/target_scale standardise the targets for the MSE loss (predict maps scores back to
    target units). steps: the optimizer steps of the fit that produced the returned (best)
    parameters; holdout_tau: their held-out Kendall tau (nan without a held-out split)."""

    config: ControllerConfig
    vocab_sizes: tuple[int, ...]
    params: Any
    target_mean: float = 0.0
    target_scale: float = 1.0
    steps: int = 0
    holdout_tau: float = float("nan")

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)


# ----------------------------------------------------------------------------------------- model
class StructureCorrelationRanker(nn.Module):
    """Scores sets of candidates: tokens (sets, set_size, rows, fields) -> scores (sets, set_size).

    lengths (sets, set_size) gives each candidate's number of valid rows (>= 1), set_sizes (sets,)
    the number of valid candidates at the front of each set."""

    vocab_sizes: tuple[int, ...]
    embed_dim: int
    field_merge: str
    encoder_hidden: int
    ranker_hidden: int
    cross_candidate: bool

    @nn.compact
    def __call__(self, tokens, lengths, set_sizes):
        num_sets, set_size, rows, num_fields = tokens.shape
        # One embedding per field, stored as one table with per-field offsets (one gather and one
        # parameter leaf instead of one per field: the same model, compiled faster).
        offsets = np.concatenate([[0], np.cumsum(self.vocab_sizes)[:-1]]).astype(np.int32)
        embedded = nn.Embed(sum(self.vocab_sizes), self.embed_dim, name="field_embeddings")(
            tokens + offsets)  # (sets, set_size, rows, fields, embed_dim)
        if self.field_merge == "sum":
            rows_in = embedded.sum(axis=-2)
        else:
            rows_in = embedded.reshape(num_sets, set_size, rows, num_fields * self.embed_dim)
        rows_in = rows_in.reshape(num_sets * set_size, rows, -1)
        flat_lengths = lengths.reshape(-1)
        # A forward LSTM's output at step t ignores later steps, so reading it at the last valid row
        # needs no padding mask (masking the carry would cost 40% more per step).
        hidden = nn.RNN(nn.OptimizedLSTMCell(self.encoder_hidden, name="encoder_cell"))(rows_in)
        last = jnp.take_along_axis(hidden, (flat_lengths - 1)[:, None, None], axis=1)[:, 0]
        features = last.reshape(num_sets, set_size, self.encoder_hidden)
        if self.cross_candidate:
            context = nn.Bidirectional(
                nn.RNN(nn.OptimizedLSTMCell(self.ranker_hidden, name="ranker_forward_cell")),
                nn.RNN(nn.OptimizedLSTMCell(self.ranker_hidden, name="ranker_backward_cell")))(
                    features, seq_lengths=set_sizes)
            features = jnp.concatenate([features, context], axis=-1)
        return nn.Dense(1, name="score")(features)[..., 0]


def _model_fields(config: ControllerConfig) -> tuple:
    return (config.embed_dim, config.field_merge, config.encoder_hidden, config.ranker_hidden,
            config.cross_candidate)


def _make_model(config: ControllerConfig, vocab_sizes: tuple[int, ...]
                ) -> StructureCorrelationRanker:
    return StructureCorrelationRanker(
        vocab_sizes=vocab_sizes, embed_dim=config.embed_dim, field_merge=config.field_merge,
        encoder_hidden=config.encoder_hidden, ranker_hidden=config.ranker_hidden,
        cross_candidate=config.cross_candidate)


# ---------------------------------------------------------------------------------- input checks
def _bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= max(n, minimum): few distinct shapes, hence few recompiles."""
    return 1 << (max(n, minimum) - 1).bit_length()


def _bucket_rows(n: int) -> int:
    """Rows padded to a multiple of 4: the encoder's cost grows with them, so round finely."""
    return -(-n // 4) * 4


def _pad_tokens(token_sequences: Sequence[Any], num_fields: int | None = None,
                vocab_sizes: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Checks variable-length (rows_i, fields) int arrays; pads to (n, bucketed rows, fields)."""
    if isinstance(token_sequences, (str, bytes)) or not hasattr(token_sequences, "__len__"):
        raise TypeError("token_sequences must be a list of (rows, fields) integer arrays, got "
                        f"{type(token_sequences).__name__}")
    if len(token_sequences) == 0:
        raise ValueError("token_sequences is empty: need at least one candidate")
    arrays = []
    for i, seq in enumerate(token_sequences):
        array = np.asarray(seq)
        if array.ndim != 2 or array.shape[0] == 0:
            raise ValueError(f"candidate {i}: expected a (rows >= 1, fields) array, got shape "
                             f"{array.shape}")
        if num_fields is None:
            num_fields = array.shape[1]
        if array.shape[1] != num_fields:
            raise ValueError(f"candidate {i}: has {array.shape[1]} token fields, expected "
                             f"{num_fields}")
        if array.dtype.kind not in "iu":
            raise TypeError(f"candidate {i}: tokens must be integers, got dtype {array.dtype}")
        arrays.append(array)
    lengths = np.fromiter((a.shape[0] for a in arrays), np.int32, len(arrays))
    tokens = np.zeros((len(arrays), _bucket_rows(int(lengths.max())), num_fields), np.int32)
    for i, array in enumerate(arrays):
        tokens[i, :array.shape[0]] = array
    if tokens.min() < 0:
        raise ValueError(f"candidate {int(np.argmax(tokens.min(axis=(1, 2)) < 0))}: negative token")
    if vocab_sizes is not None:
        _check_vocab(tokens, vocab_sizes)
    return tokens, lengths


def _check_vocab(tokens: np.ndarray, vocab_sizes: tuple[int, ...]) -> None:
    too_big = tokens >= np.asarray(vocab_sizes)
    if too_big.any():
        i, _, field = np.argwhere(too_big)[0]
        raise ValueError(f"candidate {i}: field {field} has value {tokens[i, :, field].max()}, "
                         f"outside the controller's vocabulary of size {vocab_sizes[field]} "
                         "(set ControllerConfig.vocab_sizes large enough when fitting)")


def _vocab_for(tokens: np.ndarray, config: ControllerConfig, init_state: ControllerState | None
               ) -> tuple[int, ...]:
    if init_state is not None:
        return init_state.vocab_sizes
    if config.vocab_sizes is not None:
        if len(config.vocab_sizes) != tokens.shape[2]:
            raise ValueError(f"ControllerConfig.vocab_sizes has {len(config.vocab_sizes)} fields, "
                             f"the tokens have {tokens.shape[2]}")
        return config.vocab_sizes
    return tuple(int(v) + 1 for v in tokens.max(axis=(0, 1)))  # padding rows are 0: harmless


# ------------------------------------------------------------------------------- compiled programs
class _Programs(NamedTuple):
    init_params: Any  # key -> params
    optimizer: optax.GradientTransformation
    train_chunk: Any  # (params, opt_state, key, data) -> (params, opt_state, key, mean loss)
    score_sets: Any  # (params, tokens, lengths, set_sizes) -> scores


# Fields that change no compiled program: reset them in the cache key so that e.g. a new seed
# reuses the compiled train step.
_RUN_ONLY_FIELDS = dict(max_steps=1, patience=1, holdout_fraction=0.0, predict_batch=1, seed=0,
                        vocab_sizes=None)


def _programs(config: ControllerConfig, vocab_sizes: tuple[int, ...]) -> _Programs:
    return _build_programs(dataclasses.replace(config, **_RUN_ONLY_FIELDS), vocab_sizes)


@functools.lru_cache(maxsize=32)
def _build_programs(config: ControllerConfig, vocab_sizes: tuple[int, ...]) -> _Programs:
    model = _make_model(config, vocab_sizes)

    @jax.jit  # eager init of the scanned LSTMs takes seconds; compiled, a fraction of that
    def init_params(key):
        dummy = jnp.zeros((1, 1, 1, len(vocab_sizes)), jnp.int32)
        one = jnp.ones((1, 1), jnp.int32)
        return model.init(key, dummy, one, one[0])["params"]

    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(config.learning_rate, weight_decay=config.weight_decay))

    def sample_sets(key, data):
        """Random sets of one group each, members first and in random order."""
        group_key, order_key = jax.random.split(key)
        valid = data["valid"]
        anchors = jax.random.choice(group_key, valid.shape[0], (config.sets_per_batch,),
                                    p=valid / valid.sum())
        set_group = data["groups"][anchors]
        priority = jax.random.uniform(order_key, (config.sets_per_batch, valid.shape[0]))
        eligible = valid[None, :] & (data["groups"][None, :] == set_group[:, None])
        priority = jnp.where(eligible, priority, -1.0)
        top, members = jax.lax.top_k(priority, config.set_size)
        return members, top >= 0.0

    def loss_fn(params, key, data):
        members, is_member = sample_sets(key, data)
        lengths = jnp.where(is_member, data["lengths"][members], 1)
        scores = model.apply({"params": params}, data["tokens"][members], lengths,
                             is_member.sum(axis=1))
        scores, targets = scores.reshape(-1), data["targets"][members].reshape(-1)
        groups, mask = data["groups"][members].reshape(-1), is_member.reshape(-1)
        if config.loss == "mse":
            return jnp.sum(mask * (scores - targets) ** 2) / jnp.maximum(mask.sum(), 1)
        # every ordered pair (i better than j) of the batch within a group, across sets too, so
        # that scores of different sets share one scale
        better = ((targets[:, None] > targets[None, :]) & mask[:, None] & mask[None, :]
                  & (groups[:, None] == groups[None, :]))
        pair_loss = jax.nn.softplus(scores[None, :] - scores[:, None])
        return jnp.sum(jnp.where(better, pair_loss, 0.0)) / jnp.maximum(better.sum(), 1)

    @jax.jit
    def train_chunk(params, opt_state, key, data):
        def step(carry, _):
            params, opt_state, key = carry
            key, step_key = jax.random.split(key)
            loss, grads = jax.value_and_grad(loss_fn)(params, step_key, data)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, key), loss

        (params, opt_state, key), losses = jax.lax.scan(
            step, (params, opt_state, key), None, length=config.eval_every)
        return params, opt_state, key, losses.mean()

    @jax.jit
    def score_sets(params, tokens, lengths, set_sizes):
        return model.apply({"params": params}, tokens, lengths, set_sizes)

    return _Programs(init_params, optimizer, train_chunk, score_sets)


# ------------------------------------------------------------------------------------- predict
def _canonical_sets(tokens: np.ndarray, lengths: np.ndarray, set_size: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cuts the distinct candidates into sets independently of the input order.

    Returns (sets, set_size) candidate indices, their member mask (members first; set sizes differ
    by at most one) and, per candidate, the index of its distinct representative: identical
    candidates are scored once and share the score."""
    n = tokens.shape[0]
    # Sorting whole candidates as big-endian byte strings orders them like a lexsort, 5x faster.
    keys = np.ascontiguousarray(
        np.concatenate([lengths[:, None], tokens.reshape(n, -1)], axis=1).astype(">u4"))
    rows = keys.view(np.dtype((np.void, keys.shape[1] * keys.itemsize))).reshape(n)
    _, distinct, representative = np.unique(rows, return_index=True, return_inverse=True)
    order = distinct[np.random.default_rng(seed).permutation(distinct.size)]
    num_sets = -(-order.size // set_size)
    members = np.zeros((num_sets, set_size), np.int64)
    is_member = np.zeros((num_sets, set_size), bool)
    for s, chunk in enumerate(np.array_split(order, num_sets)):
        members[s, :chunk.size] = chunk
        is_member[s, :chunk.size] = True
    return members, is_member, distinct[representative.reshape(-1)]


def _raw_scores(programs: _Programs, params, config: ControllerConfig, tokens: np.ndarray,
                lengths: np.ndarray) -> np.ndarray:
    """Model scores of padded candidates, in as few compiled calls as `predict_batch` allows, each
    padded to a multiple of 8 sets (or a power of two below that) to bound recompiles."""
    members, is_member, representative = _canonical_sets(tokens, lengths, config.set_size,
                                                         config.seed)
    num_sets = members.shape[0]
    max_sets = max(1, config.predict_batch // config.set_size)
    num_calls = -(-num_sets // max_sets)
    per_call = -(-num_sets // num_calls)
    sets_per_call = _bucket(per_call) if per_call < 8 else -(-per_call // 8) * 8
    outputs = []
    for start in range(0, num_sets, sets_per_call):  # dispatch every call, then collect
        idx = np.zeros((sets_per_call, config.set_size), np.int64)
        mask = np.zeros((sets_per_call, config.set_size), bool)
        stop = min(start + sets_per_call, num_sets)
        idx[:stop - start], mask[:stop - start] = members[start:stop], is_member[start:stop]
        call_lengths = np.where(mask, lengths[idx], 1)
        outputs.append((idx, mask, programs.score_sets(params, tokens[idx], call_lengths,
                                                       mask.sum(axis=1))))
    scores = np.zeros(tokens.shape[0], np.float32)
    for idx, mask, out in outputs:
        scores[idx[mask]] = np.asarray(out)[mask]
    return scores[representative]


def predict(state: ControllerState, token_sequences: Sequence[Any]) -> np.ndarray:
    """Scores of the candidates (higher = better), float32 array (n,).

    With loss "mse" the scores are in target units; with "pairwise" only their order means
    something. Deterministic and independent of the order of `token_sequences`."""
    tokens, lengths = _pad_tokens(token_sequences, state.num_fields, state.vocab_sizes)
    programs = _programs(state.config, state.vocab_sizes)
    raw = _raw_scores(programs, state.params, state.config, tokens, lengths)
    return (raw * state.target_scale + state.target_mean).astype(np.float32)


def top_k(state: ControllerState, token_sequences: Sequence[Any], k: int) -> np.ndarray:
    """Indices of the k best-scored candidates, best first (all of them if k exceeds their number);
    equal scores are ordered by lower index."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    scores = predict(state, token_sequences)
    return ranking.predicted_top_k(scores, min(int(k), scores.size))


# ------------------------------------------------------------------------------------------ fit
def initialize(vocab_sizes: Sequence[int], config: ControllerConfig | None = None
               ) -> ControllerState:
    """An untrained controller for tokens with these per-field vocabulary sizes (config.seed)."""
    config = config or ControllerConfig()
    vocab_sizes = tuple(int(v) for v in vocab_sizes)
    if not vocab_sizes or min(vocab_sizes) < 1:
        raise ValueError("vocab_sizes must be positive integers, one per token field, "
                         f"got {vocab_sizes}")
    params = _programs(config, vocab_sizes).init_params(
        jax.random.fold_in(jax.random.key(config.seed), 0))
    return ControllerState(config=config, vocab_sizes=vocab_sizes, params=params)


def _grouped_tau(targets: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Kendall tau within each group, averaged with weights = group size (groups of >= 2)."""
    taus, weights = [], []
    for g in np.unique(groups):
        in_group = groups == g
        if in_group.sum() >= 2:
            tau = ranking.kendall_tau(targets[in_group], scores[in_group])
            if np.isfinite(tau):
                taus.append(tau)
                weights.append(in_group.sum())
    return float(np.average(taus, weights=weights)) if taus else float("nan")


def fit(token_sequences: Sequence[Any], targets: Any, groups: Any = None,
        init_state: ControllerState | None = None,
        config: ControllerConfig | None = None) -> ControllerState:
    """Trains a controller on candidates with known targets (higher = better).

    groups: optional label per candidate; only candidates of the same group are compared (e.g. the
      round that produced them, when targets are relative to that round's base network).
    init_state: warm start from these parameters (refit each round); its vocabulary is kept and the
      model shape of `config` must match it. The optimizer state starts afresh.
    config: defaults to init_state.config, else ControllerConfig().
    Returns the parameters with the best held-out Kendall tau (the last ones without a held-out
    split).
    """
    if config is None:
        config = init_state.config if init_state is not None else ControllerConfig()
    if init_state is not None and (_model_fields(config) != _model_fields(init_state.config)):
        raise ValueError("config describes a different model than init_state.config: a warm start "
                         "needs the same embed_dim, field_merge, hidden sizes and cross_candidate")
    tokens, lengths = _pad_tokens(token_sequences,
                                  init_state.num_fields if init_state is not None else None)
    n = tokens.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 candidates to learn a ranking, got {n}")
    targets = np.asarray(targets)
    if (targets.shape != (n,) or targets.dtype.kind not in "biuf"
            or not np.all(np.isfinite(targets))):
        raise ValueError(f"targets must be {n} finite numbers (one per candidate), got shape "
                         f"{targets.shape}, dtype {targets.dtype}")
    targets = targets.astype(np.float64)
    groups = np.zeros(n, np.int64) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},) (one label per candidate), "
                         f"got {groups.shape}")
    groups = np.unique(groups, return_inverse=True)[1].reshape(-1).astype(np.int32)
    vocab_sizes = _vocab_for(tokens, config, init_state)
    _check_vocab(tokens, vocab_sizes)

    target_mean, target_scale = float(targets.mean()), float(targets.std()) or 1.0
    standardized = (targets - target_mean) / target_scale

    rng = np.random.default_rng(config.seed)
    n_holdout = int(round(config.holdout_fraction * n))
    if n_holdout < 2 or n - n_holdout < 2:
        n_holdout = 0
    permutation = rng.permutation(n)
    holdout, train = permutation[:n_holdout], permutation[n_holdout:]

    padded_n = _bucket(train.size, config.set_size)
    data = {"tokens": np.zeros((padded_n,) + tokens.shape[1:], np.int32),
            "lengths": np.ones(padded_n, np.int32),
            "targets": np.zeros(padded_n, np.float32),
            "groups": np.zeros(padded_n, np.int32),
            "valid": np.zeros(padded_n, bool)}
    for name, values in (("tokens", tokens), ("lengths", lengths), ("targets", standardized),
                         ("groups", groups),
                         ("valid", np.ones(n, bool))):
        data[name][:train.size] = values[train]
    data = jax.tree.map(jnp.asarray, data)

    programs = _programs(config, vocab_sizes)
    if init_state is None:
        init_state = initialize(vocab_sizes, config)
    params = init_state.params
    train_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    opt_state = programs.optimizer.init(params)

    def holdout_tau(params) -> float:
        if n_holdout == 0:
            return float("nan")
        scores = _raw_scores(programs, params, config, tokens[holdout], lengths[holdout])
        return _grouped_tau(targets[holdout], scores, groups[holdout])

    best_params, best_tau, best_step = params, holdout_tau(params), 0
    steps, evaluations_without_gain = 0, 0
    while steps < config.max_steps:  # whole chunks: max_steps rounds up to a multiple of eval_every
        params, opt_state, train_key, _ = programs.train_chunk(params, opt_state, train_key, data)
        steps += config.eval_every
        if n_holdout == 0:
            best_params, best_step = params, steps
            continue
        tau = holdout_tau(params)
        if tau > best_tau or not np.isfinite(best_tau):
            best_params, best_tau, best_step = params, tau, steps
            evaluations_without_gain = 0
        else:
            evaluations_without_gain += 1
            if evaluations_without_gain >= config.patience:
                break
    return ControllerState(config=config, vocab_sizes=vocab_sizes, params=best_params,
                           target_mean=target_mean if config.loss == "mse" else 0.0,
                           target_scale=target_scale if config.loss == "mse" else 1.0,
                           steps=best_step, holdout_tau=best_tau)


# ------------------------------------------------------------------------------ save / restore
def save(state: ControllerState, path: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
    """Writes `params.msgpack` (flax serialization of the parameters) and `controller.json`
    (config, vocabulary, target scaling), each atomically.

    Plain host files rather than an orbax checkpoint: the controller is small and replicated
    on every process, and orbax refuses host-local arrays in a multi-process job. In a
    multi-process search only process 0 calls this."""
    path = pathlib.Path(path).absolute()
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    params = serialization.msgpack_serialize(jax.tree.map(np.asarray, jax.device_get(
        state.params)))
    meta = {"format": CHECKPOINT_FORMAT, "config": state.config.to_dict(),
            "vocab_sizes": list(state.vocab_sizes), "target_mean": state.target_mean,
            "target_scale": state.target_scale, "steps": state.steps,
            "holdout_tau": None if np.isnan(state.holdout_tau) else state.holdout_tau,
            "params_sha256": hashlib.sha256(params).hexdigest()}
    atomic_write(path / PARAMS_FILE, params)
    atomic_write(path / META_FILE, json.dumps(meta, indent=1))
    return path


def restore(path: str | pathlib.Path) -> ControllerState:
    """Reads a controller written by `save`. Raises ValueError naming the file for a missing,
    truncated or mismatched checkpoint."""
    path = pathlib.Path(path).absolute()
    meta_path, params_path = path / META_FILE, path / PARAMS_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: not a controller saved by "
                                "memnas_jax.controller.save")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is corrupt: {e}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r}")
    config = ControllerConfig.from_dict(meta["config"])
    vocab_sizes = tuple(meta["vocab_sizes"])
    data = params_path.read_bytes() if params_path.exists() else b""
    if hashlib.sha256(data).hexdigest() != meta.get("params_sha256"):
        raise ValueError(f"{params_path} is missing or corrupt (checksum mismatch)")
    abstract = jax.eval_shape(_programs(config, vocab_sizes).init_params, jax.random.key(0))
    loaded = serialization.msgpack_restore(data)
    if jax.tree.structure(loaded) != jax.tree.structure(abstract) or any(
            np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(loaded),
                                                   jax.tree.leaves(abstract))):
        raise ValueError(f"{params_path} does not hold the parameters of its controller.json")
    params = jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), loaded, abstract)
    holdout_tau = meta["holdout_tau"]
    return ControllerState(config=config, vocab_sizes=vocab_sizes, params=params,
                           target_mean=meta["target_mean"], target_scale=meta["target_scale"],
                           steps=meta["steps"],
                           holdout_tau=float("nan") if holdout_tau is None else holdout_tau)
