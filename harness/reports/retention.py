"""Forgetting in the report: what each method kept on the other datasets (``eval.transfer``).

The retention table gives, per training dataset and method, the target's test R@1 and its gain over
the untrained backbone (the study's untrained entry, when it has one), then for each transfer
dataset the zero-shot R@1 and the retained fraction (trained / untrained backbone), and their mean.
The figure plots gain against mean retention, one point per method: up is better on the target,
right is less forgetting (100 % = as good as the untrained backbone elsewhere).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.reports.formatting import fmt_pm, md_table, tex_table
from harness.reports.runs import column, mean_std, reproductions
from harness.reports.style import method_colours, report_style
from harness.studies.spec import StudySpec

_KEY = re.compile(r"^(?:metrics\.)?transfer/([^/]+)/(recall_at_1|retained_recall_at_1)$")


def transfer_datasets(runs: pd.DataFrame) -> list[str]:
    """The transfer datasets any run logged, sorted."""
    return sorted({m.group(1) for c in runs.columns if (m := _KEY.match(c)) and runs[c].notna().any()})


def retention_summary(spec: StudySpec, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, entry): mean/std over reproduction seeds of the transfer metrics."""
    names = transfer_datasets(runs)
    rows = []
    for dataset, entry in spec.units():
        rep = reproductions(runs, spec, dataset, entry)
        row: dict[str, Any] = {"dataset": dataset, "entry": entry.name, "label": entry.label}
        for other in names:
            for m in ("recall_at_1", "retained_recall_at_1"):
                key = f"transfer/{other}/{m}"
                row[f"{key}_mean"], row[f"{key}_std"] = mean_std(column(rep, key)) if len(rep) else (np.nan,) * 2
        retained = [row[f"transfer/{o}/retained_recall_at_1_mean"] for o in names]
        row["retained_mean"] = float(np.mean(retained)) if names and not np.isnan(retained).any() else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _gains(summary: pd.DataFrame, part: pd.DataFrame, untrained: frozenset) -> tuple[pd.Series, bool]:
    """Target R@1 in points over the untrained entry (when the study has one), else the R@1 itself."""
    target = summary.set_index("entry").loc[part["entry"], "test/recall_at_1_mean"].to_numpy() * 100
    reference = summary[summary["entry"].isin(untrained) & summary["test/recall_at_1_mean"].notna()]
    if reference.empty:
        return pd.Series(target, index=part.index), False
    return pd.Series(target - reference["test/recall_at_1_mean"].iloc[0] * 100, index=part.index), True


def retention_tables(
    spec: StudySpec, summary: pd.DataFrame, retention: pd.DataFrame, untrained: frozenset
) -> tuple[str, str]:
    """Markdown and LaTeX retention tables, one per training dataset with transfer metrics."""
    md, tex = [], []
    others = sorted({c.split("/")[1] for c in retention.columns if c.startswith("transfer/")})
    for dataset in spec.datasets:
        part = retention[(retention["dataset"] == dataset) & retention["retained_mean"].notna()]
        if part.empty:
            continue
        gains, relative = _gains(summary[summary["dataset"] == dataset], part, untrained)
        headers = ["Method", "Gain R@1" if relative else "R@1"]
        for o in others:
            headers += [f"{o} R@1", f"{o} kept"]
        headers.append("Mean kept")
        rows = []
        for i, r in part.iterrows():
            row = [r["label"], f"{gains[i]:+.1f}" if relative else f"{gains[i]:.1f}"]
            for o in others:
                row += [
                    fmt_pm(r[f"transfer/{o}/recall_at_1_mean"] * 100, r[f"transfer/{o}/recall_at_1_std"] * 100),
                    fmt_pm(
                        r[f"transfer/{o}/retained_recall_at_1_mean"] * 100,
                        r[f"transfer/{o}/retained_recall_at_1_std"] * 100,
                    ),
                ]
            rows.append(row + [f"{r['retained_mean'] * 100:.1f}"])
        caption = (
            f"{spec.name}: trained on {dataset}, evaluated zero-shot on {', '.join(others)}; "
            + (
                "gain: test R@1 points over the untrained backbone on " + dataset
                if relative
                else f"test R@1 on {dataset}"
            )
            + "; kept: R@1 as a % of the untrained backbone's on that dataset (100 = nothing forgotten); "
            "mean +- std over the reproduction seeds"
        )
        md.append(f"### {dataset}\n\n{caption}.\n\n" + md_table(headers, rows))
        tex.append(tex_table(headers, rows, caption, label=f"tab:{spec.name}-{dataset}-retention"))
    return "\n".join(md), "\n".join(tex)


def gain_retention_figure(
    spec: StudySpec, summary: pd.DataFrame, retention: pd.DataFrame, dataset: str, path: Path, untrained: frozenset
) -> bool:
    """Gain on ``dataset`` against mean retention on the transfer datasets, one point per method."""
    from adjustText import adjust_text

    from harness.reports.figures import COLUMN_IN, _save

    part = retention[
        (retention["dataset"] == dataset) & retention["retained_mean"].notna() & ~retention["entry"].isin(untrained)
    ]
    if part.empty:
        return False
    gains, relative = _gains(summary[summary["dataset"] == dataset], part, untrained)
    colours = method_colours([e.name for e in spec.entries], sorted(untrained))
    x, y = (part["retained_mean"] * 100).tolist(), gains.tolist()
    with report_style() as plt:
        fig, ax = plt.subplots(figsize=(COLUMN_IN, 3.0))
        ax.scatter(x, y, s=24, c=[colours[n] for n in part["entry"]], zorder=3, edgecolors="white", linewidths=0.5)
        ax.axvline(100, color="0.5", lw=0.8, ls=":")
        ax.annotate(
            "untrained backbone",
            (100, 1),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=6,
            color="0.4",
            ha="right",
            va="top",
        )
        if relative:
            ax.axhline(0, color="0.5", lw=0.8, ls=":")
        ax.set(
            xlabel="R@1 kept on the other datasets (%)",
            ylabel=f"{dataset} R@1 gain (points)" if relative else f"{dataset} test R@1 (%)",
            title=f"{dataset}: gain vs retention",
        )
        texts = [ax.text(xi, yi, label, fontsize=7, color="0.1") for xi, yi, label in zip(x, y, part["label"])]
        adjust_text(
            texts,
            x=x,
            y=y,
            ax=ax,
            expand=(1.3, 1.8),
            iter_lim=1000,
            arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5},
        )
        fig.tight_layout()
        _save(fig, path)
    return True
