"""Published numbers (``published.yaml``, each with its source) paired with ours, and paper-shaped tables."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from harness.reports.formatting import (
    DASH,
    RETRIEVAL,
    fmt_pm,
    md_table,
    metric_label,
    tex_table,
)
from harness.reports.runs import column, mean_std, reproductions
from harness.studies.spec import StudySpec

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")

# ----------------------------------------------------------------------------- published numbers


@functools.lru_cache(maxsize=1)
def load_published(path: Path = PUBLISHED_FILE) -> tuple[list[dict[str, Any]], dict[str, str], list[dict[str, Any]]]:
    """Flattened published cells (each complete), the source names and the table headers."""
    raw = yaml.safe_load(path.read_text())
    cells, tables = [], []
    for table in raw["tables"]:
        defaults = {k: v for k, v in table.items() if k not in ("cells", "title", "id")}
        tables.append({"id": table["id"], "title": table["title"], "source": table["source"], "table": table["table"]})
        for cell in table["cells"]:
            full = {**defaults, **cell, "table_id": table["id"]}
            full["setting"] = {"data.shots": 0, **(full.get("setting") or {})}
            missing = {
                "source",
                "table",
                "row",
                "column",
                "method",
                "dataset",
                "backbone",
                "metric",
                "value",
                "unit",
            } - set(full)
            if missing:
                raise ValueError(f"{path}: cell {cell} of table {table['id']} lacks {sorted(missing)}")
            cells.append(full)
    return cells, dict(raw["sources"]), tables


def _run_setting(rep: pd.DataFrame, key: str) -> str | None:
    col = f"params.{key}"
    if col not in rep or rep.empty:
        return None
    values = sorted(set(rep[col].astype(str)))
    return values[0] if len(values) == 1 else None


def _ours(rep: pd.DataFrame, metric: str) -> np.ndarray:
    if metric == "params_trainable_pct":
        return column(rep, "params/trainable") / column(rep, "params/total") * 100.0
    if metric.startswith("params_"):  # published.yaml's params_trainable -> our params/trainable
        return column(rep, metric.replace("params_", "params/", 1))
    return column(rep, f"test/{metric}")


def _scale(metric: str, unit: str) -> float:
    if unit == "%" and RETRIEVAL.match(metric):
        return 100.0
    if unit == "M":
        return 1e-6
    return 1.0


def matches(spec: StudySpec, runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Published cells paired with our reproduction runs of the same protocol."""
    cells, _, _ = load_published()
    out = []
    for dataset, entry in spec.units():
        rep = reproductions(runs, spec, dataset, entry)
        if rep.empty:
            continue
        arch = entry.backbone.split(".", 1)[0]
        for cell in cells:
            if (cell["dataset"], cell["method"], cell["backbone"]) != (dataset, entry.published_as, arch):
                continue
            if any(_run_setting(rep, k) != str(v) for k, v in cell["setting"].items()):
                continue
            scale = _scale(cell["metric"], cell["unit"])
            mean, std = mean_std(_ours(rep, cell["metric"]) * scale)
            sel = float("nan")
            if cell["metric"] == "recall_at_1":
                sel = mean_std(column(rep, "test/selected_recall_at_1") * scale)[0]
            out.append(
                {
                    **cell,
                    "entry": entry.name,
                    "label": entry.label,
                    "ours_mean": mean,
                    "ours_std": std,
                    "ours_test_selected": sel,
                    "seeds": len(rep),
                    "protocol": _run_setting(rep, "protocol") or "fair",
                }
            )
    return out


def published_tables(spec: StudySpec, paired: list[dict[str, Any]]) -> tuple[pd.DataFrame, str, str]:
    """Ours beside every distinct published figure for the same method, dataset and backbone."""
    _, sources, _ = load_published()
    seen, rows = set(), []
    for p in paired:
        key = (p["dataset"], p["entry"], p["metric"], p["value"])
        if key in seen:
            continue
        seen.add(key)
        digits = 3 if p["unit"] == "fraction" else (2 if p["unit"] == "M" else 1)
        # a difference only where our protocol is the papers' (counts do not depend on it)
        comparable = p["protocol"] == "paper" or p["unit"] == "M"
        delta = p["ours_mean"] - float(p["value"]) if comparable else float("nan")
        rows.append(
            {
                "dataset": p["dataset"],
                "method": p["label"],
                "metric": metric_label(p["metric"]),
                "unit": p["unit"],
                "protocol": p["protocol"],
                "seeds": p["seeds"],
                "ours_mean": p["ours_mean"],
                "ours_std": p["ours_std"],
                "ours_test_selected": p["ours_test_selected"],
                "published": float(p["value"]),
                "delta": delta,
                "source": f"{p['source']} {p['table']}",
                "digits": digits,
            }
        )
    columns = [
        "dataset",
        "method",
        "metric",
        "unit",
        "protocol",
        "seeds",
        "ours_mean",
        "ours_std",
        "ours_test_selected",
        "published",
        "delta",
        "source",
    ]
    df = pd.DataFrame(rows, columns=columns + ["digits"])
    headers = [
        "Dataset",
        "Method",
        "Metric",
        "Unit",
        "Protocol",
        "Ours",
        "Ours (test-sel.)",
        "Published",
        "Δ",
        "Source",
    ]
    body = [
        [
            r["dataset"],
            r["method"],
            r["metric"],
            r["unit"],
            r["protocol"],
            fmt_pm(r["ours_mean"], r["ours_std"], r["digits"]),
            fmt_pm(r["ours_test_selected"], float("nan"), r["digits"]),
            f"{r['published']:.{r['digits']}f}",
            DASH if not math.isfinite(r["delta"]) else f"{r['delta']:+.{r['digits']}f}",
            r["source"],
        ]
        for r in rows
    ]
    df = df[columns]  # the CSV: full precision, in the unit of the 'unit' column
    notes = "\n".join(
        f"- `{k}`: {v}" for k, v in sorted(sources.items()) if any(r["source"].startswith(k) for r in rows)
    )
    md = md_table(headers, body) + ("\n" + notes + "\n" if notes else "")
    caption = (
        f"{spec.name}: ours (mean ± std over seeds) beside published numbers. Δ is given only for "
        "paper-protocol runs (all training classes, the best test epoch, as both papers select); "
        "fair-protocol rows (validation classes held out, checkpoint selected on validation) show the "
        "published number for reference only"
    )
    md = f"{caption}.\n\n{md}"
    tex = tex_table(headers, body, caption)
    return df, md, tex


def paper_tables(paired: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """Paper-shaped tables (rows and columns as printed), ours / published in each cell."""
    cells, _, tables = load_published()
    out = []
    for table in tables:
        mine = [p for p in paired if p["table_id"] == table["id"]]
        if not mine:
            continue
        ref = [c for c in cells if c["table_id"] == table["id"]]
        row_names = list(dict.fromkeys(c["row"] for c in ref))
        col_names = list(dict.fromkeys(c["column"] for c in ref))
        headers = [""] + [h for c in col_names for h in (f"{c} (ours)", f"{c} (paper)")]
        body = []
        for r in row_names:
            line = [r]
            for c in col_names:
                cell = next((x for x in ref if x["row"] == r and x["column"] == c), None)
                ours = next((p for p in mine if p["row"] == r and p["column"] == c), None)
                digits = 3 if cell and cell["unit"] == "fraction" else (2 if cell and cell["unit"] == "M" else 1)
                line.append(fmt_pm(ours["ours_mean"], ours["ours_std"], digits) if ours else DASH)
                line.append(f"{float(cell['value']):.{digits}f}" if cell else DASH)
            body.append(line)
        out.append((table["id"], table["title"], md_table(headers, body), tex_table(headers, body, table["title"])))
    return out
