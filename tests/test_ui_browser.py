"""The MLflow UI as a user sees it: the URL ``dmlbench ui`` prints, opened in headless Chromium,
shows the results as columns sorted by the objective, the chart view puts results first and hides
constants, and run pages open in model-training mode (skipped where Chromium is not installed; ``.ci/run``
installs it); last, ``kill`` of ``dmlbench ui`` stops every MLflow process it started."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import mlflow
import pytest

from harness.tracking.links import SHARED_VIEW_KEY, SHARED_VIEW_TAG, decode_view, run_url

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install chromium)"
)

#: three finished runs: R@1 puts b first, then c, then a; selected_epoch is the same for all
RUNS = {"a": 0.50, "b": 0.70, "c": 0.60}


def rendered(url: str) -> str:
    """The page's DOM after its scripts ran (a fresh browser profile each time: no remembered mode)."""
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1600,1200",
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """``dmlbench ui`` on a store with three runs, one server for the module's tests, started as a
    user would (MLflow's job runner not asked for); its URL, run ids, store, experiment, process."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('browser') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("browser")
    ids = {}
    for name, r1 in RUNS.items():
        with mlflow.start_run(experiment_id=experiment, run_name=name) as run:
            mlflow.set_tag("dmlbench.method", "bitfit")
            for epoch in (1, 2):
                mlflow.log_metrics({"val/recall_at_1": r1 - 0.1 / epoch, "train/loss": 1.0 / epoch}, step=epoch)
            mlflow.log_metrics(
                {
                    "test/recall_at_1": r1,
                    "test/map_at_r": r1 / 3,
                    "best/val_recall_at_1": r1 - 0.05,
                    "params/trainable": 1000 * r1,
                    "cost/throughput_img_s": 100.0,
                    "test/selected_epoch": 2.0,
                }
            )
            ids[name] = run.info.run_id
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "ui", "--port", str(port), "--timeout", "120"],
        env={
            **{k: v for k, v in os.environ.items() if k != "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"},  # conftest's
            "MLFLOW_TRACKING_URI": uri,
            "PYTHONUNBUFFERED": "1",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = ""
        while "MLflow UI for" not in line and proc.poll() is None:
            line = proc.stdout.readline()
        url = re.search(r"(http://\S+)", line).group(1)
        yield SimpleNamespace(url=url, ids=ids, uri=uri, experiment=experiment, port=port, proc=proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        mlflow.set_tracking_uri(None)


@needs_chromium
def test_the_printed_url_opens_the_results_sorted_by_the_objective(ui):
    url, ids = ui.url, ui.ids
    assert "viewStateShareKey=" in url and "workflowType=machine_learning" in url
    dom = rendered(url)
    headers = re.findall(
        r'class="ag-header-cell [^"]*" role="columnheader"[^>]*aria-colindex="(\d+)" col-id="([^"]+)"', dom
    )  # the DOM's order is not the screen's: aria-colindex is
    shown = [h for _, h in sorted((int(i), h) for i, h in headers) if h.startswith(("metrics.", "tags."))]
    assert shown == [
        "metrics.`test/recall_at_1`",
        "metrics.`test/map_at_r`",
        "metrics.`best/val_recall_at_1`",
        "metrics.`params/trainable`",
        "metrics.`cost/throughput_img_s`",
        "tags.`dmlbench.method`",
    ]
    assert "Sort: test/recall_at_1" in dom
    rows = dict(re.findall(r'role="row" row-index="(\d+)" row-id="([0-9a-f]{32})"', dom))
    by_index = [rows[str(i)] for i in range(len(RUNS))]
    assert by_index == [ids["b"], ids["c"], ids["a"]]
    assert "Model training" in dom and "Evaluations" not in dom


@needs_chromium
def test_the_chart_view_reads_results_first_and_draws_no_constant(ui):
    url, uri = ui.url, ui.uri
    experiment = mlflow.MlflowClient(uri).get_experiment_by_name("browser")
    state = decode_view(experiment.tags[SHARED_VIEW_TAG + SHARED_VIEW_KEY])
    hidden = {c["metricKey"] for c in state["compareRunCharts"] if c["deleted"]}
    assert hidden == {"test/selected_epoch", "cost/throughput_img_s"}  # the same value in every run
    assert all(c["runsCountToCompare"] >= len(RUNS) for c in state["compareRunCharts"])
    dom = rendered(url + "&compareRunsMode=CHART")
    sections = re.findall(r'white-space: pre;">([^<]+)</div><div[^>]*>\((\d+)\)<', dom)
    names = [name for name, _ in sections]
    assert names[:5] == ["test", "best", "val", "train", "params"], sections
    assert dict(sections)["test"] == "2"  # recall_at_1 and map_at_r; selected_epoch hidden


@needs_chromium
def test_run_pages_open_in_model_training_mode(ui):
    url, ids, uri = ui.url, ui.ids, ui.uri
    base = url.split("#", 1)[0]
    mlflow.set_tracking_uri(uri)
    hint = run_url(ids["a"])
    page = hint.split("http://127.0.0.1:5000/", 1)[1]
    dom = rendered(base + page)
    assert "Model metrics" in dom and "Evaluations" not in dom
    assert "Evaluations" in rendered(base + page.split("?", 1)[0])  # without it: the browser's default, GenAI


def test_ui_prints_the_runs_view_and_a_kill_stops_every_process(ui):
    """The printed URL opens the latest experiment's runs in model-training mode, the server
    answers, MLflow's job runner (huey consumers for GenAI jobs) is not started unless the user
    asks for it, and `kill` of dmlbench stops all of MLflow's processes. Last in the module: it
    stops the server the browser tests use."""
    import urllib.request

    import psutil

    assert f"http://127.0.0.1:{ui.port}/#/experiments/{ui.experiment}/runs?" in ui.url
    assert "workflowType=machine_learning" in ui.url
    with urllib.request.urlopen(f"http://127.0.0.1:{ui.port}/health", timeout=5) as reply:
        assert reply.status == 200
    server = psutil.Process(ui.proc.pid).children(recursive=True)
    assert len(server) >= 2  # the server and its workers
    assert not [p for p in server if "huey_consumer" in " ".join(p.cmdline())]
    ui.proc.send_signal(signal.SIGTERM)
    assert ui.proc.wait(timeout=60) == 0
    gone, alive = psutil.wait_procs(server, timeout=30)
    assert not alive, [p.cmdline()[:4] for p in alive]
