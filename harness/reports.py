"""Study reports rebuilt from MLflow alone: tables, published numbers beside ours, figures.

:func:`build_report` reads the study's runs from MLflow (tag ``dmlbench.study``), never from
Optuna or local files, so anyone with the tracking store can regenerate ``reports/<study>/``.
Output is deterministic: rows follow the spec's order, floats have fixed formats, and PNGs carry
no date, so deleting the folder and rebuilding gives the same bytes.

Files: ``report.md`` (everything, with figures linked), ``results.{csv,md,tex}`` (mean +- std over
the reproduction seeds, test split, checkpoint selected on validation), ``published.{csv,md,tex}``
(ours beside the papers, with the difference), ``table_<id>.{md,tex}`` (paper-shaped tables such as
FRPT Tables 1-5), ``tuning.{csv,md}``, ``spec.yaml`` and ``figures/``.
"""
from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from harness.study_spec import REPO_ROOT, Entry, StudySpec, distributions, dump_spec, load_spec

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")
MANIFEST = "MANIFEST.txt"
#: retrieval metrics are fractions in MLflow and percentages in tables
RETRIEVAL = re.compile(r"^(recall_at_\d+|map_at_r|r_precision)$")
DASH = "—"


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
            missing = {"source", "table", "row", "column", "method", "dataset", "backbone", "metric", "value", "unit"} - set(full)
            if missing:
                raise ValueError(f"{path}: cell {cell} of table {table['id']} lacks {sorted(missing)}")
            cells.append(full)
    return cells, dict(raw["sources"]), tables


# ----------------------------------------------------------------------------- formatting


def fmt_pm(mean: float, std: float, digits: int = 1) -> str:
    """``"73.1 ± 0.4"``; a single seed (std NaN) gives ``"73.1"``; a missing value a dash."""
    if mean is None or not math.isfinite(mean):
        return DASH
    if std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_count(n: float) -> str:
    if n is None or not math.isfinite(n):
        return DASH
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}"
    return f"{int(round(n))}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", DASH: "--", "Δ": r"$\Delta$"}


def tex_escape(text: Any) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def tex_table(headers: Sequence[str], rows: Sequence[Sequence[str]], caption: str) -> str:
    """A booktabs table; no pandas/jinja2 needed."""
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{tex_escape(caption)}}}",
             r"\begin{tabular}{" + "l" * min(2, len(headers)) + "r" * max(0, len(headers) - 2) + "}", r"\toprule",
             " & ".join(tex_escape(h) for h in headers) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape(v) for v in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def metric_label(metric: str) -> str:
    m = re.match(r"recall_at_(\d+)$", metric)
    if m:
        return f"R@{m.group(1)}"
    return {"map_at_r": "MAP@R", "r_precision": "R-Prec", "params_trainable": "Params trained",
            "params_trainable_pct": "Params trained (%)"}.get(metric, metric)


# ----------------------------------------------------------------------------- reading MLflow


def fetch_runs(spec: StudySpec) -> pd.DataFrame:
    """All trial and reproduction runs of the study, one row per run, in a stable order."""
    import mlflow

    experiments = sorted(e for e in set(spec.experiments.values()) if mlflow.get_experiment_by_name(e) is not None)
    if not experiments:
        return pd.DataFrame()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = mlflow.search_runs(experiment_names=experiments, output_format="pandas",
                                filter_string=f"tags.`dmlbench.study` = '{spec.name}'")
    if df.empty:
        return df
    df = df[df["tags.dmlbench.role"].isin(["trial", "reproduction"])].copy()
    return df.sort_values(["start_time", "run_id"]).reset_index(drop=True)


def reproductions(runs: pd.DataFrame, spec: StudySpec, dataset: str, entry: Entry) -> pd.DataFrame:
    """The latest finished reproduction run per seed of one (dataset, entry)."""
    if runs.empty:
        return runs
    sel = runs[(runs["tags.dmlbench.role"] == "reproduction") & (runs["tags.dmlbench.dataset"] == dataset)
               & (runs["tags.dmlbench.entry"] == entry.name) & (runs["tags.dmlbench.status"] == "finished")]
    sel = sel[sel["tags.dmlbench.seed"].astype(int).isin(spec.seeds)]
    return sel.groupby("tags.dmlbench.seed", sort=True).tail(1).sort_values("tags.dmlbench.seed")


def trials(runs: pd.DataFrame, dataset: str, entry: Entry) -> pd.DataFrame:
    if runs.empty:
        return runs
    sel = runs[(runs["tags.dmlbench.role"] == "trial") & (runs["tags.dmlbench.dataset"] == dataset)
               & (runs["tags.dmlbench.entry"] == entry.name)].copy()
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
    ks = {int(m.group(1)) for c in runs.columns if (m := re.match(r"metrics\.test_recall_at_(\d+)$", c))}
    return sorted(ks)


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


def _run_setting(rep: pd.DataFrame, key: str) -> str | None:
    col = f"params.{key}"
    if col not in rep or rep.empty:
        return None
    values = sorted(set(rep[col].astype(str)))
    return values[0] if len(values) == 1 else None


def _ours(rep: pd.DataFrame, metric: str) -> np.ndarray:
    if metric == "params_trainable_pct":
        return column(rep, "params_trainable") / column(rep, "params_total") * 100.0
    if metric.startswith("params_"):
        return column(rep, metric)
    return column(rep, f"test_{metric}")


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
                sel = mean_std(column(rep, "test_selected_recall_at_1") * scale)[0]
            out.append({**cell, "entry": entry.name, "label": entry.label, "ours_mean": mean, "ours_std": std,
                        "ours_test_selected": sel, "seeds": len(rep)})
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
        delta = p["ours_mean"] - float(p["value"])
        rows.append({
            "dataset": p["dataset"], "method": p["label"], "metric": metric_label(p["metric"]), "unit": p["unit"],
            "ours": fmt_pm(p["ours_mean"], p["ours_std"], digits),
            "ours_test_selected": fmt_pm(p["ours_test_selected"], float("nan"), digits),
            "published": f"{float(p['value']):.{digits}f}",
            "delta": DASH if not math.isfinite(delta) else f"{delta:+.{digits}f}",
            "source": f"{p['source']} {p['table']}",
        })
    df = pd.DataFrame(rows, columns=["dataset", "method", "metric", "unit", "ours", "ours_test_selected",
                                     "published", "delta", "source"])
    headers = ["Dataset", "Method", "Metric", "Unit", "Ours (val-sel.)", "Ours (test-sel.)", "Published", "Δ", "Source"]
    body = df.values.tolist()
    notes = "\n".join(f"- `{k}`: {v}" for k, v in sorted(sources.items()) if any(r["source"].startswith(k) for r in rows))
    md = md_table(headers, body) + ("\n" + notes + "\n" if notes else "")
    tex = tex_table(headers, body, f"{spec.name}: ours (mean ± std over seeds) beside published numbers; "
                                   "both papers select checkpoints on the test set")
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


# ----------------------------------------------------------------------------- figures


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None}, bbox_inches="tight")
    _plt().close(fig)


def _history(client: Any, run_id: str, key: str) -> dict[int, float]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {int(m.step): float(m.value) for m in points}


def curves_figure(spec: StudySpec, runs: pd.DataFrame, dataset: str, path: Path) -> bool:
    """FRPT Figure 2 style: validation R@1 and training loss per epoch, mean over seeds."""
    from mlflow.tracking import MlflowClient

    client, plt = MlflowClient(), _plt()
    with plt.style.context("default"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        drawn = False
        for entry in spec.entries:
            rep = reproductions(runs, spec, dataset, entry)
            for ax, key, scale in ((axes[0], "val_recall_at_1", 100.0), (axes[1], "train_loss", 1.0)):
                series = [_history(client, rid, key) for rid in rep["run_id"]]
                steps = sorted(set().union(*series)) if series else []
                if not steps:
                    continue
                ys = [np.mean([s[e] for s in series if e in s]) * scale for e in steps]
                ax.plot(steps, ys, marker="o", ms=3, label=entry.label)
                drawn = True
        axes[0].set(title=f"{dataset}: validation R@1 (%)", xlabel="epoch")
        axes[1].set(title=f"{dataset}: training loss", xlabel="epoch")
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, path)
    return drawn


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of points no other point beats (lower x and higher y), sorted by x."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], -ys[i]))
    front, best = [], -math.inf
    for i in order:
        if ys[i] > best:
            front.append(i)
            best = ys[i]
    return front


def tradeoff_figure(spec: StudySpec, summary: pd.DataFrame, dataset: str, path: Path) -> bool:
    """Test R@1 against trainable parameters and against peak memory, Pareto front marked."""
    plt = _plt()
    part = summary[(summary["dataset"] == dataset) & summary["test_recall_at_1_mean"].notna()]
    if part.empty:
        return False
    with plt.style.context("default"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        y = (part["test_recall_at_1_mean"] * 100).tolist()
        for ax, key, label in ((axes[0], "params_trainable_mean", "trainable parameters"),
                               (axes[1], "peak_memory_gb_mean", "peak memory (GB)")):
            x = part[key].astype(float).tolist()
            ax.scatter(x, y, s=18)
            for xi, yi, name in zip(x, y, part["label"]):
                ax.annotate(name, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
            front = pareto_front(x, y)
            ax.plot([x[i] for i in front], [y[i] for i in front], "r--", lw=1, drawstyle="steps-post")
            ax.scatter([x[i] for i in front], [y[i] for i in front], s=60, facecolors="none", edgecolors="r",
                       label="Pareto front")
            if key.startswith("params"):
                ax.set_xscale("symlog", linthresh=1.0)
            ax.set(xlabel=label, ylabel="test R@1 (%)", title=f"{dataset}: R@1 vs {label}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, path)
    return True


def bars_figure(summary: pd.DataFrame, dataset: str, path: Path) -> bool:
    """Bar chart of test R@1 and MAP@R per method (mean, std over seeds as error bars)."""
    plt = _plt()
    part = summary[(summary["dataset"] == dataset) & summary["test_recall_at_1_mean"].notna()]
    if part.empty:
        return False
    with plt.style.context("default"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(part) + 1.2), sharey=True)
        y = np.arange(len(part))
        for ax, key, title in ((axes[0], "test_recall_at_1", "test R@1 (%)"), (axes[1], "test_map_at_r", "test MAP@R (%)")):
            mean = part[f"{key}_mean"].to_numpy(float) * 100
            std = np.nan_to_num(part[f"{key}_std"].to_numpy(float) * 100)
            ax.barh(y, mean, xerr=std, color="tab:blue", alpha=0.8)
            for yi, m in zip(y, mean):
                ax.text(m, yi, f" {m:.1f}", va="center", fontsize=7)
            ax.set(xlabel=title, title=f"{dataset}: {title}")
        axes[0].set_yticks(y, part["label"].tolist(), fontsize=8)
        axes[0].invert_yaxis()
        fig.tight_layout()
        _save(fig, path)
    return True


def rebuilt_study(spec: StudySpec, entry: Entry, t: pd.DataFrame) -> Any:
    """An in-memory Optuna study rebuilt from the MLflow trial runs (the report never reads Optuna)."""
    import optuna
    from optuna.trial import TrialState, create_trial

    dists = distributions(entry.search_space)
    study = optuna.create_study(direction="maximize", study_name=f"{spec.name}/{entry.name}")
    for _, run in t.iterrows():
        state = {"finished": TrialState.COMPLETE, "pruned": TrialState.PRUNED}.get(run["tags.dmlbench.status"])
        if state is None:
            continue
        params = {}
        for key, dist in dists.items():
            text = run.get(f"params.{key}")
            if text is None or (isinstance(text, float) and math.isnan(text)):
                break
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                params[key] = next((c for c in dist.choices if str(c) == str(text)), dist.choices[0])
            elif isinstance(dist, optuna.distributions.IntDistribution):
                params[key] = int(float(text))
            else:
                params[key] = min(max(float(text), dist.low), dist.high)
        if len(params) != len(dists):
            continue
        value = float(run.get(f"metrics.{spec.metric}", float("nan")))
        if state == TrialState.COMPLETE and not math.isfinite(value):
            continue
        study.add_trial(create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                                     params=params, distributions=dists,
                                     user_attrs={"trial": int(run["trial"])}))
    return study


def _retitle(ax: Any, title: str) -> None:
    """Replace Optuna's generic title (whichever position it used) by one naming the entry."""
    for loc in ("center", "right"):
        ax.set_title("", loc=loc)
    ax.set_title(title, loc="left")


def optuna_figures(spec: StudySpec, runs: pd.DataFrame, dataset: str, entry: Entry, folder: Path,
                   notes: list[str]) -> list[Path]:
    """Optimisation history and parameter importances; skipped with a note when not meaningful."""
    import matplotlib
    import optuna
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    plt = _plt()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = rebuilt_study(spec, entry, trials(runs, dataset, entry))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    written: list[Path] = []
    stem = f"{dataset}__{entry.name}"
    if not complete:
        notes.append(f"{dataset}/{entry.label}: no completed trial, no Optuna figures")
        return written
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")
        ax = ovm.plot_optimization_history(study, target_name=spec.metric)
        _retitle(ax, f"{dataset} / {entry.label}: optimisation history")
        path = folder / f"{stem}_history.png"
        _save(ax.figure, path)
        written.append(path)
        varying = [k for k in study.best_params if len({t.params[k] for t in complete}) > 1]
        if len(complete) < 2 or not varying:
            notes.append(f"{dataset}/{entry.label}: parameter importances skipped "
                         f"({len(complete)} completed trial(s), {len(varying)} varying parameter(s); need 2 and 1)")
            return written
        try:
            ax = ovm.plot_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target_name=spec.metric)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            plt.close("all")
            notes.append(f"{dataset}/{entry.label}: parameter importances skipped ({type(exc).__name__}: {exc})")
            return written
        _retitle(ax, f"{dataset} / {entry.label}: parameter importances")
        path = folder / f"{stem}_importance.png"
        _save(ax.figure, path)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- the report


def _write(out: Path, name: str, text: str, written: list[Path]) -> None:
    path = out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    written.append(path)


def build_report(spec_path: str | Path, out_dir: str | Path | None = None, tracking_uri: str | None = None) -> Path:
    """Write ``reports/<study>/`` (or ``out_dir``) from the study's MLflow runs; returns the folder."""
    import mlflow

    spec = load_spec(spec_path)
    mlflow.set_tracking_uri(tracking_uri or spec.tracking_uri)
    out = Path(out_dir) if out_dir else REPO_ROOT / "reports" / spec.name
    out.mkdir(parents=True, exist_ok=True)
    runs = fetch_runs(spec)
    written: list[Path] = []
    notes: list[str] = []

    summary = summarize(spec, runs)
    _write(out, "results.csv", summary.to_csv(index=False, float_format="%.6f"), written)
    results_md, results_tex = results_tables(spec, summary)
    _write(out, "results.md", results_md, written)
    _write(out, "results.tex", results_tex, written)

    paired = matches(spec, runs)
    published_df, published_md, published_tex = published_tables(spec, paired)
    if paired:
        _write(out, "published.csv", published_df.to_csv(index=False), written)
        _write(out, "published.md", published_md, written)
        _write(out, "published.tex", published_tex, written)
    shaped = paper_tables(paired)
    for table_id, _, md, tex in shaped:
        _write(out, f"table_{table_id}.md", md, written)
        _write(out, f"table_{table_id}.tex", tex, written)

    tuning = tuning_table(spec, runs)
    _write(out, "tuning.csv", tuning.to_csv(index=False), written)
    _write(out, "spec.yaml", dump_spec(spec), written)

    figures: list[tuple[str, Path]] = []
    for dataset in spec.datasets:
        path = out / "figures" / f"curves_{dataset}.png"
        if curves_figure(spec, runs, dataset, path):
            figures.append((f"{dataset}: validation R@1 and training loss per epoch", path))
            written.append(path)
        elif path.exists():
            path.unlink()
        path = out / "figures" / f"comparison_{dataset}.png"
        if bars_figure(summary, dataset, path):
            figures.append((f"{dataset}: test R@1 and MAP@R per method", path))
            written.append(path)
        path = out / "figures" / f"tradeoff_{dataset}.png"
        if tradeoff_figure(spec, summary, dataset, path):
            figures.append((f"{dataset}: R@1 vs trainable parameters and peak memory", path))
            written.append(path)
        for entry in spec.entries:
            if entry.fixed:
                continue
            for p in optuna_figures(spec, runs, dataset, entry, out / "figures" / "optuna", notes):
                kind = "Optuna optimisation history" if p.stem.endswith("_history") else "parameter importances"
                figures.append((f"{dataset} / {entry.label}: {kind}", p))
                written.append(p)

    for dataset, entry in spec.units():
        n = int(summary[(summary["dataset"] == dataset) & (summary["entry"] == entry.name)]["seeds"].iloc[0])
        if n < len(spec.seeds):
            notes.append(f"{dataset}/{entry.label}: {n} of {len(spec.seeds)} reproduction seeds finished")

    report = _report_md(spec, results_md, published_md if paired else "", shaped, tuning, figures, notes, out)
    _write(out, "report.md", report, written)
    _prune_stale(out, written)
    _log_to_mlflow(spec, out)
    return out


def _report_md(spec: StudySpec, results_md: str, published_md: str, shaped: list, tuning: pd.DataFrame,
               figures: list[tuple[str, Path]], notes: list[str], out: Path) -> str:
    b = spec.budget
    lines = [f"# Study `{spec.name}`", ""]
    if spec.description:
        lines += [spec.description, ""]
    lines += [
        f"- datasets: {', '.join(spec.datasets)}; backbone: {spec.backbone}",
        f"- objective: maximise `{spec.metric}` (validation split, class-disjoint from training)",
        f"- budget per method and dataset: {b.n_trials} trials x {b.epochs} epochs"
        + (f", at most {b.timeout_s:g} s" if b.timeout_s else ""),
        f"- sampler: {spec.sampler['name']} (seed {spec.sampler.get('seed', 0)}); pruner: {spec.pruner['name']}",
        f"- reproductions of each best configuration: seeds {', '.join(map(str, spec.seeds))}",
        "",
        "## Results (test split, %, mean ± std over seeds; checkpoint selected on validation)",
        "",
        results_md,
    ]
    if published_md:
        lines += ["## Published numbers beside ours", "",
                  "Both papers select the checkpoint on the test set: compare their R@1 with the test-selected "
                  "column; the validation-selected figure is the fair one.", "", published_md]
    for _, title, md, _ in shaped:
        lines += [f"## {title}", "", "Each cell: ours (mean ± std over seeds, validation-selected) | paper.", "", md]
    lines += ["## Tuning", "", md_table(list(tuning.columns), tuning.astype(str).values.tolist())]
    if figures:
        lines += ["## Figures", ""]
        for caption, path in figures:
            lines += [f"![{caption}]({path.relative_to(out).as_posix()})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _prune_stale(out: Path, written: list[Path]) -> None:
    """Remove files an earlier build wrote that this build did not (listed in the manifest)."""
    manifest = out / MANIFEST
    keep = {p.relative_to(out).as_posix() for p in written} | {MANIFEST}
    if manifest.exists():
        for name in manifest.read_text().split():
            if name not in keep and (out / name).is_file():
                (out / name).unlink()
    manifest.write_text("\n".join(sorted(keep - {MANIFEST})) + "\n")


def _log_to_mlflow(spec: StudySpec, out: Path) -> None:
    """Attach the report to a study-level run (role=report) in the first dataset's experiment."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from harness.tracking import ensure_experiment

    client = MlflowClient()
    experiment = spec.experiments[spec.datasets[0]]
    exp = client.get_experiment_by_name(experiment)
    found = [] if exp is None else mlflow.search_runs(
        experiment_names=[experiment], output_format="list",
        filter_string=f"tags.`dmlbench.study` = '{spec.name}' and tags.`dmlbench.role` = 'report'")
    if found:
        run_id = found[0].info.run_id
    else:
        exp_id = exp.experiment_id if exp else ensure_experiment(experiment)
        run_id = client.create_run(exp_id, tags={"mlflow.runName": f"{spec.name} report", "dmlbench.study": spec.name,
                                                 "dmlbench.role": "report"}).info.run_id
    client.log_artifacts(run_id, str(out), artifact_path="report")
    client.set_terminated(run_id, "FINISHED")
