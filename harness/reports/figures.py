"""Report figures: curves per epoch, accuracy vs cost trade-offs, bars, Optuna history and importances."""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.reports.runs import reproductions, trials
from harness.studies.spec import Entry, StudySpec, distributions

# ----------------------------------------------------------------------------- figures


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """PNG at 200 dpi for reading and a vector PDF beside it for papers, both without dates, so a
    rebuild gives the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=200, metadata={"Software": None}, bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), metadata={"Creator": None, "Producer": None, "CreationDate": None},
                bbox_inches="tight")
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


def tradeoff_figure(spec: StudySpec, summary: pd.DataFrame, dataset: str, path: Path,
                    gpu_memory: bool = True) -> bool:
    """Test R@1 against trainable parameters (and against peak memory when that is GPU memory:
    on CPU it is the process's RSS, dominated by the libraries). The Pareto front is drawn over
    trained methods only; untrained reference rows are grey."""
    plt = _plt()
    part = summary[(summary["dataset"] == dataset) & summary["test_recall_at_1_mean"].notna()]
    if part.empty:
        return False
    untrained = {e.name for e in spec.entries if e.fixed and e.overrides.get("optim.epochs") == 0}
    panels = [("params_trainable_mean", "trainable parameters")]
    if gpu_memory:
        panels.append(("peak_memory_gb_mean", "peak GPU memory (GB)"))
    with plt.style.context("default"):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        ref = part["entry"].isin(untrained).tolist()
        y = (part["test_recall_at_1_mean"] * 100).tolist()
        for ax, (key, label) in zip(axes[0], panels):
            x = part[key].astype(float).tolist()
            ax.scatter([xi for xi, r in zip(x, ref) if not r], [yi for yi, r in zip(y, ref) if not r], s=18,
                       label="trained")
            ax.scatter([xi for xi, r in zip(x, ref) if r], [yi for yi, r in zip(y, ref) if r], s=18, c="0.6",
                       label="untrained reference")
            for xi, yi, name in zip(x, y, part["label"]):  # right of its point, at its height
                ax.annotate(name, (xi, yi), fontsize=6, xytext=(5, 0), textcoords="offset points", va="center")
            trained = [i for i, r in enumerate(ref) if not r]
            front = [trained[i] for i in pareto_front([x[i] for i in trained], [y[i] for i in trained])]
            ax.plot([x[i] for i in front], [y[i] for i in front], "r--", lw=1, drawstyle="steps-post")
            ax.scatter([x[i] for i in front], [y[i] for i in front], s=60, facecolors="none", edgecolors="r",
                       label="Pareto front (trained)")
            if key.startswith("params"):
                ax.set_xscale("symlog", linthresh=1.0)
            ax.set(xlabel=label, ylabel="test R@1 (%)", title=f"{dataset}: R@1 vs {label}")
            ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        _save(fig, path)
    return True


#: parameter importances are drawn only from this many completed trials on
MIN_TRIALS_FOR_IMPORTANCE = 10


def bars_figure(summary: pd.DataFrame, dataset: str, path: Path, untrained: frozenset = frozenset()) -> bool:
    """Bar chart of test R@1 and MAP@R per method (mean, std over seeds as error bars, seed count
    in the label); untrained reference rows in grey with a hatch."""
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
            ref = part["entry"].isin(untrained).to_numpy()
            ax.barh(y, mean, xerr=std, color=np.where(ref, "0.75", "tab:blue"), alpha=0.85, capsize=2,
                    hatch=None, edgecolor="none")
            for yi, r in zip(y, ref):
                if r:
                    ax.patches[int(yi)].set_hatch("//")
            for yi, m in zip(y, mean):
                ax.text(m, yi, f" {m:.1f}", va="center", fontsize=7)
            ax.set(xlabel=title, title=f"{dataset}: {title}")
        labels = [f"{lab} (n={int(n)})" for lab, n in zip(part["label"], part["seeds"])]
        axes[0].set_yticks(y, labels, fontsize=8)
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
        if len(complete) < MIN_TRIALS_FOR_IMPORTANCE or not varying:
            notes.append(f"{dataset}/{entry.label}: parameter importances skipped: {len(complete)} completed "
                         f"trial(s) and {len(varying)} varying parameter(s); fANOVA on fewer than "
                         f"{MIN_TRIALS_FOR_IMPORTANCE} trials says nothing")
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



