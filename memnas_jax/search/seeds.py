"""Seeds: every random choice of a search is a pure function of the config seed and names
(the round, a candidate's hash), so a resumed or repeated search makes the same choices."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import jax


def derive_seed(seed: int, *parts: Any) -> int:
    """A 31-bit integer that is a pure function of the config seed and `parts` (e.g. a tag, a
    round, a candidate hash): the same in every process, run and resume."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def candidate_key(seed: int, arch_hash: str) -> jax.Array:
    """The training key of a candidate: from the seed and its hash only, so the same network
    trains the same way in any round."""
    return jax.random.key(derive_seed(seed, "train", arch_hash))


def seeded_sample(hashes: Sequence[str], count: int, seed: int, round_index: int) -> list[int]:
    """Indices of `count` of the candidates, chosen by a hash of (seed, round, candidate hash)
    (so independent of their order), returned in their original order."""
    if count >= len(hashes):
        return list(range(len(hashes)))
    keys = [hashlib.sha256(f"{seed}/sample/{round_index}/{h}".encode()).hexdigest()
            for h in hashes]
    chosen = sorted(range(len(hashes)), key=lambda i: keys[i])[:count]
    return sorted(chosen)
