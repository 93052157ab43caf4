"""Running a study: tuning workers (ask/tell against the shared storage), then reproductions.

The spec format and the resume/worker model are described in :mod:`harness.studies`.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.core import interrupts
from harness.errors import RunInterrupted, StudyAborted, UserError, caused_by_interrupt
from harness.studies.parents import base_tags, inside_parent, parent_run, tag_filter
from harness.studies.placement import parse_devices, place
from harness.studies.recovery import enqueue_retry, heartbeat, recover_stale
from harness.studies.reproductions import open_reproductions, recover_seeds, run_seeds
from harness.studies.rollup import rollup
from harness.studies.spec import Entry, StudySpec, distributions, load_spec
from harness.studies.storage import budget_of, open_storage, open_study, storage_url

#: a worker gives up on an entry after this many failed trials in a row (a bug, not bad luck)
MAX_CONSECUTIVE_FAILURES = 3



TrainFn = Callable[..., Any]


def _train_fn() -> TrainFn:
    from harness.core.loop import train

    return train


def trial_counts(study: Any) -> dict[str, int]:
    from optuna.trial import TrialState

    out = {s: 0 for s in ("complete", "pruned", "failed", "running", "waiting")}
    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
             TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("dmlbench.surplus"):
            continue
        out[names[t.state]] += 1
    return out


def run_trial(spec: StudySpec, dataset: str, entry: Entry, study: Any, trial: Any, parent_id: str,
              train: TrainFn) -> str:
    """Train one trial under the parent run; tell Optuna the outcome ('complete'|'pruned'|'failed')."""
    import mlflow
    import optuna
    from optuna.trial import TrialState

    try:
        cfg = spec.resolve(dataset, entry, dict(trial.params))
    except UserError:
        study.tell(trial, state=TrialState.FAIL)
        raise
    cfg.tracking.run_name = f"{entry.name}-trial{trial.number}"
    cfg.eval.test = False  # tuning selects on validation classes only; test is for reproductions
    keep_all = cfg.tracking.trial_weights  # else only the best trial keeps its weights (keep_best_weights)
    tags = {**base_tags(spec, dataset, entry, "trial"), "dmlbench.trial": str(trial.number),
            "dmlbench.optuna_study": study.study_name, "dmlbench.seed": str(cfg.seed)}

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        active = mlflow.active_run()
        if active is not None and "mlflow_run_id" not in trial.user_attrs:
            trial.set_user_attr("mlflow_run_id", active.info.run_id)
        value = metrics.get(spec.epoch_metric)
        if value is not None and math.isfinite(value):
            trial.report(float(value), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} ({spec.epoch_metric}={value:.4f})")

    started = time.monotonic()
    try:
        with heartbeat(study, trial), inside_parent(spec, parent_id):
            result = train(cfg, on_epoch=on_epoch, tags=tags, nested=True, resume=resumable(trial))
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        progress(f"{study.study_name} trial {trial.number}: pruned ({time.monotonic() - started:.0f} s)")
        return "pruned"
    except UserError:  # bad input: the trial must not stay RUNNING
        study.tell(trial, state=TrialState.FAIL)
        raise
    except KeyboardInterrupt:
        _fail_interrupted(study, trial)
        raise
    except Exception as exc:  # noqa: BLE001 - a diverging trial must not end the study
        if caused_by_interrupt(exc):
            _fail_interrupted(study, trial)
            raise KeyboardInterrupt(f"trial {trial.number} of {study.study_name} interrupted") from None
        trial.set_user_attr("dmlbench.error", f"{type(exc).__name__}: {exc}"[:300])
        study.tell(trial, state=TrialState.FAIL)
        warnings.warn(f"trial {trial.number} of {study.study_name} failed: {type(exc).__name__}: {exc}", stacklevel=2)
        return "failed"
    trial.set_user_attr("mlflow_run_id", result.run_id)
    trial.set_user_attr("dmlbench.train_images", int(result.metrics.get("cost/train_images", 0)))
    for key, metric in result.metrics.items():  # optuna-dashboard shows the other validation metrics
        if key.startswith("best/") and math.isfinite(metric):
            trial.set_user_attr(key, metric)
    value = result.metrics.get(spec.metric, float("nan"))
    if not math.isfinite(value):
        study.tell(trial, state=TrialState.FAIL)
        return "failed"
    study.tell(trial, float(value))
    if not keep_all:
        keep_best_weights(study)
    progress(f"{study.study_name} trial {trial.number}: {spec.metric} {value:.4f} ({time.monotonic() - started:.0f} s)")
    return "complete"


def keep_best_weights(study: Any) -> None:
    """Every trial uploads its trainable weights; only the best completed trial's stay (a ViT study
    would otherwise store gigabytes of trials). Runs whose weights were removed say so in a tag."""
    from mlflow.store.artifact.artifact_repository_registry import (
        get_artifact_repository,
    )
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    best = study.best_trial.number
    client = MlflowClient()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if t.number == best or not run_id:
            continue
        run = client.get_run(run_id)
        if run.data.tags.get("dmlbench.weights", "").startswith("removed"):
            continue
        if any(a.path == "trainable.safetensors" for a in client.list_artifacts(run_id)):
            get_artifact_repository(run.info.artifact_uri).delete_artifacts("trainable.safetensors")
        client.set_tag(run_id, "dmlbench.weights", "removed: not the best trial (tracking.trial_weights=false)")


def _fail_interrupted(study: Any, trial: Any) -> None:
    """Ctrl-C: FAIL the trial now, and queue a retry that the next `study run` resumes from the
    interrupted run's checkpoint."""
    from optuna.trial import TrialState

    study.tell(trial, state=TrialState.FAIL)
    enqueue_retry(study, trial)


def resumable(trial: Any) -> str | None:
    """The dead predecessor's MLflow run when this trial retries one that left a checkpoint."""
    import mlflow

    run_id = trial.user_attrs.get("dmlbench.resume_run")
    if not run_id:
        return None
    try:
        path = mlflow.get_run(run_id).data.tags.get("dmlbench.checkpoint", "")
    except mlflow.exceptions.MlflowException:
        return None
    if not path or not Path(path).is_file():
        return None
    trial.set_user_attr("mlflow_run_id", run_id)
    return run_id


def progress(line: str) -> None:
    """One line per finished trial or reproduction, so a long study shows where it is."""
    print(line, flush=True)


def tune(spec: StudySpec, dataset: str, entry: Entry, storage: Any, parent_id: str, *, worker: int = 0,
         train: TrainFn | None = None) -> None:
    """Run trials of one entry until the shared budget is used (ask/tell; safe with other workers)."""
    from optuna.trial import TrialState

    budget = budget_of(spec, entry)
    if budget == 0:
        return
    train = train or _train_fn()
    probe = open_study(spec, dataset, entry, storage)
    offset = 7919 * worker + len(probe.get_trials(deepcopy=False))
    study = open_study(spec, dataset, entry, storage, offset=offset)
    if study.user_attrs.get("mlflow_parent_run_id") != parent_id:
        study.set_user_attr("mlflow_parent_run_id", parent_id)
    dists = distributions(entry.search_space)
    started, failures, ran = time.monotonic(), 0, 0
    while True:
        c = trial_counts(study)
        if c["complete"] + c["pruned"] + c["running"] >= budget:
            return
        if spec.budget.timeout_s is not None and time.monotonic() - started > spec.budget.timeout_s:
            return
        interrupts.check()
        trial = study.ask(dists)
        # several workers may ask at once: only the first `budget` active trials may run
        active = sorted(t.number for t in study.get_trials(deepcopy=False)
                        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
                        and not t.user_attrs.get("dmlbench.surplus"))
        if trial.number in active[budget:]:
            trial.set_user_attr("dmlbench.surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            if trial.user_attrs.get("dmlbench.retry_of") is not None:  # give the retry back
                study.enqueue_trial(dict(trial.params), user_attrs=dict(trial.user_attrs) | {"dmlbench.surplus": False})
            return
        outcome = run_trial(spec, dataset, entry, study, trial, parent_id, train)
        failures = failures + 1 if outcome == "failed" else 0
        ran += 1
        c = trial_counts(study)
        done, elapsed = c["complete"] + c["pruned"], time.monotonic() - started
        eta = elapsed / ran * max(0, budget - done - c["running"])
        progress(f"{study.study_name}: {done}/{budget} trials, {elapsed:.0f} s elapsed, ETA {eta:.0f} s")
        if failures >= MAX_CONSECUTIVE_FAILURES:
            last = study.get_trials(deepcopy=False)[-1].user_attrs.get("dmlbench.error", "")
            raise StudyAborted(f"{failures} trials in a row failed in study {study.study_name} (last: {last}); "
                               f"their MLflow runs are tagged dmlbench.study={spec.name}")


def _reproduction_params(spec: StudySpec, dataset: str, entry: Entry, storage: Any) -> tuple[dict, str] | None:
    """Best trial's parameters and its number, or None when no trial completed."""
    if entry.fixed:
        return {}, "fixed"
    study = open_study(spec, dataset, entry, storage)
    try:
        best = study.best_trial
    except ValueError:
        return None
    return dict(best.params), str(best.number)


def finished_reproductions(spec: StudySpec, dataset: str, entry: Entry, source: str | None = None) -> dict[int, str]:
    """Seed -> run id of finished reproduction runs (of the config from ``source`` if given)."""
    import mlflow

    mlflow.set_tracking_uri(spec.tracking_uri)
    if mlflow.get_experiment_by_name(spec.experiments[dataset]) is None:
        return {}
    extra = {"dmlbench.status": "finished"}
    if source is not None:
        extra["dmlbench.config_source"] = source
    runs = mlflow.search_runs(experiment_names=[spec.experiments[dataset]], output_format="list",
                              filter_string=tag_filter(spec, dataset, entry, role="reproduction", **extra),
                              order_by=["attributes.start_time ASC"])
    return {int(r.data.tags["dmlbench.seed"]): r.info.run_id for r in runs}


def reproduce_all(spec: StudySpec, storage: Any, parents: dict[str, str], train: TrainFn | None = None) -> None:
    """Run every entry's seeds that no process has claimed yet (see :mod:`.reproductions`)."""
    train = train or _train_fn()
    for dataset, entry in spec.units():
        study = open_reproductions(
            spec, dataset, entry, storage,
            best=lambda: _reproduction_params(spec, dataset, entry, storage),
            done=lambda source: finished_reproductions(spec, dataset, entry, source),
        )
        if study is None:
            if not finished_reproductions(spec, dataset, entry):
                warnings.warn(f"no completed trial for {spec.study_name(dataset, entry)}: no reproduction",
                              stacklevel=2)
            continue
        recover_seeds(spec, dataset, entry, study)
        run_seeds(spec, dataset, entry, study, parents[f"{dataset}/{entry.name}"], train, progress)


def _worker_main(spec_path: str, storage_url_: str, worker: int, parents: dict[str, str], workers: int,
                 placement: tuple[str, int] | None = None) -> None:
    """Entry point of a tuning worker process (spawned): every unit in spec order."""
    with _one_line_on_interrupt(f"tuning worker {worker}"):
        _share_cores(workers)
        quiet_optuna()
        spec = place(load_spec(spec_path), placement)
        storage = open_storage(storage_url_)
        for dataset, entry in spec.units():
            tune(spec, dataset, entry, storage, parents[f"{dataset}/{entry.name}"], worker=worker)


def _reproduce_main(spec_path: str, storage_url_: str, parents: dict[str, str], workers: int,
                    placement: tuple[str, int] | None = None) -> None:
    """Entry point of a reproduction worker process (spawned)."""
    with _one_line_on_interrupt("reproduction worker"):
        _share_cores(workers)
        quiet_optuna()
        reproduce_all(place(load_spec(spec_path), placement), open_storage(storage_url_), parents)


@contextmanager
def _one_line_on_interrupt(who: str) -> Iterator[None]:
    """Ctrl-C reaches every worker of the terminal's process group: each stops at its next safe
    point (:mod:`harness.core.interrupts`), ends its run KILLED and its trial FAIL (in the loop and
    :func:`run_trial`), then says so in one line and exits 130, instead of multiprocessing's
    traceback."""
    interrupts.defer_sigint()
    try:
        yield
    except KeyboardInterrupt as exc:
        print(f"dmlbench: {who} (pid {os.getpid()}): {exc or 'interrupted before a run started'}",
              file=sys.stderr, flush=True)
        sys.exit(130)


def _share_cores(workers: int) -> None:
    """N worker processes on one machine split its cores (oversubscribed threads spin and crawl)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_study(spec_path: str | Path, workers: int = 1, storage: str | None = None, *,
              train: TrainFn | None = None, devices: str | None = None, workers_per_device: int = 1) -> None:
    """Tune every (dataset, entry) of the spec, then run the reproductions; resumable.

    ``workers`` > 1 starts that many spawned processes on the same storage. ``devices`` ("0,1",
    "cpu") with ``workers_per_device`` K starts K processes per device instead, each pinned to its
    device: small PEFT models leave most of a GPU idle, so K concurrent trials fill it. ``train``
    replaces the training loop (tests inject fakes; only honoured with one process).
    """
    if workers < 1:
        raise UserError(f"bad value {workers!r} for --workers: must be >= 1")
    placements = parse_devices(devices, workers_per_device)
    if placements is not None:
        workers = len(placements)
    quiet_optuna()
    spec = load_spec(spec_path)
    url = storage_url(spec, storage)
    store = open_storage(url)
    parents: dict[str, str] = {}
    for dataset, entry in spec.units():
        parents[f"{dataset}/{entry.name}"] = parent_run(spec, dataset, entry)
        if not entry.fixed:
            recover_stale(spec, dataset, entry, open_study(spec, dataset, entry, store))

    def placed(w: int) -> tuple[str, int] | None:
        return (placements[w], workers_per_device) if placements else None

    if workers == 1 and placements is None:
        for dataset, entry in spec.units():
            tune(spec, dataset, entry, store, parents[f"{dataset}/{entry.name}"], train=train)
        reproduce_all(spec, store, parents, train=train)
    else:
        _spawn(_worker_main, lambda w: (str(spec.path), url, w, parents, workers, placed(w)), workers, "worker")
        _spawn(_reproduce_main, lambda w: (str(spec.path), url, parents, workers, placed(w)), workers, "reproduce")
    rollup(spec, store, parents)  # parents and a summary run carry the results in the MLflow UI


def _spawn(target: Callable, args_of: Callable[[int], tuple], workers: int, role: str) -> None:
    """``workers`` spawned processes, process ``w`` running ``target(*args_of(w))``; a failed one
    fails the study."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of(w), name=f"dmlbench-{role}-{w}") for w in range(workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # the children got the same Ctrl-C: let them tell their trials FAIL
        for p in procs:
            p.join(timeout=60)
        stuck = [p for p in procs if p.is_alive()]
        for p in stuck:  # a worker that ignores Ctrl-C: its trial is recovered on the next run
            p.terminate()
            p.join(timeout=10)
        raise RunInterrupted(
            f"interrupted: {len(procs)} {role} process(es) stopped" + (f", {len(stuck)} of them terminated" if stuck
                                                                      else "") +
            "; their runs are KILLED in MLflow and their trials FAIL in Optuna; the same `study run` "
            "continues the study (interrupted trials are retried from their checkpoints)") from None
    bad = [f"{p.name} exit code {p.exitcode}" for p in procs if p.exitcode != 0]
    if bad:
        raise StudyAborted("study worker processes failed: " + "; ".join(bad) + " (their output is above)")


def run_demo(spec: str | Path = "studies/demo.yaml", workers: int = 1) -> Path:
    """Run the demo study and its report; returns the report folder."""
    from harness.reports.build import build_report

    run_study(spec, workers=workers)
    return build_report(spec)
