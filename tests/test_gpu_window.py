"""The prepared GPU measurement (benchmarks/gpu.sh, harness/bench/window.py), proven on the CPU:
the plan fits the lent machine's limits, every method goes through the smoke and step stages at
toy sizes, a Python without mlflow/optuna still measures what needs neither (and the wheel branch
installs), a kill mid-stage keeps every record and ends every process, a stage past its cap is
killed and the next one runs, and a decode that falls back to the CPU is recorded and fails."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from harness.bench.records import read
from methods import get_method, method_names

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.sh"
#: a Python that cannot import mlflow or optuna: a meta-path finder refuses them at startup
BLOCKER = """import sys
class _NoTracking:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlflow", "optuna"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, _NoTracking())
"""


def window(out: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), *args, "--workdir", str(out.parent / "work")],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stage_records(out: Path, stage: str) -> tuple[dict, list[dict]]:
    records = [r for r in read(out) if r["stage"] == stage]
    own = [r for r in records if r.get("kind") == "stage"]
    assert len(own) == 1, (stage, own)
    return own[0], [r for r in records if r.get("kind") not in ("stage", "env")]


def test_the_dry_run_plans_every_stage_within_the_budget(tmp_path):
    proc = window(tmp_path / "out", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    caps = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s", proc.stdout, re.M)}
    assert list(caps)[:-1] == ["smoke", "step", "e2e", "sop", "concurrency", "decode", "mapr"]
    assert caps["smoke"] <= 60 and sum(v for k, v in caps.items() if k != "sum") == caps["sum"] <= 480
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_every_method_goes_through_the_smoke_and_step_stages_at_toy_sizes(tmp_path):
    out = tmp_path / "out"
    proc = window(out, "--tiny", "--stages", "smoke,step")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    head, smoke = stage_records(out, "smoke")
    assert head["status"] == "ok"
    built = {r["method"]: r for r in smoke}
    assert set(built) == set(method_names()) | {"nvjpeg"}, set(method_names()) ^ set(built)
    assert all(r["status"] == "ok" and r.get("syncs", 0) == 0 for r in built.values()), [
        (m, r.get("error")) for m, r in built.items() if r["status"] != "ok"
    ]
    assert built["nvjpeg"]["decoder"] == "cpu"  # no CUDA here: the CPU was asked for and ran
    head, steps = stage_records(out, "step")
    vit = [m for m in method_names() if get_method(m).applies_to("vit")]
    assert head["status"] == "ok" and [r["method"] for r in steps] == vit
    for r in steps:
        assert r["status"] == "ok" and r["img_s"] > 0 and r["baseline_img_s"] > 0 and r["params/trainable"] >= 0, r
    summary = (out / "summary.md").read_text()
    assert "## smoke: ok" in summary and "## step: ok" in summary and "| vptsp_g |" in summary
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "records.jsonl", "summary.md"]


def _wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, so the install branch of gpu.sh runs for real."""
    path = folder / "dmlbench_probe-0.1-py3-none-any.whl"
    info = "dmlbench_probe-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("dmlbench_probe/__init__.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: dmlbench-probe\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_without_mlflow_and_optuna_the_other_stages_run_and_the_rest_are_skipped(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    out = tmp_path / "out"
    env = {"PYTHONPATH": str(blocker), "DMLBENCH_WHEELS": str(wheels), "DMLBENCH_SITE": str(tmp_path / "site")}
    proc = window(out, "--tiny", "--stages", "smoke,e2e,sop,concurrency,mapr", "--methods", "bitfit", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "installed 1 wheels" in proc.stdout and (tmp_path / "site" / "dmlbench_probe" / "__init__.py").exists()
    for stage in ("smoke", "mapr"):
        head, rows = stage_records(out, stage)
        assert head["status"] == "ok" and rows and all(r["status"] == "ok" for r in rows), (stage, rows)
    env_record = next(r for r in read(out) if r.get("kind") == "env")
    assert env_record["mlflow"] == env_record["optuna"] == "missing"
    for stage, needs in (("e2e", "mlflow"), ("sop", "mlflow"), ("concurrency", "mlflow, optuna")):
        head, rows = stage_records(out, stage)
        assert head["status"] == "skipped" and head["error"].startswith(f"{needs} not installed") and not rows


def _measures_alive(out: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"harness.bench.measures" in cmd and str(out).encode() in cmd:
            pids.append(int(proc.name))
    return pids


def test_a_kill_mid_stage_keeps_every_record_and_ends_every_process(tmp_path):
    out = tmp_path / "out"
    # the kill lands after BitFit's step record, while four more methods' steps (seconds on a CPU) are to come
    args = [
        "--tiny",
        "--stages",
        "smoke,step",
        "--methods",
        "bitfit,boft,frpt,frpt_dpp,vptsp_g",
        "--workdir",
        str(tmp_path / "work"),
    ]
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), str(out), *args],
        env={**os.environ, "PYTHON": sys.executable},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not any(r["stage"] == "step" and r.get("kind") is None for r in read(out)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    assert _measures_alive(out)  # the step stage is running
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM: stopped every process it started" in err
    assert not _measures_alive(out)
    smoke, _ = stage_records(out, "smoke")
    step, measured = stage_records(out, "step")
    assert smoke["status"] == "ok" and step["status"] == "interrupted" and measured
    assert all(r["status"] == "ok" for r in measured) and "vptsp_g" not in [r["method"] for r in measured]
    assert "## step: interrupted" in (out / "summary.md").read_text()


def test_a_stage_past_its_cap_is_killed_and_the_next_stage_runs(tmp_path):
    out = tmp_path / "out"
    proc = window(
        out,
        "--tiny",
        "--stages",
        "step,mapr",
        "--caps",
        "step=4",
        "--methods",
        "full_finetune,bitfit",
        env={"DMLBENCH_STAGE_MARGIN_S": "0"},
    )
    assert proc.returncode == 1, proc.stdout[-2000:]  # a stage timed out
    step, _ = stage_records(out, "step")
    mapr, rows = stage_records(out, "mapr")
    assert step["status"] == "timeout" and "cap of 4 s" in step["error"] and step["seconds"] < 20
    assert mapr["status"] == "ok" and rows[0]["eval_s"] >= 0
    assert not _measures_alive(out)


def test_a_decode_fallback_is_recorded_warned_once_and_fails_the_check(tmp_path, capsys):
    """nvJPEG asked for (a CUDA-like decoder here) and refusing: every batch is decoded on the
    CPU, counted as cpu-fallback, one warning line says why, and decode_check fails."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from harness.bench.decode_check import compare
    from harness.data.decode import Decoder

    class RefusingNvjpeg(Decoder):
        def __init__(self, device, on_device=True, name=""):
            super().__init__(device, on_device, name="train")
            self.gpu = on_device  # as on a CUDA device

        def _decode_on_device(self, batch):
            raise RuntimeError("nvjpeg: CMYK images are not supported")

    files = []
    for i in range(3):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(path, quality=90)
        files.append(str(path))
    decoder = RefusingNvjpeg(torch.device("cpu"))
    encoded = [torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8) for f in files]
    for _ in range(2):
        images = decoder(encoded, files)
    assert [tuple(t.shape) for t in images] == [(3, 24, 32)] * 3
    assert decoder.used() == "cpu-fallback" and decoder.batches["cpu-fallback"] == 2
    err = capsys.readouterr().err
    assert err.count("nvJPEG did not decode a batch (train): nvjpeg: CMYK images are not supported") == 1
    result = compare(files, torch.device("cpu"), make_decoder=RefusingNvjpeg)
    assert result["status"] == "failed" and result["decoder"] == "cpu-fallback"
    assert "asked for and the batches were decoded by cpu-fallback" in result["error"]
    assert compare(files, torch.device("cpu")).get("status") is None  # the CPU asked for and used: fine
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    png = RefusingNvjpeg(torch.device("cpu"))
    png([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], ["x.png"])
    assert png.used() == "cpu-fallback"


@pytest.mark.parametrize("split_kind", ["device", "cpu", "array"])
def test_runs_record_the_decoder_of_every_split(split_kind, tiny_overrides, tmp_path):
    """data/decoder/<split> as the run's params: what decoded the images, per split."""
    import mlflow
    from PIL import Image

    from harness.training.loop import train
    from harness.training.resolution import resolve

    overrides = {**tiny_overrides, "optim.epochs": 1}
    if split_kind != "array":
        import numpy as np

        for c in range(4):
            (tmp_path / "f" / f"c{c}").mkdir(parents=True)
            for i in range(6):
                Image.fromarray(np.full((20, 20, 3), 30 * c + i, np.uint8)).save(tmp_path / "f" / f"c{c}" / f"{i}.jpg")
        overrides.update(
            {
                "dataset": "image_folder",
                "data.root": str(tmp_path / "f"),
                "data.pipeline": split_kind,
                "data.val_fraction": 0.0,
                "data.batch_size": 8,
                "data.samples_per_class": 2,
                "data.max_per_class": 0,
                "data.check_published": False,
            }
        )
    result = train(resolve(method="linear_probe", backbone="resnet18", overrides=overrides))
    params = mlflow.get_run(result.run_id).data.params
    decoders = {k: v for k, v in params.items() if k.startswith("data/decoder/")}
    expected = {"device": "cpu", "cpu": "cpu", "array": "in-memory"}[split_kind]  # device pipeline on a CPU
    assert decoders and set(decoders.values()) == {expected}, decoders
    splits = {"train", "test"} | ({"val"} if split_kind == "array" else set())  # image_folder: no val here
    assert set(decoders) == {f"data/decoder/{s}" for s in splits}
