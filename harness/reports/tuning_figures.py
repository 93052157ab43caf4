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


def optuna_figures(spec: StudySpec, dataset: str, entry: Entry, folder: Path, notes: list[str],
                   storage: str | None = None) -> list[Path]:
    """Optimisation history and parameter importances; skipped with a note when not meaningful."""
    import optuna
    from matplotlib.ticker import MaxNLocator
    from optuna.trial import TrialState

    study = load_entry_study(spec, dataset, entry, storage)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if study is not None else []
    if not complete:
        notes.append(f"{dataset}/{entry.label}: no completed trial in the Optuna storage, no Optuna figures")
        return []
    colour = method_colours([e.name for e in spec.entries])[entry.name]
    written, stem, metric = [], f"{dataset}__{entry.name}", (study.metric_names or [spec.metric])[0]
    with report_style() as plt:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        numbers, values = [t.number for t in complete], [t.value for t in complete]
        ax.scatter(numbers, values, s=18, color=colour, label=f"completed trial ({len(complete)})", zorder=3)
        pruned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.intermediate_values]
        if pruned:
            ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                       marker="x", s=18, color="0.5", label=f"pruned (last report, {len(pruned)})")
        best, running = [], float("-inf")
        for v in values:
            running = max(running, v)
            best.append(running)
        ax.step(numbers, best, where="post", color="0.2", lw=1, label="best so far")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="trial", ylabel=metric, title=f"{dataset} / {entry.label}: optimisation history")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)  # outside the data
        written.append(folder / f"{stem}_history.png")
        _save(fig, written[-1])

        varying = [k for k in study.best_params if len({t.params.get(k) for t in complete}) > 1]
        if len(complete) < MIN_TRIALS_FOR_IMPORTANCE or not varying:
            notes.append(f"{dataset}/{entry.label}: parameter importances skipped: {len(complete)} completed "
                         f"trial(s) and {len(varying)} varying parameter(s); fANOVA on fewer than "
                         f"{MIN_TRIALS_FOR_IMPORTANCE} trials says nothing")
            return written
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            notes.append(f"{dataset}/{entry.label}: parameter importances skipped ({type(exc).__name__}: {exc})")
            return written
        names = list(importances)[::-1]
        fig, ax = plt.subplots(figsize=(5.5, 0.35 * len(names) + 1.2))
        ax.barh(names, [importances[n] for n in names], color=colour)
        for i, n in enumerate(names):
            ax.text(importances[n], i, f" {importances[n]:.2f}", va="center", fontsize=7)
        ax.grid(axis="y", visible=False)
        ax.set(xlabel=f"fANOVA importance for {metric} ({len(complete)} trials)",
               title=f"{dataset} / {entry.label}: parameter importances")
        written.append(folder / f"{stem}_importance.png")
        _save(fig, written[-1])
    return written
