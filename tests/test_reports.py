"""Study reports: rebuilt from MLflow alone, byte-identical, with published numbers paired correctly."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TINY, TINY_VIT

from harness.reports.build import build_report
from harness.reports.figures import pareto_front
from harness.reports.formatting import fmt_count, fmt_pm
from harness.reports.published import (
    load_published,
    matches,
    paper_tables,
    published_tables,
)
from harness.reports.runs import fetch_runs
from harness.studies.loading import load_spec
from harness.studies.runner import run_study
from methods import method_names

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """linear_probe tuned (2 trials x 2 epochs) + the untrained reference row, 2 seeds each."""
    folder = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    overrides = {k: v for k, v in {**TINY, **TINY_VIT}.items() if k not in ("dataset", "optim.epochs")}
    spec = {
        "name": "rep",
        "backbone": "vit_small_patch16_224",
        "datasets": ["fashion_mnist"],
        "methods": [{"method": "linear_probe", "label": "Linear probe"}],
        "references": [
            {
                "method": "linear_probe",
                "name": "pretrained",
                "label": "pretrained (no training)",
                "published_as": "pretrained",
                "overrides": {"optim.epochs": 0, "model.embed_dim": 0},
            }
        ],
        "overrides": {
            **overrides,
            "tracking.uri": uri,
            "tracking.log_artifacts": False,
            "eval.transfer": ["fashion_styles"],
        },
        "budget": {"n_trials": 2, "epochs": 2},
        "reproduce": {"seeds": [0, 1]},
    }
    path = folder / "rep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(folder)  # a sqlite store puts artifacts under ./mlruns
        mlflow.set_tracking_uri(uri)
        run_study(path)
        yield path


@pytest.fixture(scope="module")
def built_report(finished_study, tmp_path_factory) -> Path:
    """The study's report with the default options, built once for the tests that only read it."""
    return build_report(finished_study, out_dir=tmp_path_factory.mktemp("built") / "report")


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_report_is_rebuilt_identically(finished_study, built_report, tmp_path):
    other = build_report(finished_study, out_dir=tmp_path / "b")
    a, b = files(built_report), files(other)
    assert a == b
    names = set(a)
    for name in (
        "report.md",
        "results.csv",
        "results.md",
        "results.tex",
        "tuning.csv",
        "spec.yaml",
        "figures/curves_fashion_mnist.png",
        "figures/tradeoff_fashion_mnist.png",
        "figures/comparison_fashion_mnist.png",
        "figures/optuna/fashion_mnist_history.png",
        "retention.md",
        "retention.tex",
        "figures/retention_fashion_mnist.png",
    ):
        assert name in names
        if name.endswith(".png"):
            assert name.removesuffix(".png") + ".pdf" in names  # vector beside raster
    assert not any("pretrained" in n for n in names if n.startswith("figures/optuna/"))
    assert "published.md" not in names  # nothing published for Fashion-MNIST


def test_retention_table_reports_what_each_method_kept(finished_study, built_report):
    """eval.transfer in the spec: reproductions evaluate fashion_styles zero-shot, tuning trials do
    not (transfer splits are test data); the untrained reference keeps exactly 100 %."""
    runs = fetch_runs(load_spec(finished_study))
    key = "metrics.transfer/fashion_styles/retained_recall_at_1"
    trials_logged = runs[runs["tags.dmlbench.role"] == "trial"][key] if key in runs else []
    assert key in runs and not pd.Series(trials_logged).notna().any()
    out = built_report
    table = (out / "retention.md").read_text()
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in table.splitlines()
        if line.startswith("| ") and "Method" not in line
    }
    assert set(rows) == {"Linear probe", "pretrained (no training)"}
    assert rows["pretrained (no training)"][0] == "+0.0" and rows["pretrained (no training)"][-1] == "100.0"
    assert "fashion_styles kept" in table and "Forgetting" in (out / "report.md").read_text()


def test_optuna_figures_read_the_optuna_storage_and_never_write_it(finished_study, tmp_path):
    journal = finished_study.parent / "rep.optuna.journal"
    before = journal.read_bytes()
    build_report(finished_study, out_dir=tmp_path / "o")
    assert journal.read_bytes() == before
    moved = journal.rename(tmp_path / "aside.journal")
    try:  # without Optuna's storage the MLflow part is still complete, and the report says what is missing
        out = build_report(finished_study, out_dir=tmp_path / "n")
        assert not journal.exists()
        assert not list((out / "figures").glob("optuna/*"))
        assert "no completed trial in the Optuna storage" in (out / "report.md").read_text()
        assert (out / "results.csv").is_file()
    finally:
        moved.rename(journal)


def test_results_are_the_reproduction_runs(built_report):
    out = built_report
    runs = mlflow.search_runs(
        experiment_names=["fashion_mnist"],
        output_format="list",
        filter_string="tags.`dmlbench.study` = 'rep' and tags.`dmlbench.role` = 'reproduction'",
    )
    table = pd.read_csv(out / "results.csv")
    assert list(table["label"]) == ["Linear probe", "pretrained (no training)"]
    for entry, (_, row) in zip(("linear_probe", "pretrained"), table.iterrows()):
        values = np.array([r.data.metrics["test/recall_at_1"] for r in runs if r.data.tags["dmlbench.entry"] == entry])
        assert len(values) == 2 and row["seeds"] == 2
        # the CSV keeps full precision and names its unit
        assert row["test/recall_at_1_mean [fraction]"] == pytest.approx(values.mean(), abs=1e-12)
        assert row["test/recall_at_1_std [fraction]"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        cell = fmt_pm(values.mean() * 100, values.std(ddof=1) * 100)
        md = (out / "results.md").read_text()  # the best of a column is bold, as in LaTeX
        shown = (f"| {cell}{mark} |" in md or f"| **{cell}{mark}** |" in md for mark in ("", "†"))
        assert any(shown) and f"| {row['label']} | 2 |" in md
    assert table.loc[1, "params/trainable_inference_mean [count]"] == 0  # the untrained backbone trains nothing used
    tuning = pd.read_csv(out / "tuning.csv")
    assert list(tuning["complete"]) == [2, 0]


def test_intervals_significance_and_the_verdict_come_from_the_per_query_tables(finished_study, built_report, tmp_path):
    from harness.reports.stats import paired_differences, paired_p_value, two_level_interval

    out = build_report(finished_study, out_dir=tmp_path / "ci", ci=True)
    table = pd.read_csv(out / "results.csv").set_index("entry")
    runs = mlflow.search_runs(
        experiment_names=["fashion_mnist"],
        output_format="list",
        filter_string="tags.`dmlbench.study` = 'rep' and tags.`dmlbench.role` = 'reproduction'",
    )
    queries = {}
    for entry in ("linear_probe", "pretrained"):
        frames = []
        for r in sorted(
            (r for r in runs if r.data.tags["dmlbench.entry"] == entry), key=lambda r: r.data.tags["dmlbench.seed"]
        ):
            path = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="per_query/test.parquet")
            frames.append(pd.read_parquet(path).assign(seed=int(r.data.tags["dmlbench.seed"])))
        queries[entry] = pd.concat(frames)
        interval = two_level_interval([f["ap_at_r"].to_numpy() for f in frames])
        row = table.loc[entry]
        assert (row["test/map_at_r_ci_low [fraction]"], row["test/map_at_r_ci_high [fraction]"]) == interval
        assert interval[0] <= row["test/map_at_r_mean [fraction]"] <= interval[1]
    best = table["test/map_at_r_mean [fraction]"].idxmax()
    other = ({"linear_probe", "pretrained"} - {best}).pop()
    assert np.isnan(table.loc[best, "test/map_at_r_p_best"])
    p = paired_p_value(paired_differences(queries[other], queries[best], "ap_at_r"))  # one comparison: Holm = raw
    assert table.loc[other, "test/map_at_r_p_best"] == pytest.approx(p)
    assert bool(table.loc[other, "test/map_at_r_tied_best"]) == (p >= 0.05)
    report = (out / "report.md").read_text()
    verdict = paired_p_value(paired_differences(queries["linear_probe"], queries["pretrained"], "ap_at_r"))
    word = "significant at 5%" if verdict < 0.05 else "not significant"
    assert "Linear probe, the trained method with the best validation val_map_at_r" in report
    assert f"{word} (paired permutation test over" in report and f"p = {verdict:.3g})" in report
    assert "two-level percentile bootstrap" in report and "mean [95% interval]" in report
    assert " [" in (out / "results.md").read_text()  # intervals in the cells with --ci
    assert " ± " in (built_report / "results.md").read_text()  # and the default build keeps mean ± sd


def test_report_is_logged_to_a_study_run(built_report):
    (run,) = mlflow.search_runs(
        experiment_names=["fashion_mnist"],
        output_format="list",
        filter_string="tags.`dmlbench.study` = 'rep' and tags.`dmlbench.role` = 'report'",
    )
    listed = {f.path for f in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id, "report")}
    assert {"report/report.md", "report/results.tex", "report/figures"} <= listed


# ----------------------------------------------------------------------------- published numbers


def fake_mlflow_runs(
    entry: str, dataset: str, r1: list[float], shots: int = 0, protocol: str = "paper"
) -> pd.DataFrame:
    """Rows shaped like mlflow.search_runs output for reproduction runs (input to the pairing logic)."""
    return pd.DataFrame(
        [
            {
                "run_id": f"{entry}-{seed}",
                "start_time": pd.Timestamp(2024, 1, 1) + pd.Timedelta(seconds=seed),
                "tags.dmlbench.role": "reproduction",
                "tags.dmlbench.status": "finished",
                "tags.dmlbench.dataset": dataset,
                "tags.dmlbench.entry": entry,
                "tags.dmlbench.seed": str(seed),
                "params.data.shots": str(shots),
                "params.protocol": protocol,
                "metrics.test/recall_at_1": value,
                "metrics.test/selected_recall_at_1": value + 0.01,
                "metrics.params/trainable": 2.9e6,
                "metrics.params/total": 26.4e6,
            }
            for seed, value in enumerate(r1)
        ]
    )


def test_published_cells_pair_with_our_runs():
    spec = load_spec(REPO / "studies" / "frpt_ablation.yaml")
    runs = fake_mlflow_runs("frpt", "cub200", [0.70, 0.72])
    paired = matches(spec, runs)
    tables = {p["table_id"] for p in paired}
    assert {"frpt_table1", "frpt_table2", "frpt_table3"} <= tables and "frpt_table4" not in tables
    table, md = next((t, md) for t, _, md, _ in paper_tables(paired) if t == "frpt_table1")
    assert "| DPP + PT + CAH | 71.0 ± 1.4 | 74.3 | " in md
    assert "| Fine-tuning | — | 69.5 | — | 84.4 | — | 23.53 |" in md
    df, _, tex = published_tables(spec, paired)
    r1 = df[(df["metric"] == "R@1") & (df["method"] == "DPP + PT + CAH")]
    assert list(r1["published"]) == [74.3] and list(r1["delta"]) == [pytest.approx(-3.3)]
    assert list(r1["ours_test_selected"]) == [pytest.approx(72.0)] and list(r1["ours_mean"]) == [pytest.approx(71.0)]
    assert r"$\pm$" in tex and r"\begin{table*}" in tex and r"\toprule" in tex  # 10 columns: both paper columns


def test_fair_protocol_rows_show_published_numbers_without_a_difference():
    spec = load_spec(REPO / "studies" / "frpt_ablation.yaml")
    df, md, tex = published_tables(
        spec, matches(spec, fake_mlflow_runs("frpt", "cub200", [0.70, 0.72], protocol="fair"))
    )
    r1 = df[(df["metric"] == "R@1") & (df["method"] == "DPP + PT + CAH")]
    assert list(r1["published"]) == [74.3] and np.isnan(r1["delta"]).all() and list(r1["protocol"]) == ["fair"]
    assert "| 74.3 | — |" in md
    counts = df[df["unit"] == "M"]
    assert len(counts) and np.isfinite(counts["delta"]).all()  # parameter counts compare under any protocol
    assert "only for paper-protocol runs" in md and "only for paper-protocol runs" in tex.replace("\n", " ")


def test_few_shot_cells_need_the_same_shots():
    spec = load_spec(REPO / "studies" / "frpt_few_shot.yaml")
    runs = pd.concat(
        [
            fake_mlflow_runs("frpt_r50_10shot", "cub200", [0.66], shots=10),
            fake_mlflow_runs("frpt_r50_5shot", "cub200", [0.60], shots=5),
        ]
    )
    paired = matches(spec, runs)
    few = {(p["entry"], p["column"], p["value"]) for p in paired if p["table_id"] == "frpt_table4"}
    assert few == {("frpt_r50_10shot", "10-shot", 66.6), ("frpt_r50_5shot", "5-shot", 62.8)}
    assert not any(p["table_id"] == "frpt_table1" for p in paired)  # full-data rows need shots 0


def test_published_file_is_complete_and_consistent():
    cells, sources, tables = load_published()
    assert {t["source"] for t in tables} == set(sources)
    keys = [(c["table_id"], c["row"], c["column"]) for c in cells]
    assert len(keys) == len(set(keys))
    known = set(method_names()) | {"pretrained"}
    for c in cells:
        assert c["unit"] in ("%", "fraction", "M") and c["method"] in known, c
        if c["unit"] == "fraction":
            assert 0 < c["value"] < 1, c
        elif c["unit"] == "%":
            assert 1 < c["value"] <= 100, c


def test_pareto_front_and_formatting():
    assert pareto_front([1, 2, 3, 4], [10, 9, 12, 12]) == [0, 2]
    assert fmt_pm(73.123, 0.46) == "73.1 ± 0.5"
    assert fmt_pm(73.1, float("nan")) == "73.1"
    assert fmt_pm(float("nan"), 1.0) == "—"
    assert fmt_count(23_530_000) == "23.53M" and fmt_count(0) == "0"


def test_figures_come_as_png_and_pdf_and_importances_need_enough_trials(built_report):
    out = built_report
    pngs = sorted((out / "figures").rglob("*.png"))
    assert pngs and all(p.with_suffix(".pdf").is_file() for p in pngs)
    assert all(p.read_bytes().startswith(b"%PDF") for p in (out / "figures").rglob("*.pdf"))
    assert not list((out / "figures").rglob("*_importance.png"))  # 2 trials are too few
    assert "fANOVA on fewer than 10 trials says nothing" in (out / "report.md").read_text()
    assert "R@1 vs memory plot" in (out / "report.md").read_text()  # CPU runs: RSS, not GPU memory


def latex_problems(tex: str) -> list[str]:
    """Parse with pylatexenc; environments must nest and close (a compiler's first complaint)."""
    from pylatexenc.latexwalker import LatexEnvironmentNode, LatexWalker

    nodes, _, _ = LatexWalker(tex, tolerant_parsing=False).get_latex_nodes()
    envs = [n.environmentname for n in nodes if isinstance(n, LatexEnvironmentNode)]
    return [] if envs and all(e in ("table", "table*") for e in envs) else [f"top-level environments {envs}"]


def test_results_latex_is_booktabs_with_the_best_in_bold_and_compiles(built_report, tmp_path):
    tex = (built_report / "results.tex").read_text()
    assert latex_problems(tex) == []
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex and r"\begin{table*}" in tex
    assert r"\textbf{" in tex and "over 2 seeds" in tex and "protocol 'fair'" in tex
    assert "Linear probe" in tex and "pretrained (no training)" in tex
    if shutil.which("pdflatex") is None:  # the checks above ran; the compile cannot: say so
        pytest.skip("pdflatex not installed (Debian: texlive-latex-recommended; .ci/run installs it)")
    doc = tmp_path / "doc.tex"
    doc.write_text(
        "\\documentclass[twocolumn]{article}\n\\usepackage{booktabs}\n\\begin{document}\n" + tex + "\n\\end{document}\n"
    )
    done = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:]


def test_the_gallery_shows_each_querys_neighbours_framed_by_correctness(built_report, tmp_path):
    from harness.reports.gallery import draw_queries, hardest_classes, visualize_retrieval

    out = built_report
    assert (out / "figures" / "gallery_fashion_mnist.png").exists() and (
        out / "figures" / "gallery_fashion_mnist.pdf"
    ).exists()
    report = (out / "report.md").read_text()
    assert "gallery_fashion_mnist.png" in report and "## Hardest classes" in report
    (run,) = mlflow.search_runs(
        experiment_names=["fashion_mnist"],
        output_format="list",
        filter_string="tags.`dmlbench.study` = 'rep' and tags.`dmlbench.entry` = 'linear_probe' "
        "and tags.`dmlbench.role` = 'reproduction' and tags.`dmlbench.seed` = '0'",
    )
    path = visualize_retrieval(run.info.run_id, n=3, k=4, out_dir=tmp_path / "v")
    assert path.exists() and path.with_suffix(".pdf").exists()
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "figures")}
    assert {"figures/retrieval.png", "figures/retrieval.pdf"} <= logged
    table = pd.read_parquet(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="per_query/test.parquet")
    )
    drawn = draw_queries(table, 3)
    assert list(drawn) == list(draw_queries(table, 3)) and set(drawn) <= set(table["query"])  # seeded, scored
    hard = hardest_classes(table, [f"c{i}" for i in range(10)], n=3)
    per_class = table.groupby("class")["hit_at_1"].mean().sort_values(kind="stable") * 100
    assert hard["R@1"].tolist() == pytest.approx(per_class.head(3).tolist())
    with pytest.raises(Exception, match="bad value 9 for --k"):
        visualize_retrieval(run.info.run_id, k=9)
