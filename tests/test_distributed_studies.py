"""Studies across processes and machines: two ``study run`` processes on one storage finish the
budget exactly, run every reproduction once, and leave nothing RUNNING; a killed reproduction is
recovered. The PostgreSQL + ``mlflow server`` case uses real servers started here on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import all_runs, free_port, mlflow_database, rerun_in_process

REPO = Path(__file__).resolve().parents[1]
SEEDS = [0, 1]


def write_spec(folder: Path, name: str, methods: tuple[str, ...] = ("linear_probe", "bitfit")) -> Path:
    spec = {
        "name": name,
        "backbone": "tf_efficientnet_lite0",
        "datasets": ["fashion_mnist"],
        "methods": list(methods),
        "objective": "val_map_at_r",
        "overrides": {
            "data.max_per_class": 16,
            "data.image_size": 32,
            "data.resize_size": 32,
            "data.batch_size": 32,
            "data.samples_per_class": 8,
            "data.num_workers": 0,
            "model.pretrained": False,
            "model.embed_dim": 16,
            "optim.warmup_epochs": 0,
            "tracking.log_artifacts": False,
        },
        "budget": {"n_trials": 2, "epochs": 1},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "reproduce": {"seeds": SEEDS},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_two(spec: Path, env: dict, storage: str | None) -> None:
    cmd = [sys.executable, "-m", "harness.cli", "study", "run", str(spec)] + (["--storage", storage] if storage else [])
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs


def check_exactly_once(spec_path: Path, tracking_uri: str, storage: str) -> None:
    import optuna
    from optuna.trial import TrialState

    from harness.studies.loading import load_spec
    from harness.studies.storage import open_storage

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    spec = load_spec(spec_path)
    store = open_storage(storage)
    for dataset, entry in spec.units():
        trials = optuna.load_study(study_name=spec.study_name(dataset, entry), storage=store).get_trials()
        states = Counter(t.state for t in trials if not t.user_attrs.get("dmlbench.surplus"))
        assert states[TrialState.COMPLETE] == spec.budget.n_trials and not states[TrialState.RUNNING], states
        seeds = optuna.load_study(study_name=f"{spec.study_name(dataset, entry)}/reproductions", storage=store)
        done = sorted(int(t.params["seed"]) for t in seeds.get_trials(states=(TrialState.COMPLETE,)))
        assert done == SEEDS, done
    runs = all_runs(tracking_uri)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    repro = Counter(
        (r.data.tags["dmlbench.entry"], r.data.tags["dmlbench.seed"])
        for r in runs
        if r.data.tags.get("dmlbench.role") == "reproduction" and r.info.status == "FINISHED"
    )
    assert set(repro.values()) == {1} and len(repro) == len(spec.units()) * len(SEEDS), repro
    parents = Counter(r.data.tags["dmlbench.entry"] for r in runs if r.data.tags.get("dmlbench.role") == "parent")
    assert set(parents.values()) == {1}, parents  # one parent per entry, whichever process made it


def test_two_processes_on_one_journal_run_each_reproduction_once(tmp_path, tracking_uri):
    spec = write_spec(tmp_path, "twoproc")
    run_two(spec, {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, None)
    journal = Path(tracking_uri.removeprefix("sqlite:///")).parent / "twoproc.optuna.journal"
    check_exactly_once(spec, tracking_uri, str(journal))


def running_reproductions(uri: str) -> list:
    runs = all_runs(uri)
    return [r for r in runs if r.data.tags.get("dmlbench.role") == "reproduction" and r.info.status == "RUNNING"]


def kill_inside_a_reproduction(proc: subprocess.Popen, uri: str, timeout: float = 300):
    """SIGKILL ``proc`` while one of its reproduction runs is RUNNING, and return that run.

    A run seen RUNNING can finish before a kill lands (a tiny seed trains in a second, and the
    next unit's seeds follow), so the process is stopped (SIGSTOP) first and the run looked up
    again: only a run still RUNNING in a frozen process is certainly cut off mid-training."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if running_reproductions(uri):
            proc.send_signal(signal.SIGSTOP)
            try:
                frozen = running_reproductions(uri)
            except Exception:  # frozen while holding the store's write lock: let it go on
                frozen = []
            if frozen:
                proc.kill()
                proc.wait()
                return frozen[0]
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no reproduction run seen RUNNING (exit {proc.wait()}): {proc.stdout.read()}")


def test_a_killed_reproduction_is_recovered_and_nothing_stays_running(tmp_path, tracking_uri, monkeypatch):
    """A worker dies (SIGKILL) during a reproduction: its trial and MLflow run stay RUNNING; the
    rerun fails both, runs the seed again, and finishes with every seed done once."""
    import optuna
    from optuna.trial import TrialState

    from harness.studies.storage import open_storage, storage_url

    spec_path = write_spec(tmp_path, "killed")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = [sys.executable, "-m", "harness.cli", "study", "run", str(spec_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = kill_inside_a_reproduction(proc, tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from harness.studies.loading import load_spec

    store = open_storage(storage_url(load_spec(spec_path)))
    seeds = optuna.load_study(study_name=killed.data.tags["dmlbench.optuna_study"], storage=store)
    trial = seeds.trials[int(killed.data.tags["dmlbench.trial"])]
    assert trial.state == TrialState.RUNNING  # the dead worker's seed
    assert client.get_run(killed.info.run_id).info.status == "RUNNING"
    assert rerun_in_process(cmd, env, monkeypatch) == 0
    assert client.get_run(killed.info.run_id).info.status == "FAILED"
    assert seeds.trials[trial.number].state == TrialState.FAIL
    check_exactly_once(spec_path, tracking_uri, storage_url(load_spec(spec_path)))


# ----------------------------------------------------------------------------- PostgreSQL + mlflow server


@pytest.fixture
def mlflow_server(tmp_path, postgres_url):
    """An MLflow tracking server on loopback whose store is the PostgreSQL server (as on a cluster:
    a sqlite store behind a server serialises concurrent writers and can answer 'database is locked')."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
            "--backend-store-uri",
            mlflow_database(postgres_url),
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_two_processes_on_postgresql_and_an_mlflow_server(tmp_path, postgres_url, mlflow_server, monkeypatch):
    pytest.importorskip("psycopg")
    spec = write_spec(tmp_path, "pgstudy")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    run_two(spec, {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}, postgres_url)
    check_exactly_once(spec, mlflow_server, postgres_url)


def test_a_retried_trial_continues_its_dead_predecessors_run(tmp_path, tracking_uri, monkeypatch):
    """SIGKILL during a trial's third epoch: the rerun's retry resumes the same MLflow run from the
    epoch-2 checkpoint instead of starting over."""
    import optuna
    from optuna.trial import TrialState

    from harness.studies.loading import load_spec
    from harness.studies.storage import open_storage, storage_url

    spec = yaml.safe_load(write_spec(tmp_path, "retry").read_text())
    spec.update(methods=["bitfit"], budget={"n_trials": 1, "epochs": 5}, reproduce={"seeds": []})
    spec["overrides"]["data.max_per_class"] = 64
    path = tmp_path / "retry.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = [sys.executable, "-m", "harness.cli", "study", "run", str(path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = mlflow.MlflowClient(tracking_uri)

    def trial_runs():
        return [
            r
            for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("dmlbench.role") == "trial"
        ]

    deadline = time.time() + 300
    while time.time() < deadline:
        runs = trial_runs()
        if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 2:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    (dead,) = trial_runs()
    before = {m.step: m for m in client.get_metric_history(dead.info.run_id, "train/loss")}
    rerun_ms = time.time() * 1000
    assert rerun_in_process(cmd, env, monkeypatch) == 0
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    s = load_spec(path)
    study = optuna.load_study(
        study_name=s.study_name(*s.units()[0][:1], s.units()[0][1]), storage=open_storage(storage_url(s))
    )
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE], states
    assert study.trials[1].user_attrs["mlflow_run_id"] == dead.info.run_id
    (run,) = trial_runs()  # no second run: the retry continued the first
    assert run.info.status == "FINISHED"
    # resumed, not trained again from epoch 1 in the same run: the epochs up to its checkpoint are
    # the dead process's (logged once, before the kill), the rest the rerun's
    # (the kill comes as epoch 2 is logged, before or after its checkpoint: it resumes from 1 or 2)
    start = int(run.data.tags.get("dmlbench.resumed_from_epoch", 0))
    assert start >= 1 and set(before) >= set(range(1, start + 1)), (start, sorted(before))
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4, 5]
    for m in history:
        if m.step <= start:
            assert (m.timestamp, m.value) == (before[m.step].timestamp, before[m.step].value)
    assert all(any(m.step == e and m.timestamp >= rerun_ms for m in history) for e in range(start + 1, 6))
