"""``dmlbench compare``: runs side by side, for any runs of a store."""

from __future__ import annotations

from typing import Any

from harness.errors import UserError

#: metric sections in the order a reader wants them: results first, costs last
SECTIONS = ("tuning/", "test/", "best/", "params/", "cost/")
#: per-run counts and timings that say nothing when compared
SKIPPED = ("params/total", "cost/train_images", "cost/log_time_s", "test/selected_epoch")


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

    def row(label: str, values: list[Any]) -> None:
        rows.append({"": label, **dict(zip(names, values))})

    rows: list[dict[str, Any]] = []
    row("method", [r.data.tags.get("dmlbench.method", "") for r in runs])
    row("role", [r.data.tags.get("dmlbench.role", "run") for r in runs])
    row("status", [r.info.status for r in runs])
    if any("dmlbench.seeds" in r.data.tags for r in runs):  # a study's parents: seeds behind the means
        row("seeds", [r.data.tags.get("dmlbench.seeds", "-") for r in runs])
    keys = set().union(*(r.data.metrics for r in runs))
    for section in SECTIONS:
        for key in sorted(k for k in keys if k.startswith(section) and k not in SKIPPED):
            row(key, [r.data.metrics.get(key, "-") for r in runs])
    for key in sorted({k for r in runs for k in r.data.tags if k.startswith("best_param.")}):  # tuned values
        row(key, [r.data.tags.get(key, "-") for r in runs])
    for key in sorted(set().union(*(r.data.params for r in runs))):
        values = [r.data.params.get(key, "-") for r in runs]
        if len(set(values)) > 1:
            rows.append({"": f"config {key}", **dict(zip(names, values))})
    return names, rows
