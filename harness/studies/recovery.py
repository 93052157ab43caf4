"""Stale trials: heartbeats of running trials, recovery of those whose worker died, and what a
retried trial takes over from its predecessor (its checkpoint, or its run finished by hand)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from harness.studies.parents import tag_filter
from harness.studies.spec import Entry, StudySpec

#: seconds between heartbeats written into a running trial's user attributes
#: (``DMLBENCH_HEARTBEAT_S`` changes it, e.g. for tests)
HEARTBEAT_S = float(os.environ.get("DMLBENCH_HEARTBEAT_S", "30"))
#: a RUNNING trial whose heartbeat is older than this is considered dead (other hosts)
STALE_AFTER_S = 10 * HEARTBEAT_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(trial: Any, now: float | None = None) -> bool:
    """True when a RUNNING trial's worker is gone: dead pid on this host, or an old heartbeat."""
    now = time.time() if now is None else now
    attrs = trial.user_attrs
    beat = attrs.get("dmlbench.heartbeat")
    if beat is None:
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - started > STALE_AFTER_S
    if attrs.get("dmlbench.host") == socket.gethostname() and not _pid_alive(int(attrs.get("dmlbench.pid", -1))):
        return True
    return now - float(beat) > STALE_AFTER_S


def fail_stale(study: Any) -> list[Any]:
    """Tell FAIL to every RUNNING trial of ``study`` whose worker is gone; returns those trials
    (a trial another process finishes or fails meanwhile is left to it)."""
    import optuna
    from optuna.trial import TrialState

    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue
        failed.append(t)
    return failed


def recover_stale(spec: StudySpec, dataset: str, entry: Entry, study: Any) -> list[int]:
    """Fail the dead RUNNING trials of ``study`` and enqueue their parameters again."""
    failed = []
    for t in fail_stale(study):
        enqueue_retry(study, t)
        fail_mlflow_child(spec, dataset, entry, t.number)
        failed.append(t.number)
    return failed


def enqueue_retry(study: Any, trial: Any) -> None:
    """Queue ``trial``'s parameters again; the retry continues its MLflow run from the checkpoint."""
    retry = {"dmlbench.retry_of": trial.number}
    if trial.user_attrs.get("mlflow_run_id"):
        retry["dmlbench.resume_run"] = trial.user_attrs["mlflow_run_id"]
    study.enqueue_trial(dict(trial.params), user_attrs=retry)


def fail_mlflow_child(spec: StudySpec, dataset: str, entry: Entry, number: int) -> None:
    """A killed trial's MLflow run stays RUNNING forever: mark it FAILED."""
    import mlflow

    mlflow.set_tracking_uri(spec.tracking_uri)
    if mlflow.get_experiment_by_name(spec.experiments[dataset]) is None:
        return
    runs = mlflow.search_runs(
        experiment_names=[spec.experiments[dataset]],
        output_format="list",
        filter_string=tag_filter(spec, dataset, entry, role="trial", **{"dmlbench.trial": str(number)})
        + " and attributes.status = 'RUNNING'",
    )
    for run in runs:
        end_failed(run.info.run_id, "worker process died (stale trial)")


def end_failed(run_id: str, error: str, **tags: str) -> None:
    """End a run left RUNNING by a dead process FAILED, with the reason (and any other tags)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in {"dmlbench.status": "failed", "dmlbench.error": error, **tags}.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, "FAILED")


def _beat(trial: Any) -> None:
    """Seconds since the epoch (what staleness compares) and the same instant for people."""
    now = time.time()
    trial.set_user_attr("dmlbench.heartbeat", now)
    trial.set_user_attr("dmlbench.heartbeat_utc", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)))


@contextmanager
def heartbeat(study: Any, trial: Any, interval: float = HEARTBEAT_S) -> Iterator[None]:
    """Record host/pid and refresh ``dmlbench.heartbeat`` while the trial runs.

    A beat that fails (the database restarting) is tried again at the next interval: the storage
    reconnects. A trial that cannot beat for half of :data:`STALE_AFTER_S` stops at its next safe
    point (``interrupts.check``): by then another process may take it for dead and retry it, and
    it must not train twice."""
    from harness.errors import StoreUnavailable
    from harness.runtime import interrupts

    trial.set_user_attr("dmlbench.host", socket.gethostname())
    trial.set_user_attr("dmlbench.pid", os.getpid())
    _beat(trial)
    stop = threading.Event()

    def beat() -> None:
        last = time.monotonic()
        while not stop.wait(interval):
            try:
                _beat(trial)
                last = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - retried next time; a finished trial stops the loop
                if stop.is_set():
                    return
                if time.monotonic() - last > STALE_AFTER_S / 2:
                    interrupts.abort(
                        StoreUnavailable(
                            f"trial {trial.number} could not record its heartbeat for {time.monotonic() - last:.0f} s "
                            f"({type(exc).__name__}); it stops so that no other worker trains it twice"
                        )
                    )
                    return

    thread = threading.Thread(target=beat, daemon=True, name="dmlbench-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        interrupts.abort(None)


def predecessor(trial: Any) -> Any | None:
    """The MLflow run of the interrupted or dead trial this one retries (``dmlbench.resume_run``)."""
    import mlflow

    run_id = trial.user_attrs.get("dmlbench.resume_run")
    if not run_id:
        return None
    try:
        return mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None


def close_predecessor(trial: Any, successor: str) -> None:
    """A retried trial's predecessor run that cannot be continued (no checkpoint: it died before
    its first epoch, or its MLflow server went away) and is still RUNNING ends FAILED, naming the
    run that replaces it, so no run of a study stays RUNNING for good."""
    run = predecessor(trial)
    if run is None or run.info.status != "RUNNING" or run.info.run_id == successor:
        return
    end_failed(
        run.info.run_id,
        f"interrupted before a checkpoint (worker or MLflow server gone); retried by trial {trial.number} "
        f"as run {successor}",
        **{"dmlbench.successor": successor},
    )


def resumable(trial: Any) -> str | None:
    """The predecessor's run when it left a checkpoint to continue from."""
    import mlflow

    from harness.training.checkpoint import locate

    run = predecessor(trial)
    tag = run.data.tags.get("dmlbench.checkpoint", "") if run is not None else ""
    if not tag or not locate(tag, mlflow.get_tracking_uri()).is_file():
        return None
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    return run.info.run_id


def adopted(spec: StudySpec, study: Any, trial: Any) -> float | None:
    """A retry whose predecessor's run was finished by hand (``train --resume``, as the README
    offers) is that run's result: it is told to Optuna, not trained again. Returns its value."""
    import math

    from optuna.trial import TrialState

    run = predecessor(trial)
    if run is None or run.info.status != "FINISHED" or run.data.tags.get("dmlbench.status") != "finished":
        return None
    value = run.data.metrics.get(spec.metric, float("nan"))
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    trial.set_user_attr("dmlbench.adopted", "finished by hand (train --resume)")
    if not math.isfinite(value):
        study.tell(trial, state=TrialState.FAIL)
        return None
    study.tell(trial, float(value))
    return float(value)
