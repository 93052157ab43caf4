"""The model step alone: the harness's training step against a plain timm loop, on a resident batch.

The harness step is :func:`harness.training.setup.train_step`, exactly what ``train_epoch`` runs
per batch: the model's hooks, ``training_loss``, backward, clipping and the harness's optimiser
(fused AdamW on CUDA). The plain loop is what a user would write
without the harness: ``timm.create_model(num_classes=0)``, the same head (LayerNorm + Linear on a
ViT, Linear on a CNN), the same loss module, ``torch.optim.AdamW`` over the parameters the
method trains (full fine-tuning, linear probe and BitFit have a plain equivalent; other methods
are compared with the plain full fine-tuning loop), bf16 autocast on CUDA, and the same gradient
clipping (``optim.grad_clip``). Both run in the same process, alternately, and the best of the
rounds is kept, so the ratio is not the machine's noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.runtime import autocast_for, grad_scaler_for, peak_memory_gb, pick_device, reset_peak_memory, synchronize
from harness.training.resolution import resolve
from harness.training.setup import build_model, make_optimizer, prepare_for_device
from harness.training.step import train_step
from methods import get_method

#: methods whose trainable set a plain loop reproduces with requires_grad alone
PLAIN_EQUIVALENT = {"full_finetune": "all", "linear_probe": "head", "bitfit": "biases"}


def step_config(
    method: str,
    backbone: str,
    image_size: int,
    batch_size: int,
    samples_per_class: int,
    amp: bool,
    overrides: dict[str, Any] | None = None,
) -> Any:
    return resolve(
        method=method,
        backbone=backbone,
        overrides={
            "model.pretrained": False,
            "data.image_size": image_size,
            "data.batch_size": batch_size,
            "data.resize_size": int(round(image_size * 256 / 224)),
            "data.samples_per_class": samples_per_class,
            "optim.amp": amp,
            **(overrides or {}),
        },
    )


def synthetic_batch(
    batch_size: int, image_size: int, samples_per_class: int, num_classes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Images and labels on the device, and the labels on the host (as the sampler hands them)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    classes = torch.randperm(num_classes, generator=generator)[: batch_size // samples_per_class]
    labels = classes.repeat_interleave(samples_per_class)
    return images, labels.to(device), labels.numpy()


def timed(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` after ``warmup`` (synchronised at both ends only)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def harness_step(cfg: Any, num_classes: int, device: torch.device) -> tuple[Callable[[], None], Any]:
    """The harness's step on a resident batch (:func:`train_step`, as the loop takes it), and its model."""
    model = prepare_for_device(build_model(cfg, num_classes).to(device), cfg, device)
    optimizer = make_optimizer(model, cfg)
    amp, scaler = autocast_for(device, cfg.optim.amp), grad_scaler_for(device, cfg.optim.amp)
    images, labels, host = synthetic_batch(
        cfg.data.batch_size, cfg.data.image_size, cfg.data.samples_per_class, num_classes, device
    )
    if getattr(model, "channels_last", False):
        images = images.contiguous(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step() -> None:
        if optimizer is None:  # nothing trains (an untrained reference): the forward pass alone
            with amp():
                model.training_loss(images, labels)
            return
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

    return step, model


def plain_step(cfg: Any, num_classes: int, device: torch.device, method: str) -> Callable[[], None]:
    """The same computation written as a plain timm loop (see the module docstring)."""
    import timm

    from harness.models.losses import build_loss

    trains = PLAIN_EQUIVALENT.get(method, "all")
    torch.manual_seed(0)
    backbone = timm.create_model(
        cfg.backbone.split(".")[0], pretrained=False, num_classes=0, **cfg.model.backbone_kwargs
    ).to(device)
    width = backbone.num_features
    dim = cfg.model.embed_dim or width
    vit = hasattr(backbone, "blocks")
    head = nn.Sequential(nn.LayerNorm(width) if vit else nn.Identity(), nn.Linear(width, dim)).to(device)
    criterion = build_loss(cfg.loss.name, num_classes, dim, cfg.loss).to(device)
    for name, p in backbone.named_parameters():
        p.requires_grad_(trains == "all" or (trains == "biases" and name.endswith("bias")))
    params = [p for m in (backbone, head, criterion) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda"
    )
    amp = autocast_for(device, cfg.optim.amp)
    images, labels, _ = synthetic_batch(
        cfg.data.batch_size, cfg.data.image_size, cfg.data.samples_per_class, num_classes, device
    )
    backbone.train(trains == "all")  # a frozen backbone stays in eval mode, as in the harness
    clip = cfg.optim.grad_clip

    def step() -> None:
        with amp():
            embeddings = head(backbone(images))
        loss = criterion(embeddings.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:  # as the run config clips, so both loops do the same work
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()

    return step


def train_flops_per_image(step: Callable[[], None], batch_size: int) -> float:
    """FLOPs of one training step (forward + backward) per image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / batch_size


def measure_step(
    method: str,
    backbone: str,
    *,
    image_size: int = 224,
    batch_size: int = 64,
    samples_per_class: int = 2,
    num_classes: int = 100,
    steps: int = 20,
    warmup: int = 5,
    device: str = "",
    amp: bool = True,
    baseline: bool = False,
    rounds: int = 2,
    overrides: dict[str, Any] | None = None,
    plain_cache: dict[str, float] | None = None,
) -> dict[str, Any]:
    """img/s, peak memory and FLOPs of the harness step (and the plain loop's img/s when
    ``baseline``), measured in this process. ``plain_cache`` keeps the plain loop's seconds per
    step by trainable set (all, head, biases), so methods that share a set time it once."""
    get_method(method)
    dev = pick_device(device)
    cfg = step_config(method, backbone, image_size, batch_size, samples_per_class, amp, overrides)
    ours, model = harness_step(cfg, num_classes, dev)
    kind = PLAIN_EQUIVALENT.get(method, "all")
    cached = plain_cache is not None and kind in plain_cache
    plain = plain_step(cfg, num_classes, dev, method) if baseline and not cached else None
    best_ours = best_plain = float("inf")
    peak = 0.0
    for _ in range(rounds):  # alternate, so both see the same machine state
        reset_peak_memory(dev)
        best_ours = min(best_ours, timed(ours, steps, warmup, dev))
        peak = max(peak, peak_memory_gb(dev))
        if plain is not None:
            best_plain = min(best_plain, timed(plain, steps, warmup, dev))
    if baseline and plain_cache is not None:
        best_plain = plain_cache.setdefault(kind, best_plain)
    flops = train_flops_per_image(ours, batch_size)
    record = {
        "method": method,
        "backbone": backbone,
        "image_size": image_size,
        "batch_size": batch_size,
        "amp": "bf16" if amp and dev.type == "cuda" else "fp32",
        "device": device_name(dev),
        "img_s": round(batch_size / best_ours, 1),
        "peak_gb": round(peak, 3),
        "train_gflops_per_img": round(flops / 1e9, 3),
        **model.count_parameters(),
    }
    peak_flops = peak_bf16_flops(dev)
    if peak_flops:
        record["pct_bf16_peak"] = round(100 * record["img_s"] * flops / peak_flops, 2)
    if baseline:
        record["baseline_img_s"] = round(batch_size / best_plain, 1)
        record["baseline_method"] = method if method in PLAIN_EQUIVALENT else "full_finetune"
        record["step_vs_baseline"] = round(record["img_s"] / record["baseline_img_s"], 3)
    return record


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


#: dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, from the vendors' data sheets
BF16_PEAK = {
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}


def peak_bf16_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [k for k in BF16_PEAK if k in name]
    return BF16_PEAK[max(matches, key=len)] if matches else None
