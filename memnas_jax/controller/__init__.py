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

The package, one job per module: `config` (`ControllerConfig`, `ControllerState`), `model` (the
ranker), `tokens` (padding and vocabulary checks), `programs` (the compiled train / score steps),
`predict`, `fit`, `checkpoint` (save / restore).
"""

from memnas_jax.controller.checkpoint import (
    CHECKPOINT_FORMAT,
    META_FILE,
    PARAMS_FILE,
    restore,
    save,
)
from memnas_jax.controller.config import FIELD_MERGES, LOSSES, ControllerConfig, ControllerState
from memnas_jax.controller.fit import fit, grouped_tau, initialize
from memnas_jax.controller.model import StructureCorrelationRanker
from memnas_jax.controller.predict import predict, top_k

__all__ = [
    "CHECKPOINT_FORMAT", "FIELD_MERGES", "LOSSES", "META_FILE", "PARAMS_FILE", "ControllerConfig",
    "ControllerState", "StructureCorrelationRanker", "fit", "grouped_tau", "initialize", "predict",
    "restore", "save", "top_k",
]
