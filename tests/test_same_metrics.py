"""The same seed gives the same metrics as before the harness was rebuilt by job (issue 23).

``tests/data/tiny_runs.json`` holds the metrics of a few tiny runs (CNN and ViT, frozen and
trained backbones, VPTSP-G's memory bank, LoRA merged at test time) computed by the code before
``harness/core`` was split, once per machine it was run on (an AMD AVX2, an AMD AVX-512 and an
Intel AVX-512 processor so far: their float kernels differ in the last bits, and two epochs
amplify that enough to flip which epoch validation selects). On a recorded machine (same
processor, same torch) every number must be equal bit for bit. On another machine the numbers of
every recorded machine are compared with tolerances measured between the recorded ones
(``ACROSS_MACHINES``): the counts exactly, the training losses to a relative 1e-4 (they differ
by at most 1.7e-6 between the three; a changed seed, data order, initialisation or loss moves
them far more), the per-epoch validation metrics to a few queries (a last-bit difference swaps
near-tied neighbours: up to 4 of the 64 validation queries of the fully trained ResNet-18), and
the selected epoch's numbers (``best/``, ``test/``) are left out, since such a swap may select
the other epoch. Add a machine with the code of commit 8dd1874's tree: ``git worktree add
/tmp/old 8dd1874``, run that tree's ``tests/test_same_metrics.py`` with ``PYTHONPATH=/tmp/old``,
and append the record it writes to ``machines`` here.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parent / "data" / "tiny_runs.json"
sys.path.insert(0, str(Path(__file__).parent))

#: (name, method, backbone, extra overrides)
RUNS = [
    ("linear_probe_cnn", "linear_probe", "resnet18", {}),
    ("bitfit_vit", "bitfit", "vit_small_patch16_224", {}),
    ("full_finetune_cnn", "full_finetune", "resnet18", {"optim.grad_clip": 0.5}),
    ("vptsp_g_bank", "vptsp_g", "vit_small_patch16_224", {"method_args.memory_bank": True}),
    ("lora_merged", "lora", "vit_small_patch16_224", {"method_args.merge": True}),
    ("frpt_cnn", "frpt", "resnet18", {"data.image_size": 64, "data.resize_size": 64}),
]
#: cost/* are timings; every other logged number is compared
SKIP = ("cost/",)
#: another machine: (key prefix, relative, absolute tolerance); None leaves the key out
ACROSS_MACHINES = {
    "params/": (0, 0),
    "train/": (1e-4, 0),
    "val/": (0, 8 / 64),  # 8 of the 64 validation queries (twice the largest swap seen)
    "best/": None,
    "test/": None,
}


def machine() -> dict[str, str]:
    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu or platform.processor(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def tiny_runs(uri: str) -> dict[str, dict[str, float]]:
    from conftest import TINY, TINY_VIT

    try:
        from harness.training import resolve, train
    except ImportError:  # before issue 23's layout
        from harness.training.loop import train
        from harness.training.resolution import resolve
    out = {}
    for name, method, backbone, extra in RUNS:
        overrides = {
            **TINY,
            **(TINY_VIT if backbone.startswith("vit") else {}),
            "tracking.uri": uri,
            "tracking.log_artifacts": False,
            # the layout the numbers were recorded with: NHWC became the CPU's default for CNNs later
            "model.channels_last": "off",
            **extra,
        }
        result = train(resolve(method=method, backbone=backbone, overrides=overrides))
        metrics = {k: float(v) for k, v in result.metrics.items() if not k.startswith(SKIP)}
        for row in result.history:
            for k, v in row.items():
                if k.startswith(("train/loss", "val/")):
                    metrics[f"{k}@{int(row['epoch'])}"] = float(v)
        out[name] = metrics
    return out


def test_tiny_runs_give_the_metrics_they_gave_before_the_rebuild(tracking_uri):
    torch.set_num_threads(1)
    machines = json.loads(FIXTURE.read_text())["machines"]
    now = tiny_runs(tracking_uri)
    same = [m for m in machines if m["machine"] == machine()]
    for recorded in same or machines:
        for name, before in recorded["runs"].items():
            assert set(now[name]) == set(before), name
            for key, value in before.items():
                if same:
                    assert now[name][key] == value, (name, key, now[name][key], value)
                    continue
                tolerance = ACROSS_MACHINES[key.split("/")[0] + "/"]
                if tolerance is not None:
                    rel, abs_ = tolerance
                    assert now[name][key] == pytest.approx(value, rel=rel, abs=abs_), (name, key, recorded["machine"])


if __name__ == "__main__":
    import tempfile

    import mlflow

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        runs = tiny_runs(uri)
    FIXTURE.parent.mkdir(exist_ok=True)
    old = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    if "runs" in old:  # a single-machine file (before a second machine was added)
        old = {"machines": [old]}
    kept = [m for m in old.get("machines", []) if m["machine"] != machine()]
    record = {"recorded_by": old.get("recorded_by", ""), "machines": kept + [{"machine": machine(), "runs": runs}]}
    FIXTURE.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
