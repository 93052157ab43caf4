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
        "test/map_at_r",
        "test/r_precision",
        "test/selected_recall_at_1",
        "params/trainable",
        "params/trainable_inference",
        "params/total",
        "cost/peak_memory_gb",
        "cost/throughput_img_s",
    ]
    rows = []
    for dataset, entry in spec.units():
        rep = reproductions(runs, spec, dataset, entry)
        row: dict[str, Any] = {
            "dataset": dataset,
            "entry": entry.name,
            "label": entry.label,
            "method": entry.method,
            "backbone": entry.backbone,
            "seeds": len(rep),
            "device": rep["tags.dmlbench.device"].mode().iloc[0] if len(rep) and "tags.dmlbench.device" in rep else "",
        }
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std(column(rep, m)) if len(rep) else (float("nan"),) * 2
        if row["cost/throughput_img_s_mean"] == 0:  # nothing trained: not applicable, in every format
            row["cost/throughput_img_s_mean"] = row["cost/throughput_img_s_std"] = float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def cell(r: pd.Series, m: str, ci: bool) -> str:
    """One retrieval cell in %: ``mean ± std`` (or ``mean [low, high]``, the 95% interval, with
    ``ci``), and a dagger where the method is not significantly different from the best."""
    mean, low, high = r[f"{m}_mean"], r.get(f"{m}_ci_low", np.nan), r.get(f"{m}_ci_high", np.nan)
    if ci and np.isfinite(mean) and np.isfinite(low):
        text = f"{mean * 100:.1f} [{low * 100:.1f}, {high * 100:.1f}]"
    else:
        text = fmt_pm(mean * 100, r[f"{m}_std"] * 100)
    return text + ("†" if bool(r.get(f"{m}_tied_best", False)) else "")


def results_tables(spec: StudySpec, summary: pd.DataFrame, ci: bool = False) -> tuple[str, str]:
    """Markdown and LaTeX, per dataset: the main table (method, trainable parameters, retrieval)
    narrow enough for a two-column paper's ``table*``, then the cost table (seeds, parameters at
    inference, memory, throughput). The best value of each retrieval column is bold in both
    formats (ties included)."""
    md, tex = [], []
    for dataset in spec.datasets:
        part = summary[summary["dataset"] == dataset].reset_index(drop=True)
        ks = sorted(
            int(m.group(1))
            for c in part.columns
            if (m := re.match(r"test/recall_at_(\d+)_mean$", c)) and part[c].notna().any()
        )
        retrieval = [f"test/recall_at_{k}" for k in ks] + ["test/map_at_r", "test/r_precision"]
        headers = ["Method", "Params"] + [f"R@{k}" for k in ks] + ["MAP@R", "R-Prec"]
        if part["test/selected_recall_at_1_mean"].notna().any():  # tested every epoch (paper protocol)
            retrieval.append("test/selected_recall_at_1")
            headers.append("R@1 test-sel.")
        rows = [
            [r["label"], fmt_count(r["params/trainable_mean"]), *[cell(r, m, ci) for m in retrieval]]
            for _, r in part.iterrows()
        ]
        bold = [(row, 2 + col) for col, m in enumerate(retrieval) for row in best_rows(list(part[f"{m}_mean"] * 100))]
        md_rows = [[f"**{v}**" if (i, j) in set(bold) else v for j, v in enumerate(row)] for i, row in enumerate(rows)]
        caption = main_caption(spec, dataset, part, "test-sel." in headers[-1], ci)
        memory = memory_label(part)
        cost_headers = (
            ["Method", "Seeds", "Params (train)", "Params (inference)"] + ([memory] if memory else []) + ["img/s"]
        )
        cost_rows = [
            [
                r["label"],
                str(r["seeds"]),
                fmt_count(r["params/trainable_mean"]),
                fmt_count(r["params/trainable_inference_mean"]),
            ]
            + ([fmt_pm(r["cost/peak_memory_gb_mean"], r["cost/peak_memory_gb_std"], 2)] if memory else [])
            # nothing trained, no training throughput: "not applicable", not 0
            + [fmt_pm(r["cost/throughput_img_s_mean"], float("nan"), 0)]
            for _, r in part.iterrows()
        ]
        cost_caption = (
            f"{spec.name} on {dataset}: cost of each method; parameters as trained (proxies, classifiers "
            "and training-only parts included) and at inference"
            + (
                ""
                if memory
                else "; no peak memory: runs on the CPU report the process's resident set, which the libraries dominate"
            )
        )
        md.append(
            f"### {dataset}\n\n{caption}.\n\n"
            + md_table(headers, md_rows)
            + f"\n{cost_caption}.\n\n"
            + md_table(cost_headers, cost_rows)
        )
        tex.append(tex_table(headers, rows, caption, bold=bold, label=f"tab:{spec.name}-{dataset}", wide=True))
        tex.append(tex_table(cost_headers, cost_rows, cost_caption, label=f"tab:{spec.name}-{dataset}-cost"))
    return "\n".join(md), "\n".join(tex)


def main_caption(spec: StudySpec, dataset: str, part: pd.DataFrame, test_selected: bool, ci: bool = False) -> str:
    """The main table's caption: what the numbers are, over which seeds, under which protocol."""
    protocol = {
        "fair": "checkpoint selected on held-out validation classes",
        "paper": "all training classes, the best test epoch (the papers' protocol)",
    }[spec.protocol]
    counts = sorted(set(int(n) for n in part["seeds"] if pd.notna(n) and n))
    if not counts:  # a study whose reproductions have not run (or failed): say so, not a seed count
        over = "no reproduction finished"
    elif counts == [1]:
        over = f"one seed ({', '.join(map(str, spec.seeds))})"
    else:
        n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        over = f"mean ± std over {n} seeds ({', '.join(map(str, spec.seeds))})"
    if ci and counts:
        over = over.replace("mean ± std", "mean [95% interval over seeds and queries]")
    return (
        f"{spec.name} on {dataset}: test retrieval in %, {over}; protocol '{spec.protocol}': {protocol}; "
        f"Params: trainable parameters. "
        + ("R@1 test-sel. is the best test epoch, as the papers report; " if test_selected else "")
        + "best per column in bold"
        + (
            "; † not significantly different from the best (R@1, MAP@R: paired permutation test over queries "
            "and seeds, Holm-corrected, 5%)"
            if any(
                part.get(f"{m}_tied_best", pd.Series(dtype=bool)).any() for m in ("test/recall_at_1", "test/map_at_r")
            )
            else ""
        )
    )


def memory_label(part: pd.DataFrame) -> str | None:
    """The cost table's memory column: GPU memory when the runs were on GPUs, none on the CPU."""
    devices = {str(d) for d in part.get("device", pd.Series(dtype=str)).dropna()} - {"", "nan"}
    if devices and all(d != "cpu" for d in devices):
        return "Peak GPU mem (GB)"
    return None


#: unit of each summary column stem, written into the CSV header so nobody guesses
UNITS = {"test/": "fraction", "params/": "count", "cost/peak_memory_gb": "GB", "cost/throughput_img_s": "img/s"}


def summary_csv(summary: pd.DataFrame) -> str:
    """The summary at full precision, each metric column named with its unit."""

    def named(col: str) -> str:
        if col.endswith(("_p_best", "_p_reference", "_tied_best")):  # p-values and flags: no unit
            return col
        unit = next((u for stem, u in UNITS.items() if col.startswith(stem)), None)
        return f"{col} [{unit}]" if unit else col

    return summary.rename(columns=named).to_csv(index=False)


def tuning_table(spec: StudySpec, runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for dataset, entry in spec.units():
        t = trials(runs, dataset, entry)
        status = t["tags.dmlbench.status"] if not t.empty else pd.Series(dtype=str)
        row: dict[str, Any] = {
            "dataset": dataset,
            "entry": entry.name,
            "tuned": not entry.fixed,
            "complete": int((status == "finished").sum()),
            "pruned": int((status == "pruned").sum()),
            "failed": int((status == "failed").sum()),
        }
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
