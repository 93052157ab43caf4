"""User-facing errors.

Anything the user can fix (a typo in a key, a missing folder, a corrupt image) raises
:class:`UserError`. The CLI prints its one-line message and exits with status 2; everything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: printed as one line by the CLI, exit code 2."""


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
