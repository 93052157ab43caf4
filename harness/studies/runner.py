"""Running a study: tuning workers (ask/tell against the shared storage), then reproductions.

The spec format and the resume/worker model are described in :mod:`harness.studies`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.errors import (
    DiskFull,
    StoreUnavailable,
    StudyAborted,
    StudyIncomplete,
    UserError,
    caused_by_interrupt,
)
from harness.runtime import interrupts
from harness.studies.loading import load_spec
from harness.studies.outcomes import failed_work, keep_best_weights, trial_counts
from harness.studies.parents import base_tags, inside_parent, parent_run, tag_filter
from harness.studies.placement import parse_devices, place
from harness.studies.recovery import adopted, close_predecessor, enqueue_retry, heartbeat, recover_stale, resumable
from harness.studies.reproductions import (
    MAX_SEED_ATTEMPTS,
    open_reproductions,
    recover_seeds,
    retry_failed_seeds,
    run_seeds,
)
from harness.studies.rollup import rollup
from harness.studies.spec import Entry, StudySpec, distributions
from harness.studies.storage import budget_of, open_storage, open_study, storage_url
from harness.studies.workers import PhaseGate, one_line_exit, share_cores, spawn
from harness.tracking.store import tracking_server_gone
from harness.training.checkpoint import RunClaimed

#: a worker gives up on an entry after this many failed trials in a row (a bug, not bad luck)
MAX_CONSECUTIVE_FAILURES = 3


TrainFn = Callable[..., Any]


def _train_fn() -> TrainFn:
    from harness.training.loop import train

    return train


def run_trial(
    spec: StudySpec, dataset: str, entry: Entry, study: Any, trial: Any, parent_id: str, train: TrainFn
) -> str:
    """Train one trial under the parent run; tell Optuna the outcome ('complete'|'pruned'|'failed')."""
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
    tags = {
        **base_tags(spec, dataset, entry, "trial"),
        "dmlbench.trial": str(trial.number),
        "dmlbench.optuna_study": study.study_name,
        "dmlbench.seed": str(cfg.seed),
    }

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        value = metrics.get(spec.epoch_metric)
        if value is not None and math.isfinite(value):
            trial.report(float(value), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} ({spec.epoch_metric}={value:.4f})")

    started = time.monotonic()
    if (value := adopted(spec, study, trial)) is not None:
        progress(f"{study.study_name} trial {trial.number}: {spec.metric} {value:.4f} (its run was finished by hand)")
        return "complete"
    resume = resumable(trial)

    def on_start(run_id: str) -> None:
        trial.set_user_attr("mlflow_run_id", run_id)
        if resume is None:  # the predecessor's run cannot be continued: close it, naming this one
            close_predecessor(trial, run_id)

    try:
        with heartbeat(study, trial), inside_parent(spec, parent_id):
            result = train(cfg, on_epoch=on_epoch, tags=tags, nested=True, resume=resume, on_start=on_start)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        progress(f"{study.study_name} trial {trial.number}: pruned ({time.monotonic() - started:.0f} s)")
        return "pruned"
    except RunClaimed as exc:  # its run is alive in another process: not trained twice
        trial.set_user_attr("dmlbench.error", str(exc)[:300])
        study.tell(trial, state=TrialState.FAIL)
        return "failed"
    except UserError:  # bad input: the trial must not stay RUNNING
        study.tell(trial, state=TrialState.FAIL)
        raise
    except (DiskFull, StoreUnavailable):  # the machine's fault, not the trial's: stop, retry it later
        _fail_interrupted(study, trial)
        raise
    except KeyboardInterrupt:
        _fail_interrupted(study, trial)
        raise
    except Exception as exc:  # noqa: BLE001 - a diverging trial must not end the study
        if caused_by_interrupt(exc):
            _fail_interrupted(study, trial)
            raise KeyboardInterrupt(f"trial {trial.number} of {study.study_name} interrupted") from None
        if (
            gone := tracking_server_gone(spec.tracking_uri, exc)
        ) is not None:  # not the trial's fault: stop, retry it later
            _fail_interrupted(study, trial)
            raise gone from None
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


def _fail_interrupted(study: Any, trial: Any) -> None:
    """Ctrl-C: FAIL the trial now, and queue a retry that the next `study run` resumes from the
    interrupted run's checkpoint."""
    from optuna.trial import TrialState

    study.tell(trial, state=TrialState.FAIL)
    enqueue_retry(study, trial)


def progress(line: str) -> None:
    """One line per finished trial or reproduction, so a long study shows where it is."""
    print(line, flush=True)


def tune(
    spec: StudySpec,
    dataset: str,
    entry: Entry,
    storage: Any,
    parent_id: str,
    *,
    worker: int = 0,
    train: TrainFn | None = None,
) -> None:
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
        active = sorted(
            t.number
            for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            and not t.user_attrs.get("dmlbench.surplus")
        )
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
            raise StudyAborted(
                f"{failures} trials in a row failed in study {study.study_name} (last: {last}); "
                f"their MLflow runs are tagged dmlbench.study={spec.name}"
            )


def _reproduction_params(spec: StudySpec, dataset: str, entry: Entry, storage: Any) -> tuple[dict, str] | None:
    """Best trial's parameters and its number, or None when no trial completed."""
    if entry.fixed:
        return {}, "fixed"
    study = open_study(spec, dataset, entry, storage)
    try:
        best = study.best_trial
    except ValueError:
        return None
    return dict(best.params), str(best.user_attrs.get("dmlbench.source_number") or best.number)


def finished_reproductions(spec: StudySpec, dataset: str, entry: Entry, source: str | None = None) -> dict[int, str]:
    """Seed -> run id of finished reproduction runs (of the config from ``source`` if given)."""
    import mlflow

    mlflow.set_tracking_uri(spec.tracking_uri)
    if mlflow.get_experiment_by_name(spec.experiments[dataset]) is None:
        return {}
    extra = {"dmlbench.status": "finished"}
    if source is not None:
        extra["dmlbench.config_source"] = source
    runs = mlflow.search_runs(
        experiment_names=[spec.experiments[dataset]],
        output_format="list",
        filter_string=tag_filter(spec, dataset, entry, role="reproduction", **extra),
        order_by=["attributes.start_time ASC"],
    )
    return {int(r.data.tags["dmlbench.seed"]): r.info.run_id for r in runs}


def reproduce_all(spec: StudySpec, storage: Any, parents: dict[str, str], train: TrainFn | None = None) -> None:
    """Run every entry's seeds that no process has claimed yet (see :mod:`.reproductions`)."""
    train = train or _train_fn()
    for dataset, entry in spec.units():
        study = open_reproductions(
            spec,
            dataset,
            entry,
            storage,
            best=lambda: _reproduction_params(spec, dataset, entry, storage),
            done=lambda source: finished_reproductions(spec, dataset, entry, source),
        )
        if study is None:
            if not finished_reproductions(spec, dataset, entry):
                warnings.warn(
                    f"no completed trial for {spec.study_name(dataset, entry)}: no reproduction", stacklevel=2
                )
            continue
        recover_seeds(spec, dataset, entry, study)
        retry_failed_seeds(study)
        run_seeds(spec, dataset, entry, study, parents[f"{dataset}/{entry.name}"], train, progress)


def _worker_main(
    spec_path: str,
    storage_url_: str,
    worker: int,
    parents: dict[str, str],
    workers: int,
    placement: tuple[str, int] | None,
    gate: PhaseGate,
) -> None:
    """Entry point of a study worker process (spawned): its share of every unit's trials, in spec
    order; then, once every worker has finished tuning, its share of the reproductions."""
    with one_line_exit(f"tuning worker {worker}"):
        share_cores(workers)
        quiet_optuna()
        spec = place(load_spec(spec_path), placement)
        storage = open_storage(storage_url_)
        for dataset, entry in spec.units():
            tune(spec, dataset, entry, storage, parents[f"{dataset}/{entry.name}"], worker=worker)
        if not gate.arrive_and_wait():
            return  # another worker failed: the study stops before its reproductions (spawn says why)
    with one_line_exit(f"reproduction worker {worker}"):
        reproduce_all(spec, storage, parents)


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_study(
    spec_path: str | Path,
    workers: int = 1,
    storage: str | None = None,
    *,
    train: TrainFn | None = None,
    devices: str | None = None,
    workers_per_device: int = 1,
    rebuild_from_mlflow: bool = False,
) -> None:
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
    interrupts.defer_signals()  # Ctrl-C and SIGTERM stop trials at safe points, in every process
    spec = load_spec(spec_path)
    url = storage_url(spec, storage)
    from harness.studies.preflight import preflight

    preflight(spec, url)  # data, weights, models, stores: before any run, trial or journal exists
    store = open_storage(url, spec.path)
    from harness.studies.ledger import check_ledger

    if rebuilt := check_ledger(spec, store, url, rebuild=rebuild_from_mlflow):  # never train a finished trial twice
        progress(f"rebuilt {rebuilt} trial(s) of study {spec.name} from MLflow")
    parents: dict[str, str] = {}
    for dataset, entry in spec.units():
        parents[f"{dataset}/{entry.name}"] = parent_run(spec, dataset, entry, store)
        if not entry.fixed:
            recover_stale(spec, dataset, entry, open_study(spec, dataset, entry, store))

    def placed(w: int) -> tuple[str, int] | None:
        return (placements[w], workers_per_device) if placements else None

    if workers == 1 and placements is None:
        for dataset, entry in spec.units():
            tune(spec, dataset, entry, store, parents[f"{dataset}/{entry.name}"], train=train)
        reproduce_all(spec, store, parents, train=train)
    else:
        spawn(
            _worker_main,
            lambda w: (str(spec.path), url, w, parents, workers, placed(w)),
            workers,
            "worker",
            phased=True,
        )
    rollup(spec, store, parents)  # parents and a summary run carry the results in the MLflow UI
    unfinished = failed_work(spec, store)
    if unfinished:
        raise StudyIncomplete(
            f"study {spec.name} ended with failed work: "
            + "; ".join(unfinished)
            + f"; the same `study run` retries failed seeds (up to {MAX_SEED_ATTEMPTS} attempts each)"
        )
