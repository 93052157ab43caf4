"""SIGTERM (kill, Slurm pre-emption, time limits) and dying parents, sent to real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from optuna.trial import TrialState
from test_studies import optuna_study, runs_of, write_spec

from harness import cli

REPO = Path(__file__).resolve().parent.parent
TRAIN = [
    "--method",
    "linear_probe",
    "--set",
    "data.max_per_class=32",
    "--set",
    "data.image_size=32",
    "--set",
    "data.resize_size=32",
    "--set",
    "data.num_workers=0",
    "--set",
    "model.pretrained=false",
    "--set",
    "optim.epochs=500",
    "--set",
    "data.batch_size=48",
    "--set",
    "data.samples_per_class=16",
    "--set",
    "model.embed_dim=16",
]


def wait_for(condition, timeout: float = 180.0, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError("timed out")


def training_runs(uri: str) -> list:
    return [
        r
        for r in mlflow.MlflowClient(uri).search_runs(
            [e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()]
        )
        if r.info.status == "RUNNING" and "train/loss" in r.data.metrics
    ]


def test_sigterm_ends_a_train_run_killed_with_exit_143_and_the_resume_command(tmp_path, tracking_uri):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "train", *TRAIN, "--tracking-uri", tracking_uri],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: training_runs(tracking_uri))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("dmlbench: terminated (SIGTERM) run ")
    (run,) = mlflow.MlflowClient(tracking_uri).search_runs(
        [mlflow.get_experiment_by_name("fashion_mnist").experiment_id]
    )
    assert run.info.status == "KILLED" and run.data.tags["dmlbench.status"] == "interrupted"
    assert f"dmlbench train --resume {run.info.run_id} --tracking-uri {tracking_uri}" in lines[0]


def test_interrupt_before_a_run_is_one_readable_line(monkeypatch, capsys):
    """Ctrl-C while a run is still being prepared (or during a report) used to print 'dmlbench: '."""

    def interrupted(args):
        raise KeyboardInterrupt

    import harness.reports.command

    monkeypatch.setattr(harness.reports.command, "report", interrupted)
    assert cli.main(["report", "studies/demo.yaml"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "dmlbench: interrupted (Ctrl-C) before a run started; nothing was written"


def _study_process(tmp_path: Path, tracking_uri: str, name: str) -> tuple[subprocess.Popen, Path]:
    mlflow.set_tracking_uri(tracking_uri)
    path = write_spec(
        tmp_path,
        tracking_uri,
        name=name,
        methods=["linear_probe"],
        budget={"n_trials": 2, "epochs": 100000},
        reproduce={"seeds": []},
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "study", "run", str(path), "--workers", "2"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for(
        lambda: (
            proc.poll() is not None
            or len([r for r in runs_of(name, "trial") if r.info.status == "RUNNING" and "train/loss" in r.data.metrics])
            == 2
        )
    )
    assert proc.poll() is None, proc.stderr.read()
    return proc, path


def _nothing_left_running(path: Path, name: str) -> None:
    trials = optuna_study(path, "linear_probe").trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len([t for t in trials if t.state == TrialState.FAIL]) == 2
    retries = [t for t in trials if t.state == TrialState.WAITING]
    runs = runs_of(name)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = {r.info.run_id for r in runs if r.info.status == "KILLED"}
    assert len(killed) == 2 and {t.user_attrs["dmlbench.resume_run"] for t in retries} == killed


def test_sigterm_to_a_study_stops_its_workers_with_exit_143(tmp_path, tracking_uri):
    """`kill PID` of `study run --workers 2` (the parent only): the parent passes SIGTERM on, each
    worker ends its run KILLED and its trial FAIL with a retry, one line each, exit 143."""
    proc, path = _study_process(tmp_path, tracking_uri, "sigterm")
    workers = psutil.Process(proc.pid).children()
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 3, err
    assert sum("terminated (SIGTERM)" in line and "KILLED" in line for line in lines[:2]) == 2
    assert lines[-1].startswith("dmlbench: terminated (SIGTERM): 2 worker process(es) stopped")
    gone, alive = psutil.wait_procs(workers, timeout=15)  # multiprocessing's helper exits with its parent
    assert not alive, [(w.pid, w.cmdline()) for w in alive]
    _nothing_left_running(path, "sigterm")


def test_no_worker_outlives_a_killed_parent(tmp_path, tracking_uri):
    """`kill -9` of the parent: the kernel sends its workers SIGTERM (PR_SET_PDEATHSIG); they end
    their runs KILLED and their trials FAIL with retries, and none trains on as an orphan."""
    proc, path = _study_process(tmp_path, tracking_uri, "orphans")
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len([w for w in workers if "python" in w.name()]) >= 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=90)
    for w in alive:
        w.kill()
    assert not alive, [w.pid for w in alive]
    _nothing_left_running(path, "orphans")


@pytest.fixture(autouse=True)
def _no_stray_children():
    yield
    for child in psutil.Process().children(recursive=True):
        if "harness.cli" in " ".join(child.cmdline()):
            child.kill()


def test_a_signal_during_an_epochs_bookkeeping_waits_for_its_checkpoint():
    """SIGTERM between an epoch's logged metrics and its checkpoint (a CI race: the run was KILLED
    with epoch 1 logged and no checkpoint) acts once both are written, through the usual handler."""
    from harness.runtime import interrupts

    before = signal.getsignal(signal.SIGTERM)
    interrupts.terminate_like_interrupt()
    written = []
    try:
        with pytest.raises(interrupts.Terminated):
            with interrupts.held():
                written.append("metrics")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs here, in the main thread, and must not raise
                written.append("checkpoint")
        assert written == ["metrics", "checkpoint"]
        assert signal.getsignal(signal.SIGTERM) is not before  # train's handler is back in place
        with pytest.raises(interrupts.Terminated):  # and the signal is remembered for the next safe point
            interrupts.check()
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupts.reset()


def test_a_ctrl_c_swallowed_where_it_landed_stops_train_at_the_next_safe_point():
    """`dmlbench train` raises Ctrl-C at once; where a library's clean-up swallows that
    KeyboardInterrupt (CI saw a run train on after SIGINT), the next check raises it again."""
    from harness.runtime import interrupts

    interrupts.terminate_like_interrupt()
    try:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler raises here
        except KeyboardInterrupt:
            pass  # swallowed, as an `except BaseException` in a clean-up path would
        with pytest.raises(KeyboardInterrupt) as caught:
            interrupts.check()
        assert not isinstance(caught.value, interrupts.Terminated)
        interrupts.reset()
        interrupts.check()  # acted on: a command run in-process afterwards is not interrupted
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        interrupts.reset()
