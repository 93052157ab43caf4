"""``dmlbench study launch --slurm``: a real one-node Slurm cluster (slurmctld + slurmd started here
in a temporary folder) runs a small study as a job array of 2 workers through submitit, on a real
PostgreSQL Optuna storage and ``mlflow server``; the budget is exact, every seed runs once and
nothing stays RUNNING. Bad launches are refused in one line before anything is submitted."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_port
from test_distributed_studies import check_exactly_once, mlflow_server, write_spec  # noqa: F401 - fixture

from harness.cli import main

REPO = Path(__file__).resolve().parents[1]
DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo")


def cluster_conf(folder: Path, host: str) -> str:
    return "\n".join(
        [
            "ClusterName=dmlbenchtest",
            f"SlurmctldHost={host}",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            # one node on loopback, nobody else: no munge key to distribute
            "AuthType=auth/none",
            "CredType=cred/none",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'ctld.pid'}",
            f"SlurmdPidFile={folder / 'd.pid'}",
            f"SlurmctldLogFile={folder / 'ctld.log'}",
            f"SlurmdLogFile={folder / 'd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2",
            f"NodeName={host} CPUs={max(2, os.cpu_count() or 2)} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


@pytest.fixture
def slurm_cluster(tmp_path_factory, monkeypatch):
    """A one-node Slurm cluster; ``SLURM_CONF`` points every client at it."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(
            f"Slurm not installed ({', '.join(missing)} missing; Debian: apt-get install slurm-wlm; "
            ".ci/run installs it)"
        )
    if os.geteuid() != 0:
        pytest.skip("a test Slurm cluster needs root (slurmd starts jobs as their user)")
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    host = socket.gethostname()
    conf = folder / "slurm.conf"
    conf.write_text(cluster_conf(folder, host))
    monkeypatch.setenv("SLURM_CONF", str(conf))
    subprocess.run(["slurmctld", "-f", str(conf), "-i"], check=True, capture_output=True)
    subprocess.run(["slurmd", "-f", str(conf), "-N", host], check=True, capture_output=True)
    try:
        deadline = time.time() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout:
            if time.time() > deadline:
                pytest.fail("the test Slurm node did not come up: " + (folder / "d.log").read_text()[-2000:])
            time.sleep(0.5)
        yield folder
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True)
        for pid_file in ("d.pid", "ctld.pid"):
            pid = folder / pid_file
            if pid.exists():
                try:
                    os.kill(int(pid.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)


def test_a_study_runs_as_a_slurm_array_with_the_budget_exact(
    tmp_path, slurm_cluster, postgres_url, mlflow_server, monkeypatch, capsys
):
    pytest.importorskip("submitit")
    pytest.importorskip("psycopg")
    spec = write_spec(tmp_path, "slurmstudy", methods=("bitfit",))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    argv = ["study", "launch", str(spec), "--slurm", "--array", "2", "--cpus-per-task", "1", "--time", "30"]
    code = main([*argv, "--storage", postgres_url, "--wait", "--logs", str(tmp_path / "logs")])  # the launcher here
    out = capsys.readouterr()
    assert code == 0, out.out + out.err + "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.err")))
    assert "as Slurm array" in out.out and "all 2 Slurm tasks of study slurmstudy finished" in out.out
    tasks = sorted(p.name for p in (tmp_path / "logs").glob("*_result.pkl"))
    assert len(tasks) == 2, tasks  # two array tasks ran, each returned
    check_exactly_once(spec, mlflow_server, postgres_url)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--array", "2"], "study launch needs a scheduler; valid: --slurm"),
        (["--slurm", "--array", "0"], "bad value 0 for --array: must be >= 1"),
        (["--slurm"], "bad Optuna storage .* for --slurm: .* valid: postgresql"),
        (
            ["--slurm", "--storage", "postgresql+psycopg://u@127.0.0.1:1/x", "--tracking-uri", "sqlite:///m.db"],
            "bad MLflow store 'sqlite:///m.db' for --slurm: every node must reach it",
        ),
    ],
)
def test_a_launch_that_cannot_work_is_refused_before_submitting(tmp_path, monkeypatch, capsys, argv, message):
    if shutil.which("sbatch") is None and "--slurm" in argv and "0" not in argv:
        message = "sbatch not found"
    spec = write_spec(tmp_path, "bad")
    monkeypatch.chdir(tmp_path)
    assert main(["study", "launch", str(spec), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "slurm").exists() and not list(tmp_path.glob("*.journal"))
