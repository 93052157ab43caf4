"""``dmlbench compare``: runs side by side, for any runs of a store."""
from __future__ import annotations

from typing import Any

from harness.errors import UserError

COMPARE_METRICS = ("test/recall_at_1", "test/map_at_r", "test/r_precision", "test/selected_recall_at_1",
                   "best/val_recall_at_1", "best/val_map_at_r", "params/trainable", "params/trainable_inference",
                   "cost/peak_memory_gb", "cost/throughput_img_s", "cost/wall_time_s")


def compare_rows(run_ids: list[str], tracking_uri: str = "") -> tuple[list[str], list[dict[str, Any]]]:
    """``(column names, rows)``: headline metrics of each run, then the config keys that differ."""
    import mlflow

    from harness.tracking.store import resolve_uri

    mlflow.set_tracking_uri(resolve_uri(tracking_uri))
    runs = []
    for run_id in run_ids:
        try:
            runs.append(mlflow.get_run(run_id))
        except mlflow.exceptions.MlflowException:
            raise UserError(f"no run {run_id!r} in the MLflow store {mlflow.get_tracking_uri()}") from None
    names = [f"{r.info.run_name} ({r.info.run_id[:8]})" for r in runs]
    rows = [{"": "method", **{n: r.data.tags.get("dmlbench.method", "") for n, r in zip(names, runs)}},
            {"": "status", **{n: r.info.status for n, r in zip(names, runs)}}]
    for key in COMPARE_METRICS:
        if any(key in r.data.metrics for r in runs):
            rows.append({"": key, **{n: r.data.metrics.get(key, "-") for n, r in zip(names, runs)}})
    for key in sorted(set().union(*(r.data.params for r in runs))):
        values = [r.data.params.get(key, "-") for r in runs]
        if len(set(values)) > 1:
            rows.append({"": f"config {key}", **dict(zip(names, values))})
    return names, rows
