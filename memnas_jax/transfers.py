"""The host <-> device transfers the training loops mean to make, each named.

A training step takes only arrays already on the device and returns nothing to the host; the
loops read the metrics once per epoch, put each epoch's order on the device, evaluate, save
checkpoints. Each such place runs under `intended(name)`, which allows transfers there and
counts them by name, so a test can run a whole loop under
`jax.transfer_guard("disallow_explicit")` and see that every transfer is one of these
(tests/test_train.py, tests/test_packed.py).
"""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator

import jax

# What the training loops allow, by name; a new kind of transfer gets a name here.
NAMES = ("initial state", "checkpoint restore", "training data", "epoch order",
         "epoch metrics", "epoch counter", "nan check", "streamed batch", "evaluation",
         "checkpoint save", "final variables", "pack activity")
SEEN: collections.Counter = collections.Counter()  # name -> times entered, in this process


@contextlib.contextmanager
def intended(name: str) -> Iterator[None]:
    """Allows host <-> device transfers inside, as the transfer called `name` (one of NAMES)."""
    if name not in NAMES:
        raise ValueError(f"unknown transfer {name!r}: name it in memnas_jax.transfers.NAMES")
    SEEN[name] += 1
    with jax.transfer_guard("allow"):
        yield


__all__ = ["NAMES", "SEEN", "intended"]
