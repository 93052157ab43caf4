"""Roll a study's results up onto its MLflow parent runs, so the collapsed runs table can be sorted
and charted: each (study, dataset, entry) parent gets its best trial's objective and parameters
and its reproductions' test metrics as mean, std and seed count; one study summary run per
dataset holds every entry's headline numbers (``<entry>/test_recall_at_1_mean`` ...; MLflow's chart view makes a section per entry)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from harness.studies.parents import tag_filter
from harness.studies.spec import Entry, StudySpec

#: reproduction metrics rolled up as mean and std over seeds
TEST_METRICS = ("test/recall_at_1", "test/map_at_r", "test/r_precision", "test/selected_recall_at_1")
#: per-run constants rolled up as their mean
CONSTANTS = ("params/trainable", "params/trainable_inference", "cost/peak_memory_gb", "cost/throughput_img_s")


def entry_rollup(spec: StudySpec, dataset: str, entry: Entry, storage: Any) -> tuple[dict[str, float], dict[str, str]]:
    """``(metrics, tags)`` for one parent run."""
    import mlflow
    import optuna

    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    if not entry.fixed:
        try:
            best = optuna.load_study(study_name=spec.study_name(dataset, entry), storage=storage).best_trial
            metrics[f"tuning/best_{spec.objective}"] = float(best.value)
            tags["dmlbench.best_trial"] = str(best.number)
            tags.update({f"best_param.{k}": str(v) for k, v in best.params.items()})
        except (KeyError, ValueError):
            pass
    runs = mlflow.search_runs(experiment_names=[spec.experiments[dataset]], output_format="list",
                              filter_string=tag_filter(spec, dataset, entry, role="reproduction",
                                                       **{"dmlbench.status": "finished"}))
    if runs:
        metrics["test/seeds"] = float(len(runs))
        for key in TEST_METRICS:
            values = np.array([r.data.metrics[key] for r in runs if key in r.data.metrics], dtype=float)
            if len(values):
                metrics[f"{key}_mean"] = float(values.mean())
                metrics[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        for key in CONSTANTS:
            values = [r.data.metrics[key] for r in runs if key in r.data.metrics]
            if values:
                metrics[key] = float(np.mean(values))
    return {k: v for k, v in metrics.items() if math.isfinite(v)}, tags


def rollup(spec: StudySpec, storage: Any, parents: dict[str, str]) -> None:
    """Log every entry's roll-up onto its parent and a study summary run per dataset."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from harness.tracking.store import ensure_experiment

    mlflow.set_tracking_uri(spec.tracking_uri)
    client = MlflowClient()
    summary: dict[str, dict[str, float]] = {}
    for dataset, entry in spec.units():
        metrics, tags = entry_rollup(spec, dataset, entry, storage)
        parent = parents[f"{dataset}/{entry.name}"]
        for key, value in metrics.items():
            client.log_metric(parent, key, value)
        for key, value in tags.items():
            client.set_tag(parent, key, value)
        summary.setdefault(dataset, {}).update({f"{entry.name}/{k.replace('/', '_')}": v for k, v in metrics.items()
                                                if k.startswith(("test/recall_at_1", "test/map_at_r", "test/seeds"))})
    for dataset, metrics in summary.items():
        exp = ensure_experiment(spec.experiments[dataset])
        found = client.search_runs([exp], filter_string=tag_filter(spec, dataset, role="study"))
        run_id = found[0].info.run_id if found else client.create_run(exp, tags={
            "mlflow.runName": f"{spec.name} (summary)", "dmlbench.study": spec.name, "dmlbench.dataset": dataset,
            "dmlbench.role": "study",
            "mlflow.note.content": f"Study `{spec.name}` on **{dataset}**: every entry's reproduction test "
                                   f"metrics (mean over seeds), protocol `{spec.protocol}`."}).info.run_id
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id, "FINISHED")
