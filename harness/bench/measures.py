"""What each stage of the GPU window measures (:mod:`harness.bench.window` runs one per process).

``python -m harness.bench.measures STAGE OUT OPTIONS_JSON PARENT_PID``. Each measurement becomes
a record the moment it exists (:class:`harness.bench.records.Recorder`); a method that fails is
recorded with its error's one line and the stage goes on; a stage past its own deadline
(``DMLBENCH_STAGE_DEADLINE``, set by the window a few seconds before the cap) records what it had
no time for as skipped. Sizes are the GPU's unless ``tiny`` (toy sizes for a CPU test).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bench.records import Recorder, one_line

VIT = "vit_small_patch16_224"
#: the smoke stage builds ViT methods on this 2-block ViT-S at 32 px and CNN-only ones on this CNN
SMOKE_VIT = {"img_size": 32, "depth": 2}
SMOKE_CNN = "resnet10t"
#: the end-to-end stage's representative methods: everything trains, biases only, the memory bank
E2E = (("full_finetune", {}), ("bitfit", {}), ("vptsp_g", {"method_args.memory_bank": True}))


@dataclass(frozen=True)
class Sizes:
    image: int
    batch: int
    steps: int
    warmup: int
    vit_kwargs: dict = field(default_factory=dict)
    cub_scale: float = 1.0
    cub_size: tuple[int, int] | None = None
    sop_scale: float = 0.05
    sop_size: tuple[int, int] | None = None
    workers: int = 8
    eval_n: int = 60000
    eval_dim: int = 384
    ks: tuple[int, ...] = (1, 2, 4)
    study_scale: float = 0.25
    study_methods: tuple[str, ...] = ("bitfit", "lora")


FULL = Sizes(image=224, batch=64, steps=20, warmup=5)
TINY = Sizes(image=32, batch=16, steps=2, warmup=1, vit_kwargs={"depth": 2}, cub_scale=0.02, cub_size=(96, 72),
             sop_scale=0.002, sop_size=(64, 64), workers=0, eval_n=2000, eval_dim=64, ks=(1, 2), study_scale=0.02,
             study_methods=("bitfit",))


def time_left() -> float:
    """Seconds until the stage's own deadline (infinite when run by hand)."""
    deadline = os.environ.get("DMLBENCH_STAGE_DEADLINE")
    return float("inf") if not deadline else float(deadline) - time.time()


def say(line: str) -> None:
    print(line, flush=True)


def vit_methods() -> list[str]:
    from methods import get_method, method_names

    return [m for m in method_names() if get_method(m).applies_to("vit")]


def each(rec: Recorder, items: list, needs_s: float, body: Callable[[Any], dict[str, Any]],
         name: Callable[[Any], str] = str, **fields: Any) -> None:
    """``body(item)`` per item as one record: ok with its fields, failed with the error's line, or
    skipped once fewer than ``needs_s`` seconds are left before the stage's deadline."""
    for item in items:
        label = name(item)
        if time_left() < needs_s:
            rec.add(label, "skipped", "the stage's cap was reached before this measurement", **fields)
            say(f"{rec.stage} {label}: skipped (cap)")
            continue
        try:
            result = body(item)
        except Exception as exc:  # noqa: BLE001 - one method's failure is a finding, not the stage's end
            rec.add(label, "failed", exc, **fields)
            say(f"{rec.stage} {label}: failed: {one_line(exc)}")
            continue
        result.pop("method", None)
        rec.add(label, result.pop("status", "ok"), result.pop("error", None), **fields, **result)
        say(f"{rec.stage} {label}: ok " + ", ".join(f"{k}={v}" for k, v in list(result.items())[:4]))


# ----------------------------------------------------------------------------- stages


def smoke(rec: Recorder, sizes: Sizes, o: dict) -> None:
    """Import everything, build every method once on the device, two steps each (the second with
    host syncs made errors on CUDA, counted on the CPU), and decode a few JPEGs."""
    import importlib.metadata

    import timm
    import torch
    import torchvision

    from methods import method_names
    from harness.runtime import pick_device

    from harness.bench.window import missing

    device = pick_device("")
    versions = {}
    for module, dist in (("peft", "peft"), ("mlflow", "mlflow-skinny"), ("optuna", "optuna")):
        try:
            versions[module] = "missing" if missing((module,)) else importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[module] = "installed"
    rec.add(None, kind="env", device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__,
            python=sys.version.split()[0], cuda=torch.version.cuda, **versions)
    methods = o["methods"] or method_names()
    each(rec, methods, 1.0, lambda m: smoke_method(m, device))
    each(rec, ["nvjpeg"], 1.0, lambda _: smoke_decode(device))


def smoke_method(method: str, device: Any) -> dict[str, Any]:
    import torch

    from harness.bench.step import step_config, synthetic_batch
    from methods import get_method
    from harness.runtime import count_syncs
    from harness.training.setup import build_model, make_optimizer, prepare_for_device
    from harness.training.step import train_step
    from harness.runtime import autocast_for, grad_scaler_for

    vit = get_method(method).applies_to("vit")
    backbone = VIT if vit else SMOKE_CNN
    overrides = {"model.backbone_kwargs": SMOKE_VIT} if vit else {}
    cfg = step_config(method, backbone, 32, 8, 2, True, {"model.embed_dim": 32, **overrides})
    model = prepare_for_device(build_model(cfg, 8).to(device), cfg, device)
    optimizer = make_optimizer(model, cfg)
    amp, scaler = autocast_for(device, cfg.optim.amp), grad_scaler_for(device, cfg.optim.amp)
    images, labels, host = synthetic_batch(8, 32, 2, 8, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def one() -> None:
        train_step(model, optimizer, images, labels, host, amp=amp, scaler=scaler, grad_clip=cfg.optim.grad_clip,
                   trainable=trainable)

    one()  # creates the optimiser's state
    syncs = count_syncs(one, device, optimizer)
    return {"family": model.family, "params/trainable": model.count_parameters()["params/trainable"],
            "syncs": syncs, "status": "ok" if syncs == 0 else "failed",
            "error": None if syncs == 0 else f"{syncs} host-device sync(s) in one training step"}


def smoke_decode(device: Any) -> dict[str, Any]:
    import io

    import numpy as np
    from PIL import Image

    from harness.data.decode import Decoder, as_encoded

    rng = np.random.default_rng(0)
    files = []
    for _ in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        files.append(as_encoded(buf.getvalue()))
    decoder = Decoder(device, on_device=True)
    images = decoder(files, [f"generated-{i}.jpg" for i in range(4)])
    used = decoder.used()
    wanted = "nvjpeg" if device.type == "cuda" else "cpu"
    ok = used == wanted and all(tuple(t.shape) == (3, 120, 160) for t in images)
    return {"decoder": used, "status": "ok" if ok else "failed",
            "error": None if ok else f"asked for {wanted}, decoded with {used}"}


def step(rec: Recorder, sizes: Sizes, o: dict) -> None:
    """The training step of every ViT-S method against the plain timm loop (one per trainable set,
    measured once and shared by the methods with that set)."""
    from harness.bench.step import measure_step

    plain: dict[str, float] = {}
    kwargs = {"model.backbone_kwargs": sizes.vit_kwargs} if sizes.vit_kwargs else {}
    each(rec, o["methods"] or vit_methods(), 2.0, lambda m: measure_step(
        m, VIT, image_size=sizes.image, batch_size=sizes.batch, steps=sizes.steps, warmup=sizes.warmup,
        baseline=True, plain_cache=plain, overrides=kwargs))


def _folder(kind: str, sizes: Sizes, o: dict, scale: float | None = None, make: bool = True) -> tuple[str, Path]:
    """The generated folder of this shape (written once, reused by later stages)."""
    from harness.bench.folders import SHAPES, make_folder

    scale = scale if scale is not None else (sizes.cub_scale if kind == "cub" else sizes.sop_scale)
    size = sizes.cub_size if kind == "cub" else sizes.sop_size
    suffix = f"-{size[0]}x{size[1]}" if size else ""
    root = Path(o["workdir"]) / f"{kind}-{scale:g}{suffix}"
    if not make:
        return SHAPES[kind].dataset, root
    return make_folder(kind, root, scale=scale, size=size)


def e2e(rec: Recorder, sizes: Sizes, o: dict) -> None:
    """The data path alone per pipeline, then train() end to end for the representative methods."""
    import torch

    from harness.bench.endtoend import cuda_syncs_per_step, end_to_end
    from harness.bench.run import data_path_figures

    started = time.monotonic()
    dataset, root = _folder("cub", sizes, o)
    rec.add("folder", kind="folder", dataset=dataset, seconds=round(time.monotonic() - started, 1))
    common = dict(image_size=sizes.image, batch_size=sizes.batch, samples_per_class=2, workers=sizes.workers)
    kwargs = {"model.backbone_kwargs": sizes.vit_kwargs} if sizes.vit_kwargs else {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    each(rec, ["cpu", "device"], 5.0, lambda p: data_path_figures(
        VIT, dataset, root, p, device, overrides=kwargs, **common), name=lambda p: f"data path ({p})")
    runs = [(m, extra, p) for m, extra in E2E for p in ("cpu", "device")]
    each(rec, runs, 10.0, lambda r: end_to_end(
        r[0], VIT, dataset, root, Path(o["workdir"]) / "stores", pipeline=r[2], epochs=1,
        overrides={**kwargs, **r[1]}, **common), name=lambda r: r[0] + (" (memory bank)" if r[1] else ""),
        )
    if device.type == "cuda":
        each(rec, ["bitfit"], 10.0, lambda m: {"pipeline": "device", "syncs_per_step": cuda_syncs_per_step(
            m, VIT, dataset, root, pipeline="device", overrides=kwargs, **common)}, name=lambda m: f"{m} syncs")


def sop(rec: Recorder, sizes: Sizes, o: dict) -> None:
    """BitFit on a SOP-shaped folder with no pixel cache: every batch is decoded on the device."""
    from harness.bench.endtoend import end_to_end

    started = time.monotonic()
    dataset, root = _folder("sop", sizes, o)
    rec.add("folder", kind="folder", dataset=dataset, seconds=round(time.monotonic() - started, 1))
    kwargs = {"model.backbone_kwargs": sizes.vit_kwargs} if sizes.vit_kwargs else {}
    each(rec, ["bitfit"], 10.0, lambda m: end_to_end(
        m, VIT, dataset, root, Path(o["workdir"]) / "stores", pipeline="device", epochs=1, image_size=sizes.image,
        batch_size=sizes.batch, samples_per_class=2, workers=sizes.workers,
        overrides={**kwargs, "data.pixel_cache_gb": 0}))


def concurrency(rec: Recorder, sizes: Sizes, o: dict) -> None:
    """A shrunk study with K = 1, 2, 4 concurrent trials per device, one record per K."""
    import torch

    from harness.bench.concurrency import concurrent_trial

    dataset, root = _folder("cub", sizes, o, scale=sizes.study_scale)
    device = "0" if torch.cuda.is_available() else "cpu"
    overrides = {"data.image_size": sizes.image, "data.resize_size": round(sizes.image * 256 / 224),
                 "data.batch_size": sizes.batch, "data.samples_per_class": 2, "data.num_workers": sizes.workers}
    if sizes.vit_kwargs:
        overrides["model.backbone_kwargs"] = sizes.vit_kwargs
    ks = [2] if sizes is TINY else [1, 2, 4]  # a CPU test: the spawned workers are the cost
    each(rec, ks, 15.0, lambda k: concurrent_trial(
        k, device, Path(o["workdir"]) / "concurrency", dataset=dataset, root=root, backbone=VIT,
        methods=list(sizes.study_methods), trials=2, epochs=1, overrides=overrides), name=lambda k: f"K={k}")


def decode(rec: Recorder, sizes: Sizes, o: dict) -> None:
    """nvJPEG against libjpeg-turbo: pixel differences, speed, and which decoder really ran."""
    import torch

    from harness.bench.decode_check import compare

    _, root = _folder("cub", sizes, o, make=False)
    if not (root / ".complete").exists():  # no e2e before it (skipped, or cut): a small one will do
        _, root = _folder("cub", sizes, o, scale=min(sizes.cub_scale, 0.025))
    files = sorted(str(p) for p in root.rglob("*.jpg"))[:256]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    each(rec, ["decode"], 2.0, lambda _: compare(files, device))


def mapr(rec: Recorder, sizes: Sizes, o: dict) -> None:
    import torch

    from harness.bench.endtoend import evaluation_speed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    each(rec, [f"{sizes.eval_n}x{sizes.eval_dim}"], 2.0,
         lambda _: evaluation_speed(sizes.eval_n, sizes.eval_dim, device, ks=sizes.ks))


BODIES = {"smoke": smoke, "step": step, "e2e": e2e, "sop": sop, "concurrency": concurrency, "decode": decode,
          "mapr": mapr}


def main(argv: list[str]) -> int:
    stage, out, options, parent = argv[0], Path(argv[1]), json.loads(argv[2]), int(argv[3])
    from harness.runtime.interrupts import die_with_parent

    die_with_parent(parent)  # a window killed outright (kill -9) takes its stage with it
    sizes = TINY if options.get("tiny") else FULL
    BODIES[stage](Recorder(out, stage), sizes, options)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
