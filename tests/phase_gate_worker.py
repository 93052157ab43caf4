"""The spawned worker of the phase-gate test, in a module of its own: a spawned process imports the
module its target lives in, and this one needs nothing but the gate (a test module would bring
torch, mlflow and optuna into each child: 5 s of imports per process on 2 cores)."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def gate_worker(out: str, worker: int, fail: bool, gate) -> None:
    """Worker 1 is late (or fails) before the gate; each writes whether it passed and when."""
    if worker == 1:
        time.sleep(1.0)
        if fail:
            sys.exit(3)
    arrived = time.time()
    passed = gate.arrive_and_wait()
    Path(out, str(worker)).write_text(f"{passed} {arrived} {time.time()}")
