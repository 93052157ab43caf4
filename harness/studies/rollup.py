"""Roll a study's results up onto its MLflow parent runs, so the collapsed runs table can be sorted
and charted: each (study, dataset, entry) parent gets its best trial's objective and parameters
and its reproductions' test metrics as mean, std and seed count; one study summary run per
dataset holds every entry's headline numbers as a table (its description and ``summary.json``)."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pandas as pd

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
    runs = mlflow.search_runs(
        experiment_names=[spec.experiments[dataset]],
        output_format="list",
        filter_string=tag_filter(spec, dataset, entry, role="reproduction", **{"dmlbench.status": "finished"}),
    )
    if runs:
        tags["dmlbench.seeds"] = str(len(runs))  # a count, not a chart
        for key in TEST_METRICS:
            values = np.array([r.data.metrics[key] for r in runs if key in r.data.metrics], dtype=float)
            if len(values):
                metrics[f"{key}_mean"] = float(values.mean())
                if len(values) > 1:  # one seed has no spread: no chart of zeros
                    metrics[f"{key}_std"] = float(values.std(ddof=1))
        for key in CONSTANTS:
            values = [r.data.metrics[key] for r in runs if key in r.data.metrics]
            if values:
                metrics[key] = float(np.mean(values))
    return {k: v for k, v in metrics.items() if math.isfinite(v)}, tags


def rollup(spec: StudySpec, storage: Any, parents: dict[str, str]) -> None:
    """Log every entry's roll-up onto its parent and a study summary run per dataset."""
    import mlflow
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from harness.tracking.store import ensure_experiment, retried

    mlflow.set_tracking_uri(spec.tracking_uri)
    client = MlflowClient()
    summary: dict[str, list[dict[str, Any]]] = {}
    for dataset, entry in spec.units():
        metrics, tags = entry_rollup(spec, dataset, entry, storage)
        parent = parents[f"{dataset}/{entry.name}"]
        # every `study run` process rolls up at its end, possibly at the same moment: retried
        retried(
            lambda: client.log_batch(
                parent,
                metrics=[Metric(k, v, now_ms(), 0) for k, v in metrics.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )
        )
        # a parent is RUNNING while a trial trains inside it; a server that died before the
        # trial's process left it (its trial already FINISHED, adopted on the rerun, which never
        # enters the parent again) would leave it RUNNING for good: the roll-up, the parent's
        # last write, ends it
        if client.get_run(parent).info.status == "RUNNING":
            retried(lambda: client.set_terminated(parent, "FINISHED"))
        summary.setdefault(dataset, []).append(
            {"entry": entry.name, "label": entry.label, **metrics, "test/seeds": int(tags.get("dmlbench.seeds", 0))}
        )
    for dataset, rows in summary.items():
        exp = ensure_experiment(spec.experiments[dataset])
        found = client.search_runs([exp], filter_string=tag_filter(spec, dataset, role="study"))
        run_id = (
            found[0].info.run_id
            if found
            else client.create_run(
                exp,
                tags={
                    "mlflow.runName": f"{spec.name} (summary)",
                    "dmlbench.study": spec.name,
                    "dmlbench.dataset": dataset,
                    "dmlbench.role": "study",
                },
            ).info.run_id
        )
        # a table, not metrics: per-entry metrics on one run are one-bar charts; the parents
        # carry the same numbers as metrics, one bar per method
        client.set_tag(run_id, "mlflow.note.content", summary_note(spec, dataset, rows))
        client.log_table(run_id, data=pd.DataFrame(rows), artifact_file="summary.json")
        client.set_terminated(run_id, "FINISHED")


def now_ms() -> int:
    return int(time.time() * 1000)


def summary_note(spec: StudySpec, dataset: str, rows: list[dict[str, Any]]) -> str:
    """The study summary run's description: every entry's test results as a Markdown table."""

    def cell(row: dict[str, Any], key: str) -> str:
        mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
        if mean is None:
            return "-"
        return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std and row.get("test/seeds", 0) > 1 else "")

    lines = [
        f"Study `{spec.name}` on **{dataset}**, protocol `{spec.protocol}`: test split of each entry's "
        f"reproductions (mean ± std over seeds {spec.seeds}); the parent runs carry the same numbers as metrics.",
        "",
        "| entry | seeds | R@1 (%) | MAP@R (%) | trainable params |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        params = row.get("params/trainable")
        lines.append(
            f"| {row['label']} | {int(row.get('test/seeds', 0))} | {cell(row, 'test/recall_at_1')} | "
            f"{cell(row, 'test/map_at_r')} | {'-' if params is None else f'{params / 1e6:.2f}M'} |"
        )
    return "\n".join(lines)
