"""The comparison table (mean +- std over reproduction seeds) and the tuning table."""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from harness.reports.formatting import fmt_count, fmt_pm, md_table, tex_table
from harness.reports.runs import column, mean_std, recall_ks, reproductions, trials
from harness.studies.spec import StudySpec

# ----------------------------------------------------------------------------- tables


def summarize(spec: StudySpec, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, entry): mean/std over seeds of every reported metric."""
    ks = recall_ks(runs) if not runs.empty else [1]
    metrics = [f"test_recall_at_{k}" for k in ks] + [
        "test_map_at_r", "test_r_precision", "test_selected_recall_at_1", "params_trainable",
        "params_trainable_inference", "params_total", "peak_memory_gb", "throughput_img_s"]
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
    """Markdown and LaTeX of the main comparison, one table per dataset."""
    md, tex = [], []
    for dataset in spec.datasets:
        part = summary[summary["dataset"] == dataset]
        ks = sorted(int(m.group(1)) for c in part.columns if (m := re.match(r"test_recall_at_(\d+)_mean$", c))
                    and part[c].notna().any())
        headers = ["Method", "Seeds"] + [f"R@{k}" for k in ks] + [
            "MAP@R", "R-Prec", "R@1 test-sel.", "Params train", "Params infer", "Peak mem (GB)", "img/s"]
        rows = []
        for _, r in part.iterrows():
            pct = [fmt_pm(r[f"test_recall_at_{k}_mean"] * 100, r[f"test_recall_at_{k}_std"] * 100) for k in ks]
            rows.append([r["label"], str(r["seeds"]), *pct,
                         fmt_pm(r["test_map_at_r_mean"] * 100, r["test_map_at_r_std"] * 100),
                         fmt_pm(r["test_r_precision_mean"] * 100, r["test_r_precision_std"] * 100),
                         fmt_pm(r["test_selected_recall_at_1_mean"] * 100, r["test_selected_recall_at_1_std"] * 100),
                         fmt_count(r["params_trainable_mean"]), fmt_count(r["params_trainable_inference_mean"]),
                         fmt_pm(r["peak_memory_gb_mean"], r["peak_memory_gb_std"], 2),
                         fmt_pm(r["throughput_img_s_mean"], float("nan"), 0)])
        md.append(f"### {dataset}\n\n" + md_table(headers, rows))
        caption = (f"{spec.name}: {dataset}, test split (%), mean ± std over seeds, checkpoint selected on "
                   "validation; R@1 test-sel. uses the papers' test-selected checkpoint")
        tex.append(tex_table(headers, rows, caption))
    return "\n".join(md), "\n".join(tex)



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



