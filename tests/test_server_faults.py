"""Servers that go away, for real: an MLflow tracking server killed during a run and a study,
PostgreSQL restarted during a trial's per-epoch report, and PostgreSQL down for good."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import all_runs, free_port, rerun_in_process
from optuna.trial import TrialState
from test_signals import TRAIN, wait_for
from test_studies import base_overrides, write_spec

from harness.cli import main

REPO = Path(__file__).resolve().parent.parent
#: MLflow's client gives up on a dead server after seconds here, not minutes
FAST_MLFLOW = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "PYTHONUNBUFFERED": "1",
}


class Server:
    """An `mlflow server` on a fixed port and a sqlite store, that can be killed and started again."""

    def __init__(self, folder: Path, template: Path) -> None:
        self.folder, self.port, self.proc = folder, free_port(), None
        shutil.copyfile(template, folder / "server.db")  # migrated already: the server starts seconds sooner
        self.url = f"http://127.0.0.1:{self.port}"
        self.earlier: set[str] = set()  # run ids from the tests before the current one (:meth:`runs`)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'server.db'}",
                "--artifacts-destination",
                str(self.folder / "artifacts"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.folder,
            start_new_session=True,
        )

        def up() -> bool:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return True
            except OSError:
                return False

        wait_for(up, timeout=120)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def runs(self) -> list:
        """The runs of the current test: the store's runs less those earlier tests left there."""
        return [r for r in all_runs(self.url) if r.info.run_id not in self.earlier]


@pytest.fixture(scope="module")
def _server(tmp_path_factory, _mlflow_template):
    """One server for the module (a start costs 6 s of CPU): each test kills it and starts it
    again, so the next test finds it up; its runs are told apart by :meth:`Server.runs`."""
    s = Server(tmp_path_factory.mktemp("mlflow-server"), _mlflow_template)
    s.start()
    yield s
    if s.proc.poll() is None:
        s.kill()


@pytest.fixture
def server(_server):
    if _server.proc.poll() is not None:  # an earlier test failed while the server was down
        _server.start()
    _server.earlier = {r.info.run_id for r in all_runs(_server.url)}
    return _server


def test_a_dead_mlflow_server_is_one_line_and_the_run_resumes_when_it_is_back(server, tmp_path, monkeypatch):
    env = {**os.environ, **FAST_MLFLOW}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "train",
            *TRAIN,
            "--tracking-uri",
            server.url,
            "--set",
            f"tracking.checkpoint_dir={tmp_path / 'ckpt'}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: any("train/loss" in r.data.metrics for r in server.runs()))
        (run,) = server.runs()
        server.kill()
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 5, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"the MLflow server {server.url} stopped answering" in lines[0]
    assert f"dmlbench train --resume {run.info.run_id} --tracking-uri {server.url}" in lines[0]
    server.start()
    assert mlflow.MlflowClient(server.url).get_run(run.info.run_id).info.status == "RUNNING"
    # the epochs the run logged before it saw the server gone (more under load), plus one
    logged = len(mlflow.MlflowClient(server.url).get_metric_history(run.info.run_id, "train/loss"))
    # the resume in this process (the kill above already went to a process of its own)
    for key, value in FAST_MLFLOW.items():
        monkeypatch.setenv(key, value)
    argv = ["train", "--resume", run.info.run_id, "--tracking-uri", server.url, "--set", f"optim.epochs={logged + 1}"]
    assert main(argv) == 0
    assert mlflow.MlflowClient(server.url).get_run(run.info.run_id).info.status == "FINISHED"


def start_study(
    tmp_path: Path, server: Server, name: str, budget: dict, overrides: dict | None = None
) -> tuple[list[str], dict, subprocess.Popen]:
    """A linear-probe study (no reproductions) on ``server``, started in the background: its
    command (for the rerun), environment and process."""
    env = {**os.environ, **FAST_MLFLOW, "MLFLOW_TRACKING_URI": server.url}
    path = write_spec(
        tmp_path,
        server.url,
        name=name,
        methods=["linear_probe"],
        budget=budget,
        reproduce={"seeds": []},
        storage=str(tmp_path / f"{name}.journal"),
        overrides={**base_overrides(server.url), **(overrides or {})},
    )
    cmd = [sys.executable, "-m", "harness.cli", "study", "run", str(path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return cmd, env, proc


def test_a_study_on_a_dead_mlflow_server_stops_in_one_line_and_resumes(server, tmp_path, monkeypatch):
    """The server dies during a trial: the study stops (exit 5) naming the server, not blaming an
    active run; with the server back, the rerun resumes that trial's run from its checkpoint and
    leaves every run in a final state."""
    cmd, env, proc = start_study(tmp_path, server, "srv", {"n_trials": 1, "epochs": 4})
    try:
        wait_for(
            lambda: any(
                r.data.tags.get("dmlbench.role") == "trial" and "train/loss" in r.data.metrics for r in server.runs()
            )
        )
        server.kill()
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 5, err
    assert "Traceback" not in err and "already active" not in err
    assert f"the MLflow server {server.url} stopped answering" in err.strip().splitlines()[-1]
    server.start()
    (trial_run,) = [r for r in server.runs() if r.data.tags.get("dmlbench.role") == "trial"]
    assert rerun_in_process(cmd, env, monkeypatch) == 0
    runs = server.runs()
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trial_runs = [r for r in runs if r.data.tags.get("dmlbench.role") == "trial"]
    assert [r.info.run_id for r in trial_runs] == [trial_run.info.run_id]  # resumed, not trained anew
    steps = sorted(
        m.step for m in mlflow.MlflowClient(server.url).get_metric_history(trial_run.info.run_id, "train/loss")
    )
    assert steps == [1, 2, 3, 4]  # each epoch once: the checkpointed ones were not trained again


def test_a_trial_cut_off_before_its_first_checkpoint_leaves_no_run_running(server, tmp_path, monkeypatch):
    """The issue's case: the server stops while trial 0 is still before its first checkpoint.
    The rerun cannot continue that run, so it trains the trial anew and ends the old run FAILED,
    naming its successor: no run stays RUNNING for good."""
    # about 1 s of feature caching between the run's creation and its first epoch (2 cores)
    cmd, env, proc = start_study(tmp_path, server, "cut", {"n_trials": 2, "epochs": 2}, {"data.max_per_class": 200})
    try:  # the run exists, its features are being cached: frozen there, before any epoch or checkpoint
        wait_for(lambda: any(r.data.tags.get("dmlbench.role") == "trial" for r in server.runs()), interval=0.02)
        os.kill(proc.pid, signal.SIGSTOP)
        (cut,) = [r for r in server.runs() if r.data.tags.get("dmlbench.role") == "trial"]
        server.kill()
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert cut.info.status == "RUNNING" and "train/loss" not in cut.data.metrics  # cut off before epoch 1
    assert proc.returncode == 5, err
    server.start()
    assert rerun_in_process(cmd, env, monkeypatch) == 0
    runs = {r.info.run_id: r for r in server.runs()}
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    old = runs[cut.info.run_id]
    assert old.info.status == "FAILED" and old.data.tags["dmlbench.status"] == "failed"
    successor = runs[old.data.tags["dmlbench.successor"]]
    assert (
        successor.info.status == "FINISHED" and successor.data.tags["dmlbench.trial"] != cut.data.tags["dmlbench.trial"]
    )
    assert f"as run {successor.info.run_id}" in old.data.tags["dmlbench.error"]
    trials = [r for r in runs.values() if r.data.tags.get("dmlbench.role") == "trial" and r.info.status == "FINISHED"]
    assert len(trials) == 2  # the budget: two trials, the retry among them


def _pg_study(tmp_path: Path, tracking_uri: str, postgres_url: str, name: str, extra_env: dict, epochs: int = 6):
    pytest.importorskip("psycopg")
    path = write_spec(
        tmp_path,
        tracking_uri,
        name=name,
        methods=["linear_probe"],
        budget={"n_trials": 1, "epochs": epochs},
        reproduce={"seeds": []},
    )
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONUNBUFFERED": "1",
        "DMLBENCH_HEARTBEAT_S": "1",
        **extra_env,
    }
    cmd = [sys.executable, "-m", "harness.cli", "study", "run", str(path), "--storage", postgres_url]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = mlflow.MlflowClient(tracking_uri)
    wait_for(
        lambda: any(
            r.data.tags.get("dmlbench.role") == "trial" and "train/loss" in r.data.metrics
            for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id])
        )
    )
    return proc, cmd, env, path


def test_a_postgresql_restart_during_a_trial_is_waited_out(tmp_path, tracking_uri, postgres, postgres_url):
    """PostgreSQL restarts while a trial trains (its per-epoch reports and heartbeats hit the gap):
    the study carries on and finishes, the heartbeat too, nothing is left RUNNING."""
    from harness.studies.storage import open_storage

    proc, _, _, path = _pg_study(tmp_path, tracking_uri, postgres_url, "pgrestart", {}, epochs=40)
    restarted = time.time()
    postgres.ctl("restart")
    storage = open_storage(postgres_url)

    def beat_after_restart() -> bool:
        (trial,) = optuna.load_study(study_name="pgrestart/fashion_mnist/linear_probe", storage=storage).trials
        assert proc.poll() is None, "the trial ended before a heartbeat after the restart"
        return trial.user_attrs["dmlbench.heartbeat"] > restarted + 1

    wait_for(beat_after_restart, timeout=120)  # the heartbeat thread survived the reconnect
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    (trial,) = optuna.load_study(study_name="pgrestart/fashion_mnist/linear_probe", storage=storage).trials
    assert trial.state == TrialState.COMPLETE


def test_postgresql_down_for_good_is_one_line_and_the_rerun_finishes(
    tmp_path, tracking_uri, postgres, postgres_url, monkeypatch
):
    proc, cmd, env, path = _pg_study(tmp_path, tracking_uri, postgres_url, "pgdown", {"DMLBENCH_STORAGE_OUTAGE_S": "5"})
    postgres.ctl("stop")
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        postgres.ctl("start")
    assert proc.returncode == 5, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and "the Optuna storage postgresql+psycopg://" in lines[0], err
    assert rerun_in_process(cmd, env, monkeypatch) == 0
    runs = all_runs(tracking_uri)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (trial_run,) = [r for r in runs if r.data.tags.get("dmlbench.role") == "trial"]
    assert trial_run.info.status == "FINISHED"  # continued from its checkpoint, not trained anew
