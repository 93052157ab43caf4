"""The Optuna storage against MLflow: finished trials are never trained twice.

Every finished tuning trial leaves a run in MLflow (tags ``dmlbench.study``, ``.role=trial``,
``.status=finished``) and a trial in the Optuna storage that points at it (``mlflow_run_id``).
When the storage lost them (an emptied, deleted or replaced journal, a wiped database), a plain
rerun would train every one of them again. :func:`check_ledger` finds such runs before anything
is written and refuses, or with ``rebuild`` adds them back to Optuna from what MLflow recorded
(parameters, objective value, pruned or complete), keeping their original trial numbers as
``dmlbench.source_number`` so their reproductions are recognised too.
"""

from __future__ import annotations

import math
from typing import Any

from harness.errors import UserError
from harness.studies.parents import tag_filter
from harness.studies.spec import Entry, StudySpec, distributions


def ended_trial_runs(spec: StudySpec, dataset: str, entry: Entry) -> list[Any]:
    """Finished or pruned trial runs of the entry in MLflow."""
    import mlflow

    mlflow.set_tracking_uri(spec.tracking_uri)
    if mlflow.get_experiment_by_name(spec.experiments[dataset]) is None:
        return []
    runs = mlflow.search_runs(
        experiment_names=[spec.experiments[dataset]],
        output_format="list",
        filter_string=tag_filter(spec, dataset, entry, role="trial"),
    )
    return [r for r in runs if r.data.tags.get("dmlbench.status") in ("finished", "pruned")]


def known_run_ids(spec: StudySpec, dataset: str, entry: Entry, storage: Any) -> set[str]:
    """MLflow run ids the entry's Optuna trials point at (read-only: no study is created)."""
    import optuna

    try:
        study = optuna.load_study(study_name=spec.study_name(dataset, entry), storage=storage)
    except KeyError:
        return set()
    return {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False)} - {None}


def check_ledger(spec: StudySpec, storage: Any, storage_url: str, rebuild: bool = False) -> int:
    """Refuse (or, with ``rebuild``, repair) a storage that lost finished trials; returns how
    many trials were rebuilt."""
    rebuilt = 0
    for dataset, entry in spec.units():
        if entry.fixed:
            continue
        # MLflow first, Optuna second: a trial names its run in Optuna (``mlflow_run_id``) when the
        # run starts, before it is tagged finished, so every run read here is already known below,
        # even one that another process on this storage started and finished in between.
        ended = ended_trial_runs(spec, dataset, entry)
        known = known_run_ids(spec, dataset, entry, storage) if ended else set()
        missing = [r for r in ended if r.info.run_id not in known]
        if not missing:
            continue
        if not rebuild:
            raise UserError(
                f"the Optuna storage {storage_url} has no record of {len(missing)} finished trial(s) of "
                f"{spec.study_name(dataset, entry)} that MLflow {spec.tracking_uri} holds: the journal was emptied, "
                f"lost or replaced; nothing was trained. Restore it, or rebuild the trials from MLflow with: "
                f"dmlbench study run {spec.path} --rebuild-from-mlflow"
            )
        rebuilt += add_trials(spec, dataset, entry, storage, missing)
    return rebuilt


def add_trials(spec: StudySpec, dataset: str, entry: Entry, storage: Any, runs: list[Any]) -> int:
    """Add each run back as a COMPLETE (or PRUNED) trial with the parameters it recorded."""
    import optuna

    from harness.studies.storage import open_study

    study = open_study(spec, dataset, entry, storage)
    dists = distributions(entry.search_space)
    for run in sorted(runs, key=lambda r: int(r.data.tags.get("dmlbench.trial", 0))):
        params = {k: _parse(run.data.params.get(k), d) for k, d in dists.items()}
        if any(v is None for v in params.values()):
            raise UserError(
                f"MLflow run {run.info.run_id} does not record every searched parameter "
                f"({', '.join(k for k, v in params.items() if v is None)}); it cannot be rebuilt"
            )
        pruned = run.data.tags.get("dmlbench.status") == "pruned"
        value = run.data.metrics.get(spec.metric, float("nan"))
        state = (
            optuna.trial.TrialState.PRUNED if pruned or not math.isfinite(value) else optuna.trial.TrialState.COMPLETE
        )
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=dists,
                state=state,
                value=None if state != optuna.trial.TrialState.COMPLETE else value,
                user_attrs={
                    "mlflow_run_id": run.info.run_id,
                    "dmlbench.rebuilt_from": "mlflow",
                    "dmlbench.source_number": run.data.tags.get("dmlbench.trial", ""),
                },
            )
        )
    return len(runs)


def _parse(text: str | None, dist: Any) -> Any:
    """A parameter as MLflow stored it (a string) back to its distribution's type."""
    import optuna

    if text is None:
        return None
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return next((c for c in dist.choices if str(c) == text), None)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return int(float(text))
    return float(text)
