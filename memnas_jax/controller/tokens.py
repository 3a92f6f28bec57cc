"""Token batches: padding to bucketed shapes, and the vocabulary checks."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from memnas_jax.controller.config import ControllerConfig, ControllerState


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= max(n, minimum): few distinct shapes, hence few recompiles."""
    return 1 << (max(n, minimum) - 1).bit_length()


def bucket_rows(n: int) -> int:
    """Rows padded to a multiple of 4: the encoder's cost grows with them, so round finely."""
    return -(-n // 4) * 4


def pad_tokens(token_sequences: Sequence[Any], num_fields: int | None = None,
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
    tokens = np.zeros((len(arrays), bucket_rows(int(lengths.max())), num_fields), np.int32)
    for i, array in enumerate(arrays):
        tokens[i, :array.shape[0]] = array
    if tokens.min() < 0:
        raise ValueError(f"candidate {int(np.argmax(tokens.min(axis=(1, 2)) < 0))}: negative token")
    if vocab_sizes is not None:
        check_vocab(tokens, vocab_sizes)
    return tokens, lengths


def check_vocab(tokens: np.ndarray, vocab_sizes: tuple[int, ...]) -> None:
    too_big = tokens >= np.asarray(vocab_sizes)
    if too_big.any():
        i, _, field = np.argwhere(too_big)[0]
        raise ValueError(f"candidate {i}: field {field} has value {tokens[i, :, field].max()}, "
                         f"outside the controller's vocabulary of size {vocab_sizes[field]} "
                         "(set ControllerConfig.vocab_sizes large enough when fitting)")


def vocab_for(tokens: np.ndarray, config: ControllerConfig, init_state: ControllerState | None
               ) -> tuple[int, ...]:
    if init_state is not None:
        return init_state.vocab_sizes
    if config.vocab_sizes is not None:
        if len(config.vocab_sizes) != tokens.shape[2]:
            raise ValueError(f"ControllerConfig.vocab_sizes has {len(config.vocab_sizes)} fields, "
                             f"the tokens have {tokens.shape[2]}")
        return config.vocab_sizes
    return tuple(int(v) + 1 for v in tokens.max(axis=(0, 1)))  # padding rows are 0: harmless
