"""The structure-correlation ranker: per-candidate encoder LSTM, ranking LSTM across a set."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from memnas_jax.controller.config import ControllerConfig


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


def model_fields(config: ControllerConfig) -> tuple:
    return (config.embed_dim, config.field_merge, config.encoder_hidden, config.ranker_hidden,
            config.cross_candidate)


def make_model(config: ControllerConfig, vocab_sizes: tuple[int, ...]
                ) -> StructureCorrelationRanker:
    return StructureCorrelationRanker(
        vocab_sizes=vocab_sizes, embed_dim=config.embed_dim, field_merge=config.field_merge,
        encoder_hidden=config.encoder_hidden, ranker_hidden=config.ranker_hidden,
        cross_candidate=config.cross_candidate)
