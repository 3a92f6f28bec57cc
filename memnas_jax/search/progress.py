"""How a search reports progress: the progress bar and the log lines of candidates and rounds."""

from __future__ import annotations

from absl import logging

from memnas_jax.memory import MB
from memnas_jax.search.state import Entry, Round


def duration_text(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_bar(total: int, initial: int, description: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=description, unit="candidate",
                disable=not enabled, dynamic_ncols=True)


def log_entry(rnd: Round, index: int, entry: Entry) -> None:
    where = f"round {rnd.round} [{index + 1}/{len(rnd.entries)}] {entry.hash[:10]}"
    if not entry.ok:
        logging.warning("%s %s: %s (%s)", where, entry.description, entry.status.upper(),
                        entry.message)
        return
    reward = "" if entry.reward is None else f", reward {entry.reward:+.4f}"
    reused = ("" if entry.reused_from_round is None
              else f", reused from round {entry.reused_from_round}")
    logging.info("%s %s: accuracy %.2f %%, memory %.3f MB (params %.3f + working %.3f)%s, "
                 "%.1f s%s", where, entry.description, 100 * entry.accuracy,
                 entry.total_bytes / MB, entry.param_bytes / MB,
                 entry.working_bytes / MB, reward, entry.train_seconds, reused)


def log_round(rnd: Round) -> None:
    w = rnd.winner_entry
    if w is None:
        logging.info("round %d: no winner (best reward %s)", rnd.round, rnd.best_reward)
        return
    tau = rnd.controller_tau
    logging.info("round %d winner %s %s: accuracy %.2f %%, memory %.3f MB, reward %+.4f%s",
                 rnd.round, w.hash[:10], w.description, 100 * w.accuracy,
                 w.total_bytes / MB, w.reward,
                 "" if tau is None else f"; controller Kendall tau on the trained top-K "
                 f"{tau:+.3f}")
