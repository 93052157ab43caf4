"""The faults that long runs on shared machines meet, each reproduced for real: a second resume,
damaged or moved checkpoints, unwritable and full disks, damaged and lost journals, failed seeds,
trials finished by hand, specs that cannot run, stray class folders."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import all_runs
from optuna.trial import TrialState
from test_data import make_cub
from test_signals import TRAIN, training_runs, wait_for
from test_studies import optuna_study, runs_of, write_spec

from harness.cli import main
from harness.studies.runner import run_study

REPO = Path(__file__).resolve().parent.parent


def killed_run(tracking_uri: str, *extra: str) -> str:
    """A run SIGTERMed after its first epoch: KILLED, with a checkpoint to resume."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "train", *TRAIN, "--tracking-uri", tracking_uri, *extra],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
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
    (run,) = all_runs(tracking_uri)
    return run.info.run_id


def copy_store(src: Path, dst: Path) -> str:
    """Copy a sqlite store's folder (database, checkpoints, artifacts) into ``dst`` and point its
    artifact locations at the copy, so a test's writes never reach the original; returns its URI."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    with sqlite3.connect(dst / "mlflow.db") as db:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
            db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (src.as_uri(), dst.as_uri()))
    return f"sqlite:///{dst / 'mlflow.db'}"


@pytest.fixture(scope="module")
def _killed_store(tmp_path_factory, _mlflow_template) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("killed").resolve()
    shutil.copyfile(_mlflow_template, folder / "mlflow.db")
    return folder, killed_run(f"sqlite:///{folder / 'mlflow.db'}")


@pytest.fixture
def killed(_killed_store, tracking_uri) -> str:
    """:func:`killed_run`'s run, in this test's own store: one train process is SIGTERMed per
    module (a process start and an epoch, 7-10 s) and its store folder copied for each test."""
    folder, run_id = _killed_store
    copy_store(folder, Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent)
    return run_id


def fill(folder: Path) -> Path:
    """Take every byte left on ``folder``'s disk with one file; returns it (unlink to free)."""
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return filler


def checkpoint_of(run_id: str, tracking_uri: str) -> Path:
    from harness.training.checkpoint import locate

    return locate(mlflow.MlflowClient(tracking_uri).get_run(run_id).data.tags["dmlbench.checkpoint"], tracking_uri)


def mounted(tmp_path: Path, name: str, options: str) -> Path:
    """A real tmpfs mount (root only): a full or read-only disk, for real."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    target = tmp_path / name
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return target


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for target in made:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


# ----------------------------------------------------------------------------- resuming


def test_a_run_is_resumed_by_one_process_only(tracking_uri, killed, capsys):
    """Two `train --resume` of one run: the second refuses in one line while the first trains."""
    run_id = killed
    first = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "train", "--resume", run_id, "--tracking-uri", tracking_uri],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: (
                training_runs(tracking_uri)
                and len(mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss")) >= 2
            )
        )
        assert main(["train", "--resume", run_id, "--tracking-uri", tracking_uri]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"run {run_id} is being trained by pid {first.pid}" in err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 143


def test_resume_refuses_contradicting_options_and_applies_more_epochs(tracking_uri, killed, capsys):
    run_id = killed
    for argv, text in (
        (["--method", "bitfit"], "--method bitfit contradicts run"),
        (["--set", "optim.lr=0.5"], "--set optim.lr=0.5 contradicts run"),
        (["--set", "optim.epochs=1"], "has completed"),
        (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    ):
        assert main(["train", "--resume", run_id, "--tracking-uri", tracking_uri, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err, err
    assert mlflow.MlflowClient(tracking_uri).get_run(run_id).info.status == "KILLED"  # left as it was
    done = len(mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss"))
    assert main(["train", "--resume", run_id, "--tracking-uri", tracking_uri, "--set", f"optim.epochs={done + 1}"]) == 0
    out = capsys.readouterr().out
    assert f"resuming run {run_id} with optim.epochs 500 -> {done + 1}" in out
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and "dmlbench.error" not in run.data.tags
    assert len(mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss")) == done + 1


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_checkpoint_is_one_line_and_leaves_the_run(damage, tracking_uri, killed, capsys):
    run_id = killed
    path = checkpoint_of(run_id, tracking_uri)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"")
    assert main(["train", "--resume", run_id, "--tracking-uri", tracking_uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"checkpoint {path} of run {run_id} is damaged" in err
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["dmlbench.status"] == "interrupted"


def test_a_store_moved_with_its_checkpoints_still_resumes(tmp_path, tracking_uri, killed):
    run_id = killed
    old = Path(tracking_uri.removeprefix("sqlite:///")).parent
    assert not Path(mlflow.MlflowClient(tracking_uri).get_run(run_id).data.tags["dmlbench.checkpoint"]).is_absolute()
    moved = tmp_path / "moved"
    shutil.copytree(old, moved)
    shutil.rmtree(old / "checkpoints")
    uri = f"sqlite:///{moved / 'mlflow.db'}"
    done = len(mlflow.MlflowClient(uri).get_metric_history(run_id, "train/loss"))  # however late the kill came
    assert main(["train", "--resume", run_id, "--tracking-uri", uri, "--set", f"optim.epochs={done + 1}"]) == 0
    assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


# ----------------------------------------------------------------------------- disks


def test_an_unwritable_checkpoint_folder_is_refused_before_the_run(tmp_path, tracking_uri, capsys, mounts):
    folder = mounted(tmp_path, "ro", "ro,size=1m")
    mounts.append(folder)
    assert main(["train", *TRAIN, "--tracking-uri", tracking_uri, "--set", f"tracking.checkpoint_dir={folder}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write checkpoints to {folder}" in err
    assert not all_runs(tracking_uri)


def test_a_full_disk_is_one_line_nothing_partial_and_a_resumable_run(tmp_path, tracking_uri, mounts):
    """The checkpoint folder fills up during the run: exit 6, one line, no temporary file left,
    the run FAILED; with space freed, --resume finishes it without the old error tag."""
    folder = mounted(tmp_path, "full", "size=2m")
    mounts.append(folder)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "train",
            *TRAIN,
            "--tracking-uri",
            tracking_uri,
            "--set",
            f"tracking.checkpoint_dir={folder}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: any(folder.glob("*.pt")))
        filler = fill(folder)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 6, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no space left on device" in lines[0] and "--resume" in lines[0], err
    (run,) = all_runs(tracking_uri)
    # the last complete checkpoint and the run's claim file, no temporary or probe file
    assert sorted(p.name for p in folder.iterdir() if p.name != "filler") == [
        f"{run.info.run_id}.lock",
        f"{run.info.run_id}.pt",
    ]
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["dmlbench.error"]
    filler.unlink()
    done = len(mlflow.MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train/loss"))
    assert (
        main(
            ["train", "--resume", run.info.run_id, "--tracking-uri", tracking_uri, "--set", f"optim.epochs={done + 1}"]
        )
        == 0
    )
    run = mlflow.MlflowClient(tracking_uri).get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "dmlbench.error" not in run.data.tags


def test_a_full_disk_under_the_store_itself_is_one_line_and_resumable(tmp_path, tracking_uri, mounts):
    """The MLflow database and its artifacts fill the disk: one line, exit 6, and once space is
    freed `--resume` finishes the run (the store could not record the failure: it says so)."""
    folder = mounted(tmp_path, "store", "size=6m")
    mounts.append(folder)
    shutil.copyfile(tracking_uri.removeprefix("sqlite:///"), folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "train", *TRAIN, "--tracking-uri", uri],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: training_runs(uri))
        filler = fill(folder)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 6, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no space left on device" in lines[0] and "Traceback" not in err, err
    assert not list(folder.rglob("*.tmp")) and not list(folder.rglob(".space-probe-*"))
    filler.unlink()
    (run,) = all_runs(uri)
    done = len(mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss"))
    assert main(["train", "--resume", run.info.run_id, "--tracking-uri", uri, "--set", f"optim.epochs={done + 1}"]) == 0
    assert mlflow.MlflowClient(uri).get_run(run.info.run_id).info.status == "FINISHED"


def test_a_read_only_store_folder_stops_study_and_report_before_they_write(tmp_path, tracking_uri, capsys, mounts):
    folder = mounted(tmp_path, "store", "size=8m")
    mounts.append(folder)
    shutil.copyfile(tracking_uri.removeprefix("sqlite:///"), folder / "mlflow.db")  # an existing store...
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    path = write_spec(
        tmp_path, uri, name="ro", methods=["linear_probe"], budget={"n_trials": 1, "epochs": 1}, reproduce={"seeds": []}
    )
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)  # ...on a disk now read-only
    assert main(["study", "run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write MLflow store {uri}" in err
    out = tmp_path / "report"
    assert main(["report", str(path), "--out", str(out)]) == 2
    assert not out.exists() or not list(out.iterdir())


# ----------------------------------------------------------------------------- specs and data


@pytest.mark.parametrize(
    "change, text",
    [
        ({"overrides": {"data.root": "/nonexistent/fashion"}}, "data folder /nonexistent/fashion does not exist"),
        (
            {"methods": [{"method": "vptsp_g", "backbone": "resnet18", "overrides": {"model.backbone_kwargs": {}}}]},
            "vptsp_g",
        ),
        ({"overrides": {"model.pretrained": True, "model.weights": "WEIGHTS"}}, "do not fit backbone"),
    ],
)
def test_a_spec_that_cannot_run_creates_nothing(change, text, tmp_path, tracking_uri, capsys):
    from test_studies import base_overrides

    weights = tmp_path / "other.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"not.a.key": torch.zeros(2)}, str(weights))
    overrides = {
        **base_overrides(tracking_uri),
        **{k: str(weights) if v == "WEIGHTS" else v for k, v in change.pop("overrides", {}).items()},
    }
    path = write_spec(tmp_path, tracking_uri, name="cannot", overrides=overrides, **change)
    assert main(["study", "run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and text in err, err
    assert not all_runs(tracking_uri)
    assert not list(Path(tracking_uri.removeprefix("sqlite:///")).parent.glob("*.journal"))


def test_stray_folders_are_not_classes_and_a_changed_split_is_refused(tmp_path, recwarn):
    """A hidden folder (a notebook's checkpoints) or an empty one is not a class: skipped and said.
    A real extra class folder shifts the ids past the published split: refused, as is a split
    whose class count is not the published one."""
    from harness import data
    from harness.training.resolution import resolve
    from harness.training.setup import splits_for

    base = make_cub(tmp_path / "six", n_classes=6, per_class=2)
    for name in ("images.txt", "image_class_labels.txt", "bounding_boxes.txt", "classes.txt"):
        (base / name).unlink()
    images = base / "images"
    (images / ".ipynb_checkpoints").mkdir()
    shutil.copy(next(images.rglob("*.jpg")), images / ".ipynb_checkpoints" / "x.jpg")
    (images / "empty").mkdir()
    raw = data.readers.read_image_folder(base, {"train_fraction": 0.5})
    assert raw["train"].num_classes == 3 and raw["test"].num_classes == 3
    assert any(
        "2 folder(s) are not classes and were skipped (.ipynb_checkpoints, empty)" in str(w.message) for w in recwarn
    )
    cub = tmp_path / "cub" / "images"  # CUB's class-folder layout with one folder too many
    one = next(images.rglob("*.jpg"))
    for c in range(201):
        (cub / f"{c:03d}.class").mkdir(parents=True)
        shutil.copy(one, cub / f"{c:03d}.class" / "a.jpg")
    cfg = resolve(method="linear_probe", dataset="cub200", overrides={"data.root": str(cub.parent)})
    with pytest.raises(
        Exception, match=r"1 class\(es\) fall outside the split's classes \[1, 100\] \+ \[101, 200\]: 200.class"
    ):
        splits_for(cfg)
    shutil.rmtree(cub / "200.class")
    shutil.rmtree(cub / "150.class")
    (cub / "150.class").mkdir()  # now empty: skipped, so the test split has 99 classes
    with pytest.raises(Exception, match="the test split has 99 classes, the published split 100"):
        splits_for(cfg)


# ----------------------------------------------------------------------------- journals and ledgers


def _tiny(tmp_path: Path, uri: str, name: str, **changes) -> Path:
    base = dict(name=name, methods=["linear_probe"], budget={"n_trials": 2, "epochs": 1}, reproduce={"seeds": []})
    return write_spec(tmp_path, uri, **{**base, **changes})


def journal_of(uri: str, name: str) -> Path:
    return Path(uri.removeprefix("sqlite:///")).parent / f"{name}.optuna.journal"


@pytest.mark.parametrize("damage", ["cut_last_record", "garbage_line"])
def test_a_damaged_journal_is_refused_by_line_and_repaired(damage, tmp_path, tracking_uri, capsys):
    path = _tiny(tmp_path, tracking_uri, "dmg")
    run_study(path)
    journal = journal_of(tracking_uri, "dmg")
    lines = journal.read_bytes().splitlines(keepends=True)
    if damage == "cut_last_record":
        journal.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
        bad = len(lines)
    else:
        journal.write_bytes(b"".join(lines[:3]) + b"{not json\n" + b"".join(lines[3:]))
        bad = 4
    before = journal.read_bytes()
    for argv in (
        ["study", "run", str(path)],
        ["study", "status", str(path)],
        ["report", str(path), "--out", str(tmp_path / "r")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"Optuna journal {journal} is damaged at line {bad}" in err, err
        assert f"dmlbench study repair {path}" in err
        assert journal.read_bytes() == before  # nothing appended after the damaged record
    assert main(["study", "repair", str(path)]) == 0
    assert f"kept the {bad - 1} complete records before line {bad}" in capsys.readouterr().out
    assert len(list(journal.parent.glob("dmg.optuna.journal.damaged-*"))) == 1
    assert main(["study", "status", str(path)]) == 0


def test_a_lost_journal_never_retrains_finished_trials(tmp_path, tracking_uri, capsys):
    path = _tiny(tmp_path, tracking_uri, "lost", reproduce={"seeds": [0]})
    run_study(path)
    trained = {r.info.run_id for r in runs_of("lost")}
    journal_of(tracking_uri, "lost").write_text("")  # emptied (a crash, a wrong copy)
    assert main(["study", "run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "has no record of 2 finished trial(s) of lost/fashion_mnist/linear_probe" in err
    )
    assert "--rebuild-from-mlflow" in err and {r.info.run_id for r in runs_of("lost")} == trained
    journal_of(tracking_uri, "lost").unlink()  # lost altogether: rebuilt from MLflow
    assert main(["study", "run", str(path), "--rebuild-from-mlflow"]) == 0
    assert "rebuilt 2 trial(s) of study lost from MLflow" in capsys.readouterr().out
    new = {r.info.run_id for r in runs_of("lost")} - trained
    assert not [
        r for r in runs_of("lost") if r.info.run_id in new and r.data.tags["dmlbench.role"] in ("trial", "reproduction")
    ]  # no trial and no reproduction trained again
    trials = optuna_study(path, "linear_probe").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert {t.user_attrs["mlflow_run_id"] for t in trials} <= trained


def test_a_trial_another_process_finishes_during_the_ledger_check_is_not_reported_lost(
    tmp_path, tracking_uri, monkeypatch
):
    """Two ``study run`` processes on one journal: while one reads the ledger, the other starts and
    finishes a trial (names its run in Optuna, then tags it finished in MLflow). That trial is not
    lost, and the reading process must not refuse the storage (the race CI once hit)."""
    from harness.studies import ledger
    from harness.studies.loading import load_spec
    from harness.studies.storage import open_storage, open_study, storage_url

    spec = load_spec(_tiny(tmp_path, tracking_uri, "race"))
    ((dataset, entry),) = spec.units()
    store = open_storage(storage_url(spec), spec.path)
    tags = {
        "dmlbench.study": "race",
        "dmlbench.dataset": dataset,
        "dmlbench.entry": entry.name,
        "dmlbench.role": "trial",
    }
    other: list[str] = []

    def then_the_other_process_trains_a_trial(read):
        def reading(*args):
            found = read(*args)
            if not other:  # right after the check's first read, whichever store it reads first
                trial = open_study(spec, dataset, entry, store).ask()
                mlflow.set_experiment(spec.experiments[dataset])
                with mlflow.start_run(tags=tags) as run:
                    trial.set_user_attr("mlflow_run_id", run.info.run_id)
                    mlflow.set_tag("dmlbench.status", "finished")
                other.append(run.info.run_id)
            return found

        return reading

    for name in ("ended_trial_runs", "known_run_ids"):
        monkeypatch.setattr(ledger, name, then_the_other_process_trains_a_trial(getattr(ledger, name)))
    assert ledger.check_ledger(spec, store, storage_url(spec)) == 0
    assert [r.info.run_id for r in ledger.ended_trial_runs(spec, dataset, entry)] == other  # it did finish
    assert ledger.check_ledger(spec, store, storage_url(spec)) == 0  # and is known on the next check too


def test_failed_seeds_are_reported_and_retried_until_the_bound(tmp_path, tracking_uri, capsys):
    """Every reproduction seed fails: the study exits 7 naming them; each rerun retries them, at
    most MAX_SEED_ATTEMPTS times in all; once they succeed the study exits 0."""
    from harness.studies.reproductions import MAX_SEED_ATTEMPTS
    from harness.training.loop import train as real_train

    path = _tiny(tmp_path, tracking_uri, "seeds", reproduce={"seeds": [0, 1]})

    def failing(cfg, **kw):
        if kw.get("tags", {}).get("dmlbench.role") == "reproduction":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_train(cfg, **kw)

    from harness.errors import StudyIncomplete

    for attempt in range(1, MAX_SEED_ATTEMPTS + 2):
        with pytest.raises(
            StudyIncomplete, match=r"seeds/fashion_mnist/linear_probe seed 0 \(RuntimeError: CUDA error"
        ):
            run_study(path, train=failing)
        seeds = optuna.load_study(
            study_name="seeds/fashion_mnist/linear_probe/reproductions",
            storage=__import__("harness.studies.storage", fromlist=["x"]).open_storage(
                str(journal_of(tracking_uri, "seeds"))
            ),
        )
        failed = [t for t in seeds.trials if t.state == TrialState.FAIL]
        assert len(failed) == 2 * min(attempt, MAX_SEED_ATTEMPTS)  # no retry past the bound
    assert main(["study", "status", str(path)]) == 0 and "0/2" in capsys.readouterr().out
    assert main(["study", "run", str(path)]) == 7  # the command's exit code (the console script passes it on)
    assert "failed work" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_trial_finished_by_hand_is_not_trained_again(tmp_path, tracking_uri, capsys):
    """Ctrl-C stops a trial; the user finishes its run with `train --resume` (as the README
    offers); the next `study run` takes that run as the trial's result instead of training it."""
    from harness.training.loop import train as real_train

    path = _tiny(tmp_path, tracking_uri, "byhand", budget={"n_trials": 1, "epochs": 2})

    def interrupted(cfg, on_epoch=None, **kw):
        def stop(epoch, row):
            on_epoch(epoch, row)
            raise KeyboardInterrupt

        return real_train(cfg, on_epoch=stop, **kw)

    with pytest.raises(KeyboardInterrupt):
        run_study(path, train=interrupted)
    (killed,) = runs_of("byhand", "trial")
    assert killed.info.status == "KILLED"
    assert main(["train", "--resume", killed.info.run_id]) == 0
    run_study(path)
    trials = optuna_study(path, "linear_probe").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["mlflow_run_id"] == killed.info.run_id
    assert trials[1].value == mlflow.get_run(killed.info.run_id).data.metrics["best/val_map_at_r"]
    assert [r.info.run_id for r in runs_of("byhand", "trial")] == [killed.info.run_id]  # none trained again
