"""The benchmark, the prepared GPU script's training stages at toy sizes on CPU, study plans and
device placement (the GPU window's own behaviour: tests/test_gpu_window.py)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.studies.placement import parse_devices
from harness.studies.plan import EVAL_COST, plan

REPO = Path(__file__).resolve().parents[1]
STAGES = {
    "read",
    "decode",
    "augment",
    "to_float_normalise",
    "collate_transfer",
    "host_to_device",
    "step",
    "evaluation",
    "logging",
}


def test_gpu_window_trains_decodes_and_shares_a_device_at_tiny_sizes(tmp_path):
    """benchmarks/gpu.sh --tiny on CPU, the stages that train: the data path per pipeline and
    train() end to end for full fine-tuning, BitFit and VPTSP-G's memory bank, a SOP-shaped
    folder decoded every batch, K = 2 concurrent trials per device that use the budget exactly
    once and leave nothing RUNNING, and the decode check; each record with its fields."""
    from harness.bench.records import read

    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "benchmarks" / "gpu.sh"),
            str(out),
            "--tiny",
            "--stages",
            "e2e,sop,concurrency,decode",
            "--workdir",
            str(work),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read(out)
    assert [r["status"] for r in records if r.get("kind") == "stage"] == ["ok"] * 4
    e2e = [r for r in records if r["stage"] == "e2e" and r.get("kind") is None]
    paths = {r["pipeline"]: r for r in e2e if r["method"].startswith("data path")}
    assert set(paths) == {"cpu", "device"}
    for r in paths.values():
        assert set(r["stages"]) == STAGES - {"step", "evaluation", "logging"} and r["pipeline_img_s"] > 0
        assert r["decoder"] == "cpu"  # no CUDA: the device pipeline decodes on the CPU, and says so
    trained = {(r["method"], r["pipeline"]): r for r in e2e if not r["method"].startswith("data path")}
    assert set(trained) == {
        (m, p) for m in ("full_finetune", "bitfit", "vptsp_g (memory bank)") for p in ("cpu", "device")
    }
    for r in trained.values():
        assert r["status"] == "ok" and r["data_img_s"] > 0 and 0 < r["eval_share"] < 1 and r["decoder"] == "cpu", r
    (sop,) = [r for r in records if r["stage"] == "sop" and r["method"] == "bitfit"]
    assert sop["pipeline"] == "device" and "train=cpu" in sop["decoded_batches"]
    (k2,) = [r for r in records if r["stage"] == "concurrency" and r.get("kind") == "concurrency"]
    assert (k2["k"], k2["trials"], k2["budget"], k2["status"]) == (2, 2, 2, "ok")
    (decode,) = [r for r in records if r["stage"] == "decode" and r.get("kind") is None]
    assert decode["decode_max_abs_diff"] == 0 and decode["test_transform_max_abs_diff"] == 0  # CPU: same library
    summary = (out / "summary.md").read_text()
    assert "| data path, host ms per image |" in summary and "## concurrency: ok" in summary
    k2_dir = work / "concurrency" / "k2"
    with sqlite3.connect(k2_dir / "k2.db") as con:
        states = con.execute("select status from runs").fetchall()
        trial_runs = con.execute("select count(*) from tags where key = 'dmlbench.role' and value = 'trial'").fetchone()
    assert ("RUNNING",) not in states and trial_runs[0] == 2
    import optuna

    from harness.studies.loading import load_spec
    from harness.studies.storage import open_storage, open_study, storage_url

    spec = load_spec(k2_dir / "study.yaml")
    store = open_storage(storage_url(spec, None))
    trials = [t for d, e in spec.units() for t in open_study(spec, d, e, store).get_trials(deepcopy=False)]
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(t.user_attrs["dmlbench.train_images"] > 0 for t in trials)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["benchmark", "--methods", "bitfitt"], "unknown method 'bitfitt'"),
        (["benchmark", "--pipelines", "gpu"], "bad pipeline 'gpu' for --pipelines; valid: auto, cpu, device, legacy"),
        (["benchmark", "--folder-size", "500"], "bad value '500' for --folder-size"),
        (["benchmark", "--end-to-end", "--folder", "cubb"], "bad value 'cubb' for --folder"),
        (["benchmark", "--concurrent", "0"], "bad value [0] for --concurrent"),
        (["study", "plan", "studies/peft_vit_s.yaml", "--img-s", "0"], "bad value 0.0 for --img-s"),
        (["study", "run", "studies/demo.yaml", "--devices", "gpu0"], "bad value 'gpu0' for --devices"),
        (
            ["study", "run", "studies/demo.yaml", "--devices", "cpu", "--workers-per-device", "0"],
            "bad value 0 for --workers-per-device",
        ),
    ],
)
def test_bad_benchmark_and_study_options_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    assert main([*argv, "--workdir", str(tmp_path)] if argv[0] == "benchmark" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.db").exists() and not list(tmp_path.glob("*/"))


def test_devices_are_checked_and_spread():
    assert parse_devices("cpu", 2) == ["cpu", "cpu"]
    assert parse_devices(None, 3) is None
    import torch

    if not torch.cuda.is_available():
        from harness.errors import UserError

        with pytest.raises(UserError, match="GPU 0 does not exist"):
            parse_devices("0", 1)


def test_study_plan_counts_what_the_budget_trains(tmp_path):
    rows = {(r["dataset"], r["entry"]): r for r in plan(REPO / "studies" / "peft_vit_s.yaml", img_s=1000)}
    cub = rows[("cub200", "bitfit")]
    # CUB without its data: the published 5,864 training images less the validation fifth
    val = round(5864 * 0.2)
    assert cub["train_images"] == 5864 - val and cub["sizes_from"] == "published sizes"
    trials, epochs, seeds = 12, 40, 3
    assert cub["trained_images"] == (trials + seeds) * epochs * (5864 - val)
    assert cub["evaluated_images"] == trials * epochs * val + seeds * (epochs * val + 5924)
    assert cub["gpu_hours"] == pytest.approx(
        (cub["trained_images"] + EVAL_COST * cub["evaluated_images"]) / 1000 / 3600, abs=0.01
    )
    records = tmp_path / "bench.json"
    records.write_text(json.dumps([{"method": "bitfit", "img_s": 4000.0, "data_img_s": 2000.0}]))
    by_bench = {
        (r["dataset"], r["entry"]): r for r in plan(REPO / "studies" / "peft_vit_s.yaml", benchmark=str(records))
    }
    assert by_bench[("cub200", "bitfit")]["img_s"] == 2000.0  # end to end, not the model step alone
    assert by_bench[("cub200", "adapter")]["gpu_hours"] is None
    demo = plan(REPO / "studies" / "demo.yaml", img_s=100)  # the embedded data is on disk: its own carving
    assert {r["sizes_from"] for r in demo} == {"data on disk"}
