"""The Optuna side of a report, read from the study's own storage (``optuna.load_study``, never
written), so it shows what optuna-dashboard shows: the optimisation history and, from enough
trials, fANOVA parameter importances. Drawn in the report's style rather than Optuna's."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from harness.reports.figures import _save
from harness.reports.style import method_colours, report_style
from harness.studies.spec import Entry, StudySpec

#: parameter importances are drawn only from this many completed trials on
MIN_TRIALS_FOR_IMPORTANCE = 10


def load_entry_study(spec: StudySpec, dataset: str, entry: Entry, storage: str | None = None) -> Any | None:
    """The entry's Optuna study, or None where its storage or study does not exist (read-only)."""
    import optuna

    from harness.studies.storage import open_existing_storage, storage_url

    store = open_existing_storage(storage_url(spec, storage), spec.path)
    if store is None:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=spec.study_name(dataset, entry), storage=store)
    except KeyError:
        return None


def history_figure(spec: StudySpec, dataset: str, path: Path, notes: list[str], storage: str | None = None) -> bool:
    """Small multiples, one panel per tuned entry: completed trials, pruned trials at their last
    report, and the best value so far (what optuna-dashboard's history shows, one figure a dataset)."""
    from matplotlib.ticker import MaxNLocator
    from optuna.trial import TrialState

    from harness.reports.figures import PAGE_IN

    studies = []
    for entry in (e for e in spec.entries if not e.fixed):
        study = load_entry_study(spec, dataset, entry, storage)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if study is not None else []
        if complete:
            studies.append((entry, study, complete))
        else:
            notes.append(
                f"{dataset}/{entry.label}: no completed trial in the Optuna storage, not in the history figure"
            )
    if not studies:
        return False
    colours = method_colours([e.name for e in spec.entries])
    cols = min(4, len(studies))
    rows = -(-len(studies) // cols)
    metric = (studies[0][1].metric_names or [spec.metric])[0]
    with report_style() as plt:
        fig, axes = plt.subplots(rows, cols, figsize=(PAGE_IN, 1.6 * rows + 0.6), squeeze=False, sharey=True)
        for ax, (entry, study, complete) in zip(axes.flat, studies):
            numbers, values = [t.number for t in complete], [t.value for t in complete]
            ax.scatter(numbers, values, s=12, color=colours[entry.name], zorder=3)
            pruned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.intermediate_values]
            if pruned:
                ax.scatter(
                    [t.number for t in pruned],
                    [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                    marker="x",
                    s=12,
                    color="0.5",
                )
            best = [max(values[: i + 1]) for i in range(len(values))]
            ax.step(numbers, best, where="post", color="0.2", lw=1)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{entry.label} ({len(complete)})", fontsize=8)
        for ax in list(axes.flat)[len(studies) :]:
            ax.set_visible(False)
        fig.supxlabel("trial", fontsize=8)
        fig.supylabel(metric, fontsize=8)
        fig.suptitle(
            f"{dataset}: Optuna history (dots: completed trials, x: pruned at their last report, line: best so far)",
            fontsize=8,
        )
        fig.tight_layout()
        _save(fig, path)
    return True


def importance_figures(
    spec: StudySpec, dataset: str, entry: Entry, folder: Path, notes: list[str], storage: str | None = None
) -> list[Path]:
    """fANOVA parameter importances of one entry, from MIN_TRIALS_FOR_IMPORTANCE completed trials on
    (the rule optuna-dashboard does not apply: it computes them from any two); else a note."""
    import optuna
    from optuna.trial import TrialState

    from harness.reports.figures import COLUMN_IN

    study = load_entry_study(spec, dataset, entry, storage)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if study is not None else []
    if not complete:
        return []
    varying = [k for k in study.best_params if len({t.params.get(k) for t in complete}) > 1]
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE or not varying:
        notes.append(
            f"{dataset}/{entry.label}: parameter importances skipped: {len(complete)} completed "
            f"trial(s) and {len(varying)} varying parameter(s); fANOVA on fewer than "
            f"{MIN_TRIALS_FOR_IMPORTANCE} trials says nothing (optuna-dashboard draws them from 2)"
        )
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            )
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        notes.append(f"{dataset}/{entry.label}: parameter importances skipped ({type(exc).__name__}: {exc})")
        return []
    metric = (study.metric_names or [spec.metric])[0]
    colour = method_colours([e.name for e in spec.entries])[entry.name]
    names = list(importances)[::-1]
    with report_style() as plt:
        fig, ax = plt.subplots(figsize=(COLUMN_IN, 0.3 * len(names) + 1.0))
        ax.barh(names, [importances[n] for n in names], color=colour)
        for i, n in enumerate(names):
            ax.text(importances[n], i, f" {importances[n]:.2f}", va="center", fontsize=7)
        ax.grid(axis="y", visible=False)
        ax.set(xlabel=f"fANOVA importance, {metric}", title=f"{dataset} / {entry.label} ({len(complete)} trials)")
        path = folder / f"{dataset}__{entry.name}_importance.png"
        _save(fig, path)
    return [path]
