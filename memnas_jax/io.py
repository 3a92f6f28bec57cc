"""Writing files safely: `atomic_write(path, data)`, the project's one way to write a file that a
kill, a crash or a full disk must never leave half-written. A write that fails (a full or
read-only disk, an I/O error) leaves the previous file as it was and raises `StorageError`, whose
message names the path: the search stops there and the same command resumes it."""

from __future__ import annotations

import os
import pathlib
import tempfile

from memnas_jax.errors import UserError


class StorageError(UserError, OSError):
    """A file could not be written; the previous copy is intact."""


def atomic_write(path: str | os.PathLike, data: str | bytes, *,
                 previous: str | os.PathLike | None = None) -> None:
    """Writes `data` (str, as UTF-8, or bytes) to `path` through a temp file in the same folder,
    fsync and `os.replace`: the file is the old one or the new one, never a mix. `previous`:
    first move the current file there, so that the last good copy survives a torn new one
    (readers fall back to it)."""
    path = pathlib.Path(path)
    if not isinstance(data, (str, bytes)):
        raise TypeError(f"atomic_write takes str or bytes, got {type(data).__name__}")
    try:
        _write(path, data, previous)
    except OSError as e:
        raise StorageError(
            f"cannot write {path} ({e.strerror or e}); the previous copy is intact. Free space "
            "or fix the filesystem, then run the same command again to resume") from None


def _write(path: pathlib.Path, data: str | bytes, previous: str | os.PathLike | None) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with (os.fdopen(fd, "wb") if isinstance(data, bytes)
              else os.fdopen(fd, "w", encoding="utf-8")) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


__all__ = ["StorageError", "atomic_write"]
