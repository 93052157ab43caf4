"""``dmlbench study status``: trials by state against the budget, best value, reproductions done."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness.studies.loading import load_spec
from harness.studies.outcomes import trial_counts
from harness.studies.runner import finished_reproductions, quiet_optuna
from harness.studies.spec import StudySpec
from harness.studies.storage import budget_of, open_existing_storage, storage_url


def study_status(spec_path: str | Path, storage: str | None = None) -> Any:
    """One row per (dataset, entry): trials by state vs budget, best value, reproductions done."""
    import optuna
    import pandas as pd

    quiet_optuna()
    spec = load_spec(spec_path)
    url = storage_url(spec, storage)
    # read-only: a missing journal is not created, existing studies are loaded, never created
    store = open_existing_storage(url, spec.path)
    existing = (
        set()
        if store is None
        else {s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)}
    )
    rows = []
    for dataset, entry in spec.units():
        row: dict[str, Any] = {
            "dataset": dataset,
            "entry": entry.name,
            "method": entry.method,
            "budget": "fixed" if entry.fixed else budget_of(spec, entry),
        }
        counts = {k: 0 for k in ("complete", "pruned", "failed", "running")}
        best, best_trial, source = float("nan"), "", "fixed" if entry.fixed else None
        if not entry.fixed and spec.study_name(dataset, entry) in existing:
            study = optuna.load_study(study_name=spec.study_name(dataset, entry), storage=store)
            counts.update({k: v for k, v in trial_counts(study).items() if k in counts})
            try:
                best, best_trial = study.best_value, str(study.best_trial.number)
                source = best_trial
            except ValueError:
                pass
        row.update(counts)
        row[spec.metric] = round(best, 4) if math.isfinite(best) else float("nan")
        row["best_trial"] = best_trial
        done = (
            finished_reproductions(spec, dataset, entry, source) if source is not None and _store_exists(spec) else {}
        )
        row["reproductions"] = f"{len([s for s in spec.seeds if s in done])}/{len(spec.seeds)}"
        rows.append(row)
    return pd.DataFrame(rows)


def _store_exists(spec: StudySpec) -> bool:
    """Avoid creating an empty MLflow store just to report that nothing ran yet."""
    uri = spec.tracking_uri
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    return True
