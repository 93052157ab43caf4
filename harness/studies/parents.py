"""The study's MLflow parent runs, found again by tags on resume, and the tags of their children."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from harness.studies.spec import Entry, StudySpec
from harness.studies.storage import budget_of


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def tag_filter(spec: StudySpec, dataset: str, entry: Entry | None = None, role: str | None = None, **extra: str) -> str:
    tags = {"dmlbench.study": spec.name, "dmlbench.dataset": dataset}
    if entry is not None:
        tags["dmlbench.entry"] = entry.name
    if role is not None:
        tags["dmlbench.role"] = role
    tags.update(extra)
    return " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())


#: how long a process waits for the one that creates an entry's parent run to name it
PARENT_TIMEOUT_S = 120.0


def parent_run(spec: StudySpec, dataset: str, entry: Entry, storage: Any = None) -> str:
    """The MLflow parent run of one (study, dataset, entry): one, however many processes start
    the study at once. With the study's Optuna ``storage`` the first process to create the study
    ``<entry study>/mlflow-parent`` (the storage refuses a second creation) finds or creates the
    run and names it there; the others wait for the name. Searching MLflow alone cannot decide it:
    two processes that create a run each and then search may each see only its own."""
    import optuna

    if storage is None:
        return find_or_create_parent(spec, dataset, entry)
    name = f"{spec.study_name(dataset, entry)}/mlflow-parent"
    try:
        claim = optuna.create_study(study_name=name, storage=storage)
    except optuna.exceptions.DuplicatedStudyError:
        claim = optuna.load_study(study_name=name, storage=storage)
        deadline = time.monotonic() + PARENT_TIMEOUT_S
        while "run_id" not in claim.user_attrs:
            if time.monotonic() > deadline:  # its creator died before naming it: take over
                break
            time.sleep(0.2)
        run_id = claim.user_attrs.get("run_id")
        if run_id and _alive(spec, run_id):
            return run_id
    run_id = find_or_create_parent(spec, dataset, entry)
    claim.set_user_attr("run_id", run_id)
    return run_id


def _alive(spec: StudySpec, run_id: str) -> bool:
    import mlflow

    mlflow.set_tracking_uri(spec.tracking_uri)
    try:
        return mlflow.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def find_or_create_parent(spec: StudySpec, dataset: str, entry: Entry) -> str:
    """Find (by tags) or create the MLflow parent run of one (study, dataset, entry)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from harness.tracking.store import (
        check_writable,
        ensure_experiment,
        environment_tags,
    )

    check_writable(spec.tracking_uri)
    mlflow.set_tracking_uri(spec.tracking_uri)
    experiment = spec.experiments[dataset]
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        found = mlflow.search_runs(
            experiment_names=[experiment],
            output_format="list",
            filter_string=tag_filter(spec, dataset, entry, role="parent"),
            order_by=["attributes.start_time ASC"],
        )
        if found:
            return found[0].info.run_id
    exp_id = exp.experiment_id if exp else ensure_experiment(experiment)
    tags = {
        **environment_tags(),
        "mlflow.runName": f"{spec.name}/{entry.name}",
        "mlflow.source.name": f"dmlbench study run {spec.path.name}",
        "mlflow.source.type": "LOCAL",
        "dmlbench.study": spec.name,
        "dmlbench.dataset": dataset,
        "dmlbench.entry": entry.name,
        "dmlbench.method": entry.method,
        "dmlbench.backbone": entry.backbone,
        "dmlbench.role": "parent",
        "dmlbench.label": entry.label,
        "dmlbench.objective": spec.metric,
        "mlflow.note.content": (
            f"Study `{spec.name}`: **{entry.label}** (`{entry.method}`, recipe `{entry.preset or 'none'}`) on "
            f"**{dataset}** with `{entry.backbone}`. {budget_of(spec, entry)} tuning trials x {spec.budget.epochs} "
            f"epochs on validation classes (objective {spec.metric}), then seeds {spec.seeds} on the test split, "
            f"protocol `{spec.protocol}`. The children are the trials and reproductions; this run's metrics "
            "roll them up."
        ),
    }
    run = client.create_run(exp_id, tags=tags)
    client.log_param(run.info.run_id, "n_trials", budget_of(spec, entry))
    client.log_param(run.info.run_id, "epochs", spec.budget.epochs)
    client.set_terminated(run.info.run_id, "FINISHED")
    # two processes starting together may both have created one: all keep the earliest
    found = mlflow.search_runs(
        experiment_names=[experiment],
        output_format="list",
        filter_string=tag_filter(spec, dataset, entry, role="parent"),
        order_by=["attributes.start_time ASC", "attributes.run_id ASC"],
    )
    first = found[0].info.run_id if found else run.info.run_id
    if first != run.info.run_id:
        client.delete_run(run.info.run_id)
    return first


@contextmanager
def inside_parent(spec: StudySpec, parent_id: str) -> Iterator[None]:
    """Make ``parent_id`` the active MLflow run so the loop's ``nested=True`` run hangs under it."""
    import mlflow

    mlflow.set_tracking_uri(spec.tracking_uri)
    mlflow.start_run(run_id=parent_id)
    try:
        yield
    finally:
        mlflow.end_run()


def base_tags(spec: StudySpec, dataset: str, entry: Entry, role: str) -> dict[str, str]:
    return {
        "dmlbench.study": spec.name,
        "dmlbench.dataset": dataset,
        "dmlbench.entry": entry.name,
        "dmlbench.label": entry.label,
        "dmlbench.role": role,
    }
