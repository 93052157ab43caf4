"""Reproductions claimed through the shared Optuna storage, so any number of ``study run``
processes, on any number of machines, run each (dataset, entry, seed) exactly once.

Each (study, dataset, entry) gets a second Optuna study, ``<study>/<dataset>/<entry>/reproductions``,
whose trials are the seeds. The process that creates it enqueues one trial per seed, carrying the
configuration to reproduce (the tuning study's best parameters, fixed at that moment, and their
source), then marks the study ready; others wait for the mark. Workers take seeds with ``ask()``,
which hands a waiting trial to exactly one caller (the storage serialises it), and ``tell`` the
test R@1. A RUNNING seed whose worker died (dead pid, stale heartbeat) is failed, its MLflow run
ended FAILED, and the seed enqueued again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from harness.runtime import interrupts
from harness.studies.parents import inside_parent, tag_filter
from harness.studies.recovery import end_failed, fail_stale, heartbeat
from harness.studies.spec import Entry, StudySpec

#: how long a process waits for another one to finish enqueueing the seeds
READY_TIMEOUT_S = 120.0
#: a seed that failed is retried by the next `study run`, up to this many attempts in all
MAX_SEED_ATTEMPTS = 3


def open_reproductions(
    spec: StudySpec,
    dataset: str,
    entry: Entry,
    storage: Any,
    best: Callable[[], tuple[dict, str] | None],
    done: Callable[[str], dict[int, str]],
) -> Any | None:
    """The seeds' study, created and filled by the first caller (seeds without a finished run of
    the same config); None without a config to reproduce."""
    import optuna

    name = f"{spec.study_name(dataset, entry)}/reproductions"
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "dmlbench.ready" not in study.user_attrs and time.monotonic() < deadline:
            time.sleep(0.5)
        return study if study.user_attrs.get("dmlbench.ready") else None
    from harness.studies.storage import label_study

    label_study(study, spec, dataset, entry, "test/recall_at_1")  # each seed's test R@1
    study.set_user_attr("seeds", ", ".join(map(str, spec.seeds)))
    found = best()
    if found is not None:
        params, source = found
        finished = done(source)
        for seed in (s for s in spec.seeds if s not in finished):
            study.enqueue_trial(
                {"seed": seed},
                user_attrs={"dmlbench.config_source": source, "dmlbench.params": json.dumps(params, sort_keys=True)},
            )
    study.set_user_attr("dmlbench.ready", found is not None)
    return study if found is not None else None


def recover_seeds(spec: StudySpec, dataset: str, entry: Entry, study: Any) -> list[int]:
    """Fail the seeds whose worker died, end their MLflow runs FAILED, and enqueue them again."""
    again = []
    for t in fail_stale(study):
        seed = int(t.params["seed"])
        study.enqueue_trial(
            {"seed": seed},
            user_attrs={k: v for k, v in t.user_attrs.items() if k in ("dmlbench.config_source", "dmlbench.params")},
        )
        fail_run(spec, dataset, entry, seed, t.user_attrs.get("mlflow_run_id"))
        again.append(seed)
    return again


def seed_attempts(study: Any) -> dict[int, list[Any]]:
    """Seed -> its trials in order (surplus asks left out)."""
    out: dict[int, list[Any]] = {}
    for t in study.get_trials(deepcopy=False):
        seed = t.params.get("seed", (t.system_attrs.get("fixed_params") or {}).get("seed"))  # waiting: enqueued
        if seed is not None and not t.user_attrs.get("dmlbench.surplus"):
            out.setdefault(int(seed), []).append(t)
    return out


def retry_failed_seeds(study: Any) -> list[int]:
    """Enqueue again every seed whose latest attempt FAILed (not a dead worker's: those are
    recovered by :func:`recover_seeds`), while it has attempts left; returns those seeds."""
    from optuna.trial import TrialState

    again = []
    for seed, trials in seed_attempts(study).items():
        states = [t.state for t in trials]
        if trials[-1].state != TrialState.FAIL or TrialState.COMPLETE in states:
            continue
        if sum(s == TrialState.FAIL for s in states) >= MAX_SEED_ATTEMPTS:
            continue
        attrs = {k: v for k, v in trials[-1].user_attrs.items() if k in ("dmlbench.config_source", "dmlbench.params")}
        if attrs:
            study.enqueue_trial({"seed": seed}, user_attrs=attrs)
            again.append(seed)
    return again


def failed_seeds(study: Any) -> dict[int, str]:
    """Seeds whose latest attempt failed, with its error (what a study that ends must report)."""
    from optuna.trial import TrialState

    return {
        seed: trials[-1].user_attrs.get("dmlbench.error", "failed")
        for seed, trials in seed_attempts(study).items()
        if trials[-1].state == TrialState.FAIL and TrialState.COMPLETE not in [t.state for t in trials]
    }


def fail_run(spec: StudySpec, dataset: str, entry: Entry, seed: int, run_id: str | None) -> None:
    """End a dead reproduction's MLflow run FAILED (found by id, or by its RUNNING reproduction tags)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(spec.tracking_uri)
    client = MlflowClient()
    ids = (
        [run_id]
        if run_id
        else [
            r.info.run_id
            for r in mlflow.search_runs(
                experiment_names=[spec.experiments[dataset]],
                output_format="list",
                filter_string=tag_filter(spec, dataset, entry, role="reproduction", **{"dmlbench.seed": str(seed)})
                + " and attributes.status = 'RUNNING'",
            )
        ]
        if mlflow.get_experiment_by_name(spec.experiments[dataset])
        else []
    )
    for rid in ids:
        if client.get_run(rid).info.status == "RUNNING":
            end_failed(rid, "worker process died (stale reproduction)")


def claim(study: Any) -> Any | None:
    """A waiting seed for this process, or None when every seed is taken."""
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState

    while waiting := {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}:
        trial = study.ask({"seed": IntDistribution(-(2**31), 2**31 - 1)})
        if trial.number in waiting and "dmlbench.params" in trial.user_attrs:  # an enqueued seed
            return trial
        # another process took the last waiting seed between the check and the ask
        trial.set_user_attr("dmlbench.surplus", True)
        study.tell(trial, state=TrialState.FAIL)
    return None


def run_seeds(
    spec: StudySpec,
    dataset: str,
    entry: Entry,
    study: Any,
    parent_id: str,
    train: Callable,
    progress: Callable[[str], None],
) -> None:
    """Claim and run seeds until none is left; each result is told to the seeds' study."""
    from optuna.trial import TrialState

    from harness.errors import DiskFull, StoreUnavailable, UserError
    from harness.studies.parents import base_tags

    while True:
        interrupts.check()  # after Ctrl-C a worker claims no further seed
        if (trial := claim(study)) is None:
            return
        seed = int(trial.params["seed"])
        params = json.loads(trial.user_attrs["dmlbench.params"])
        source = trial.user_attrs["dmlbench.config_source"]
        cfg = spec.resolve(dataset, entry, params, seed=seed)
        cfg.tracking.run_name = f"{entry.name}-seed{seed}"
        tags = {
            **base_tags(spec, dataset, entry, "reproduction"),
            "dmlbench.seed": str(seed),
            "dmlbench.config_source": source,
            "dmlbench.optuna_study": study.study_name,
            "dmlbench.trial": str(trial.number),
        }
        started = time.monotonic()
        try:
            with heartbeat(study, trial), inside_parent(spec, parent_id):
                result = train(cfg, tags=tags, nested=True)
        except (UserError, KeyboardInterrupt):
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as exc:  # noqa: BLE001 - one failed seed must not stop the others
            from harness.tracking.store import tracking_server_gone

            if (gone := tracking_server_gone(spec.tracking_uri, exc)) is not None or isinstance(
                exc, (DiskFull, StoreUnavailable)
            ):
                study.tell(trial, state=TrialState.FAIL)  # the machine's fault: retried by the next run
                raise gone or exc from None
            trial.set_user_attr("dmlbench.error", f"{type(exc).__name__}: {exc}"[:300])
            study.tell(trial, state=TrialState.FAIL)
            progress(f"{spec.study_name(dataset, entry)} seed {seed}: failed ({type(exc).__name__}: {exc})")
            continue
        trial.set_user_attr("mlflow_run_id", result.run_id)
        value = result.metrics.get("test/recall_at_1", float("nan"))
        study.tell(trial, value if value == value else 0.0)
        progress(
            f"{spec.study_name(dataset, entry)} seed {seed}: test R@1 {value:.4f} ({time.monotonic() - started:.0f} s)"
        )
