"""What the GPU window's stages cost on this machine, piece by piece, to estimate them on an H100.

    .venv/bin/python benchmarks/window_costs.py [--json]

Each stage of harness/bench/window.py is a fixed host part (process start and imports, building
models, MLflow runs, spawning workers, writing JPEGs) plus device work (training steps, decoding,
the kNN). The host parts are measured here, at two sizes where they scale, so the fixed part and
the part per unit come apart; the device work is counted in images and multiplied by H100 rates
(the README says which). Prints one line per measurement.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def seconds(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    out: dict[str, float] = {}
    py = sys.executable
    out["process_start_imports_s"] = seconds(
        lambda: subprocess.run(
            [py, "-c", "import torch, timm, torchvision, peft, harness.training.loop, methods"], check=True, cwd=REPO
        ),
        2,
    )

    import numpy as np

    from harness.bench.folders import _image

    rng = np.random.default_rng(0)
    out["jpeg_500x375_ms_per_core"] = 1000 * seconds(lambda: [_image(rng, c, 500, 375) for c in range(40)]) / 40
    out["jpeg_sop_mean_ms_per_core"] = 1000 * seconds(lambda: [_image(rng, c, 448, 448) for c in range(40)]) / 40

    from harness.bench.model_stages import smoke_method
    from methods import method_names

    device = torch.device("cpu")
    names = method_names()
    smoke_method("bitfit", device)  # first build pays lazy imports
    out["smoke_per_method_s"] = seconds(lambda: [smoke_method(m, device) for m in names]) / len(names)

    from harness.bench.step import measure_step

    kw = {"model.backbone_kwargs": {"depth": 1}}
    for steps in (1, 4):
        out[f"step_tiny_{steps}steps_s"] = seconds(
            lambda: measure_step(
                "bitfit",
                "vit_small_patch16_224",
                image_size=32,
                batch_size=8,
                steps=steps,
                warmup=0,
                baseline=False,
                overrides=kw,
            )
        )

    from harness.bench.endtoend import end_to_end
    from harness.bench.folders import make_folder

    with tempfile.TemporaryDirectory() as tmp:
        dataset, root = make_folder("cub", Path(tmp) / "cub", scale=0.02, size=(64, 48), workers=1)
        common = dict(
            image_size=32,
            batch_size=16,
            samples_per_class=2,
            workers=0,
            overrides={"model.backbone_kwargs": {"depth": 1}},
        )
        end_to_end(
            "bitfit", "vit_small_patch16_224", dataset, root, Path(tmp) / "s", pipeline="device", epochs=1, **common
        )
        for epochs in (1, 3):
            out[f"train_tiny_{epochs}epochs_s"] = seconds(
                lambda: end_to_end(
                    "bitfit",
                    "vit_small_patch16_224",
                    dataset,
                    root,
                    Path(tmp) / "s",
                    pipeline="device",
                    epochs=epochs,
                    **common,
                )
            )
    for line in (f"{k}: {v:.3f}" for k, v in out.items()):
        print(line, flush=True)
    return out


if __name__ == "__main__":
    result = main()
    if "--json" in sys.argv:
        print(json.dumps(result))
