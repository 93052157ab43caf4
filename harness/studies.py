"""Optuna studies: the same tuning budget for every method, then seeded reproductions.

A study spec is a YAML file (``studies/*.yaml``). Every method entry is tuned with the same
budget (trials x epochs, optional wall-clock cap) on the validation split, then its best
configuration is retrained with several seeds and evaluated on the test split. Results live in
MLflow only; :mod:`harness.reports` rebuilds tables and figures from there.

Spec format (every key is checked; a typo names the closest valid key)::

    name: demo                       # study name: Optuna study names, MLflow tag dmlbench.study
    description: free text
    backbone: tf_efficientnet_lite0  # timm name; an entry may override it
    datasets: [fashion_mnist]        # dataset names (datasets/*.yaml)
    methods: all                     # 'all' = every registered method whose families include the
                                     # backbone's family, or a list of names / entries:
      # - full_finetune
      # - method: frpt               # registry name (required)
      #   name: frpt_r101            # unique id in the study (default: the method name)
      #   label: "FRPT R101"         # row label in reports (default: the name)
      #   backbone: resnet101        # per-entry backbone
      #   preset: paper              # a preset of the method (harness.registry presets)
      #   overrides: {data.shots: 5} # run-config keys for this entry only
      #   search_space:              # merged over the registry's space; `key: null` drops a key
      #     optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      #   fixed: true                # no tuning: only the seeded reproductions of this config
      #   published_as: pretrained   # method name in harness/published.yaml (default: method)
    exclude: [frpt_bbox]             # with 'all': registry names to leave out
    references:                      # untuned rows appended after the methods (fixed: true),
      - {method: linear_probe, name: pretrained, label: "pretrained (no training)",
         published_as: pretrained, overrides: {optim.epochs: 0, model.embed_dim: 0}}
    overrides: {data.max_per_class: 40}  # run-config keys applied to every run
    objective: val_map_at_r          # val_map_at_r | val_recall_at_1 (maximised; sets eval.select)
    budget: {n_trials: 2, epochs: 2, timeout_s: 600}  # per tuned entry and dataset, the same for
                                     # all; timeout_s: a worker starts no new trial of an entry
                                     # after that many seconds on it (per invocation)
    sampler: {name: tpe, seed: 0, n_startup_trials: 5}  # tpe | random | bruteforce | grid
    pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}
                                     # median | hyperband | threshold (lower/upper) | none
    reproduce: {seeds: [0, 1, 2]}    # seeds of the test runs of each entry's best config ([] = none)
    storage: ""                      # Optuna storage: SQLAlchemy URL (several machines) or journal
                                     # file path; '' = <dir of mlflow.db>/<name>.optuna.journal;
                                     # --storage wins

Checkpoints are selected on the objective's validation metric (``eval.select`` follows it), and
with ``--workers N`` each of the N spawned processes uses cpu_count / N torch threads.

Fairness: ``budget.epochs`` sets ``optim.epochs`` for every tuned entry, so neither ``overrides``
may set it (a fixed entry may, e.g. 0 epochs for the untrained backbone).

Workers and resume: one Optuna study per (study, dataset, entry), named
``<study>/<dataset>/<entry>``. Workers ask/tell against the shared storage, so N processes (here
or on other machines with an SQL storage URL) share one budget, and re-running the command only
runs the missing trials. Optuna's own heartbeat exists only for RDBStorage inside
``study.optimize``; the exact shared budget needs ask/tell, so each running trial records its
host, pid and a heartbeat in its user attributes. A RUNNING trial whose process is gone (same
host) or whose heartbeat is older than :data:`STALE_AFTER_S` is failed and its parameters are
enqueued again.

MLflow: one parent run per (study, dataset, entry), found again by tags on resume; each trial and
each reproduction is a nested child run tagged ``dmlbench.study``, ``dmlbench.entry``,
``dmlbench.role`` (trial | reproduction), ``dmlbench.trial`` / ``dmlbench.seed``.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.study_spec import REPO_ROOT, Entry, StudySpec, distributions, grid_size, load_spec

#: seconds between heartbeats written into a running trial's user attributes
HEARTBEAT_S = 30.0
#: a RUNNING trial whose heartbeat is older than this is considered dead (other hosts)
STALE_AFTER_S = 10 * HEARTBEAT_S
#: a worker gives up on an entry after this many failed trials in a row (a bug, not bad luck)
MAX_CONSECUTIVE_FAILURES = 3


# ----------------------------------------------------------------------------- storage


def storage_url(spec: StudySpec, storage: str | None = None) -> str:
    """The Optuna storage to use: argument, spec, else a journal file beside the MLflow store
    (``<dir of mlflow.db>/<study>.optuna.journal``; the repo root for a non-sqlite store)."""
    if storage or spec.storage:
        return storage or spec.storage
    uri = spec.tracking_uri
    folder = Path(uri.removeprefix("sqlite:///")).resolve().parent if uri.startswith("sqlite:///") else REPO_ROOT
    return str(folder / f"{spec.name}.optuna.journal")


def open_storage(url: str) -> Any:
    """SQLAlchemy URLs -> RDBStorage; anything else is a journal file path (``journal:`` optional)."""
    import optuna

    if "://" in url and not url.startswith("journal:"):
        return optuna.storages.RDBStorage(url)
    from optuna.storages.journal import JournalFileBackend

    path = Path(url.removeprefix("journal:")).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def make_sampler(spec: StudySpec, entry: Entry, offset: int = 0) -> Any:
    """Seeded sampler; ``offset`` shifts the seed so workers and resumed runs draw fresh points."""
    import optuna

    name, seed = spec.sampler["name"], int(spec.sampler.get("seed", 0)) + offset
    if name == "tpe":
        kwargs = {"n_startup_trials": int(spec.sampler["n_startup_trials"])} if "n_startup_trials" in spec.sampler else {}
        return optuna.samplers.TPESampler(seed=seed, **kwargs)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "bruteforce":
        return optuna.samplers.BruteForceSampler(seed=seed)
    grid = {}
    for key, d in entry.search_space.items():
        if d["type"] == "categorical":
            grid[key] = list(d["choices"])
        else:
            n = grid_size({key: d}) or 1
            grid[key] = [d["low"] + i * d["step"] for i in range(n)]
    return optuna.samplers.GridSampler(grid, seed=seed)


def make_pruner(spec: StudySpec) -> Any:
    import optuna

    p = spec.pruner
    if p["name"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(p.get("n_startup_trials", 1)),
                                           n_warmup_steps=int(p.get("n_warmup_steps", 0)))
    if p["name"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=int(p.get("min_resource", 1)), max_resource=spec.budget.epochs,
                                              reduction_factor=int(p.get("reduction_factor", 3)))
    if p["name"] == "threshold":
        return optuna.pruners.ThresholdPruner(lower=p.get("lower"), upper=p.get("upper"),
                                              n_warmup_steps=int(p.get("n_warmup_steps", 0)))
    return optuna.pruners.NopPruner()


def budget_of(spec: StudySpec, entry: Entry) -> int:
    """Trials to finish for ``entry``: n_trials, capped by the grid size for grid samplers."""
    if entry.fixed:
        return 0
    if spec.sampler["name"] in ("bruteforce", "grid"):
        return min(spec.budget.n_trials, grid_size(entry.search_space) or spec.budget.n_trials)
    return spec.budget.n_trials


def open_study(spec: StudySpec, dataset: str, entry: Entry, storage: Any, offset: int = 0) -> Any:
    import optuna

    return optuna.create_study(
        study_name=spec.study_name(dataset, entry), storage=storage, direction="maximize",
        sampler=make_sampler(spec, entry, offset), pruner=make_pruner(spec), load_if_exists=True,
    )


# ----------------------------------------------------------------------------- stale trials


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


def recover_stale(spec: StudySpec, dataset: str, entry: Entry, study: Any) -> list[int]:
    """Fail the dead RUNNING trials of ``study`` and enqueue their parameters again."""
    import optuna
    from optuna.trial import TrialState

    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process finished or failed it meanwhile
        study.enqueue_trial(dict(t.params), user_attrs={"dmlbench.retry_of": t.number})
        _fail_mlflow_child(spec, dataset, entry, t.number)
        failed.append(t.number)
    return failed


def _fail_mlflow_child(spec: StudySpec, dataset: str, entry: Entry, number: int) -> None:
    """A killed trial's MLflow run stays RUNNING forever: mark it FAILED."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(spec.tracking_uri)
    if mlflow.get_experiment_by_name(spec.experiments[dataset]) is None:
        return
    runs = mlflow.search_runs(
        experiment_names=[spec.experiments[dataset]], output_format="list",
        filter_string=_tag_filter(spec, dataset, entry, role="trial", **{"dmlbench.trial": str(number)})
        + " and attributes.status = 'RUNNING'",
    )
    client = MlflowClient()
    for run in runs:
        client.set_tag(run.info.run_id, "dmlbench.status", "failed")
        client.set_tag(run.info.run_id, "dmlbench.error", "worker process died (stale trial)")
        client.set_terminated(run.info.run_id, "FAILED")


@contextmanager
def heartbeat(study: Any, trial: Any, interval: float = HEARTBEAT_S) -> Iterator[None]:
    """Record host/pid and refresh ``dmlbench.heartbeat`` while the trial runs."""
    trial.set_user_attr("dmlbench.host", socket.gethostname())
    trial.set_user_attr("dmlbench.pid", os.getpid())
    trial.set_user_attr("dmlbench.heartbeat", time.time())
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                trial.set_user_attr("dmlbench.heartbeat", time.time())
            except Exception:  # noqa: BLE001 - the trial finished between the check and the write
                return

    thread = threading.Thread(target=beat, daemon=True, name="dmlbench-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ----------------------------------------------------------------------------- MLflow parents


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def _tag_filter(spec: StudySpec, dataset: str, entry: Entry | None = None, role: str | None = None, **extra: str) -> str:
    tags = {"dmlbench.study": spec.name, "dmlbench.dataset": dataset}
    if entry is not None:
        tags["dmlbench.entry"] = entry.name
    if role is not None:
        tags["dmlbench.role"] = role
    tags.update(extra)
    return " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())


def parent_run(spec: StudySpec, dataset: str, entry: Entry) -> str:
    """Find (by tags) or create the MLflow parent run of one (study, dataset, entry)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from harness.tracking import check_writable, ensure_experiment, environment_tags

    check_writable(spec.tracking_uri)
    mlflow.set_tracking_uri(spec.tracking_uri)
    experiment = spec.experiments[dataset]
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        found = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                                   filter_string=_tag_filter(spec, dataset, entry, role="parent"),
                                   order_by=["attributes.start_time ASC"])
        if found:
            return found[0].info.run_id
    exp_id = exp.experiment_id if exp else ensure_experiment(experiment)
    tags = {
        **environment_tags(),
        "mlflow.runName": f"{spec.name}/{entry.name}",
        "dmlbench.study": spec.name, "dmlbench.dataset": dataset, "dmlbench.entry": entry.name,
        "dmlbench.method": entry.method, "dmlbench.backbone": entry.backbone, "dmlbench.role": "parent",
        "dmlbench.label": entry.label, "dmlbench.objective": spec.metric,
    }
    run = client.create_run(exp_id, tags=tags)
    client.log_param(run.info.run_id, "n_trials", budget_of(spec, entry))
    client.log_param(run.info.run_id, "epochs", spec.budget.epochs)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@contextmanager
def _inside(spec: StudySpec, parent_id: str) -> Iterator[None]:
    """Make ``parent_id`` the active MLflow run so the loop's ``nested=True`` run hangs under it."""
    import mlflow

    mlflow.set_tracking_uri(spec.tracking_uri)
    mlflow.start_run(run_id=parent_id)
    try:
        yield
    finally:
        mlflow.end_run()


def _base_tags(spec: StudySpec, dataset: str, entry: Entry, role: str) -> dict[str, str]:
    return {"dmlbench.study": spec.name, "dmlbench.dataset": dataset, "dmlbench.entry": entry.name,
            "dmlbench.label": entry.label, "dmlbench.role": role}


# ----------------------------------------------------------------------------- workers


TrainFn = Callable[..., Any]


def _train_fn() -> TrainFn:
    from harness.loop import train

    return train


def _counts(study: Any) -> dict[str, int]:
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
    tags = {**_base_tags(spec, dataset, entry, "trial"), "dmlbench.trial": str(trial.number),
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
        with heartbeat(study, trial), _inside(spec, parent_id):
            result = train(cfg, on_epoch=on_epoch, tags=tags, nested=True)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        progress(f"{study.study_name} trial {trial.number}: pruned ({time.monotonic() - started:.0f} s)")
        return "pruned"
    except UserError:
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:  # noqa: BLE001 - a diverging trial must not end the study
        trial.set_user_attr("dmlbench.error", f"{type(exc).__name__}: {exc}"[:300])
        study.tell(trial, state=TrialState.FAIL)
        warnings.warn(f"trial {trial.number} of {study.study_name} failed: {type(exc).__name__}: {exc}", stacklevel=2)
        return "failed"
    trial.set_user_attr("mlflow_run_id", result.run_id)
    value = result.metrics.get(spec.metric, float("nan"))
    if not math.isfinite(value):
        study.tell(trial, state=TrialState.FAIL)
        return "failed"
    study.tell(trial, float(value))
    progress(f"{study.study_name} trial {trial.number}: {spec.metric} {value:.4f} ({time.monotonic() - started:.0f} s)")
    return "complete"


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
    dists = distributions(entry.search_space)
    started, failures = time.monotonic(), 0
    while True:
        c = _counts(study)
        if c["complete"] + c["pruned"] + c["running"] >= budget:
            return
        if spec.budget.timeout_s is not None and time.monotonic() - started > spec.budget.timeout_s:
            return
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
        if failures >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"{failures} trials in a row failed in study {study.study_name}; see the MLflow runs")


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
                              filter_string=_tag_filter(spec, dataset, entry, role="reproduction", **extra),
                              order_by=["attributes.start_time ASC"])
    return {int(r.data.tags["dmlbench.seed"]): r.info.run_id for r in runs}


def reproduce(spec: StudySpec, dataset: str, entry: Entry, seed: int, storage: Any, parent_id: str,
              train: TrainFn | None = None) -> str | None:
    """Retrain the entry's best config with ``seed`` unless that run exists; returns its run id."""
    found = _reproduction_params(spec, dataset, entry, storage)
    if found is None:
        warnings.warn(f"no completed trial for {spec.study_name(dataset, entry)}: no reproduction", stacklevel=2)
        return None
    params, source = found
    done = finished_reproductions(spec, dataset, entry, source)
    if seed in done:
        return done[seed]
    cfg = spec.resolve(dataset, entry, params, seed=seed)
    cfg.tracking.run_name = f"{entry.name}-seed{seed}"
    tags = {**_base_tags(spec, dataset, entry, "reproduction"), "dmlbench.seed": str(seed),
            "dmlbench.config_source": source}
    started = time.monotonic()
    with _inside(spec, parent_id):
        result = (train or _train_fn())(cfg, tags=tags, nested=True)
    progress(f"{spec.study_name(dataset, entry)} seed {seed}: test R@1 "
             f"{result.metrics.get('test_recall_at_1', float('nan')):.4f} ({time.monotonic() - started:.0f} s)")
    return result.run_id


def _worker_main(spec_path: str, storage_url_: str, worker: int, parents: dict[str, str], workers: int) -> None:
    """Entry point of a tuning worker process (spawned): every unit in spec order."""
    _share_cores(workers)
    _quiet()
    spec = load_spec(spec_path)
    storage = open_storage(storage_url_)
    for dataset, entry in spec.units():
        tune(spec, dataset, entry, storage, parents[f"{dataset}/{entry.name}"], worker=worker)


def _reproduce_main(args: tuple[str, str, str, str, int, str, int]) -> str | None:
    spec_path, storage_url_, dataset, entry_name, seed, parent_id, workers = args
    _share_cores(workers)
    _quiet()
    spec = load_spec(spec_path)
    return reproduce(spec, dataset, spec.entry(entry_name), seed, open_storage(storage_url_), parent_id)


def _share_cores(workers: int) -> None:
    """N worker processes on one machine split its cores (oversubscribed threads spin and crawl)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _quiet() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_study(spec_path: str | Path, workers: int = 1, storage: str | None = None, *,
              train: TrainFn | None = None) -> None:
    """Tune every (dataset, entry) of the spec, then run the reproductions; resumable.

    ``workers`` > 1 starts that many spawned processes on the same storage. ``train`` replaces
    the training loop (tests inject fakes; only honoured with ``workers == 1``).
    """
    if workers < 1:
        raise UserError(f"bad value {workers!r} for --workers: must be >= 1")
    _quiet()
    spec = load_spec(spec_path)
    url = storage_url(spec, storage)
    store = open_storage(url)
    parents: dict[str, str] = {}
    for dataset, entry in spec.units():
        parents[f"{dataset}/{entry.name}"] = parent_run(spec, dataset, entry)
        if not entry.fixed:
            recover_stale(spec, dataset, entry, open_study(spec, dataset, entry, store))

    if workers == 1:
        for dataset, entry in spec.units():
            tune(spec, dataset, entry, store, parents[f"{dataset}/{entry.name}"], train=train)
    else:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(str(spec.path), url, w, parents, workers), name=f"dmlbench-worker-{w}")
                 for w in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [f"{p.name} exit code {p.exitcode}" for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError("study workers failed: " + "; ".join(bad))

    jobs = [(dataset, entry.name, seed) for dataset, entry in spec.units() for seed in spec.seeds]
    if workers == 1 or len(jobs) <= 1:
        for dataset, name, seed in jobs:
            reproduce(spec, dataset, spec.entry(name), seed, store, parents[f"{dataset}/{name}"], train=train)
    else:
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(min(workers, len(jobs)))
        try:
            pool.map(_reproduce_main, [(str(spec.path), url, d, n, s, parents[f"{d}/{n}"], workers) for d, n, s in jobs],
                     chunksize=1)
        except BaseException:
            pool.terminate()
            raise
        else:
            pool.close()  # let workers exit cleanly (terminate() can leak their semaphores)
        finally:
            pool.join()


# ----------------------------------------------------------------------------- status


def study_status(spec_path: str | Path, storage: str | None = None) -> Any:
    """One row per (dataset, entry): trials by state vs budget, best value, reproductions done."""
    import optuna
    import pandas as pd

    _quiet()
    spec = load_spec(spec_path)
    store = open_storage(storage_url(spec, storage))
    existing = {s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)}
    rows = []
    for dataset, entry in spec.units():
        row: dict[str, Any] = {"dataset": dataset, "entry": entry.name, "method": entry.method,
                               "budget": "fixed" if entry.fixed else budget_of(spec, entry)}
        counts = {k: 0 for k in ("complete", "pruned", "failed", "running")}
        best, best_trial, source = float("nan"), "", "fixed" if entry.fixed else None
        if not entry.fixed and spec.study_name(dataset, entry) in existing:
            study = open_study(spec, dataset, entry, store)
            counts.update({k: v for k, v in _counts(study).items() if k in counts})
            try:
                best, best_trial = study.best_value, str(study.best_trial.number)
                source = best_trial
            except ValueError:
                pass
        row.update(counts)
        row[spec.metric] = round(best, 4) if math.isfinite(best) else float("nan")
        row["best_trial"] = best_trial
        done = finished_reproductions(spec, dataset, entry, source) if source is not None and _store_exists(spec) else {}
        row["reproductions"] = f"{len([s for s in spec.seeds if s in done])}/{len(spec.seeds)}"
        rows.append(row)
    return pd.DataFrame(rows)


def _store_exists(spec: StudySpec) -> bool:
    """Avoid creating an empty MLflow store just to report that nothing ran yet."""
    uri = spec.tracking_uri
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    return True


# ----------------------------------------------------------------------------- demo


def run_demo(spec: str | Path = "studies/demo.yaml", workers: int = 1) -> Path:
    """Run the demo study and its report; returns the report folder."""
    from harness.reports import build_report

    run_study(spec, workers=workers)
    return build_report(spec)
