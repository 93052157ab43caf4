"""The comparison table (mean +- std over reproduction seeds) and the tuning table."""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from harness.reports.formatting import best_rows, fmt_count, fmt_pm, md_table, tex_table
from harness.reports.runs import column, mean_std, recall_ks, reproductions, trials
from harness.studies.spec import StudySpec

# ----------------------------------------------------------------------------- tables


def summarize(spec: StudySpec, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, entry): mean/std over seeds of every reported metric."""
    ks = (recall_ks(runs) if not runs.empty else []) or [1]  # no reproduction yet: R@1 columns, empty
    metrics = [f"test/recall_at_{k}" for k in ks] + [
        "test/map_at_r", "test/r_precision", "test/selected_recall_at_1", "params/trainable",
        "params/trainable_inference", "params/total", "cost/peak_memory_gb", "cost/throughput_img_s"]
    rows = []
    for dataset, entry in spec.units():
        rep = reproductions(runs, spec, dataset, entry)
        row: dict[str, Any] = {"dataset": dataset, "entry": entry.name, "label": entry.label, "method": entry.method,
                               "backbone": entry.backbone, "seeds": len(rep)}
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std(column(rep, m)) if len(rep) else (float("nan"),) * 2
        rows.append(row)
    return pd.DataFrame(rows)


def results_tables(spec: StudySpec, summary: pd.DataFrame) -> tuple[str, str]:
    """Markdown and LaTeX of the main comparison, one table per dataset; the best value of each
    retrieval column is bold (ties included)."""
    md, tex = [], []
    for dataset in spec.datasets:
        part = summary[summary["dataset"] == dataset].reset_index(drop=True)
        ks = sorted(int(m.group(1)) for c in part.columns if (m := re.match(r"test/recall_at_(\d+)_mean$", c))
                    and part[c].notna().any())
        retrieval = [f"test/recall_at_{k}" for k in ks] + ["test/map_at_r", "test/r_precision", "test/selected_recall_at_1"]
        headers = ["Method", "Seeds"] + [f"R@{k}" for k in ks] + [
            "MAP@R", "R-Prec", "R@1 test-sel.", "Params train", "Params infer", "Peak mem (GB)", "img/s"]
        rows = []
        for _, r in part.iterrows():
            rows.append([r["label"], str(r["seeds"]),
                         *[fmt_pm(r[f"{m}_mean"] * 100, r[f"{m}_std"] * 100) for m in retrieval],
                         fmt_count(r["params/trainable_mean"]), fmt_count(r["params/trainable_inference_mean"]),
                         fmt_pm(r["cost/peak_memory_gb_mean"], r["cost/peak_memory_gb_std"], 2),
                         # nothing trained, no training throughput: "not applicable", not 0
                         fmt_pm(r["cost/throughput_img_s_mean"] or float("nan"), float("nan"), 0)])
        bold = [(row, 2 + col) for col, m in enumerate(retrieval) for row in best_rows(list(part[f"{m}_mean"] * 100))]
        protocol = {"fair": "checkpoint selected on held-out validation classes",
                    "paper": "all training classes, the best test epoch (the papers' protocol)"}[spec.protocol]
        n_seeds = sorted(set(part["seeds"]))
        seeds = f"{n_seeds[0]}" if len(n_seeds) == 1 else f"{n_seeds[0]}-{n_seeds[-1]}"
        caption = (f"{spec.name} on {dataset}: test split, retrieval in %, mean ± std over {seeds} seed(s) "
                   f"({', '.join(map(str, spec.seeds))}); protocol '{spec.protocol}': {protocol}. "
                   "R@1 test-sel. is the best test epoch, as the papers report; best per column in bold")
        md.append(f"### {dataset}\n\n{caption}.\n\n" + md_table(headers, rows))
        tex.append(tex_table(headers, rows, caption, bold=bold, label=f"tab:{spec.name}-{dataset}"))
    return "\n".join(md), "\n".join(tex)


#: unit of each summary column stem, written into the CSV header so nobody guesses
UNITS = {"test/": "fraction", "params/": "count", "cost/peak_memory_gb": "GB", "cost/throughput_img_s": "img/s"}


def summary_csv(summary: pd.DataFrame) -> str:
    """The summary at full precision, each metric column named with its unit."""
    def named(col: str) -> str:
        unit = next((u for stem, u in UNITS.items() if col.startswith(stem)), None)
        return f"{col} [{unit}]" if unit else col

    return summary.rename(columns=named).to_csv(index=False)


def tuning_table(spec: StudySpec, runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for dataset, entry in spec.units():
        t = trials(runs, dataset, entry)
        status = t["tags.dmlbench.status"] if not t.empty else pd.Series(dtype=str)
        row: dict[str, Any] = {"dataset": dataset, "entry": entry.name, "tuned": not entry.fixed,
                               "complete": int((status == "finished").sum()), "pruned": int((status == "pruned").sum()),
                               "failed": int((status == "failed").sum())}
        done = t[status == "finished"] if not t.empty else t
        values = column(done, spec.metric) if not done.empty else np.array([])
        if len(values) and np.isfinite(values).any():
            best = done.iloc[int(np.nanargmax(values))]
            row["best_trial"] = int(best["trial"])
            row[spec.metric] = f"{float(np.nanmax(values)):.4f}"
            row["best_params"] = ", ".join(f"{k}={best.get(f'params.{k}')}" for k in sorted(entry.search_space))
        else:
            row.update({"best_trial": "", spec.metric: "", "best_params": ""})
        rows.append(row)
    return pd.DataFrame(rows)



