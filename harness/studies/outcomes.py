"""What a study has done so far: trial counts, failed work, and which trials keep their weights."""

from __future__ import annotations

from typing import Any

from harness.studies.reproductions import failed_seeds
from harness.studies.spec import StudySpec
from harness.studies.storage import open_study


def trial_counts(study: Any) -> dict[str, int]:
    from optuna.trial import TrialState

    out = {s: 0 for s in ("complete", "pruned", "failed", "running", "waiting")}
    names = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("dmlbench.surplus"):
            continue
        out[names[t.state]] += 1
    return out


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


def failed_work(spec: StudySpec, store: Any) -> list[str]:
    """What failed and is not done: reproduction seeds whose latest attempt failed, and entries
    whose tuning never completed a trial because its trials failed."""
    import optuna

    out = []
    for dataset, entry in spec.units():
        name = spec.study_name(dataset, entry)
        if not entry.fixed:
            c = trial_counts(open_study(spec, dataset, entry, store))
            if c["complete"] + c["pruned"] == 0 and c["failed"]:
                out.append(f"{name}: all {c['failed']} trials failed")
        try:
            seeds = optuna.load_study(study_name=f"{name}/reproductions", storage=store)
        except KeyError:
            continue
        for seed, error in sorted(failed_seeds(seeds).items()):
            out.append(f"{name} seed {seed} ({error[:120]})")
    return out
