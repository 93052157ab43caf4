"""Study worker processes: started by spawn, each pinned to its share of cores, each ending in one
line and an exit code whatever stops it, and stopped together on Ctrl-C or SIGTERM."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from harness.errors import DiskFull, RunFailure, RunInterrupted, StoreUnavailable, StudyAborted, UserError
from harness.runtime import interrupts


@contextmanager
def one_line_exit(who: str) -> Iterator[None]:
    """Ctrl-C reaches every worker of the terminal's process group, SIGTERM comes from the parent
    (or Slurm): each worker stops at its next safe point (:mod:`harness.runtime.interrupts`), ends its
    run KILLED and its trial FAIL (in the loop and :func:`run_trial`), then says so in one line
    and exits 130 (143 for SIGTERM), instead of multiprocessing's traceback. A worker whose parent
    dies, however, gets SIGTERM from the kernel: none trains on as an orphan."""
    interrupts.defer_signals()
    parent = multiprocessing.parent_process()
    if parent is not None:
        interrupts.die_with_parent(parent.pid)
    try:
        yield
    except (UserError, RunFailure) as exc:  # one line and the error's exit code, not a traceback
        print(f"dmlbench: error: {who} (pid {os.getpid()}): {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code if isinstance(exc, RunFailure) else 2)
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if interrupts.exit_code(exc) == 143 else "interrupted"
        print(
            f"dmlbench: {who} (pid {os.getpid()}): {str(exc) or what + ' before a run started'}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(interrupts.exit_code(exc))


def share_cores(workers: int) -> None:
    """N worker processes on one machine split its cores (oversubscribed threads spin and crawl)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


class PhaseGate:
    """Where the workers of one spawn meet between two phases (tuning, then reproductions): each
    waits there until all have arrived, so no reproduction starts while another worker's trial
    still runs. One spawn for both phases, not one per phase, saves each worker's start (imports,
    spec, storage: 8 to 16 s of a 10-minute demo on 2 cores). A worker that fails closes the gate
    (:func:`spawn` sees its exit code): the others stop there, as a failed tuning worker stopped
    the study before its reproductions when each phase had its own processes."""

    def __init__(self, ctx: Any, workers: int) -> None:
        self.workers = workers
        self.arrived = ctx.Value("i", 0)
        self.closed = ctx.Event()

    def arrive_and_wait(self) -> bool:
        """True once every worker has arrived, False if the gate was closed first."""
        with self.arrived.get_lock():
            self.arrived.value += 1
        while self.arrived.value < self.workers:
            if self.closed.is_set():
                return False
            interrupts.check()  # Ctrl-C or SIGTERM while waiting: the one-line exit of the worker
            time.sleep(0.05)
        return not self.closed.is_set()


def spawn(target: Callable, args_of: Callable[[int], tuple], workers: int, role: str, *, phased: bool = False) -> None:
    """``workers`` spawned processes, process ``w`` running ``target(*args_of(w))`` (with a
    :class:`PhaseGate` shared by all as the last argument if ``phased``); a failed one fails the
    study."""
    ctx = multiprocessing.get_context("spawn")
    gate = PhaseGate(ctx, workers) if phased else None
    extra = (gate,) if phased else ()
    procs = [
        ctx.Process(target=target, args=(*args_of(w), *extra), name=f"dmlbench-{role}-{w}") for w in range(workers)
    ]
    for p in procs:
        p.start()
    stopping: str | None = None
    deadline = 0.0
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=0.2)
            if gate is not None and any(p.exitcode not in (None, 0) for p in procs):
                gate.closed.set()
            if stopping is None and (stopping := interrupts.requested()):
                if stopping == "SIGTERM":  # Ctrl-C reached the children already; SIGTERM is passed on
                    for p in procs:
                        if p.is_alive():
                            os.kill(p.pid, signal.SIGTERM)
                deadline = time.monotonic() + 60
            if stopping and time.monotonic() > deadline:
                break
    except KeyboardInterrupt as exc:  # a second Ctrl-C: stop now
        stopping = "SIGTERM" if interrupts.exit_code(exc) == 143 else "SIGINT"
    if stopping:
        stuck = [p for p in procs if p.is_alive()]
        for p in stuck:  # a worker that ignores the signal: its trial is recovered on the next run
            p.terminate()
            p.join(timeout=10)
        terminated = stopping == "SIGTERM"
        raise RunInterrupted(
            ("terminated (SIGTERM)" if terminated else "interrupted")
            + f": {len(procs)} {role} process(es) stopped"
            + (f", {len(stuck)} of them killed" if stuck else "")
            + "; their runs are KILLED in MLflow and their trials FAIL in Optuna; the same `study run` "
            "continues the study (interrupted trials are retried from their checkpoints)",
            terminated=terminated,
        ) from None
    bad = [f"{p.name} exit code {p.exitcode}" for p in procs if p.exitcode != 0]
    for failure in (DiskFull, StoreUnavailable):  # a worker's own one-line error says what
        if any(p.exitcode == failure.exit_code for p in procs):
            raise failure(
                f"study worker processes stopped: {'; '.join(bad)} (their lines are above); the same "
                "`study run` continues the study once that is fixed"
            )
    if bad:
        raise StudyAborted("study worker processes failed: " + "; ".join(bad) + " (their output is above)")
