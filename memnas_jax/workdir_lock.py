"""One owner per work directory: an advisory lock (`fcntl.flock` on `<workdir>/.lock`) held by the
process that writes there (process 0 of a job) for as long as it runs.

A second search or final training on the same directory is refused at once, with the holder's
host, PID and start time (written into the lock file). The kernel drops the lock when its holder
exits, however it exits, so a crash or SIGKILL leaves no stale lock: the next run simply takes it.
On a filesystem without flock support (some Lustre or old NFS mounts), the lock is skipped with a
warning: keep to one process per work directory by hand there.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket

from absl import logging

from memnas_jax.errors import UserError, WorkdirError

LOCK_FILE = ".lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirLockedError(UserError, RuntimeError):
    """Another live process owns the work directory."""


class WorkdirLock:
    """`with WorkdirLock(workdir, "search"):` owns `workdir` for the block (re-entrant per
    instance is not needed: one per run)."""

    def __init__(self, workdir: str | os.PathLike, what: str = "search"):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self.what = what
        self._file = None

    def acquire(self) -> None:
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise WorkdirLockedError(
                f"{self.path.parent} is in use by another {holder}. Wait for it to finish, stop "
                "it, or give this run another --workdir (the lock goes away by itself when its "
                "holder exits, even by a crash).") from None
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                f.close()
                raise
            logging.warning("%s: this filesystem does not support flock (%s); running without "
                            "the work-directory lock: make sure no other process uses it",
                            self.path, e.strerror)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                            "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            finally:
                self._file.close()
                self._file = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def prepare_workdir(workdir: str | os.PathLike) -> pathlib.Path:
    """Creates `workdir` and checks that it can be written; else a WorkdirError that says so."""
    workdir = pathlib.Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"cannot write the work directory {workdir} ({e.strerror or e}); "
                           "choose another --workdir") from None
    return workdir


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"{h['what']}: host {h['host']}, PID {h['pid']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "process (its details are unreadable)"


__all__ = ["LOCK_FILE", "WorkdirLock", "WorkdirLockedError", "prepare_workdir"]
