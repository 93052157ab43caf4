"""Reading a study's runs from MLflow (tag ``dmlbench.study``) into a DataFrame, and selecting from it."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd

from harness.studies.spec import Entry, StudySpec

# ----------------------------------------------------------------------------- reading MLflow


def fetch_runs(spec: StudySpec) -> pd.DataFrame:
    """All trial and reproduction runs of the study, one row per run, in a stable order."""
    import mlflow

    experiments = sorted(e for e in set(spec.experiments.values()) if mlflow.get_experiment_by_name(e) is not None)
    if not experiments:
        return pd.DataFrame()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = mlflow.search_runs(
            experiment_names=experiments, output_format="pandas", filter_string=f"tags.`dmlbench.study` = '{spec.name}'"
        )
    if df.empty:
        return df
    df = df[df["tags.dmlbench.role"].isin(["trial", "reproduction"])].copy()
    return df.sort_values(["start_time", "run_id"]).reset_index(drop=True)


def reproductions(runs: pd.DataFrame, spec: StudySpec, dataset: str, entry: Entry) -> pd.DataFrame:
    """The latest finished reproduction run per seed of one (dataset, entry)."""
    if runs.empty:
        return runs
    sel = runs[
        (runs["tags.dmlbench.role"] == "reproduction")
        & (runs["tags.dmlbench.dataset"] == dataset)
        & (runs["tags.dmlbench.entry"] == entry.name)
        & (runs["tags.dmlbench.status"] == "finished")
    ]
    sel = sel[sel["tags.dmlbench.seed"].astype(int).isin(spec.seeds)]
    return sel.groupby("tags.dmlbench.seed", sort=True).tail(1).sort_values("tags.dmlbench.seed")


def trials(runs: pd.DataFrame, dataset: str, entry: Entry) -> pd.DataFrame:
    if runs.empty:
        return runs
    sel = runs[
        (runs["tags.dmlbench.role"] == "trial")
        & (runs["tags.dmlbench.dataset"] == dataset)
        & (runs["tags.dmlbench.entry"] == entry.name)
    ].copy()
    sel["trial"] = sel["tags.dmlbench.trial"].astype(int)
    return sel.sort_values(["trial", "start_time"])


def column(df: pd.DataFrame, name: str) -> np.ndarray:
    """Float values of ``metrics.<name>`` (NaN where absent)."""
    key = f"metrics.{name}"
    return df[key].astype(float).to_numpy() if key in df else np.full(len(df), np.nan)


def mean_std(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def recall_ks(runs: pd.DataFrame) -> list[int]:
    ks = {int(m.group(1)) for c in runs.columns if (m := re.match(r"metrics\.test/recall_at_(\d+)$", c))}
    return sorted(ks)
