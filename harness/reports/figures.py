"""Report figures: curves per epoch, accuracy vs cost trade-offs, comparison bars (Optuna's figures
are in :mod:`harness.reports.tuning_figures`)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.reports.runs import reproductions
from harness.reports.style import (
    REFERENCE_COLOUR,
    REFERENCE_STYLES,
    method_colours,
    report_style,
)
from harness.studies.spec import StudySpec

# ----------------------------------------------------------------------------- figures


def _save(fig: Any, path: Path) -> None:
    """PNG at 200 dpi for reading and a vector PDF beside it for papers, both without dates, so a
    rebuild gives the same bytes."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=200, metadata={"Software": None}, bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), metadata={"Creator": None, "Producer": None, "CreationDate": None},
                bbox_inches="tight")
    plt.close(fig)


def _history(client: Any, run_id: str, key: str) -> dict[int, float]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {int(m.step): float(m.value) for m in points}


def _mean_curve(client: Any, run_ids: Sequence[str], key: str, scale: float) -> tuple[list[int], list[float]]:
    """Mean over seeds per epoch of one metric's history."""
    series = [_history(client, rid, key) for rid in run_ids]
    steps = sorted(set().union(*series)) if series else []
    return steps, [float(np.mean([s[e] for s in series if e in s])) * scale for e in steps]


def _legend_outside(fig: Any, axes: Sequence[Any]) -> None:
    """One legend for the figure, right of the panels, each label once."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="center left", bbox_to_anchor=(1.0, 0.5))


def curves_figure(spec: StudySpec, runs: pd.DataFrame, dataset: str, path: Path, untrained: frozenset = frozenset()) -> bool:
    """FRPT Figure 2 style, mean over seeds: validation R@1 per epoch, and the training loss with
    one panel per loss (Proxy Anchor near 15 and cross-entropy near 1 share no scale). Untrained
    reference rows are horizontal lines at their R@1."""
    from matplotlib.ticker import MaxNLocator
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    colours = method_colours([e.name for e in spec.entries], sorted(untrained))
    reps = {e.name: reproductions(runs, spec, dataset, e) for e in spec.entries}
    family = {name: str(rep["params.loss.name"].iloc[0]) if len(rep) and "params.loss.name" in rep else "?"
              for name, rep in reps.items()}
    losses = sorted({family[e.name] for e in spec.entries if e.name not in untrained and len(reps[e.name])})
    with report_style() as plt:
        fig, axes = plt.subplots(1, 1 + len(losses), figsize=(4.2 * (1 + len(losses)), 3.4), squeeze=False)
        axes = list(axes[0])
        panel = {loss: ax for loss, ax in zip(losses, axes[1:])}
        drawn, refs = False, 0
        for entry in spec.entries:
            ids = list(reps[entry.name]["run_id"])
            steps, ys = _mean_curve(client, ids, "val/recall_at_1", 100.0)
            if entry.name in untrained:
                if ys:
                    axes[0].axhline(ys[0], color=colours[entry.name], lw=1.2, label=entry.label,
                                    ls=REFERENCE_STYLES[refs % len(REFERENCE_STYLES)])
                    refs += 1
                continue
            if steps:
                axes[0].plot(steps, ys, marker="o", color=colours[entry.name], label=entry.label)
                drawn = True
            steps, ys = _mean_curve(client, ids, "train/loss", 1.0)
            if steps:
                panel[family[entry.name]].plot(steps, ys, marker="o", color=colours[entry.name], label=entry.label)
        axes[0].set(title=f"{dataset}: validation R@1 (%)", xlabel="epoch")
        for loss, ax in panel.items():
            ax.set(title=f"training loss: {loss.replace('_', ' ')}", xlabel="epoch")
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _legend_outside(fig, axes)
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
                    gpu_memory: bool = True, untrained: frozenset = frozenset()) -> bool:
    """Test R@1 against trainable parameters (and against peak memory when that is GPU memory:
    on CPU it is the process's RSS, dominated by the libraries). The Pareto front is drawn over
    trained methods only; untrained reference rows are grey; labels are placed by adjustText so
    they do not overlap."""
    from adjustText import adjust_text

    part = summary[(summary["dataset"] == dataset) & summary["test/recall_at_1_mean"].notna()]
    if part.empty:
        return False
    colours = method_colours([e.name for e in spec.entries], sorted(untrained))
    panels = [("params/trainable_mean", "trainable parameters")]
    if gpu_memory:
        panels.append(("cost/peak_memory_gb_mean", "peak GPU memory (GB)"))
    with report_style() as plt:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
        ref = part["entry"].isin(untrained).tolist()
        y = (part["test/recall_at_1_mean"] * 100).tolist()
        for ax, (key, label) in zip(axes[0], panels):
            x = part[key].astype(float).tolist()
            ax.scatter(x, y, s=28, c=[colours.get(n, REFERENCE_COLOUR) for n in part["entry"]], zorder=3,
                       edgecolors="white", linewidths=0.5)
            trained = [i for i, r in enumerate(ref) if not r]
            front = [trained[i] for i in pareto_front([x[i] for i in trained], [y[i] for i in trained])]
            ax.plot([x[i] for i in front], [y[i] for i in front], "--", color="0.2", lw=1, drawstyle="steps-post",
                    label="Pareto front (trained methods)")
            if key.startswith("params"):
                ax.set_xscale("symlog", linthresh=1.0)
            ax.set(xlabel=label, ylabel="test R@1 (%)", title=f"{dataset}: R@1 vs {label}")
            if any(ref):
                ax.scatter([], [], s=28, c=REFERENCE_COLOUR, label="untrained reference")
            texts = [ax.text(xi, yi, name, fontsize=7, color="0.35" if r else "0.1")
                     for xi, yi, name, r in zip(x, y, part["label"], ref)]
            adjust_text(texts, x=x, y=y, ax=ax, expand=(1.3, 1.8), force_text=(0.4, 0.8), iter_lim=2000,
                        arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
        fig.tight_layout()
        _save(fig, path)
    return True


def bars_figure(spec: StudySpec, summary: pd.DataFrame, dataset: str, path: Path, untrained: frozenset = frozenset()) -> bool:
    """Bar chart of test R@1 and MAP@R per method (mean, std over seeds as error bars, seed count
    in the label), each method in its own colour; untrained reference rows grey and hatched."""
    part = summary[(summary["dataset"] == dataset) & summary["test/recall_at_1_mean"].notna()]
    if part.empty:
        return False
    colours = method_colours([e.name for e in spec.entries], sorted(untrained))
    with report_style() as plt:
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.32 * len(part) + 1.3), sharey=True)
        y = np.arange(len(part))
        ref = part["entry"].isin(untrained).to_numpy()
        for ax, key, title in ((axes[0], "test/recall_at_1", "test R@1 (%)"), (axes[1], "test/map_at_r", "test MAP@R (%)")):
            mean = part[f"{key}_mean"].to_numpy(float) * 100
            std = np.nan_to_num(part[f"{key}_std"].to_numpy(float) * 100)
            bars = ax.barh(y, mean, xerr=std, color=[colours.get(n, REFERENCE_COLOUR) for n in part["entry"]],
                           capsize=2, edgecolor="white", error_kw={"lw": 0.8})
            for bar, r in zip(bars, ref):
                if r:
                    bar.set_hatch("//")
            for yi, m in zip(y, mean):
                ax.text(m, yi, f" {m:.1f}", va="center", fontsize=7)
            ax.set(xlabel=title, title=f"{dataset}: {title}")
            ax.grid(axis="y", visible=False)
        labels = [f"{lab} (n={int(n)})" + (" [untrained]" if r else "")
                  for lab, n, r in zip(part["label"], part["seeds"], ref)]
        axes[0].set_yticks(y, labels)
        axes[0].invert_yaxis()
        fig.tight_layout()
        _save(fig, path)
    return True
