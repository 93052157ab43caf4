"""Nothing lost, nothing stuck, every mistake caught up front: resumable runs, one-line errors
with distinct exit codes, interrupted runs ended KILLED, and input checks before anything exists."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from conftest import all_runs

from harness.cli import main
from harness.errors import RunInterrupted, UserError
from harness.training import checkpoint
from harness.training.loop import train
from harness.training.resolution import resolve
from harness.training.setup import splits_for

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- resume


RESUMED = {
    "bitfit": ("bitfit", {}),
    # the CPU memory bank keeps each class row's optimizer state outside the optimizer
    "vptsp_g_memory_bank": (
        "vptsp_g",
        {
            "method_args.memory_bank": True,
            "optim.name": "adamw",
            "loss.name": "proxy_anchor",
            "backbone": "vit_small_patch16_224",
            "data.samples_per_class": 4,
            "data.batch_size": 16,
            "method_args.num_prompt": 4,
            "method_args.num_class_prompt": 2,
        },
    ),
}


@pytest.mark.parametrize("case", RESUMED)
def test_killed_run_resumes_in_the_same_run_and_equals_an_uninterrupted_one(case, tiny_overrides, tracking_uri):
    method, extra = RESUMED[case]
    vit = {"model.backbone_kwargs": {"img_size": 32, "depth": 2}} if "backbone" in extra else {}
    over = {**tiny_overrides, **vit, **extra, "optim.epochs": 4, "tracking.log_artifacts": False}
    full = train(resolve(method=method, overrides=over))

    def stop_after_2(epoch: int, row: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted, match="after 2 completed epoch"):
        train(resolve(method=method, overrides=over), on_epoch=stop_after_2)
    killed = next(r for r in all_runs(tracking_uri) if r.info.status == "KILLED")
    ckpt = checkpoint.locate(killed.data.tags["dmlbench.checkpoint"], tracking_uri)
    assert ckpt.is_file() and killed.data.tags["dmlbench.status"] == "interrupted"

    assert main(["train", "--resume", killed.info.run_id]) == 0
    resumed = mlflow.MlflowClient(tracking_uri).get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED" and not ckpt.exists()  # same run; checkpoint removed
    compared = [k for k in full.metrics if k.startswith(("test/", "best/", "params/"))]
    assert compared
    for key in compared:
        assert resumed.data.metrics[key] == full.metrics[key], key  # bit for bit
    losses = mlflow.MlflowClient(tracking_uri).get_metric_history(killed.info.run_id, "train/loss")
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == [h["train/loss"] for h in full.history]
    assert main(["train", "--resume", killed.info.run_id]) == 2  # finished: nothing to resume


def test_resume_of_an_unknown_run_is_a_one_line_error(tracking_uri, capsys):
    assert main(["train", "--resume", "0123456789abcdef"]) == 2
    assert "no run '0123456789abcdef'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- runtime failures


def test_diverged_loss_is_one_line_exit_3_and_a_failed_run(tiny_overrides, tracking_uri, capsys):
    sets = [f"{k}={v}" for k, v in tiny_overrides.items() if k != "model.backbone_kwargs"]
    args = [
        "train",
        "--method",
        "bitfit",
        *sum((["--set", s] for s in sets), []),
        "--set",
        "optim.lr=1e30",
        "--set",
        "optim.grad_clip=0",
        "--set",
        "optim.name=sgd",
        "--set",
        "optim.epochs=3",
    ]
    assert main(args) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training diverged" in err and "Traceback" not in err
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FAILED" and run.info.run_id in err


def test_ctrl_c_ends_the_run_killed_with_exit_130(tmp_path, tracking_uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "harness.cli",
        "train",
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
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(
        r.info.status == "RUNNING" and "train/loss" in r.data.metrics for r in all_runs(tracking_uri)
    ):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted run" in err and "KILLED" in err and "Traceback" not in err
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "KILLED" and run.data.tags["dmlbench.status"] == "interrupted"


# ----------------------------------------------------------------------------- checks up front


@pytest.mark.parametrize(
    "key, value, text",
    [
        ("optim.lr", "nan", "optim.lr"),
        ("optim.lr", "inf", "optim.lr"),
        ("optim.lr", "-1", "optim.lr"),
        ("eval.ks", "[1, 0]", "eval.ks"),
        ("data.resize_size", "16", "data.resize_size"),
        ("model.embed_dim", "-5", "model.embed_dim"),
        ("data.shots", "-1", "data.shots"),
        ("data.max_per_class", "-3", "data.max_per_class"),
        ("optim.min_lr", "1.0", "optim.min_lr"),
    ],
)
def test_bad_values_are_refused_before_anything_exists(key, value, text, tracking_uri, capsys):
    assert main(["train", "--method", "bitfit", "--set", "model.pretrained=false", "--set", f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert text in err and len(err.strip().splitlines()) == 1
    assert all_runs(tracking_uri) == []


def test_cuda_on_a_machine_without_cuda_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        resolve(method="bitfit", overrides={"device": "cuda"})


def test_vit_is_built_for_the_run_image_size(tiny_vit_overrides):
    over = {**tiny_vit_overrides, "model.backbone_kwargs": {"depth": 2}, "data.image_size": 48, "data.resize_size": 48}
    cfg = resolve(method="bitfit", backbone="vit_small_patch16_224", overrides=over)
    assert cfg.model.backbone_kwargs["img_size"] == 48
    with pytest.raises(UserError, match="img_size=32 does not match data.image_size=48"):
        resolve(
            method="bitfit",
            backbone="vit_small_patch16_224",
            overrides={**over, "model.backbone_kwargs": {"depth": 2, "img_size": 32}},
        )


@pytest.mark.parametrize(
    "file, line, text",
    [
        ("image_class_labels.txt", "1 one", "image_class_labels.txt:1: expected '<image id> <integer class id>'"),
        ("classes.txt", "Black_footed_Albatross", "classes.txt:1: expected '<integer class id> <class name>'"),
        ("bounding_boxes.txt", "1 2.0 3.0", "bounding_boxes.txt:1: expected '<image id> <x> <y> <width> <height>'"),
    ],
)
def test_malformed_cub_metadata_names_file_and_line(tmp_path, file, line, text):
    from test_data import cfg_for, make_cub

    base = make_cub(tmp_path, n_classes=4, per_class=2, images=False)
    rows = (base / file).read_text().splitlines()
    (base / file).write_text("\n".join([line] + rows[1:]) + "\n")
    with pytest.raises(UserError, match=text.replace("<", ".").replace(">", ".")):
        splits_for(cfg_for("cub200", tmp_path))


def test_missing_box_names_the_image(tmp_path):
    from test_data import cfg_for, make_cub

    base = make_cub(tmp_path, n_classes=4, per_class=2, images=False)
    rows = (base / "bounding_boxes.txt").read_text().splitlines()
    (base / "bounding_boxes.txt").write_text("\n".join(rows[1:]) + "\n")
    with pytest.raises(UserError, match="image id '1' of images.txt has no box"):
        splits_for(cfg_for("cub200", tmp_path))


def silent_server() -> tuple[socket.socket, int]:
    """A TCP server that accepts and never answers (an HTTP endpoint that hangs)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    threading.Thread(target=lambda: [srv.accept() for _ in range(4)], daemon=True).start()
    return srv, srv.getsockname()[1]


def test_tracking_uris_are_checked_before_any_run(tmp_path, capsys, monkeypatch):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    srv, silent = silent_server()
    cases = [
        ("garbage://x", "bad MLflow tracking URI"),
        (str(tmp_path / "mlruns"), "file store"),
        (f"file://{tmp_path}/mlruns", "file store"),
        (f"http://127.0.0.1:{port}", "does not answer"),
        (f"http://127.0.0.1:{silent}", "does not answer"),
    ]
    for uri, text in cases:
        started = time.monotonic()
        assert (
            main(
                [
                    "train",
                    "--method",
                    "bitfit",
                    "--set",
                    "model.pretrained=false",
                    "--set",
                    "data.max_per_class=4",
                    "--set",
                    "data.num_workers=0",
                    "--tracking-uri",
                    uri,
                ]
            )
            == 2
        ), uri
        assert time.monotonic() - started < 30
        err = capsys.readouterr().err
        assert text in err and len(err.strip().splitlines()) == 1, (uri, err)
    srv.close()
    assert not (tmp_path / "mlruns").exists()


def test_report_without_runs_writes_nothing(tmp_path, tracking_uri, capsys):
    out = tmp_path / "report"
    assert main(["report", str(REPO / "studies" / "demo.yaml"), "--out", str(out), "--tracking-uri", tracking_uri]) == 2
    assert "no runs of study 'demo'" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "storage, text",
    [
        ("nosuchdriver://x/y", "bad --storage"),
        ("postgresql+psycopg://u@127.0.0.1:1/db", "cannot open Optuna storage"),
    ],
)
def test_bad_storage_urls_are_refused_before_any_run_or_trial(storage, text, tracking_uri, capsys):
    spec = REPO / "studies" / "demo.yaml"
    assert main(["study", "run", str(spec), "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert text in err and len(err.strip().splitlines()) == 1
    assert all_runs(tracking_uri) == []


@pytest.mark.parametrize(
    "space, text",
    [
        ({"optim.lr": {"type": "float", "low": "abc", "high": 1}}, "finite numbers low <= high"),
        ({"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "log scale needs low > 0"),
        ({"optim.name": {"type": "categorical", "choices": ["adamw", "sgdd"]}}, "bad value 'sgdd' for 'optim.name'"),
        ({"method_args.style": {"type": "categorical", "choices": ["parallel", "seqential"]}}, "'seqential'"),
        ([1], "must be a mapping"),
    ],
)
def test_study_search_spaces_are_checked_before_anything_exists(space, text, tmp_path, tracking_uri, capsys):
    import yaml

    spec = {
        "name": "bad",
        "backbone": "tf_efficientnet_lite0",
        "datasets": ["fashion_mnist"],
        "methods": [{"method": "adapter", "search_space": space}],
        "budget": {"n_trials": 1, "epochs": 1},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert text in err and len(err.strip().splitlines()) == 1
    assert all_runs(tracking_uri) == [] and not list(tmp_path.glob("*.journal"))
    assert not list(Path(tracking_uri.removeprefix("sqlite:///")).parent.glob("*.journal"))


def test_weights_are_not_saved_when_log_weights_is_off(tiny_overrides):
    result = train(
        resolve(method="linear_probe", overrides={**tiny_overrides, "optim.epochs": 1, "tracking.log_weights": False})
    )
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert "curves.png" in names and "trainable.safetensors" not in names


def test_report_on_runs_with_the_old_metric_names_says_so_and_writes_nothing(tmp_path, tracking_uri, capsys):
    """A store written before the metric names were namespaced: one line, not empty columns."""
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.create_experiment("fashion_styles", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp, tags={"dmlbench.study": "demo", "dmlbench.role": "reproduction"})
    for key in ("train_loss", "best_val_map_at_r", "test_recall_at_1"):
        client.log_metric(run.info.run_id, key, 0.9)
    out = tmp_path / "report"
    assert main(["report", str(REPO / "studies" / "demo.yaml"), "--out", str(out), "--tracking-uri", tracking_uri]) == 2
    err = capsys.readouterr().err
    assert "'test_recall_at_1', now 'test/recall_at_1'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
