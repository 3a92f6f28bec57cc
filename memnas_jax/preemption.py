"""Graceful preemption: SIGTERM (a cluster's notice) or Ctrl-C asks the search to stop at the next
safe point instead of dying mid-write.

`install(grace_seconds)` (the experiment mains call it) handles both signals: the first one sets
a flag that the training loop reads after every step (`check()` raises `Preempted`). The search
then leaves the candidate in flight pending (its last epoch checkpoint stays, with
`search.candidate_checkpoints`), saves its state and exits with `EXIT_PREEMPTED`, logging the
command that resumes it; the resumed search gives exactly the records of an uninterrupted one. If
that takes longer than the grace period (a long compile), the process exits at the deadline with
the same status: the files on disk are whole either way (`memnas_jax.io`). A second Ctrl-C exits
at once.

Multi-process jobs: every process gets the signal and stops at its own next step; a process
left waiting at a collective is ended by the grace deadline.
"""

from __future__ import annotations

import os
import signal
import threading

from absl import logging

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, safe to rerun (e.g. SLURM --requeue)
DEFAULT_GRACE_SECONDS = 20.0

_requested = threading.Event()


class Preempted(BaseException):  # noqa: N818  (not an error: nothing may catch it as one)
    """Raised at a safe point after a stop was requested; a BaseException, so that the
    "a candidate's failure is recorded" handlers let it through."""


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """Raises `Preempted` when a stop was requested (cheap: call it after every step)."""
    if _requested.is_set():
        raise Preempted()


def request(reason: str = "stop requested", grace_seconds: float = DEFAULT_GRACE_SECONDS
            ) -> None:
    """What the signal handler does; also for tests and embedding code."""
    if _requested.is_set():
        return
    _requested.set()
    logging.warning("%s: stopping after the current training step (within %g s); the same "
                    "command resumes the search", reason, grace_seconds)
    timer = threading.Timer(grace_seconds, _deadline, args=(grace_seconds,))
    timer.daemon = True
    timer.start()


def _deadline(grace_seconds: float) -> None:
    logging.warning("not stopped within the %g s grace period: exiting now (the state on disk "
                    "is whole; the candidate in flight will train again)", grace_seconds)
    logging.flush()
    os._exit(EXIT_PREEMPTED)


def install(grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
    """Handles SIGTERM and SIGINT in this (main) thread's process as described above."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        if _requested.is_set():
            if signum == signal.SIGINT:
                logging.warning("second %s: exiting at once", name)
                logging.flush()
                os._exit(128 + signum)
            return
        request(f"{name} received", grace_seconds)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def reset() -> None:
    """Forgets a request (tests)."""
    _requested.clear()


__all__ = ["DEFAULT_GRACE_SECONDS", "EXIT_PREEMPTED", "Preempted", "check", "install", "request",
           "requested", "reset"]
