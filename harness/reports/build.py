"""Study reports rebuilt from MLflow alone: tables, published numbers beside ours, figures.

:func:`build_report` reads the study's runs from MLflow (tag ``dmlbench.study``), so anyone with
the tracking store can regenerate ``reports/<study>/``; only the Optuna figures (history,
importances) read the study's Optuna storage, read-only, as optuna-dashboard does.
Output is deterministic: rows follow the spec's order, floats have fixed formats, and PNGs carry
no date, so deleting the folder and rebuilding gives the same bytes.

Files: ``report.md`` (everything, with figures linked), ``results.{csv,md,tex}`` (mean +- std over
the reproduction seeds, test split, checkpoint selected on validation), ``published.{csv,md,tex}``
(ours beside the papers, with the difference), ``table_<id>.{md,tex}`` (paper-shaped tables such as
FRPT Tables 1-5), ``retention.{md,tex}`` (runs with ``eval.transfer``), ``tuning.{csv,md}``,
``spec.yaml`` and ``figures/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from harness.config import home
from harness.errors import UserError
from harness.reports.figures import bars_figure, curves_figure, identical_groups, tradeoff_figure
from harness.reports.formatting import md_table
from harness.reports.gallery import report_galleries
from harness.reports.published import matches, paper_tables, published_tables
from harness.reports.retention import gain_retention_figure, retention_summary, retention_tables, transfer_datasets
from harness.reports.runs import fetch_runs
from harness.reports.significance import METHOD, add_uncertainty, query_tables, verdicts
from harness.reports.tables import results_tables, summarize, summary_csv, tuning_table
from harness.reports.tuning_figures import history_figure, importance_figures
from harness.studies.loading import load_spec
from harness.studies.spec import StudySpec, dump_spec

MANIFEST = "MANIFEST.txt"

# ----------------------------------------------------------------------------- the report


def _write(out: Path, name: str, text: str, written: list[Path]) -> None:
    path = out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    written.append(path)


def build_report(
    spec_path: str | Path,
    out_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    ci: bool = False,
) -> Path:
    """Write ``reports/<study>/`` (or ``out_dir``) from the study's MLflow runs; returns the folder."""
    import mlflow

    spec = load_spec(spec_path)
    uri = tracking_uri or spec.tracking_uri
    mlflow.set_tracking_uri(uri)
    runs = fetch_runs(spec)
    if runs.empty:  # checked before anything is written
        raise UserError(
            f"no runs of study '{spec.name}' in the MLflow store {uri}; run "
            f"'dmlbench study run {spec.path}' first, or pass the store with --tracking-uri"
        )

    def logged(prefixes: tuple[str, ...]) -> bool:
        return any(c.startswith(prefixes) and runs[c].notna().any() for c in runs.columns)

    if logged(("metrics.train_loss", "metrics.best_val_")) and not logged(("metrics.train/", "metrics.best/")):
        raise UserError(
            f"the runs of study '{spec.name}' in {uri} use metric names from before dmlbench "
            "namespaced them ('test_recall_at_1', now 'test/recall_at_1'); rerun the study into a "
            "fresh store (or under a new study name) to report on it"
        )
    from harness.tracking.store import check_writable

    check_writable(uri)  # the report is logged to MLflow too: refuse before writing any file
    out = Path(out_dir) if out_dir else home() / "reports" / spec.name
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise UserError(f"cannot write the report to {out} ({exc.strerror}); pass --out DIR") from None
    written: list[Path] = []
    notes: list[str] = []

    queries = query_tables(spec, runs)  # per-query test tables of the reproductions: the uncertainty
    summary = add_uncertainty(spec, summarize(spec, runs), queries)
    _write(out, "results.csv", summary_csv(summary), written)
    results_md, results_tex = results_tables(spec, summary, ci=ci)
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

    untrained = frozenset(e.name for e in spec.entries if e.fixed and e.overrides.get("optim.epochs") == 0)
    retention = retention_summary(spec, runs) if transfer_datasets(runs) else None
    retention_md = ""
    if retention is not None:  # eval.transfer: what each method kept on the other datasets
        retention_md, retention_tex = retention_tables(spec, summary, retention, untrained)
        _write(out, "retention.md", retention_md, written)
        _write(out, "retention.tex", retention_tex, written)

    tuning = tuning_table(spec, runs)
    _write(out, "tuning.csv", tuning.to_csv(index=False), written)
    _write(out, "spec.yaml", dump_spec(spec), written)

    figures: list[tuple[str, Path]] = []
    for dataset in spec.datasets:
        path = out / "figures" / f"curves_{dataset}.png"
        if curves_figure(spec, runs, dataset, path, untrained, summary=summary):
            figures.append((f"{dataset}: validation R@1 and training loss per epoch", path))
            written.append(path)
        elif path.exists():
            path.unlink()
        path = out / "figures" / f"comparison_{dataset}.png"
        if bars_figure(spec, summary, dataset, path, untrained):
            figures.append((f"{dataset}: test R@1 and MAP@R per method", path))
            written.append(path)
        path = out / "figures" / f"tradeoff_{dataset}.png"
        on_gpu = "tags.dmlbench.device" in runs and not runs["tags.dmlbench.device"].isin(["cpu", "mps"]).all()
        if tradeoff_figure(spec, summary, dataset, path, gpu_memory=on_gpu, untrained=untrained):
            figures.append(
                (f"{dataset}: R@1 vs trainable parameters" + (" and peak GPU memory" if on_gpu else ""), path)
            )
            written.append(path)
            if not on_gpu:
                notes.append(
                    f"{dataset}: no R@1 vs memory plot: these runs ran on the CPU, where peak memory is "
                    "the process's RSS (mostly the libraries), not the method's own cost"
                )
        path = out / "figures" / f"retention_{dataset}.png"
        if retention is not None and gain_retention_figure(spec, summary, retention, dataset, path, untrained):
            figures.append((f"{dataset}: gain on {dataset} vs R@1 kept on the other datasets", path))
            written.append(path)
        path = out / "figures" / "optuna" / f"{dataset}_history.png"
        if history_figure(spec, dataset, path, notes, storage):
            figures.append((f"{dataset}: Optuna optimisation history of every tuned method", path))
            written.append(path)
        for entry in spec.entries:
            if entry.fixed:
                continue
            for p in importance_figures(spec, dataset, entry, out / "figures" / "optuna", notes, storage):
                figures.append((f"{dataset} / {entry.label}: parameter importances", p))
                written.append(p)

    hardest: list[str] = []
    for caption, path, md in report_galleries(spec, runs, queries, out):
        figures.append((caption, path))
        written.append(path)
        hardest += [f"### {caption.split(':')[0]}", ""] + md
    notes_hardest = "\n".join(hardest)
    for dataset in spec.datasets:
        labels = {e.name: e.label for e in spec.entries}
        for group in identical_groups(summary[summary["dataset"] == dataset]):
            notes.append(
                f"{dataset}: {' and '.join(labels[n] for n in group)} give identical results (the same "
                "computation on this backbone, e.g. VPT's two variants on a CNN): one point in the trade-off "
                "figure, dashed lines in the curves"
            )
    for dataset, entry in spec.units():
        n = int(summary[(summary["dataset"] == dataset) & (summary["entry"] == entry.name)]["seeds"].iloc[0])
        if n < len(spec.seeds):
            notes.append(f"{dataset}/{entry.label}: {n} of {len(spec.seeds)} reproduction seeds finished")

    written += [p.with_suffix(".pdf") for p in list(written) if p.suffix == ".png" and p.with_suffix(".pdf").exists()]
    report = _report_md(
        spec,
        results_md,
        published_md if paired else "",
        shaped,
        tuning,
        figures,
        notes,
        out,
        verdicts(spec, runs, summary, queries),
        retention_md,
        uncertainty=(METHOD if queries else "No per-query tables in these runs: no intervals or significance marks.")
        + (" Cells show the 95% interval." if ci and queries else ""),
        ci=ci and bool(queries),
        hardest=notes_hardest,
    )
    _write(out, "report.md", report, written)
    _prune_stale(out, written)
    _log_to_mlflow(spec, out)
    return out


def _report_md(
    spec: StudySpec,
    results_md: str,
    published_md: str,
    shaped: list,
    tuning: pd.DataFrame,
    figures: list[tuple[str, Path]],
    notes: list[str],
    out: Path,
    verdicts: list[str],
    retention_md: str = "",
    uncertainty: str = "",
    ci: bool = False,
    hardest: str = "",
) -> str:
    b = spec.budget
    lines = [f"# Study `{spec.name}`", ""]
    if spec.description:
        lines += [spec.description, ""]
    if verdicts:
        lines += ["**Trained vs untrained (the method picked on validation):** " + " ".join(verdicts), ""]
    lines += [
        f"- datasets: {', '.join(spec.datasets)}; backbone: {spec.backbone}",
        f"- objective: maximise `{spec.metric}` (validation split, class-disjoint from training)",
        f"- budget per method and dataset: {b.n_trials} trials x {b.epochs} epochs"
        + (f", at most {b.timeout_s:g} s" if b.timeout_s else ""),
        f"- sampler: {spec.sampler['name']} (seed {spec.sampler.get('seed', 0)}); pruner: {spec.pruner['name']}",
        f"- reproductions of each best configuration: seeds {', '.join(map(str, spec.seeds))}",
        "",
        "## Results (test split, %, "
        + ("mean [95% interval]" if ci else "mean ± std over seeds")
        + "; checkpoint selected on validation)",
        "",
        uncertainty,
        "",
        results_md,
    ]
    if published_md:
        lines += [
            "## Published numbers beside ours",
            "",
            "Both papers select the checkpoint on the test set: compare their R@1 with the test-selected "
            "column; the validation-selected figure is the fair one.",
            "",
            published_md,
        ]
    for _, title, md, _ in shaped:
        lines += [f"## {title}", "", "Each cell: ours (mean ± std over seeds, validation-selected) | paper.", "", md]
    if retention_md:
        lines += ["## Forgetting: zero-shot on the other datasets", "", retention_md]
    if hardest:
        lines += [
            "## Hardest classes",
            "",
            "The test classes with the lowest R@1 and the class their misses retrieve most often at rank 1.",
            "",
            hardest,
        ]
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

    from harness.tracking.store import ensure_experiment

    client = MlflowClient()
    experiment = spec.experiments[spec.datasets[0]]
    exp = client.get_experiment_by_name(experiment)
    found = (
        []
        if exp is None
        else mlflow.search_runs(
            experiment_names=[experiment],
            output_format="list",
            filter_string=f"tags.`dmlbench.study` = '{spec.name}' and tags.`dmlbench.role` = 'report'",
        )
    )
    if found:
        run_id = found[0].info.run_id
    else:
        exp_id = exp.experiment_id if exp else ensure_experiment(experiment)
        run_id = client.create_run(
            exp_id,
            tags={"mlflow.runName": f"{spec.name} report", "dmlbench.study": spec.name, "dmlbench.role": "report"},
        ).info.run_id
    client.log_artifacts(run_id, str(out), artifact_path="report")
    client.set_terminated(run_id, "FINISHED")
