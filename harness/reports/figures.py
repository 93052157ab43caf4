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

#: figure widths in inches: one column and the full page of a two-column paper (fonts in
#: :mod:`harness.reports.style` are 7-9 pt at these sizes)
COLUMN_IN, PAGE_IN = 3.3, 6.9

# ----------------------------------------------------------------------------- figures


def _save(fig: Any, path: Path) -> None:
    """PNG at 200 dpi for reading and a vector PDF beside it for papers, both without dates, so a
    rebuild gives the same bytes."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=200, metadata={"Software": None}, bbox_inches="tight")
    fig.savefig(
        path.with_suffix(".pdf"),
        metadata={"Creator": None, "Producer": None, "CreationDate": None},
        bbox_inches="tight",
    )
    plt.close(fig)


def _history(client: Any, run_id: str, key: str) -> dict[int, float]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {int(m.step): float(m.value) for m in points}


def _mean_curve(client: Any, run_ids: Sequence[str], key: str, scale: float) -> tuple[list[int], list[float]]:
    """Mean over seeds per epoch of one metric's history."""
    series = [_history(client, rid, key) for rid in run_ids]
    steps = sorted(set().union(*series)) if series else []
    return steps, [float(np.mean([s[e] for s in series if e in s])) * scale for e in steps]


def _legend_below(fig: Any, axes: Sequence[Any], ncol: int = 3) -> None:
    """One legend for the figure, below the panels (the figure keeps its page width), each label once."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol)


def identical_groups(summary: pd.DataFrame) -> list[list[str]]:
    """Entries whose reported results are identical (VPT-Shallow and VPT-Deep are the same padding
    prompt on CNNs): groups of entry names, so figures draw them visibly and the report says so."""
    keys = ["test/recall_at_1_mean", "test/map_at_r_mean", "params/trainable_mean"]
    part = summary.dropna(subset=keys[:1])
    groups: dict[tuple, list[str]] = {}
    for _, r in part.iterrows():
        groups.setdefault(tuple(round(float(r[k]), 9) for k in keys), []).append(r["entry"])
    return [g for g in groups.values() if len(g) > 1]


def curves_figure(
    spec: StudySpec,
    runs: pd.DataFrame,
    dataset: str,
    path: Path,
    untrained: frozenset = frozenset(),
    summary: pd.DataFrame | None = None,
) -> bool:
    """FRPT Figure 2 style, mean over seeds: validation R@1 per epoch, and the training loss with
    one panel per loss (Proxy Anchor near 15 and cross-entropy near 1 share no scale). Untrained
    reference rows are horizontal lines at their R@1."""
    from matplotlib.ticker import MaxNLocator
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    colours = method_colours([e.name for e in spec.entries], sorted(untrained))
    reps = {e.name: reproductions(runs, spec, dataset, e) for e in spec.entries}
    family = {
        name: str(rep["params.loss.name"].iloc[0]) if len(rep) and "params.loss.name" in rep else "?"
        for name, rep in reps.items()
    }
    losses = sorted({family[e.name] for e in spec.entries if e.name not in untrained and len(reps[e.name])})
    twin = (
        {name for group in identical_groups(summary[summary["dataset"] == dataset]) for name in group[1:]}
        if summary is not None
        else set()
    )
    with report_style() as plt:
        fig, axes = plt.subplots(1, 1 + len(losses), figsize=(PAGE_IN, 2.6), squeeze=False)
        axes = list(axes[0])
        panel = {loss: ax for loss, ax in zip(losses, axes[1:])}
        drawn, refs = False, 0
        for entry in spec.entries:
            ids = list(reps[entry.name]["run_id"])
            steps, ys = _mean_curve(client, ids, "val/recall_at_1", 100.0)
            if entry.name in untrained:
                if ys:
                    axes[0].axhline(
                        ys[0],
                        color=colours[entry.name],
                        lw=1.2,
                        label=entry.label,
                        ls=REFERENCE_STYLES[refs % len(REFERENCE_STYLES)],
                    )
                    refs += 1
                continue
            style = {"ls": "--", "marker": "x", "ms": 5} if entry.name in twin else {"marker": "o"}  # both visible
            if steps:
                axes[0].plot(steps, ys, color=colours[entry.name], label=entry.label, **style)
                drawn = True
            steps, ys = _mean_curve(client, ids, "train/loss", 1.0)
            if steps:
                panel[family[entry.name]].plot(steps, ys, color=colours[entry.name], label=entry.label, **style)
        axes[0].set(title=f"{dataset}: val R@1 (%)", xlabel="epoch")
        for loss, ax in panel.items():
            ax.set(title=f"loss: {loss.replace('_', ' ')}", xlabel="epoch")
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        _legend_below(fig, axes, ncol=4)
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


def tradeoff_figure(
    spec: StudySpec,
    summary: pd.DataFrame,
    dataset: str,
    path: Path,
    gpu_memory: bool = True,
    untrained: frozenset = frozenset(),
) -> bool:
    """Test R@1 against trainable parameters, log scale spanning the trained methods (and against
    peak memory when that is GPU memory: on CPU it is the process's RSS, dominated by the
    libraries). The Pareto front is over trained methods; untrained rows have no trainable
    parameters, so they are horizontal reference lines; identical rows share one point and one
    label; labels are placed by adjustText so they do not overlap."""
    from adjustText import adjust_text

    part = summary[(summary["dataset"] == dataset) & summary["test/recall_at_1_mean"].notna()]
    trained_rows = part[~part["entry"].isin(untrained)]
    if trained_rows.empty:
        return False
    colours = method_colours([e.name for e in spec.entries], sorted(untrained))
    twins = {g[0]: g for g in identical_groups(part)}
    hidden = {n for g in twins.values() for n in g[1:]}
    labels = {e.name: e.label for e in spec.entries}
    shown = trained_rows[~trained_rows["entry"].isin(hidden)]
    panels = [("params/trainable_mean", "trainable parameters")]
    if gpu_memory:
        panels.append(("cost/peak_memory_gb_mean", "peak GPU memory (GB)"))
    with report_style() as plt:
        fig, axes = plt.subplots(
            1, len(panels), figsize=(COLUMN_IN if len(panels) == 1 else PAGE_IN, 3.0), squeeze=False
        )
        y = (shown["test/recall_at_1_mean"] * 100).tolist()
        for ax, (key, label) in zip(axes[0], panels):
            x = shown[key].astype(float).tolist()
            ax.scatter(x, y, s=24, c=[colours[n] for n in shown["entry"]], zorder=3, edgecolors="white", linewidths=0.5)
            front = pareto_front(x, y)
            ax.plot(
                [x[i] for i in front],
                [y[i] for i in front],
                "--",
                color="0.2",
                lw=1,
                drawstyle="steps-post",
                label="Pareto front",
            )
            for k, (_, r) in enumerate(part[part["entry"].isin(untrained)].iterrows()):
                ax.axhline(
                    r["test/recall_at_1_mean"] * 100,
                    color=REFERENCE_COLOUR,
                    lw=1,
                    ls=REFERENCE_STYLES[k % len(REFERENCE_STYLES)],
                    label=r["label"],
                )
            ax.set_xscale("log")
            lo, hi = min(x), max(x)
            ax.set_xlim(lo / 2.0, hi * 2.0)  # the axis spans the data, with room for the labels
            ax.set(xlabel=label, ylabel="test R@1 (%)", title=f"{dataset}: R@1 vs {label}")
            names = [" = ".join(labels[m] for m in twins.get(n, [n])) for n in shown["entry"]]
            texts = [ax.text(xi, yi, name, fontsize=7, color="0.1") for xi, yi, name in zip(x, y, names)]
            adjust_text(
                texts,
                x=x,
                y=y,
                ax=ax,
                expand=(1.3, 1.8),
                force_text=(0.4, 0.8),
                iter_lim=2000,
                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5},
            )
        fig.tight_layout()
        _legend_below(fig, list(axes[0]), ncol=2)
        _save(fig, path)
    return True


def bars_figure(
    spec: StudySpec, summary: pd.DataFrame, dataset: str, path: Path, untrained: frozenset = frozenset()
) -> bool:
    """Test R@1 and MAP@R per method, sorted by R@1 (mean, std over seeds as error bars, seed count
    in the label), each method in its own colour, untrained reference rows grey and hatched; each
    axis starts near the lowest bar, so the differences between methods are what shows."""
    part = summary[(summary["dataset"] == dataset) & summary["test/recall_at_1_mean"].notna()]
    if part.empty:
        return False
    part = part.sort_values("test/recall_at_1_mean", ascending=False, kind="stable")
    colours = method_colours([e.name for e in spec.entries], sorted(untrained))
    with report_style() as plt:
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_IN, 0.24 * len(part) + 1.1), sharey=True)
        y = np.arange(len(part))
        ref = part["entry"].isin(untrained).to_numpy()
        for ax, key, title in (
            (axes[0], "test/recall_at_1", "test R@1 (%)"),
            (axes[1], "test/map_at_r", "test MAP@R (%)"),
        ):
            mean = part[f"{key}_mean"].to_numpy(float) * 100
            std = np.nan_to_num(part[f"{key}_std"].to_numpy(float) * 100)
            lo, hi = np.nanmin(mean - std), np.nanmax(mean + std)
            pad = max(1.0, 0.08 * (hi - lo))
            base = max(0.0, lo - pad)
            bars = ax.barh(
                y,
                mean - base,
                left=base,
                xerr=std,
                color=[colours.get(n, REFERENCE_COLOUR) for n in part["entry"]],
                capsize=2,
                edgecolor="white",
                error_kw={"lw": 0.8},
            )
            for bar, r in zip(bars, ref):
                if r:
                    bar.set_hatch("//")
            for yi, m, s in zip(y, mean, std):  # right of the error bar, not on it
                ax.text(m + s, yi, f" {m:.1f}", va="center", fontsize=7)
            ax.set_xlim(base, hi + 3 * pad)
            ax.set(xlabel=title, title=f"{dataset}: {title}")
            ax.grid(axis="y", visible=False)
        labels = [
            f"{lab} (n={int(n)})" + (" [untrained]" if r else "")
            for lab, n, r in zip(part["label"], part["seeds"], ref)
        ]
        axes[0].set_yticks(y, labels)
        axes[0].invert_yaxis()
        fig.tight_layout()
        _save(fig, path)
    return True
