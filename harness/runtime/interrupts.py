"""Ctrl-C and SIGTERM: stop at a safe point, end the run KILLED, say so in one line.

SIGTERM is what ``kill``, Slurm's pre-emption and job time limits send; it is handled exactly
like Ctrl-C, with its own exit code (143 = 128 + 15) instead of 130.

A terminal's Ctrl-C reaches every process of its group. Raised wherever the signal lands, a
KeyboardInterrupt can hit a garbage-collection callback (Python prints "Exception ignored") or a
storage lock's clean-up (which turns it into another error), and a worker then trains on. In a
study worker the first signal therefore only sets a flag; the training loop checks it after every
optimiser step and evaluation batch (an ``Event.is_set``: no host sync), the study loops before
every trial and seed. A second signal interrupts at once. ``dmlbench train`` (one process, one
run) interrupts at once.

:func:`die_with_parent` makes a worker process receive SIGTERM when its parent dies, however the
parent died (``kill -9`` included), so no worker trains on as an orphan.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_requested = threading.Event()
_signal_name = ["SIGINT"]
_first_at = [0.0]
#: a repeat within this many seconds is the same request delivered twice (Slurm signals the whole
#: job step and the parent passes SIGTERM on), not a second, impatient Ctrl-C
REPEAT_WINDOW_S = 2.0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so every clean-up path runs."""


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated("terminated (SIGTERM)") if signum == signal.SIGTERM else KeyboardInterrupt()


def defer_signals() -> None:
    """SIGINT and SIGTERM set the flag checked at safe points (call in a worker's main thread)."""

    def handler(signum: int, frame: Any) -> None:
        if _requested.is_set():
            if time.monotonic() - _first_at[0] > REPEAT_WINDOW_S:
                raise _interrupt(signum)
            return
        _signal_name[0] = signal.Signals(signum).name
        _first_at[0] = time.monotonic()
        _requested.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def requested() -> str | None:
    """The signal waiting for the next safe point ("SIGINT" or "SIGTERM"), or None."""
    return _signal_name[0] if _requested.is_set() else None


def terminate_like_interrupt() -> None:
    """``dmlbench train`` (one process, one run): SIGINT and SIGTERM raise at once (KeyboardInterrupt,
    or :class:`Terminated`) and also set the flag :func:`check` reads. A KeyboardInterrupt raised
    where it lands can be swallowed there (a library's clean-up or a garbage-collection callback
    catching it: "Exception ignored"), and the run trained on after Ctrl-C (CI saw it once); the
    flag raises it again at the next optimiser step or evaluation batch."""

    def handler(signum: int, frame: Any) -> None:
        _signal_name[0] = signal.Signals(signum).name
        _requested.set()
        raise _interrupt(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def reset() -> None:
    """Forget a signal already acted on (a command run in-process, as the tests do, ends here)."""
    _requested.clear()


_abort: list[BaseException | None] = [None]


def abort(exc: BaseException | None) -> None:
    """Make the next :func:`check` raise ``exc`` (another thread's reason to stop the run, e.g. a
    trial that lost its heartbeat); None clears it."""
    _abort[0] = exc


def check() -> None:
    """Raise (KeyboardInterrupt, or Terminated for SIGTERM) if a signal arrived since
    :func:`defer_signals`, or the reason given to :func:`abort`."""
    if _abort[0] is not None:
        exc, _abort[0] = _abort[0], None
        raise exc
    if _requested.is_set():
        raise _interrupt(signal.SIGTERM if _signal_name[0] == "SIGTERM" else signal.SIGINT)


@contextmanager
def held() -> Iterator[None]:
    """A signal arriving inside the block acts when it ends, through the handler it would have met
    (raise at once in ``dmlbench train``, set the flag in a study worker): an epoch's metrics and its
    checkpoint land together, so a logged epoch can always be resumed after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    pending: list[int] = []
    for s in previous:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pending and callable(previous[pending[0]]):
        previous[pending[0]](pending[0], None)


def exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM (the shell's 128 + signal number)."""
    return 143 if isinstance(exc, Terminated) or getattr(exc, "terminated", False) else 130


def die_with_parent(parent: int) -> None:
    """Linux: ask the kernel to send this process SIGTERM when its parent (pid ``parent``) dies
    (prctl PR_SET_PDEATHSIG); if the parent is already gone, act on it now."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
