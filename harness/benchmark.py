"""Training-step throughput and peak memory per method on synthetic batches (no data loading).

This isolates the model's own cost (forward + backward + optimiser step, AMP as configured), which
is what differs between methods; data loading is shared by all of them.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from harness.core.measure import (
    autocast_for,
    peak_memory_gb,
    reset_peak_memory,
    synchronize,
)
from harness.core.registry import get_method
from harness.core.resolve import resolve
from harness.core.training import build_model, make_optimizer, pick_device


def benchmark_method(
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
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Images/s and peak memory of ``steps`` training steps after ``warmup`` steps."""
    cfg = resolve(
        method=method,
        backbone=backbone,
        overrides={
            "model.pretrained": False,
            "data.image_size": image_size,
            "data.batch_size": batch_size,
            "data.samples_per_class": samples_per_class,
            "optim.amp": amp,
            **(overrides or {}),
        },
    )
    dev = pick_device(device)
    model = build_model(cfg, num_classes).to(dev)
    optimizer = make_optimizer(model, cfg)
    use_amp = amp and dev.type == "cuda"
    autocast = autocast_for(dev, amp)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(dev)
    classes = torch.randperm(num_classes, generator=generator)[: batch_size // samples_per_class]
    labels = classes.repeat_interleave(samples_per_class).to(dev)
    model.train()

    def step() -> None:
        with autocast():
            loss, _ = model.training_loss(images, labels)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.after_step()

    for _ in range(warmup):
        step()
    synchronize(dev)
    reset_peak_memory(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(dev)
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "backbone": backbone,
        "image_size": image_size,
        "batch_size": batch_size,
        "amp": "bf16" if use_amp else "fp32",
        "images_per_s": round(steps * batch_size / seconds, 1),
        "cost/peak_memory_gb": round(peak_memory_gb(dev), 3),
        **model.count_parameters(),
    }


def benchmark(methods: list[str], backbone: str, **kwargs: Any) -> list[dict[str, Any]]:
    for name in methods:
        get_method(name)  # fail on a typo before anything runs
    return [benchmark_method(name, backbone, **kwargs) for name in methods]
