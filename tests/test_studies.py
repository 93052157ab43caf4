"""Optuna studies end to end on tiny data: nested MLflow runs, resume, kill, prune, workers, specs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest
import yaml
from conftest import TINY, TINY_VIT
from optuna.trial import TrialState

from harness.errors import UserError
from harness.studies.loading import load_spec
from harness.studies.recovery import STALE_AFTER_S, is_stale
from harness.studies.runner import run_study
from harness.studies.status import study_status
from harness.studies.storage import budget_of, open_storage, storage_url
from methods import get_method, method_names

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "studies").glob("*.yaml"))


def base_overrides(uri: str) -> dict:
    """conftest's tiny ViT run, minus what a study sets itself (dataset, epochs)."""
    out = {k: v for k, v in {**TINY, **TINY_VIT}.items() if k not in ("dataset", "optim.epochs")}
    return {**out, "tracking.uri": uri, "tracking.log_artifacts": False}


def write_spec(folder: Path, uri: str, **changes) -> Path:
    spec = {
        "name": "tiny",
        "backbone": "vit_small_patch16_224",
        "datasets": ["fashion_mnist"],
        "methods": ["linear_probe", "bitfit"],
        "overrides": base_overrides(uri),
        "objective": "val_map_at_r",
        "budget": {"n_trials": 3, "epochs": 2},
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "none"},
        "reproduce": {"seeds": [0]},
    }
    spec.update(changes)
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def optuna_study(path: Path, entry: str, dataset: str = "fashion_mnist") -> optuna.Study:
    spec = load_spec(path)
    return optuna.load_study(study_name=f"{spec.name}/{dataset}/{entry}", storage=open_storage(storage_url(spec)))


def runs_of(study: str, role: str | None = None) -> list:
    filt = f"tags.`dmlbench.study` = '{study}'" + (f" and tags.`dmlbench.role` = '{role}'" if role else "")
    return mlflow.search_runs(experiment_names=["fashion_mnist"], filter_string=filt, output_format="list")


# ----------------------------------------------------------------------------- one shared tiny study


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """2 methods x 3 trials x 2 epochs + one reproduction each, with the real training loop."""
    folder = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(folder)  # a sqlite store puts artifacts under ./mlruns
        mlflow.set_tracking_uri(uri)
        path = write_spec(folder, uri, overrides={**base_overrides(uri), "tracking.log_artifacts": True})
        run_study(path)
        yield path


def test_tiny_study_completes_with_nested_runs(tiny_study):
    for entry in ("linear_probe", "bitfit"):
        study = optuna_study(tiny_study, entry)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
        parents = [r for r in runs_of("tiny", "parent") if r.data.tags["dmlbench.entry"] == entry]
        assert len(parents) == 1
        parent_id = parents[0].info.run_id
        children = [r for r in runs_of("tiny", "trial") if r.data.tags["dmlbench.entry"] == entry]
        assert sorted(int(r.data.tags["dmlbench.trial"]) for r in children) == [0, 1, 2]
        client = mlflow.tracking.MlflowClient()
        for run in children:
            assert run.data.tags["mlflow.parentRunId"] == parent_id
            assert run.info.status == "FINISHED" and run.data.tags["dmlbench.status"] == "finished"
            trial = study.trials[int(run.data.tags["dmlbench.trial"])]
            assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
            assert run.data.metrics["best/val_map_at_r"] == pytest.approx(trial.value)
            for key, value in trial.params.items():  # the trial's parameters reached the run config
                assert float(run.data.params[key]) == pytest.approx(value)
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/map_at_r")]
            assert sorted(steps) == [1, 2]
        repro = [r for r in runs_of("tiny", "reproduction") if r.data.tags["dmlbench.entry"] == entry]
        assert len(repro) == 1 and repro[0].data.tags["mlflow.parentRunId"] == parent_id
        assert repro[0].data.tags["dmlbench.config_source"] == str(study.best_trial.number)
        assert "test/recall_at_1" in repro[0].data.metrics


def test_rerun_adds_no_trial_and_no_run(tiny_study):
    before = {e: len(optuna_study(tiny_study, e).trials) for e in ("linear_probe", "bitfit")}
    n_runs = len(runs_of("tiny"))
    run_study(tiny_study)
    assert {e: len(optuna_study(tiny_study, e).trials) for e in before} == before
    assert len(runs_of("tiny")) == n_runs


def test_status_reports_budget_and_reproductions(tiny_study):
    status = study_status(tiny_study)
    assert list(status["entry"]) == ["linear_probe", "bitfit"]
    assert list(status["complete"]) == [3, 3] and list(status["budget"]) == [3, 3]
    assert list(status["pruned"]) == [0, 0] and list(status["running"]) == [0, 0]
    assert list(status["reproductions"]) == ["1/1", "1/1"]
    best = optuna_study(tiny_study, "bitfit").best_value
    assert status.loc[1, "best/val_map_at_r"] == pytest.approx(best, abs=1e-4)


# ----------------------------------------------------------------------------- pruning, kill, workers


def test_pruned_trial_is_pruned_in_optuna_and_mlflow(tmp_path, tracking_uri):
    path = write_spec(
        tmp_path,
        tracking_uri,
        name="prune",
        methods=["linear_probe"],
        budget={"n_trials": 1, "epochs": 2},
        reproduce={"seeds": []},
        pruner={"name": "threshold", "lower": 1.5},
    )  # MAP@R < 1.5 always: prune at epoch 1
    run_study(path)
    study = optuna_study(path, "linear_probe")
    assert [t.state for t in study.trials] == [TrialState.PRUNED]
    assert list(study.trials[0].intermediate_values) == [1]
    (run,) = runs_of("prune", "trial")
    assert run.info.status == "KILLED" and run.data.tags["dmlbench.status"] == "pruned"
    assert study_status(path).loc[0, "pruned"] == 1


def test_killed_worker_is_resumed(tmp_path, tracking_uri):
    path = write_spec(
        tmp_path,
        tracking_uri,
        name="kill",
        methods=["linear_probe"],
        budget={"n_trials": 2, "epochs": 2},
        reproduce={"seeds": []},
    )
    code = f"from harness.studies.runner import run_study; run_study({str(path)!r})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed = None
    deadline = time.monotonic() + 120
    try:
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            try:
                trials = optuna_study(path, "linear_probe").trials
            except KeyError:  # the worker has not created the study yet
                continue
            running = [t for t in trials if t.state == TrialState.RUNNING and "dmlbench.heartbeat" in t.user_attrs]
            if running:
                proc.send_signal(signal.SIGKILL)
                killed = running[0]
    finally:
        proc.kill()
        proc.wait()
    assert killed is not None, "the worker never ran a trial"
    assert optuna_study(path, "linear_probe").trials[killed.number].state == TrialState.RUNNING

    run_study(path)
    trials = optuna_study(path, "linear_probe").trials
    assert trials[killed.number].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    retry = [t for t in trials if t.user_attrs.get("dmlbench.retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].params == killed.params and retry[0].state == TrialState.COMPLETE
    for run in runs_of("kill", "trial"):
        assert run.info.status in ("FINISHED", "FAILED")  # nothing left RUNNING in MLflow
    assert list(study_status(path)[["complete", "running"]].iloc[0]) == [2, 0]


def test_two_workers_share_one_journal_and_reproduce_only_after_every_trial(tmp_path, tracking_uri):
    """3 trials on 2 workers: one worker runs two, the other waits for them at the gate before
    its reproduction, which therefore reproduces the best of all three trials."""
    path = write_spec(
        tmp_path,
        tracking_uri,
        name="workers",
        methods=["linear_probe"],
        budget={"n_trials": 3, "epochs": 1},
        reproduce={"seeds": [0, 1]},
    )
    run_study(path, workers=2)
    study = optuna_study(path, "linear_probe")
    trials = study.trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
    assert all(t.user_attrs.get("dmlbench.surplus") for t in trials if t.state == TrialState.FAIL)
    assert os.getpid() not in {t.user_attrs["dmlbench.pid"] for t in trials if t.state == TrialState.COMPLETE}
    trial_runs, seeds = runs_of("workers", "trial"), runs_of("workers", "reproduction")
    assert len(trial_runs) == 3 and len(seeds) == 2
    assert min(r.info.start_time for r in seeds) >= max(r.info.end_time for r in trial_runs)
    assert {r.data.tags["dmlbench.config_source"] for r in seeds} == {str(study.best_trial.number)}


def test_workers_pass_the_phase_gate_together_and_a_failed_one_closes_it(tmp_path):
    from phase_gate_worker import gate_worker

    from harness.errors import StudyAborted
    from harness.studies.workers import spawn

    spawn(gate_worker, lambda w: (str(tmp_path), w, False), 2, "worker", phased=True)
    (p0, _, left0), (p1, arrived1, _) = (Path(tmp_path, n).read_text().split() for n in "01")
    assert p0 == p1 == "True" and float(left0) >= float(arrived1)  # worker 0 waited for the late one
    with pytest.raises(StudyAborted, match="exit code 3"):
        spawn(gate_worker, lambda w: (str(tmp_path), w, True), 2, "worker", phased=True)
    assert Path(tmp_path, "0").read_text().split()[0] == "False"  # stopped at the gate, not through it


def test_stale_trial_detection():
    import socket

    now = time.time()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def trial(**attrs):
        return SimpleNamespace(user_attrs=attrs, datetime_start=None)

    here = socket.gethostname()
    assert is_stale(trial(**{"dmlbench.host": here, "dmlbench.pid": dead.pid, "dmlbench.heartbeat": now}))
    assert not is_stale(trial(**{"dmlbench.host": here, "dmlbench.pid": os.getpid(), "dmlbench.heartbeat": now}))
    far = {"dmlbench.host": "elsewhere", "dmlbench.pid": 1}
    assert not is_stale(trial(**far, **{"dmlbench.heartbeat": now - 5}))
    assert is_stale(trial(**far, **{"dmlbench.heartbeat": now - STALE_AFTER_S - 1}))


# ----------------------------------------------------------------------------- spec validation


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"budjet": {"n_trials": 1, "epochs": 1}}, "did you mean 'budget'"),
        ({"methods": ["linear_probe", "vtp_deep"]}, "unknown method 'vtp_deep'"),
        ({"datasets": ["cub"]}, "unknown dataset 'cub'"),
        (
            {"methods": [{"method": "bitfit", "search_space": {"optim.lr": None, "optim.weight_decay": None}}]},
            "empty search space",
        ),
        ({"methods": [{"method": "bitfit", "overides": {}}]}, "did you mean 'overrides'"),
        (
            {
                "methods": [
                    {"method": "bitfit", "search_space": {"optim.lrr": {"type": "float", "low": 0.1, "high": 1}}}
                ]
            },
            "unknown config key 'optim.lrr'",
        ),
        (
            {
                "methods": [
                    {"method": "bitfit", "search_space": {"optim.lr": {"type": "loguniform", "low": 0.1, "high": 1}}}
                ]
            },
            "bad type 'loguniform'",
        ),
        ({"overrides": {"optim.epochs": 5}}, "budget.epochs sets it"),
        ({"budget": {"n_trials": 2, "epochs": 1, "timeout": 5}}, "did you mean 'timeout_s'"),
        ({"sampler": {"name": "cmaes"}}, "unknown sampler 'cmaes'"),
        ({"methods": ["bitfit", {"method": "bitfit"}]}, "appears twice"),
        ({"objective": "test_recall_at_1"}, "unknown objective"),
    ],
)
def test_bad_spec_is_refused_in_one_line(tmp_path, tracking_uri, change, message):
    path = write_spec(tmp_path, tracking_uri, **change)
    with pytest.raises(UserError) as info:
        load_spec(path)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_grid_budget_is_capped_by_the_grid(tmp_path, tracking_uri):
    grid = {
        "optim.lr": {"type": "categorical", "choices": [0.001, 0.01]},
        "optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "step": 0.05},
    }
    path = write_spec(
        tmp_path,
        tracking_uri,
        sampler={"name": "bruteforce"},
        budget={"n_trials": 50, "epochs": 1},
        methods=[{"method": "bitfit", "search_space": grid}],
    )
    spec = load_spec(path)
    assert budget_of(spec, spec.entries[0]) == 6
    with pytest.raises(UserError, match="discrete search space"):
        load_spec(write_spec(tmp_path, tracking_uri, sampler={"name": "grid"}))


# ----------------------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_spec_parses(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    for entry in spec.entries:
        get_method(entry.method)
        assert entry.fixed or entry.search_space, entry.name


def test_demo_takes_every_applicable_method_from_the_registry():
    spec = load_spec(REPO / "studies" / "demo.yaml")
    tuned = {e.method for e in spec.entries if not e.fixed}
    # frpt_bbox needs boxes; vpt_deep and frpt_no_in compute what vpt_shallow and frpt do on a CNN;
    # peft_lora and peft (by default) are peft's LoRA, equal to lora; one peft tuner per family
    expected = {m for m in method_names() if get_method(m).applies_to("cnn")} - {
        "frpt_bbox",
        "vpt_deep",
        "frpt_no_in",
        "peft_lora",
        "peft",
        "boft",
        "dora",
        "loha",
        "lokr",
    }
    assert tuned == expected
    assert [e.label for e in spec.entries if e.fixed] == ["pretrained (no training)"]


@pytest.mark.parametrize(
    ("name", "keep", "backbone", "vit"),
    [
        ("frpt_ablation", ["frpt", "pretrained"], "resnet18", False),
        ("peft_vit_s", ["vpt_deep", "vptsp_g"], "vit_small_patch16_224", True),
    ],
)
def test_shrunken_shipped_spec_runs(tmp_path, tracking_uri, name, keep, backbone, vit):
    raw = yaml.safe_load((REPO / "studies" / f"{name}.yaml").read_text())
    entries = [e if isinstance(e, dict) else {"method": e} for e in raw["methods"]]
    entries += [{**e, "fixed": True} for e in raw.get("references", [])]
    entries = [e for e in entries if e.get("name", e["method"]) in keep]
    assert len(entries) == len(keep)
    for e in entries:
        e["backbone"] = backbone
    overrides = (
        base_overrides(tracking_uri)
        if vit
        else {k: v for k, v in base_overrides(tracking_uri).items() if k != "model.backbone_kwargs"}
    )
    raw.update(
        name=f"shrunk_{name}",
        datasets=["fashion_mnist"],
        backbone=backbone,
        methods=entries,
        references=[],
        overrides=overrides,
        budget={"n_trials": 1, "epochs": 1},
        reproduce={"seeds": [0]},
        pruner={"name": "none"},
    )
    path = tmp_path / f"shrunk_{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_study(path)
    status = study_status(path)
    assert list(status["reproductions"]) == ["1/1"] * len(keep)
    tuned = status[status["budget"] != "fixed"]
    assert list(tuned["complete"]) == [1] * len(tuned)


def test_study_protocol_applies_to_reproductions_only(tmp_path, tracking_uri):
    path = write_spec(tmp_path, tracking_uri, protocol="paper")
    spec = load_spec(path)
    dataset, entry = spec.units()[0]
    assert spec.protocol == "paper"
    assert spec.resolve(dataset, entry).protocol == "fair"  # tuning trials: validation classes
    repro = spec.resolve(dataset, entry, seed=1)
    assert repro.protocol == "paper" and repro.data.val_fraction == 0.0
    with pytest.raises(UserError, match="'protocol'.*valid: fair, paper"):
        load_spec(write_spec(tmp_path, tracking_uri, protocol="papr"))


def test_the_roll_up_ends_a_parent_a_dead_server_left_running(tiny_study, monkeypatch):
    """A trial that finished just as the server died leaves its parent RUNNING (the parent's
    end_run never arrived) and is adopted on the rerun without entering the parent again: the
    roll-up, which every `study run` ends with, must close it."""
    from harness.studies.rollup import rollup

    uri = f"sqlite:///{Path(tiny_study).parent / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    spec = load_spec(tiny_study)
    client = mlflow.MlflowClient()
    parents = {
        f"{r.data.tags['dmlbench.dataset']}/{r.data.tags['dmlbench.entry']}": r.info.run_id
        for r in runs_of("tiny", "parent")
    }
    left = parents["fashion_mnist/linear_probe"]
    client.update_run(left, status="RUNNING")
    rollup(spec, open_storage(storage_url(spec)), parents)
    assert {client.get_run(rid).info.status for rid in parents.values()} == {"FINISHED"}


def test_results_roll_up_onto_parents_and_the_optuna_side_is_labelled(tiny_study, capsys, monkeypatch):
    from harness.cli import main

    uri = f"sqlite:///{Path(tiny_study).parent / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for entry in ("linear_probe", "bitfit"):
        study = optuna_study(tiny_study, entry)
        (parent,) = [r for r in runs_of("tiny", "parent") if r.data.tags["dmlbench.entry"] == entry]
        (repro,) = [r for r in runs_of("tiny", "reproduction") if r.data.tags["dmlbench.entry"] == entry]
        m = parent.data.metrics
        assert (
            m["tuning/best_val_map_at_r"] == pytest.approx(study.best_value)
            and parent.data.tags["dmlbench.seeds"] == "1"
        )
        assert "test/recall_at_1_std" not in m and "test/seeds" not in m  # one seed: no spread, no count chart
        assert m["test/recall_at_1_mean"] == repro.data.metrics["test/recall_at_1"]
        assert m["params/trainable"] == repro.data.metrics["params/trainable"]
        assert parent.data.tags["mlflow.note.content"].startswith("Study `tiny`")
        assert all(parent.data.tags[f"best_param.{k}"] == str(v) for k, v in study.best_params.items())
        assert study.metric_names == ["best/val_map_at_r"] and study.user_attrs["method"] == entry
        assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
        best = study.best_trial.user_attrs
        assert (
            best["best/val_recall_at_1"] >= 0
            and best["mlflow_run_id"]
            and best["dmlbench.heartbeat_utc"].endswith("UTC")
        )
        assert "mlflow.source.git.commit" in repro.data.tags and "protocol" in repro.data.tags["mlflow.note.content"]
        trial_runs = [r for r in runs_of("tiny", "trial") if r.data.tags["dmlbench.entry"] == entry]
        # weights: the reproductions and the best trial only
        client = mlflow.MlflowClient()
        kept = {
            r.data.tags["dmlbench.trial"]
            for r in trial_runs
            if "trainable.safetensors" in {a.path for a in client.list_artifacts(r.info.run_id)}
        }
        assert kept == {str(study.best_trial.number)}, kept
        assert all(
            r.data.tags["dmlbench.weights"].startswith("removed")
            for r in trial_runs
            if r.data.tags["dmlbench.trial"] not in kept
        )
        assert "trainable.safetensors" in {a.path for a in client.list_artifacts(repro.info.run_id)}
    (summary,) = runs_of("tiny", "study")
    assert not summary.data.metrics  # a table, not one-bar charts
    note = summary.data.tags["mlflow.note.content"]
    assert "| entry | seeds | R@1 (%)" in note and "| Linear probe | 1 |" in note
    assert "summary.json" in {a.path for a in mlflow.MlflowClient().list_artifacts(summary.info.run_id)}
    # status reads, never writes: the journal is byte-identical afterwards, and --json parses
    journal = Path(tiny_study).parent / "tiny.optuna.journal"
    before = journal.read_bytes()
    assert main(["study", "status", str(tiny_study), "--json"]) == 0
    rows = __import__("json").loads(capsys.readouterr().out)
    assert {r["entry"] for r in rows} == {"linear_probe", "bitfit"} and journal.read_bytes() == before


def test_ctrl_c_stops_every_worker_and_leaves_nothing_running(tmp_path, tracking_uri):
    """Ctrl-C in a terminal reaches the whole process group: `study run --workers 2` exits 130 with
    one line per process, every interrupted trial is FAIL with a retry queued that resumes its
    KILLED run, and no MLflow run or Optuna trial is left RUNNING."""
    mlflow.set_tracking_uri(tracking_uri)  # an earlier test of this worker may have set another
    path = write_spec(
        tmp_path,
        tracking_uri,
        name="ctrlc",
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
    )  # its own process group, as a terminal gives it
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            training = [
                r for r in runs_of("ctrlc", "trial") if r.info.status == "RUNNING" and "train/loss" in r.data.metrics
            ]
            if len(training) == 2:
                break
        assert proc.poll() is None, proc.stderr.read()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 3, err  # two workers and the parent
    assert sum("tuning worker" in line and "KILLED" in line for line in lines) == 2
    assert "2 worker process(es) stopped" in lines[-1]
    trials = optuna_study(path, "linear_probe").trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    retries = [t for t in trials if t.state == TrialState.WAITING]
    assert len(interrupted) == 2 and len(retries) == 2
    runs = runs_of("ctrlc")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = {r.info.run_id for r in runs if r.info.status == "KILLED"}
    assert len(killed) == 2, [
        (r.info.status, r.data.tags.get("dmlbench.role"), r.data.tags.get("dmlbench.error")) for r in runs
    ]
    assert {t.user_attrs["dmlbench.resume_run"] for t in retries} == killed


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_trials_startup_point_is_the_same_whichever_worker_asks_and_when(tmp_path, sampler):
    """Two workers (their samplers seeded apart, as `tune` does) asking in turn give trial k the
    point one worker gives it alone; trials still differ from each other."""
    from harness.studies.search import make_sampler
    from harness.studies.spec import distributions

    spec = load_spec(write_spec(tmp_path, "sqlite:///unused.db", sampler={"name": sampler, "seed": 3}))
    entry = next(e for e in spec.entries if e.method == "bitfit")
    dists = distributions(entry.search_space)
    alone = optuna.create_study(sampler=make_sampler(spec, entry))
    sequential = [alone.ask(dists).params for _ in range(4)]
    storage = optuna.storages.InMemoryStorage()
    workers = [
        optuna.create_study(
            study_name="s", storage=storage, sampler=make_sampler(spec, entry, offset), load_if_exists=True
        )
        for offset in (0, 7919)
    ]
    asked = [workers[w].ask(dists) for w in (1, 0, 0, 1)]
    assert [t.params for t in sorted(asked, key=lambda t: t.number)] == sequential
    assert len({tuple(sorted(p.items())) for p in sequential}) == 4


def test_a_storage_outage_is_waited_out_once_then_every_call_gives_up_at_once():
    """A database that stops answering: a call retries for the outage and gives up in one line; the
    calls the study makes on its way out then give up at once (each waited the whole outage again,
    minutes with the default 120 s); a database that answers again is used again."""
    import sqlalchemy.exc as sa

    from harness.errors import StoreUnavailable
    from harness.studies.storage import retrying_storage

    class Database:
        answering = True

        def get_trial(self, trial_id):
            if not self.answering:
                raise sa.OperationalError("SELECT", {}, Exception("connection refused\nDETAIL"))
            return trial_id

    db = Database()
    storage = retrying_storage(db, "postgresql+psycopg://u:secret@h/db", outage_s=0.4)
    assert storage.get_trial(1) == 1
    db.answering = False
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"did not answer for 0.4 s \(connection refused\)") as first:
        storage.get_trial(2)
    assert 0.4 <= time.monotonic() - start < 0.4 + 0.3  # the outage, not a back-off step past it
    assert "secret" not in str(first.value)
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as second:
        storage.get_trial(3)
    assert time.monotonic() - start < 0.1 and str(second.value) == str(first.value)
    db.answering = True
    assert storage.get_trial(4) == 4
