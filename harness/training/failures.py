"""What a run that stops for a reason other than bad input becomes: one line, a distinct exit code,
and the MLflow run left in the state the line says.

- the MLflow server stops answering: :class:`StoreUnavailable` (exit 5); the run shows RUNNING on
  the server and its checkpoint is kept;
- no space left (checkpoint, artifact, store): :class:`DiskFull` (6); the run is FAILED, or
  RUNNING when the store itself is full;
- the training loss is NaN or infinite: :class:`TrainingDiverged` (3); FAILED, tag ``dmlbench.error``;
- Ctrl-C / SIGTERM: :class:`RunInterrupted` (130 / 143); KILLED with the finished epochs' metrics;
- anything else (a bug): itself, with its traceback; FAILED.

Every line ends with the exact command that continues the run from its last checkpoint.
"""

from __future__ import annotations

from typing import NoReturn

from harness.config import RunConfig
from harness.errors import (
    DiskFull,
    RunInterrupted,
    StoreUnavailable,
    TrainingDiverged,
    caused_by_interrupt,
    disk_full,
    interrupt_in,
    server_unreachable,
)
from harness.runtime import interrupts
from harness.tracking import store as tracking


def resume_command(run_id: str, cfg: RunConfig) -> str:
    """The exact command that continues ``run_id`` (with the store when one was given)."""
    uri = cfg.tracking.uri
    return f"dmlbench train --resume {run_id}" + (f" --tracking-uri {uri}" if uri else "")


def raise_one_line(exc: BaseException, run_id: str, cfg: RunConfig, completed: int) -> NoReturn:
    """End the active MLflow run as ``exc`` calls for and raise its one-line failure (the list
    above); ``completed``: the epochs whose metrics and checkpoint were written."""
    import mlflow

    if caused_by_interrupt(exc) and not isinstance(exc, KeyboardInterrupt):
        exc = interrupt_in(exc)  # a clean-up failed under Ctrl-C/SIGTERM: still that interrupt
    where = f"run {run_id} ({cfg.method} on {cfg.dataset})"
    again = resume_command(run_id, cfg)
    if (gone := server_unreachable(exc)) is not None and mlflow.get_tracking_uri().startswith("http"):
        tracking.abandon_active_run()
        raise StoreUnavailable(
            f"the MLflow server {mlflow.get_tracking_uri()} stopped answering ({gone}) in {where}; the run shows "
            f"RUNNING there and its checkpoint is kept: once the server is back, continue it with: {again}"
        ) from None
    full = disk_full(exc)
    try:
        tracking.end_failed_run(exc)
    except Exception as end_exc:  # noqa: BLE001 - a full disk can hold the store too
        if full is None and disk_full(end_exc) is None:
            raise
        raise DiskFull(
            f"no space left on device ({full or disk_full(end_exc)}) in {where}; the store could not "
            f"record it, so the run shows RUNNING: free space, then continue it with: {again}"
        ) from None
    if full is not None:
        raise DiskFull(
            f"no space left on device ({full}) in {where}; nothing partial was kept and the run is "
            f"FAILED: free space, then continue it with: {again}"
        ) from None
    if isinstance(exc, FloatingPointError):
        raise TrainingDiverged(
            f"training diverged: {exc} in {where}; the run is FAILED in MLflow "
            "(tag dmlbench.error); lower optim.lr or set optim.grad_clip"
        ) from exc
    if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted):
        terminated = interrupts.exit_code(exc) == 143
        raise RunInterrupted(
            f"{'terminated (SIGTERM)' if terminated else 'interrupted'} {where} after {completed} completed "
            f"epoch(s); the run is KILLED in MLflow with the metrics of those epochs; continue it with: {again}",
            terminated=terminated,
        ) from None
    raise exc
