"""Ctrl-C at safe points, for study worker processes.

A terminal's Ctrl-C reaches every process of its group. Raised wherever the signal lands, a
KeyboardInterrupt can hit a garbage-collection callback (Python prints "Exception ignored" and
carries on) or a storage lock's clean-up (which turns it into another error), and a worker then
trains on. In a worker the first Ctrl-C therefore only sets a flag; the training loop checks it
after every optimiser step and evaluation batch (an ``Event.is_set``: no host sync), the study
loops before every trial and seed. A second Ctrl-C interrupts at once.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

_requested = threading.Event()


def defer_sigint() -> None:
    """Install the flag-setting SIGINT handler (call in the main thread of a worker process)."""

    def handler(signum: int, frame: Any) -> None:
        if _requested.is_set():
            raise KeyboardInterrupt
        _requested.set()

    signal.signal(signal.SIGINT, handler)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed since :func:`defer_sigint`."""
    if _requested.is_set():
        raise KeyboardInterrupt
