"""The search state on disk: atomic JSON with a checksum and the previous copy, and the answer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

from absl import logging

from memnas_jax import reports
from memnas_jax.encoding import Architecture, from_json
from memnas_jax.errors import UserError
from memnas_jax.io import atomic_write

STATE_FILE = "state.json"


PREV_STATE_FILE = "state.prev.json"


CONFIG_FILE = "config.json"


STATE_FORMAT = "memnas_jax.search_state/v1"


class StateError(UserError, RuntimeError):
    """The work directory's state files cannot be read."""


def _dump_state(state: dict) -> str:
    body = json.dumps(state, sort_keys=True, allow_nan=False)
    checksum = hashlib.sha256(body.encode()).hexdigest()
    return json.dumps({"format": STATE_FORMAT, "sha256": checksum, "state": state},
                      sort_keys=True, allow_nan=False)


def _parse_state(text: str) -> dict:
    outer = json.loads(text)
    if not isinstance(outer, dict) or outer.get("format") != STATE_FORMAT:
        raise ValueError(f"not a {STATE_FORMAT} file")
    body = json.dumps(outer["state"], sort_keys=True, allow_nan=False)
    if hashlib.sha256(body.encode()).hexdigest() != outer.get("sha256"):
        raise ValueError("checksum mismatch")
    return outer["state"]


def save_state(state: dict, workdir: pathlib.Path) -> None:
    """Writes state.json atomically, keeping the previous good copy as state.prev.json: a kill
    at any moment leaves at least one of the two complete (a missing state.json falls back to
    state.prev.json)."""
    atomic_write(workdir / STATE_FILE, _dump_state(state), previous=workdir / PREV_STATE_FILE)


def load_state(workdir: pathlib.Path) -> dict | None:
    """The newest readable state of `workdir` (None for a new search). A corrupt state.json is
    reported and state.prev.json used; if neither is readable, StateError."""
    problems = []
    for name in (STATE_FILE, PREV_STATE_FILE):
        path = workdir / name
        if not path.exists():
            continue
        try:
            state = _parse_state(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{path} is unreadable ({type(e).__name__}: {e})")
            logging.error("%s", problems[-1])
            continue
        if problems or name == PREV_STATE_FILE:
            logging.warning("resuming from %s (%s); at most the last trained candidate is "
                            "lost", path, "; ".join(problems) or f"no {STATE_FILE}")
        return state
    if problems:
        raise StateError("cannot resume: " + "; ".join(problems) + ". Move the work directory "
                         "away to start a new search.")
    return None


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The answer of a search: the last round winner (None if no round produced one)."""

    architecture: Architecture | None
    arch_hash: str | None
    accuracy: float | None
    param_bytes: int | None
    working_bytes: int | None
    total_bytes: int | None
    winner_round: int | None
    stop_reason: str | None
    finished: bool
    num_rounds: int
    num_trained: int
    workdir: str
    winners: tuple[dict, ...]  # per round: round, hash, accuracy, memory, reward


def search_result(state: dict, workdir: pathlib.Path) -> SearchResult:
    won = reports.winners(state)
    last = won[-1] if won else None
    return SearchResult(
        architecture=from_json(last["architecture"]) if last else None,
        arch_hash=last["hash"] if last else None,
        accuracy=last["accuracy"] if last else None,
        param_bytes=last["param_bytes"] if last else None,
        working_bytes=last["working_bytes"] if last else None,
        total_bytes=last["total_bytes"] if last else None,
        winner_round=last["round"] if last else None,
        stop_reason=state.get("stop_reason"), finished=state["status"] == "finished",
        num_rounds=len(state["rounds"]), num_trained=state["num_trained"],
        workdir=str(workdir),
        winners=tuple({k: w[k] for k in ("round", "hash", "description", "accuracy",
                                          "param_bytes", "working_bytes", "total_bytes",
                                          "reward")} for w in won))
