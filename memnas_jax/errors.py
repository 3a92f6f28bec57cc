"""`UserError`: a mistake in what was asked (a config value, a work directory, a missing dataset,
an invalid architecture file) rather than a bug. The experiment mains print its message alone,
without a traceback, and exit with status 2; anything else keeps its traceback."""

import sys
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Raised for something the user can fix; the message says what and how."""


class ConfigError(UserError, ValueError):
    """A config value no search could run with; the message names the field."""


class WorkdirError(UserError, OSError):
    """The work directory cannot be created or written."""


EXIT_USER_ERROR = 2


def exit_on_user_error(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs), except that a `UserError` ends the process: its message on stderr,
    no traceback, exit status `EXIT_USER_ERROR`. For the experiment mains."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        sys.exit(EXIT_USER_ERROR)


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, cut to `limit` characters (for one-line records)."""
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:limit]


__all__ = ["EXIT_USER_ERROR", "ConfigError", "UserError", "WorkdirError", "exit_on_user_error",
           "first_line"]
