"""Results at a glance: where outputs go, a train command that talks, fast errors, `compare` on
parents, and report tables and figures a paper can use."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image
from test_studies import runs_of, write_spec

from harness.cli import main
from harness.studies.runner import run_study

REPO = Path(__file__).resolve().parent.parent
TINY_TRAIN = [
    "--method",
    "linear_probe",
    "--set",
    "data.max_per_class=24",
    "--set",
    "data.image_size=32",
    "--set",
    "data.resize_size=32",
    "--set",
    "model.pretrained=false",
    "--set",
    "optim.epochs=2",
    "--set",
    "model.embed_dim=16",
    "--set",
    "tracking.system_metrics=false",
]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DMLBENCH_HOME")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_outputs_go_where_the_user_stands(tmp_path, monkeypatch):
    """No --tracking-uri, no MLFLOW_TRACKING_URI: the store is ./mlflow.db where the command runs
    (or in $DMLBENCH_HOME), never in the package's folder. In this process (a command's imports
    cost 5 s): its working folder and environment are the user's, as a new process's would be."""
    before = {p.name for p in REPO.iterdir()}
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)

    def as_a_new_process() -> None:  # mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI too
        mlflow.set_tracking_uri(None)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    monkeypatch.delenv("DMLBENCH_HOME", raising=False)
    try:
        as_a_new_process()
        assert main(["train", *TINY_TRAIN]) == 0
        assert (here / "mlflow.db").is_file() and (here / "mlartifacts").is_dir()
        home = tmp_path / "home"
        monkeypatch.setenv("DMLBENCH_HOME", str(home))
        as_a_new_process()
        assert main(["train", *TINY_TRAIN]) == 0
        assert (home / "mlflow.db").is_file()
    finally:
        as_a_new_process()
    assert {p.name for p in REPO.iterdir()} == before  # nothing new in the package's folder


def test_train_says_what_it_trains_and_shows_progress_off_a_terminal(tracking_uri, capsys, monkeypatch):
    monkeypatch.setenv("DMLBENCH_PROGRESS_EVERY_S", "0")
    argv = ["train", *TINY_TRAIN, "--set", "data.max_per_class=48", "--tracking-uri", tracking_uri]
    assert main(argv) == 0  # in this process: captured output is off a terminal, as a pipe is
    out = capsys.readouterr().out
    lines = out.splitlines()
    plan = re.match(
        r"training linear_probe on fashion_mnist with tf_efficientnet_lite0 on cpu: ([\d,]+) images x 2 "
        r"epoch\(s\), ([\d,]+) validation images per epoch, ([\d,]+) test images; about .+",
        lines[0],
    )
    assert plan, lines[0]
    assert any(re.match(r"epoch 1/2: step \d+/\d+, [\d,]+ img/s, ETA ", line) for line in lines), lines
    assert f"start 'dmlbench ui --tracking-uri {tracking_uri}'" in out  # the store it is in


def test_the_default_run_on_a_cpu_says_how_long_and_how_to_get_a_first_result(tracking_uri):
    """`train --method bitfit` alone is the GPU recipe (all 70,000 images, 30 epochs): on the CPU it
    says so before the first step, then Ctrl-C stops it with the command that resumes."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "train", "--method", "bitfit", "--tracking-uri", tracking_uri],
        cwd=REPO,
        env=_env(DMLBENCH_PROGRESS_EVERY_S="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first, hint = proc.stdout.readline(), proc.stdout.readline()
        assert re.match(r"training bitfit on fashion_mnist .* on cpu: [\d,]+ images x 30 epoch\(s\)", first), first
        assert "long for a CPU" in hint and "--set optim.epochs=3" in hint
        while (line := proc.stdout.readline()) and not line.startswith("epoch 1/30: step"):
            pass
        assert line, "no progress line: the run never started"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and f"--tracking-uri {tracking_uri}" in err and "dmlbench train --resume" in err


def test_a_key_typo_answers_before_the_heavy_libraries_load():
    code = (
        "import sys; from harness.cli import main; rc = main(['train', '--set', 'optim.lrr=1']); "
        "print(rc, 'torch' in sys.modules, 'mlflow' in sys.modules, 'timm' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["2", "False", "False", "False"], done.stdout + done.stderr
    assert done.stderr.strip() == "dmlbench: error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"


@pytest.fixture(scope="module")
def three_seed_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glance")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(folder)
        mlflow.set_tracking_uri(uri)
        path = write_spec(
            folder,
            uri,
            name="glance",
            methods=["linear_probe", "bitfit"],
            budget={"n_trials": 2, "epochs": 1},
            reproduce={"seeds": [0, 1]},
            references=[
                {
                    "method": "linear_probe",
                    "name": "pretrained",
                    "label": "pretrained",
                    "overrides": {"optim.epochs": 0, "model.embed_dim": 0},
                }
            ],
        )
        run_study(path)
        yield path, uri


def test_compare_puts_parents_results_side_by_side(three_seed_study, capsys):
    path, uri = three_seed_study
    mlflow.set_tracking_uri(uri)
    parents = [r.info.run_id for r in runs_of("glance", "parent") if r.data.tags["dmlbench.entry"] != "pretrained"]
    assert main(["compare", *parents, "--tracking-uri", uri, "--json"]) == 0
    rows = {row[""]: row for row in json.loads(capsys.readouterr().out)}
    for key in (
        "seeds",
        "tuning/best_val_map_at_r",
        "test/recall_at_1_mean",
        "test/recall_at_1_std",
        "test/map_at_r_mean",
        "best_param.optim.lr",
        "params/trainable",
    ):
        assert key in rows, key
    assert {v for k, v in rows["seeds"].items() if k} == {"2"}


def test_tables_fit_a_two_column_page_and_every_format_agrees(three_seed_study, tmp_path):
    """The main table (method, parameters, retrieval) fits \\textwidth of a two-column article; costs
    are a second table; method names as papers write them; the best value is bold in Markdown as in
    LaTeX; the untrained row's throughput is empty in the CSV and a dash in the tables."""
    from pylatexenc.latexwalker import LatexEnvironmentNode, LatexWalker

    from harness.reports.build import build_report

    path, _ = three_seed_study
    out = build_report(path, out_dir=tmp_path / "r")
    tex = (out / "results.tex").read_text()
    md = (out / "results.md").read_text()
    assert "Linear probe" in md and "BitFit" in md and "linear_probe |" not in md
    assert "seed(s)" not in md and "mean ± std over 2 seeds" in md
    tables = [n for n in LatexWalker(tex).get_latex_nodes()[0] if isinstance(n, LatexEnvironmentNode)]
    assert [t.environmentname for t in tables] == ["table*", "table"]
    main_rows = [r for r in tex.split("\\begin{table}")[0].splitlines() if r.rstrip().endswith("\\\\")]
    assert max(natural_width_pt(r) for r in main_rows) < 470  # \textwidth of a 10 pt twocolumn article
    assert "img/s" not in tex.split("\\begin{table}")[0] and "img/s" in tex.split("\\begin{table}")[1]
    bold_md = re.findall(r"\*\*([\d.]+(?: ± [\d.]+)?)\*\*", md)
    bold_tex = re.findall(r"\\textbf\{([\d.]+(?: \$\\pm\$ [\d.]+)?)\}", tex)
    assert bold_md and [b.replace(" ± ", " $\\pm$ ") for b in bold_md] == bold_tex
    csv = pd.read_csv(out / "results.csv")
    untrained = csv[csv["entry"] == "pretrained"].iloc[0]
    assert pd.isna(untrained["cost/throughput_img_s_mean [img/s]"])
    assert "| pretrained | 2 |" in md and md.split("| pretrained | 2 |")[1].splitlines()[0].rstrip().endswith("— |")
    assert "Peak" not in md  # CPU runs: no resident-set column dressed as peak memory


#: Computer Modern at 10 pt: digits and most letters 5 pt, a space 3.3 pt, ±/± math 7.8 pt; 2 x 6 pt column gap
def natural_width_pt(row: str) -> float:
    cells = row.rstrip().removesuffix("\\\\").split("&")
    width = 0.0
    for cell in cells:
        text = re.sub(r"\\textbf\{(.*?)\}", r"\1", cell.strip()).replace("$\\pm$", "±").replace("\\", "")
        width += sum(7.8 if ch == "±" else 3.3 if ch == " " else 2.8 if ch in ".,:;()" else 5.0 for ch in text) + 12
    return width


def test_figures_are_sized_for_a_paper(three_seed_study, tmp_path, monkeypatch):
    """Figures a column (3.3 in) or a page (6.9 in) wide at 200 dpi, fonts of 7 pt and up, the
    comparison sorted by value; one small-multiples Optuna history per dataset; the curves say
    which method each line is."""
    from harness.reports import figures
    from harness.reports.build import build_report
    from harness.reports.style import RC

    legends, save = {}, figures._save

    def keep_legend(fig, where):
        legends[where.name] = [
            t.get_text()
            for legend in fig.legends + [a.get_legend() for a in fig.axes]
            if legend is not None
            for t in legend.get_texts()
        ]
        save(fig, where)

    monkeypatch.setattr(figures, "_save", keep_legend)
    path, _ = three_seed_study
    out = build_report(path, out_dir=tmp_path / "f")
    assert {"Linear probe", "BitFit", "pretrained"} <= set(legends["curves_fashion_mnist.png"])
    for png in (out / "figures").rglob("*.png"):
        width_in = Image.open(png).size[0] / 200
        assert width_in <= 6.9 + 0.35, (png.name, width_in)  # bbox_inches="tight" trims or adds a little
    assert min(v for k, v in RC.items() if k.endswith(("font.size", "fontsize", "labelsize", "titlesize"))) >= 7
    assert sorted(p.name for p in (out / "figures" / "optuna").glob("*.png")) == ["fashion_mnist_history.png"]
    report = (out / "report.md").read_text()
    assert "parameter importances skipped" in report and "optuna-dashboard draws them from 2" in report


def test_reproductions_studies_are_labelled_like_tuning_studies(three_seed_study):
    import optuna

    from harness.studies.loading import load_spec
    from harness.studies.storage import open_storage, storage_url

    path, _ = three_seed_study
    spec = load_spec(path)
    store = open_storage(storage_url(spec))
    tuning = optuna.load_study(study_name="glance/fashion_mnist/bitfit", storage=store)
    seeds = optuna.load_study(study_name="glance/fashion_mnist/bitfit/reproductions", storage=store)
    assert seeds.metric_names == ["test/recall_at_1"] and tuning.metric_names == ["best/val_map_at_r"]
    for key in ("dataset", "method", "backbone", "recipe", "protocol", "budget", "mlflow_experiment"):
        assert seeds.user_attrs[key] == tuning.user_attrs[key] != "", key
    assert tuning.user_attrs["recipe"].startswith("default")
