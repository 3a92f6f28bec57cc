"""What a search leaves in its work directory, a view of its state (`memnas_jax.search.state`).

Every output is a pure function of the search state (`memnas_jax.search.state.SearchState`),
rewritten whole and atomically (temp file + `os.replace`), so a resumed search never duplicates a
line and a killed one never leaves half a file:

* `candidates.jsonl`: one line per trained candidate of each round (`candidate_records`);
* `best.json`: the search's current answer, the last round winner, and the Pareto front of all
  trained candidates (`best_record`); and
  `best_architecture.json`: its `Architecture.to_json()` (for experiments/train_final.py --arch);
* `leaderboard.md`: rounds, top candidates, Pareto front, in markdown (`leaderboard_markdown`);
* `pareto.png`: accuracy vs total memory of every trained candidate, round winners marked and the
  Pareto front drawn; `trajectory.png`: the winner's accuracy and memory per round, as the paper's
  figures (matplotlib, Agg backend);
* `tensorboard/`: the same numbers as TensorBoard scalars (tensorboardX; each point appended once).

Memory figures are bytes in the records and decimal megabytes (1e6 bytes, as the paper's tables)
in the tables and plots. Accuracies are fractions in the records and percent in tables and plots.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from absl import logging

from memnas_jax.io import atomic_write
from memnas_jax.memory import MB
from memnas_jax.plots import pyplot, save_figure

if TYPE_CHECKING:
    from memnas_jax.search.state import SearchState

CANDIDATES_FILE = "candidates.jsonl"
BEST_FILE = "best.json"
BEST_ARCHITECTURE_FILE = "best_architecture.json"  # Architecture.to_json(): train_final.py --arch
LEADERBOARD_FILE = "leaderboard.md"
PARETO_FILE = "pareto.png"
TRAJECTORY_FILE = "trajectory.png"
TENSORBOARD_DIR = "tensorboard"
# Fields of a candidate record that measure time: they differ between two runs of the same search.
TIMING_FIELDS = ("train_seconds", "compile_seconds", "images_per_second")

# The fields of a trained entry copied into its candidates.jsonl record, in order.
_ENTRY_FIELDS = ("hash", "kind", "description", "cells_per_block", "param_count", "param_bytes",
                 "working_bytes", "total_bytes", "working_bytes_paper", "working_bytes_deployed",
                 "status", "accuracy", "reward",
                 "predicted_score", "reused_from_round", "final_val_accuracy", "test_accuracy",
                 "best_val_epoch", "epochs_done", *TIMING_FIELDS, "message", "failure")


def _json(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Records


def candidate_records(state: SearchState) -> list[dict]:
    """One record per trained (round, candidate): the entry's fields plus its round, position in
    the round's training order, the round's base hash and whether it won the round."""
    records = []
    for rnd in state.rounds:
        for index, entry in enumerate(rnd.entries):
            if not entry.trained:
                continue
            fields = entry.to_json()
            record = {"round": rnd.round, "index": index, "mode": rnd.mode,
                      "base_hash": rnd.base.hash if rnd.base else None}
            record.update({k: fields.get(k) for k in _ENTRY_FIELDS})
            record["winner"] = rnd.winner == entry.hash
            record["architecture"] = fields["architecture"]
            records.append(record)
    return records


def winners(state: SearchState) -> list[dict]:
    """The record of every round's winner, with its round, in round order."""
    return [dict(entry.to_json(), round=rnd.round) for rnd, entry in state.winners()]


_ANSWER_FIELDS = ("round", "hash", "kind", "description", "cells_per_block", "accuracy",
                   "reward", "param_count", "param_bytes", "working_bytes", "total_bytes",
                   "test_accuracy", "architecture")


def _answer_fields(record: dict) -> dict:
    return {**{k: record.get(k) for k in _ANSWER_FIELDS}, "total_mb": record["total_bytes"] / MB}


def best_record(state: SearchState, records: list[dict] | None = None) -> dict:
    """The search's answer: the last round winner (the base the next round would grow from), as
    in the paper; and, since with short proxy training an earlier candidate may beat it on both
    axes, the Pareto front (accuracy vs total memory) of every trained candidate, with whether
    the winner is on it. records: `candidate_records(state)`, when the caller has them."""
    won = winners(state)
    front = pareto_records(state, records)
    record = {"status": state.status, "stop_reason": state.stop_reason,
              "rounds_done": sum(r.phase == "done" for r in state.rounds),
              "num_trained": state.num_trained, "config_hash": state.config_hash,
              "best": _answer_fields(won[-1]) if won else None,
              "best_on_pareto_front": (won[-1]["hash"] in {r["hash"] for r in front}
                                       if won else None),
              "pareto_front": [_answer_fields(r) for r in front]}
    return record


def pareto_records(state: SearchState, records: list[dict] | None = None) -> list[dict]:
    """The trained candidates on the accuracy / total-memory Pareto front, by increasing memory
    (an architecture trained in several rounds counts once, with its first result)."""
    unique = _unique_by_hash(_ok(candidate_records(state) if records is None else records))
    return [unique[i] for i in pareto_front([r["accuracy"] for r in unique],
                                            [r["total_bytes"] for r in unique])]


def pareto_front(accuracy: Sequence[float], memory: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (higher accuracy at no more memory, or less
    memory at no lower accuracy), by increasing memory. Equal points: the first is kept."""
    order = sorted(range(len(accuracy)), key=lambda i: (memory[i], -accuracy[i], i))
    front, best = [], -math.inf
    for i in order:
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return front


def _ok(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "ok" and r["accuracy"] is not None]


# ---------------------------------------------------------------------------------------------
# Markdown


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / MB:.3f}"


def _num(x: float | None, fmt: str = "+.4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def leaderboard_markdown(state: SearchState, rows: int = 20,
                         records: list[dict] | None = None) -> str:
    """records: `candidate_records(state)`, when the caller has them."""
    if records is None:
        records = candidate_records(state)
    settings = state.summary
    lines = ["# MemNAS search leaderboard", ""]
    if state.finished:
        lines.append(f"Finished: {state.stop_reason}.")
    else:
        rnd = state.rounds[-1] if state.rounds else None
        lines.append(f"Running: round {rnd.round}, {rnd.num_trained}/{len(rnd.entries)} "
                     "candidates trained." if rnd else "Running: starting.")
    if settings:
        lines += ["", "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()) + "."]
    answer = best_record(state, records)
    best = answer["best"]
    lines += ["", "## Final architecture", ""]
    if best is None:
        lines.append("None yet.")
    else:
        lines += [f"Round {best['round']} winner `{best['hash'][:12]}` ({best['description']}): "
                  f"accuracy {_pct(best['accuracy'])} %, total memory {_mb(best['total_bytes'])} "
                  f"MB (parameters {_mb(best['param_bytes'])} MB, {best['param_count']:,} "
                  f"values; working {_mb(best['working_bytes'])} MB).", "", "```",
                  str(state.winners()[-1][1].architecture), "```"]
        if not answer["best_on_pareto_front"]:
            lines += ["", "It is not on the Pareto front: a candidate below is at least as "
                      "accurate with no more memory (with short proxy training, accuracy "
                      "differences between rounds may be noise)."]

    lines += ["", "## Rounds", ""]
    round_rows = []
    for rnd in state.rounds:
        entries, w = rnd.entries, rnd.winner_entry
        failed = sum(e.status in ("failed", "diverged") for e in entries)
        round_rows.append([
            rnd.round, rnd.mode, rnd.num_generated, rnd.num_over_budget,
            f"{rnd.num_trained}/{len(entries)}", failed,
            f"`{w.hash[:10]}` {w.description}" if w else "-",
            _pct(w.accuracy) if w else "-", _mb(w.param_bytes) if w else "-",
            _mb(w.working_bytes) if w else "-", _mb(w.total_bytes) if w else "-",
            _num(w.reward) if w else "-", _num(rnd.controller_tau, "+.3f")])
    lines += _table(["round", "mode", "generated", "over budget", "trained", "failed/diverged",
                     "winner", "acc %", "params MB", "working MB", "total MB", "reward",
                     "controller tau"], round_rows)

    top = sorted(_ok(records), key=lambda r: (-r["accuracy"], r["total_bytes"], r["round"]))[:rows]
    lines += ["", f"## Top {len(top)} candidates by accuracy", ""]
    lines += _table(["rank", "round", "hash", "kind", "change", "acc %", "total MB",
                     "device arena MB", "reward"],
                    [[i + 1, r["round"], f"`{r['hash'][:10]}`", r["kind"], r["description"],
                      _pct(r["accuracy"]), _mb(r["total_bytes"]),
                      _mb(r["working_bytes_deployed"]) if r.get("working_bytes_deployed")
                      else "-", _num(r["reward"])]
                     for i, r in enumerate(top)])
    front = answer["pareto_front"]
    lines += ["", "## Pareto front (accuracy vs total memory)", ""]
    lines += _table(["round", "hash", "acc %", "params MB", "working MB", "total MB"],
                    [[r["round"], f"`{r['hash'][:10]}`", _pct(r["accuracy"]),
                      _mb(r["param_bytes"]), _mb(r["working_bytes"]), _mb(r["total_bytes"])]
                     for r in front])
    return "\n".join(lines) + "\n"


def _unique_by_hash(records: Sequence[dict]) -> list[dict]:
    """The first record of each architecture (a reused candidate appears in several rounds)."""
    seen, out = set(), []
    for r in records:
        if r["hash"] not in seen:
            seen.add(r["hash"])
            out.append(r)
    return out


# ---------------------------------------------------------------------------------------------
# Plots


def plot_pareto(state: SearchState, path: str | os.PathLike, title: str = "") -> None:
    """Accuracy vs total memory of every trained candidate, coloured by round; each round's
    winner a star labelled with its round; the Pareto front a step line."""
    plt = pyplot()
    records = _unique_by_hash(_ok(candidate_records(state)))
    fig, ax = plt.subplots(figsize=(7, 4.8))
    if records:
        mem = [r["total_bytes"] / MB for r in records]
        acc = [100 * r["accuracy"] for r in records]
        num_rounds = max(r["round"] for r in records) + 1
        points = ax.scatter(mem, acc, c=[r["round"] for r in records], s=14, alpha=0.7,
                            cmap=plt.get_cmap("viridis", num_rounds), vmin=-0.5,
                            vmax=num_rounds - 0.5, label="trained candidates")
        fig.colorbar(points, ax=ax, label="round", ticks=range(num_rounds))
        front = pareto_front(acc, mem)
        ax.step([mem[i] for i in front], [acc[i] for i in front], where="post", color="tab:red",
                lw=1.2, marker="o", ms=13, mfc="none", zorder=3, label="Pareto front")
        won = winners(state)
        ax.plot([w["total_bytes"] / MB for w in won], [100 * w["accuracy"] for w in won], "-*",
                color="black", ms=11, mfc="gold", lw=0.7, label="round winners")
        for w in won:
            ax.annotate(str(w["round"]), (w["total_bytes"] / MB, 100 * w["accuracy"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no trained candidate yet", ha="center", transform=ax.transAxes)
    ax.set_xlabel("total memory (parameters + working), MB")
    ax.set_ylabel("validation accuracy, %")
    ax.set_title(title or "MemNAS candidates: accuracy vs memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_trajectory(state: SearchState, path: str | os.PathLike, title: str = "") -> None:
    """Per round: the winner's accuracy (and the best accuracy trained in the round), and the
    winner's parameter, working and total memory (the paper's acc / imc / npc figures)."""
    plt = pyplot()
    won = winners(state)
    fig, (ax_acc, ax_mem) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    if won:
        rounds = [w["round"] for w in won]
        ax_acc.plot(rounds, [100 * w["accuracy"] for w in won], "o-", label="round winner")
        best = {}
        for r in _ok(candidate_records(state)):
            best[r["round"]] = max(best.get(r["round"], 0.0), 100 * r["accuracy"])
        ax_acc.plot(sorted(best), [best[r] for r in sorted(best)], "x--", color="gray",
                    label="best trained in round")
        ax_acc.legend(fontsize=8)
        for key, label in (("param_bytes", "parameters"), ("working_bytes", "working"),
                           ("total_bytes", "total")):
            ax_mem.plot(rounds, [w[key] / MB for w in won], "o-", label=label)
        ax_mem.legend(fontsize=8)
        ax_mem.set_xticks(rounds)
    ax_acc.set_ylabel("validation accuracy, %")
    ax_acc.set_title(title or "MemNAS search trajectory")
    ax_mem.set_ylabel("memory of the winner, MB")
    ax_mem.set_xlabel("round")
    for ax in (ax_acc, ax_mem):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# TensorBoard


def tensorboard_scalars(state: SearchState) -> list[tuple[str, float, int]]:
    """(tag, value, step) of every scalar: per trained candidate (step = its position in the
    whole search's training order) and per round (step = round)."""
    scalars = []
    for step, record in enumerate(candidate_records(state)):
        if record["status"] == "ok":
            scalars += [("candidate/accuracy", record["accuracy"], step),
                        ("candidate/total_memory_mb", record["total_bytes"] / MB, step)]
            if record["reward"] is not None:
                scalars.append(("candidate/reward", record["reward"], step))
        scalars.append(("candidate/failed", float(record["status"] != "ok"), step))
    for w in winners(state):
        r = w["round"]
        scalars += [("round/winner_accuracy", w["accuracy"], r),
                    ("round/winner_param_mb", w["param_bytes"] / MB, r),
                    ("round/winner_working_mb", w["working_bytes"] / MB, r),
                    ("round/winner_total_mb", w["total_bytes"] / MB, r)]
        if w["reward"] is not None:
            scalars.append(("round/winner_reward", w["reward"], r))
    for rnd in state.rounds:
        scalars.append(("round/num_trained", float(rnd.num_trained), rnd.round))
        for key in ("controller_tau", "controller_holdout_tau"):
            value = getattr(rnd, key)
            if value is not None and math.isfinite(value):
                scalars.append((f"round/{key}", value, rnd.round))
    return scalars


TENSORBOARD_WRITTEN_FILE = "written.json"  # in the TensorBoard folder: (tag, step) written


def write_tensorboard(state: SearchState, logdir: str | os.PathLike) -> bool:
    """Appends to `logdir` the scalars of `tensorboard_scalars(state)` not written before (a
    ledger in `logdir` remembers the (tag, step) pairs written), so TensorBoard, which reads
    every event file of the folder, sees each point once; False (and a warning) when
    tensorboardX is not installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard logs "
                        "(pip install tensorboardX)")
        return False
    logdir = pathlib.Path(logdir)
    ledger = logdir / TENSORBOARD_WRITTEN_FILE
    try:
        written = {tuple(x) for x in json.loads(ledger.read_text())}
    except (OSError, ValueError):
        written = set()
    new = [(tag, value, step) for tag, value, step in tensorboard_scalars(state)
           if (tag, step) not in written]
    if not new:
        return True
    writer = SummaryWriter(str(logdir))
    try:
        for tag, value, step in new:
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()
    written |= {(tag, step) for tag, _, step in new}
    atomic_write(ledger, json.dumps(sorted(written)) + "\n")
    return True


# ---------------------------------------------------------------------------------------------
# Everything


def write_tables(state: SearchState, workdir: str | os.PathLike,
                 leaderboard_rows: int = 20) -> None:
    """candidates.jsonl, best.json and leaderboard.md (cheap: after every trained candidate)."""
    workdir = pathlib.Path(workdir)
    records = candidate_records(state)  # once: every table below reads them
    lines = [json.dumps(r, sort_keys=True, allow_nan=False) for r in records]
    atomic_write(workdir / CANDIDATES_FILE, "".join(line + "\n" for line in lines))
    atomic_write(workdir / BEST_FILE, _json(best_record(state, records)) + "\n")
    won = state.winners()
    if won:
        atomic_write(workdir / BEST_ARCHITECTURE_FILE,
                     won[-1][1].architecture.to_json(indent=1) + "\n")
    atomic_write(workdir / LEADERBOARD_FILE,
                 leaderboard_markdown(state, leaderboard_rows, records))


def write_all(state: SearchState, workdir: str | os.PathLike, *, plots: bool = True,
              tensorboard: bool = True, leaderboard_rows: int = 20) -> None:
    """The tables, and the plots and TensorBoard logs when asked (at round ends). A table that
    cannot be written stops the caller (`io.StorageError`); a plot or TensorBoard log that
    fails is logged and skipped: they are views, and must never stop a search."""
    workdir = pathlib.Path(workdir)
    write_tables(state, workdir, leaderboard_rows)
    views = []
    if plots:
        views += [(plot_pareto, workdir / PARETO_FILE),
                  (plot_trajectory, workdir / TRAJECTORY_FILE)]
    if tensorboard:
        views.append((write_tensorboard, workdir / TENSORBOARD_DIR))
    for render, path in views:
        try:
            render(state, path)
        except Exception as e:  # a view never stops a search
            logging.warning("could not write %s (%s: %s); skipped, the search goes on", path,
                            type(e).__name__, e)


def read_candidates(workdir: str | os.PathLike) -> list[dict]:
    """The records of a work directory's candidates.jsonl."""
    text = (pathlib.Path(workdir) / CANDIDATES_FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


__all__ = [
    "BEST_ARCHITECTURE_FILE", "BEST_FILE", "CANDIDATES_FILE", "LEADERBOARD_FILE", "PARETO_FILE",
    "TENSORBOARD_DIR",
    "TIMING_FIELDS", "TRAJECTORY_FILE", "best_record", "candidate_records",
    "leaderboard_markdown", "pareto_front", "pareto_records", "plot_pareto", "plot_trajectory",
    "pyplot", "read_candidates", "save_figure",
    "tensorboard_scalars", "winners", "write_all", "write_tables",
    "write_tensorboard",
]
