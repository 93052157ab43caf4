"""The stages of the GPU window that need neither MLflow nor Optuna: the smoke test (every method
built and stepped on the device, host syncs as errors, nvJPEG), the model step against the plain
timm loop, decode fidelity and exact MAP@R."""

from __future__ import annotations

import sys
from typing import Any

from harness.bench.measuring import SMOKE_CNN, SMOKE_VIT, VIT, Sizes, each, generated_folder, vit_methods
from harness.bench.records import Recorder


def smoke(rec: Recorder, sizes: Sizes, o: dict) -> None:
    """Import everything, build every method once on the device, two steps each (the second with
    host syncs made errors on CUDA, counted on the CPU), and decode a few JPEGs."""
    import importlib.metadata

    import timm
    import torch
    import torchvision

    from harness.bench.window import missing
    from harness.runtime import pick_device
    from methods import method_names

    device = pick_device("")
    versions = {}
    for module, dist in (("peft", "peft"), ("mlflow", "mlflow-skinny"), ("optuna", "optuna")):
        try:
            versions[module] = "missing" if missing((module,)) else importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[module] = "installed"
    rec.add(
        None,
        kind="env",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        timm=timm.__version__,
        python=sys.version.split()[0],
        cuda=torch.version.cuda,
        **versions,
    )
    methods = o["methods"] or method_names()
    each(rec, methods, 1.0, lambda m: smoke_method(m, device))
    each(rec, ["nvjpeg"], 1.0, lambda _: smoke_decode(device))


def smoke_method(method: str, device: Any) -> dict[str, Any]:

    from harness.bench.step import step_config, synthetic_batch
    from harness.runtime import autocast_for, count_syncs, grad_scaler_for
    from harness.training.setup import build_model, make_optimizer, prepare_for_device
    from harness.training.step import train_step
    from methods import get_method

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
        train_step(
            model,
            optimizer,
            images,
            labels,
            host,
            amp=amp,
            scaler=scaler,
            grad_clip=cfg.optim.grad_clip,
            trainable=trainable,
        )

    one()  # creates the optimiser's state
    syncs = count_syncs(one, device, optimizer)
    return {
        "family": model.family,
        "params/trainable": model.count_parameters()["params/trainable"],
        "syncs": syncs,
        "status": "ok" if syncs == 0 else "failed",
        "error": None if syncs == 0 else f"{syncs} host-device sync(s) in one training step",
    }


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
    return {
        "decoder": used,
        "status": "ok" if ok else "failed",
        "error": None if ok else f"asked for {wanted}, decoded with {used}",
    }


def step(rec: Recorder, sizes: Sizes, o: dict) -> None:
    """The training step of every ViT-S method against the plain timm loop (one per trainable set,
    measured once and shared by the methods with that set)."""
    from harness.bench.step import measure_step

    plain: dict[str, float] = {}
    kwargs = {"model.backbone_kwargs": sizes.vit_kwargs} if sizes.vit_kwargs else {}
    each(
        rec,
        o["methods"] or vit_methods(),
        2.0,
        lambda m: measure_step(
            m,
            VIT,
            image_size=sizes.image,
            batch_size=sizes.batch,
            steps=sizes.steps,
            warmup=sizes.warmup,
            rounds=sizes.rounds,
            baseline=True,
            plain_cache=plain,
            overrides=kwargs,
        ),
    )


def decode(rec: Recorder, sizes: Sizes, o: dict) -> None:
    """nvJPEG against libjpeg-turbo: pixel differences, speed, and which decoder really ran."""
    import torch

    from harness.bench.decode_check import compare

    _, root = generated_folder("cub", sizes, o, make=False)
    if not (root / ".complete").exists():  # no e2e before it (skipped, or cut): a small one will do
        _, root = generated_folder("cub", sizes, o, scale=min(sizes.cub_scale, 0.025))
    files = sorted(str(p) for p in root.rglob("*.jpg"))[:256]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    each(rec, ["decode"], 2.0, lambda _: compare(files, device))


def mapr(rec: Recorder, sizes: Sizes, o: dict) -> None:
    import torch

    from harness.bench.endtoend import evaluation_speed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    each(
        rec,
        [f"{sizes.eval_n}x{sizes.eval_dim}"],
        2.0,
        lambda _: evaluation_speed(sizes.eval_n, sizes.eval_dim, device, ks=sizes.ks),
    )
