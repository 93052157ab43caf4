"""User-facing errors.

Anything the user can fix (a typo in a key, a missing folder, a corrupt image) raises
:class:`UserError`: the CLI prints its one-line message and exits with status 2. Failures while
running are :class:`RunFailure` subclasses with their own exit codes (3 diverged, 4 study
aborted, 5 a server or storage went away, 6 no space left, 7 a study ended with failed work) and
:class:`RunInterrupted` (Ctrl-C exit 130, SIGTERM exit 143); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2."""


class RunFailure(Exception):
    """A run or study that failed while running (not bad input): one line, a distinct exit code."""

    exit_code = 1


class TrainingDiverged(RunFailure):
    """The training loss became NaN or infinite; the MLflow run is ended FAILED."""

    exit_code = 3


class StudyAborted(RunFailure):
    """A study gave up on an entry after repeated failed trials."""

    exit_code = 4


class StoreUnavailable(RunFailure):
    """The MLflow server or the Optuna storage stopped answering while running (retries spent)."""

    exit_code = 5


class DiskFull(RunFailure):
    """No space left while writing a checkpoint, an artifact or the store; nothing partial is left."""

    exit_code = 6


class StudyIncomplete(RunFailure):
    """A study ended with failed trials or seeds that a rerun retries."""

    exit_code = 7


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run: the MLflow run was ended KILLED; the message says what was
    saved and how to continue. ``terminated``: it was SIGTERM (exit code 143, not 130)."""

    def __init__(self, message: str = "", terminated: bool = False) -> None:
        super().__init__(message)
        self.terminated = terminated


def closest(value: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the nearest choice, or an empty string."""
    match = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown(kind: str, value: str, choices: Iterable[str]) -> UserError:
    """Build the standard 'unknown X' error naming the bad value and the valid choices."""
    choices = sorted(choices)
    return UserError(f"unknown {kind} '{value}'{closest(value, choices)}; valid: {', '.join(choices)}")


def caused_by_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` arose while handling a Ctrl-C: a clean-up that fails (a storage lock
    released twice, say) must not turn an interrupt into an ordinary error that is carried on past."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def interrupt_in(exc: BaseException) -> KeyboardInterrupt:
    """The KeyboardInterrupt (or SIGTERM's subclass) in ``exc``'s chain, else a plain one."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return KeyboardInterrupt()


def disk_full(exc: BaseException) -> str | None:
    """The no-space-left error in ``exc``'s chain as text, or None (OSError ENOSPC, SQLite's
    "database or disk is full", torch's "file write failed" of a full disk)."""
    import errno

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        text = str(exc)
        if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
            s in text for s in ("No space left", "database or disk is full", "file write failed")
        ):
            return (text.strip().splitlines() or [type(exc).__name__])[0][:200]
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def server_unreachable(exc: BaseException) -> str | None:
    """The unreachable-server error in ``exc``'s chain as text (an MLflow tracking server that
    stopped answering: refused connections or exhausted retries), or None."""
    markers = (
        "Max retries exceeded",
        "Connection refused",
        "ConnectionError",
        "Failed to establish a new connection",
        "RemoteDisconnected",
        "Read timed out",
    )
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        text = str(exc)
        if any(m in text for m in markers) or type(exc).__name__ in ("ConnectionError", "MaxRetryError"):
            return (text.strip().splitlines() or [type(exc).__name__])[0][:200]
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def message_line(exc: UserError) -> str:
    """A UserError's message on one line; a DataLoader worker wraps it in a traceback: take the original."""
    lines = str(exc).splitlines()
    for line in reversed(lines):
        if line.startswith("harness.errors.UserError: "):
            return line.removeprefix("harness.errors.UserError: ")
    return lines[0] if lines else type(exc).__name__
