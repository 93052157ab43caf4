"""The comparison table's uncertainty and the report's verdict, from the reproductions' per-query
tables (``per_query/test.parquet``, one per seed): 95% intervals over seeds and queries, paired
tests against the best method and against the untrained reference (Holm-corrected per table),
and the verdict for the method a user would pick without seeing the test split (the best
validation objective). :mod:`harness.reports.stats` holds the statistics."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from harness.reports.runs import column, reproductions
from harness.reports.stats import holm, paired_differences, paired_p_value, two_level_interval
from harness.studies.spec import Entry, StudySpec
from harness.tracking.per_query import column_of, has_column

#: the metrics whose tables mark what the best does not significantly beat
TESTED = ("test/recall_at_1", "test/map_at_r")
ALPHA = 0.05
METHOD = (
    "95% intervals: two-level percentile bootstrap (seeds resampled, then each drawn seed's test queries), "
    "2,000 resamples, fixed seed. Significance: paired sign-flip permutation test on the per-query differences "
    "(same queries, same seeds, pooled over seeds), 2,000 resamples, Holm-corrected over the methods of a table; "
    "† marks a method not significantly different from the best at 5%."
)


def reference_entries(spec: StudySpec) -> list[Entry]:
    """The backbone as it comes: fixed entries trained for 0 epochs with pretrained weights."""
    return [
        e
        for e in spec.entries
        if e.fixed and e.overrides.get("optim.epochs") == 0 and e.overrides.get("model.pretrained", True) is not False
    ]


def query_tables(spec: StudySpec, runs: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """(dataset, entry) -> the per-query test tables of its reproductions, one ``seed`` column
    added; an entry with a seed whose table is missing (logged before tables existed, or
    ``tracking.log_artifacts=false``) is left out, so it gets no interval rather than a narrower one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, entry in spec.units():
            frames = []
            for _, run in reproductions(runs, spec, dataset, entry).iterrows():
                try:
                    path = mlflow.artifacts.download_artifacts(
                        run_id=run["run_id"],
                        artifact_path="per_query/test.parquet",
                        dst_path=str(Path(tmp) / run["run_id"]),
                    )
                except (MlflowException, OSError):
                    frames = []
                    break
                frame = pd.read_parquet(path)
                frame.insert(0, "seed", int(run["tags.dmlbench.seed"]))
                frames.append(frame)
            if frames:
                out[(dataset, entry.name)] = pd.concat(frames, ignore_index=True)
    return out


def add_uncertainty(spec: StudySpec, summary: pd.DataFrame, tables: dict) -> pd.DataFrame:
    """``summary`` with ``<metric>_ci_low/_ci_high`` for every retrieval metric, and for R@1 and
    MAP@R ``_p_best`` / ``_p_reference`` (Holm-adjusted within the dataset's table) and
    ``_tied_best`` (not significantly different from the table's best)."""
    summary = summary.copy()
    metrics = [c.removesuffix("_mean") for c in summary.columns if c.startswith("test/") and c.endswith("_mean")]
    metrics = [m for m in metrics if has_column(m)]
    references = {e.name for e in reference_entries(spec)}
    for m in metrics:
        col = column_of(m)
        for i, row in summary.iterrows():
            table = tables.get((row["dataset"], row["entry"]))
            if table is None or col not in table:
                low = high = float("nan")
            else:
                low, high = two_level_interval([g[col].to_numpy() for _, g in table.groupby("seed", sort=True)])
            summary.loc[i, f"{m}_ci_low"], summary.loc[i, f"{m}_ci_high"] = low, high
    for m in (m for m in TESTED if f"{m}_mean" in summary):
        col = column_of(m)
        for key in ("_p_best", "_p_reference"):
            summary[f"{m}{key}"] = np.nan
        summary[f"{m}_tied_best"] = False
        for dataset in spec.datasets:
            part = summary[(summary["dataset"] == dataset) & summary[f"{m}_mean"].notna()]
            have = [i for i in part.index if (dataset, part.loc[i, "entry"]) in tables]
            if len(have) < 2:
                continue
            best = max(have, key=lambda i: part.loc[i, f"{m}_mean"])
            best_table = tables[(dataset, part.loc[best, "entry"])]
            others = [i for i in have if i != best]
            raw = [
                paired_p_value(paired_differences(tables[(dataset, part.loc[i, "entry"])], best_table, col))
                for i in others
            ]
            for i, p in zip(others, holm(raw)):
                summary.loc[i, f"{m}_p_best"] = p
                summary.loc[i, f"{m}_tied_best"] = p >= ALPHA
            refs = [i for i in have if part.loc[i, "entry"] in references]
            if refs:
                ref = max(refs, key=lambda i: part.loc[i, f"{m}_mean"])
                ref_table = tables[(dataset, part.loc[ref, "entry"])]
                trained = [i for i in have if part.loc[i, "entry"] not in references]
                raw = [
                    paired_p_value(paired_differences(tables[(dataset, part.loc[i, "entry"])], ref_table, col))
                    for i in trained
                ]
                for i, p in zip(trained, holm(raw)):
                    summary.loc[i, f"{m}_p_reference"] = p
    return summary


def pick_on_validation(spec: StudySpec, runs: pd.DataFrame, dataset: str, tables: dict) -> tuple[float, Entry] | None:
    """The trained entry with the best validation objective (mean over its reproductions): what a
    user would pick without seeing the test split; ``(its validation value, entry)``."""
    candidates = []
    for entry in spec.entries:
        if entry.fixed or (dataset, entry.name) not in tables:
            continue
        val = column(reproductions(runs, spec, dataset, entry), spec.metric)
        if np.isfinite(val).any():
            candidates.append((float(np.nanmean(val)), entry))
    return max(candidates, key=lambda c: c[0]) if candidates else None


def verdicts(spec: StudySpec, runs: pd.DataFrame, summary: pd.DataFrame, tables: dict) -> list[str]:
    """Per dataset: the trained method with the best *validation* objective (mean over its
    reproductions) against the untrained backbone on the test split, paired over queries and seeds."""
    out = []
    test_metric = "test/map_at_r" if spec.objective == "val_map_at_r" else "test/recall_at_1"
    name = "MAP@R" if test_metric == "test/map_at_r" else "R@1"
    references = reference_entries(spec)
    for dataset in spec.datasets:
        picked = pick_on_validation(spec, runs, dataset, tables)
        refs = [e for e in references if (dataset, e.name) in tables]
        if picked is None or not refs:
            continue
        val, chosen = picked
        part = summary[summary["dataset"] == dataset].set_index("entry")
        ref = max(refs, key=lambda e: part.loc[e.name, f"{test_metric}_mean"])
        diff = paired_differences(tables[(dataset, chosen.name)], tables[(dataset, ref.name)], column_of(test_metric))
        p = paired_p_value(diff)
        a, b = part.loc[chosen.name, f"{test_metric}_mean"] * 100, part.loc[ref.name, f"{test_metric}_mean"] * 100
        word = "significant at 5%" if p < ALPHA else "not significant"
        direction = "above" if a > b else "below"
        out.append(
            f"{dataset}: {chosen.label}, the trained method with the best validation {spec.objective} "
            f"({val * 100:.1f}), is {abs(a - b):.1f} points {direction} the untrained backbone ({ref.label}) in test "
            f"{name} ({a:.1f} vs {b:.1f}): {word} (paired permutation test over {len(diff):,} query-seed pairs, "
            f"p = {p:.3g})."
        )
    return out
