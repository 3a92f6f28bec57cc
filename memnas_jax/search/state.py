"""The search state: typed, frozen records (`Entry` in a `Round` in a `SearchState`), their JSON
form, and the state file (atomic, checksummed, the previous copy kept).

The loop never edits a record: it makes a new one (`dataclasses.replace`, `Round.with_entry`,
`SearchState.with_round`) and saves it. The JSON form is `memnas_jax.search_state/v1`, the one
every earlier version wrote, so their work directories resume; a file of another format is
refused with a message that names both formats."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any

from absl import logging

from memnas_jax.encoding import Architecture, from_json
from memnas_jax.errors import UserError
from memnas_jax.io import atomic_write

STATE_FILE = "state.json"
PREV_STATE_FILE = "state.prev.json"
CONFIG_FILE = "config.json"
STATE_FORMAT = "memnas_jax.search_state/v1"

PENDING = "pending"


class StateError(UserError, RuntimeError):
    """The work directory's state files cannot be read."""


# ---------------------------------------------------------------------------------------------
# Records


class _Record:
    def to_json(self) -> dict:
        """The JSON form (v1)."""
        return _json_of(self)


@dataclasses.dataclass(frozen=True)
class Entry(_Record):
    """One candidate of a round: what it is (fixed when the round is planned) and its result
    (the defaults: not trained yet)."""

    hash: str
    kind: str
    description: str
    cells_per_block: tuple[int, ...]
    architecture: Architecture
    param_count: int
    param_bytes: int
    working_bytes: int
    total_bytes: int
    predicted_score: float | None = None  # the controller's, in controller rounds
    # Both memory figures whatever config.memory.convention scores with (the working_bytes
    # above): the paper's liveness peak and TFLite Micro's arena (memory_report). States of
    # earlier versions lack them.
    working_bytes_paper: int | None = None
    working_bytes_deployed: int | None = None
    status: str = PENDING  # pending, ok, failed, diverged
    accuracy: float | None = None  # search.accuracy_metric, when ok
    reward: float | None = None  # against the round's reference
    reused_from_round: int | None = None  # a result copied from an earlier round
    final_val_accuracy: float | None = None
    test_accuracy: float | None = None
    best_val_epoch: int | None = None
    epochs_done: int | None = None
    train_seconds: float | None = None
    compile_seconds: float | None = None
    images_per_second: float | None = None
    message: str = ""
    failure: str | None = None  # why it failed: error, out_of_memory, compile, ...

    @property
    def trained(self) -> bool:
        return self.status != PENDING

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_json(cls, data: dict) -> Entry:
        return _entry(data, "an entry")

    def untrained(self) -> Entry:
        """The entry as it was before it trained."""
        return Entry(**{name: getattr(self, name) for name in _IDENTITY_FIELDS})


_IDENTITY_FIELDS = ("hash", "kind", "description", "cells_per_block", "architecture",
                    "param_count", "param_bytes", "working_bytes", "total_bytes",
                    "predicted_score", "working_bytes_paper", "working_bytes_deployed")
# Entry fields written only when set, so that a state of an earlier version reads and writes
# back unchanged.
_OPTIONAL_ENTRY_FIELDS = ("working_bytes_paper", "working_bytes_deployed")


@dataclasses.dataclass(frozen=True)
class Base(_Record):
    """The network a round grows and trims: the previous round's winner."""

    round: int
    hash: str
    architecture: Architecture
    description: str
    accuracy: float
    param_count: int
    param_bytes: int
    working_bytes: int
    total_bytes: int

    @classmethod
    def of(cls, entry: Entry, round_index: int) -> Base:
        return cls(round=round_index, **{f.name: getattr(entry, f.name)
                                         for f in dataclasses.fields(cls) if f.name != "round"})


@dataclasses.dataclass(frozen=True)
class Reference(_Record):
    """What a round's rewards are relative to: its base, or round 0's medians."""

    accuracy: float
    param_bytes: float
    working_bytes: float
    kind: str


@dataclasses.dataclass(frozen=True)
class Packing(_Record):
    """How a packed round trains (`memnas_jax.packed`)."""

    pack_size: int
    selection: str


@dataclasses.dataclass(frozen=True)
class ControllerFit(_Record):
    num_candidates: int
    steps: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class ControllerRef(_Record):
    """The newest controller fit: its round and its folder, relative to the work directory."""

    round: int
    path: str


@dataclasses.dataclass(frozen=True)
class Round(_Record):
    """One round: its plan (candidates in training order), their results and its outcome."""

    round: int
    base: Base | None  # None in round 0
    mode: str  # full, sampled, controller
    num_generated: int
    num_over_budget: int
    entries: tuple[Entry, ...]
    phase: str = "training"  # training -> selected -> done
    controller_round: int | None = None  # the fit that chose the candidates
    reference: Reference | None = None
    winner: str | None = None  # the winner's hash
    best_reward: float | None = None
    controller_tau: float | None = None  # predicted vs real rewards of the trained candidates
    controller_holdout_tau: float | None = None
    controller_fit: ControllerFit | None = None
    # Decided when the round first trains, so a resume keeps it: None standalone.
    packing: Packing | None = None
    packing_decided: bool = False

    @classmethod
    def from_json(cls, data: dict) -> Round:
        return _round(data)

    def with_entry(self, index: int, entry: Entry) -> Round:
        entries = list(self.entries)
        entries[index] = entry
        return dataclasses.replace(self, entries=tuple(entries))

    @property
    def winner_entry(self) -> Entry | None:
        return next((e for e in self.entries if e.hash == self.winner), None)

    @property
    def num_trained(self) -> int:
        return sum(e.trained for e in self.entries)


@dataclasses.dataclass(frozen=True)
class SearchState(_Record):
    """A whole search, as saved after every trained candidate."""

    config: dict[str, Any]  # the fingerprinted config fields (`config.config_fingerprint`)
    config_hash: str
    status: str = "running"  # running, finished
    stop_reason: str | None = None
    rounds: tuple[Round, ...] = ()
    controller: ControllerRef | None = None
    num_trained: int = 0  # candidates trained (not reused) over all runs
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)  # for the leaderboard
    elapsed_seconds: float = 0.0  # wall time, all runs together
    config_changes: tuple[str, ...] = ()  # one line per resume with a changed config

    @classmethod
    def from_json(cls, data: dict) -> SearchState:
        """The state of a v1 JSON object (ValueError naming the first field that does not
        fit)."""
        return _state(data)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def with_round(self, rnd: Round) -> SearchState:
        """The state with `rnd` replacing the round of its index, or appended after the last."""
        rounds = list(self.rounds)
        if rnd.round == len(rounds):
            rounds.append(rnd)
        else:
            rounds[rnd.round] = rnd
        return dataclasses.replace(self, rounds=tuple(rounds))

    def trained_entries(self) -> list[tuple[Round, Entry]]:
        """(round, entry) of every entry that has a result, in training order."""
        return [(r, e) for r in self.rounds for e in r.entries if e.trained]

    def winners(self) -> list[tuple[Round, Entry]]:
        """(round, winning entry) of every round that has a winner, in round order."""
        return [(r, r.winner_entry) for r in self.rounds if r.winner is not None]


# ---------------------------------------------------------------------------------------------
# JSON


def _json_of(value: Any) -> Any:
    if isinstance(value, Architecture):
        return value.to_dict()
    if isinstance(value, Round):
        out = {f.name: _json_of(getattr(value, f.name)) for f in dataclasses.fields(value)}
        del out["packing_decided"]
        if not value.packing_decided:  # v1: an undecided round has no "packing" key
            del out["packing"]
        return out
    if isinstance(value, SearchState):
        out = {f.name: _json_of(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if not value.config_changes:  # v1: only a state resumed with a changed config has it
            del out["config_changes"]
        return out
    if isinstance(value, Entry):
        return {f.name: _json_of(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in _OPTIONAL_ENTRY_FIELDS or getattr(value, f.name) is not None}
    if dataclasses.is_dataclass(value):
        return {f.name: _json_of(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_json_of(v) for v in value]
    return value


def _fields(cls, data: dict, what: str, **converted) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{what} is {type(data).__name__}, not an object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{what} has unknown fields {unknown}")
    return cls(**{**data, **converted})


def _optional(cls, data: dict | None, what: str):
    return None if data is None else _fields(cls, data, what)


def _entry(data: dict, what: str) -> Entry:
    return _fields(Entry, data, what, architecture=from_json(data["architecture"]),
                   cells_per_block=tuple(data["cells_per_block"]))


def _round(data: dict) -> Round:
    what = f"round {data.get('round')}"
    base = data["base"]
    return _fields(
        Round, data, what,
        base=None if base is None else _fields(Base, base, f"{what} base",
                                               architecture=from_json(base["architecture"])),
        entries=tuple(_entry(e, f"{what} entry {i}") for i, e in enumerate(data["entries"])),
        reference=_optional(Reference, data.get("reference"), f"{what} reference"),
        controller_fit=_optional(ControllerFit, data.get("controller_fit"),
                                 f"{what} controller_fit"),
        packing=_optional(Packing, data.get("packing"), f"{what} packing"),
        packing_decided="packing" in data)


def _state(data: dict) -> SearchState:
    return _fields(SearchState, data, "the state",
                   rounds=tuple(_round(r) for r in data["rounds"]),
                   controller=_optional(ControllerRef, data.get("controller"), "controller"),
                   config_changes=tuple(data.get("config_changes", ())))


# ---------------------------------------------------------------------------------------------
# The state file


def _dump_state(state: SearchState) -> str:
    body = state.to_json()
    text = json.dumps(body, sort_keys=True, allow_nan=False)
    checksum = hashlib.sha256(text.encode()).hexdigest()
    return json.dumps({"format": STATE_FORMAT, "sha256": checksum, "state": body},
                      sort_keys=True, allow_nan=False)


class _OtherFormat(ValueError):
    pass


def _parse_state(text: str) -> SearchState:
    outer = json.loads(text)
    found = outer.get("format") if isinstance(outer, dict) else None
    if found != STATE_FORMAT:
        raise _OtherFormat(f"its format is {found!r}; this memnas_jax reads {STATE_FORMAT!r}")
    body = json.dumps(outer["state"], sort_keys=True, allow_nan=False)
    if hashlib.sha256(body.encode()).hexdigest() != outer.get("sha256"):
        raise ValueError("checksum mismatch")
    return SearchState.from_json(outer["state"])


def save_state(state: SearchState, workdir: pathlib.Path) -> None:
    """Writes state.json atomically, keeping the previous good copy as state.prev.json: a kill
    at any moment leaves at least one of the two complete (a missing state.json falls back to
    state.prev.json)."""
    atomic_write(workdir / STATE_FILE, _dump_state(state), previous=workdir / PREV_STATE_FILE)


def load_state(workdir: pathlib.Path) -> SearchState | None:
    """The newest readable state of `workdir` (None for a new search). A corrupt state.json is
    reported and state.prev.json used; if neither is readable, StateError. A state of another
    format is never read: StateError names both formats."""
    problems = []
    for name in (STATE_FILE, PREV_STATE_FILE):
        path = pathlib.Path(workdir) / name
        if not path.exists():
            continue
        try:
            state = _parse_state(path.read_text(encoding="utf-8"))
        except _OtherFormat as e:
            raise StateError(f"cannot resume from {path}: {e}. Run the memnas_jax version "
                             "that wrote it, or use another --workdir.") from None
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


# ---------------------------------------------------------------------------------------------
# The answer


@dataclasses.dataclass(frozen=True)
class Winner:
    """A round's winner, as the answer lists it."""

    round: int
    hash: str
    description: str
    accuracy: float
    param_bytes: int
    working_bytes: int
    total_bytes: int
    reward: float | None


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
    winners: tuple[Winner, ...]


def search_result(state: SearchState, workdir: pathlib.Path) -> SearchResult:
    round_winners = state.winners()
    won = tuple(Winner(round=r.round, hash=e.hash, description=e.description,
                       accuracy=e.accuracy, param_bytes=e.param_bytes,
                       working_bytes=e.working_bytes, total_bytes=e.total_bytes,
                       reward=e.reward) for r, e in round_winners)
    last = round_winners[-1][1] if won else None
    return SearchResult(
        architecture=last.architecture if last else None,
        arch_hash=last.hash if last else None,
        accuracy=last.accuracy if last else None,
        param_bytes=last.param_bytes if last else None,
        working_bytes=last.working_bytes if last else None,
        total_bytes=last.total_bytes if last else None,
        winner_round=won[-1].round if won else None,
        stop_reason=state.stop_reason, finished=state.finished,
        num_rounds=len(state.rounds), num_trained=state.num_trained,
        workdir=str(workdir), winners=won)
