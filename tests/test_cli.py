"""CLI: bad input is one line on stderr with exit code 2 and leaves nothing behind."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import make_cub

from harness.cli import main

TINY = [
    "--set",
    "data.max_per_class=16",
    "--set",
    "data.image_size=32",
    "--set",
    "data.resize_size=32",
    "--set",
    "model.pretrained=false",
    "--set",
    "optim.epochs=1",
    "--set",
    "model.embed_dim=16",
]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def n_runs(uri: str) -> int:
    path = uri.removeprefix("sqlite:///")
    if not Path(path).exists():
        return 0
    with sqlite3.connect(path) as con:
        try:
            return con.execute("select count(*) from runs").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--method", "bitfitt"], "unknown method 'bitfitt' (did you mean 'bitfit'?)"),
        (["train", "--dataset", "cub2000"], "unknown dataset 'cub2000' (did you mean 'cub200'?)"),
        (["train", "--backbone", "resnet500"], "unknown backbone 'resnet500'"),
        (["train", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (["train", "--set", "optim.name=adam"], "valid: adamw, sgd"),
        (["train", "--dataset", "cub200", "--set", "data.root=/nonexistent/cub"], "/nonexistent/cub"),
        (["train", "--set", "model.weights=/nonexistent/w.pth"], "weights file not found: /nonexistent/w.pth"),
        (["datasets", "check", "sop", "--root", "/nonexistent/sop"], "/nonexistent/sop"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, tracking_uri, argv, message):
    code, out, err = cli(capsys, *argv, *TINY[:0])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dmlbench: error: ")
    assert message in err
    assert n_runs(tracking_uri) == 0  # nothing half-written


def test_unwritable_tracking_location(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file instead
        locked = tmp_path / "afile"
        locked.write_text("")
    code, _, err = cli(capsys, "train", *TINY, "--tracking-uri", f"sqlite:///{locked}/sub/mlflow.db")
    assert code == 2 and "cannot write MLflow store" in err and err.count("\n") == 1


def test_corrupt_image_named_and_no_run(capsys, tmp_path, tracking_uri):
    base = make_cub(tmp_path / "cub", n_classes=200, per_class=2)
    bad = base / "images" / "150.Bird_150" / "img_1.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    code, _, err = cli(capsys, "train", "--dataset", "cub200", "--set", f"data.root={tmp_path / 'cub'}", *TINY)
    assert code == 2 and str(bad) in err and err.count("\n") == 1
    assert n_runs(tracking_uri) == 0
    code, _, err = cli(capsys, "datasets", "check", "cub200", "--root", str(tmp_path / "cub"))
    assert code == 2 and str(bad) in err


def test_train_on_cub_layout_and_check_json(capsys, tmp_path, tracking_uri):
    make_cub(tmp_path / "cub", n_classes=200, per_class=2)
    code, out, _ = cli(capsys, "datasets", "check", "cub200", "--root", str(tmp_path / "cub"), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["train"] == {"images": 160, "classes": 80}
    assert report["val"] == {"images": 40, "classes": 20}
    assert report["test"] == {"images": 200, "classes": 100}
    code, out, _ = cli(
        capsys,
        "train",
        "--method",
        "bitfit",
        "--dataset",
        "cub200",
        "--set",
        f"data.root={tmp_path / 'cub'}",
        "--set",
        "data.batch_size=8",
        *TINY,
    )
    assert code == 0 and "test/recall_at_1" in out
    assert n_runs(tracking_uri) == 1


def test_methods_json_lists_every_method_with_counts(capsys):
    from methods import method_names

    code, out, _ = cli(capsys, "methods", "--json", "--no-pretrained", "--num-classes", "10")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == set(method_names())
    lp, ft = rows["linear_probe"], rows["full_finetune"]
    head = 1280 * 512 + 512  # Linear(1280 -> 512) on the pooled lite0 features
    proxies = 10 * 512  # Proxy Anchor proxies: training only
    assert lp["params/trainable"] == head + proxies and lp["params/trainable_inference"] == head
    # tf_efficientnet_lite0 has 4,652,008 parameters with its 1000-class classifier (1,281,000)
    assert ft["params/trainable"] == ft["params/total"] == 3_371_008 + head + proxies


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).with_name("dmlbench")
    proc = subprocess.run([str(exe), "train", "--method", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown method 'nope'" in proc.stderr


def test_train_prints_a_line_per_epoch_and_the_run_url_and_compare_puts_runs_side_by_side(capsys, tiny_overrides):
    sets = sum((["--set", f"{k}={v}"] for k, v in tiny_overrides.items() if k != "model.backbone_kwargs"), [])
    code, out, _ = cli(capsys, "train", "--method", "linear_probe", *sets)
    assert code == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2 and "loss" in lines[0] and "val R@1" in lines[0] and lines[1].startswith("epoch 2/2")
    assert "#/experiments/" in out and "/runs/" in out
    first = out.split("run ", 1)[1].split()[0]
    code, out, _ = cli(capsys, "train", "--method", "bitfit", *sets)
    second = out.split("\nrun ", 1)[1].split()[0]
    code, out, _ = cli(capsys, "compare", first, second)
    assert code == 0 and "test/recall_at_1" in out and "config method" in out and "linear_probe" in out
    assert cli(capsys, "compare", first, "nope")[0] == 2


def test_datasets_say_which_are_on_disk(capsys):
    code, out, _ = cli(capsys, "datasets", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and "on disk" in rows["cub200"]
