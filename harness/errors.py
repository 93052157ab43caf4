"""User-facing errors.

Anything the user can fix (a typo in a key, a missing folder, a corrupt image) raises
:class:`UserError`: the CLI prints its one-line message and exits with status 2. Failures while
running are :class:`RunFailure` subclasses with their own exit codes (3 diverged, 4 study
aborted) and :class:`RunInterrupted` (Ctrl-C, exit 130); anything else is a bug and keeps its
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


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the MLflow run was ended KILLED; the message says what was saved."""


def closest(value: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the nearest choice, or an empty string."""
    match = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown(kind: str, value: str, choices: Iterable[str]) -> UserError:
    """Build the standard 'unknown X' error naming the bad value and the valid choices."""
    choices = sorted(choices)
    return UserError(
        f"unknown {kind} '{value}'{closest(value, choices)}; valid: {', '.join(choices)}"
    )


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
