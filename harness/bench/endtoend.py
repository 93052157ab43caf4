"""The real ``train()`` on a generated folder, and retrieval evaluation at a given size.

:func:`end_to_end` trains one method through :func:`harness.training.loop.train` (its MLflow run goes
to a private store in the benchmark's folder, never the user's) and reads the run's own cost
metrics: training images/s over the epochs (``data_img_s``: data path and step together), the
evaluation and logging shares of wall time.

:func:`evaluation_speed` times :func:`harness.retrieval.metrics.evaluate_retrieval` (exact kNN,
Recall@K, MAP@R) on N random unit vectors of dimension D in SOP-like classes (mean 5.3 images)
on the device, with its peak memory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.runtime import peak_memory_gb, reset_peak_memory, synchronize


def end_to_end(
    method: str,
    backbone: str,
    dataset: str,
    root: Path,
    store: Path,
    *,
    pipeline: str,
    epochs: int,
    image_size: int,
    batch_size: int,
    samples_per_class: int,
    workers: int,
    device: str = "",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``train()`` run; returns its throughput and the shares of its wall time."""
    from harness.training.loop import train
    from harness.training.resolution import resolve

    store.mkdir(parents=True, exist_ok=True)
    cfg = resolve(
        method=method,
        backbone=backbone,
        dataset=dataset,
        overrides={
            "data.root": str(root),
            "data.check_published": False,
            "data.pipeline": pipeline,
            "data.image_size": image_size,
            "data.resize_size": int(round(image_size * 256 / 224)),
            "data.batch_size": batch_size,
            "data.samples_per_class": samples_per_class,
            "data.num_workers": workers,
            "data.verify_images": False,
            "model.pretrained": False,
            "optim.epochs": epochs,
            "device": device,
            "tracking.uri": f"sqlite:///{store / 'benchmark.db'}",
            "tracking.experiment": f"benchmark-{dataset}",
            "tracking.log_artifacts": False,
            "tracking.system_metrics": False,
            **(overrides or {}),
        },
    )
    started = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - started
    m = result.metrics
    trained = max(1.0, m["cost/throughput_img_s"] * sum(h.get("train/epoch_time_s", 0.0) for h in result.history))
    return {
        "pipeline": cfg.data.pipeline,
        "data_img_s": round(m["cost/throughput_img_s"], 1),
        "eval_share": round(m["cost/eval_share"], 4),
        "log_share": round(m["cost/log_time_s"] / wall, 4),
        "e2e_wall_s": round(wall, 2),
        "test_recall_at_1": round(m.get("test/recall_at_1", float("nan")), 4),
        # what decoded the training images: nvjpeg, cpu, cpu-fallback (never assumed)
        "decoder": result.facts.get("data/decoder/train", ""),
        "decoded_batches": decoded_batches(result.facts),
        # per trained image, as the stage breakdown counts: evaluation and logging amortised
        "eval_ms_per_train_img": round(1000 * m["cost/eval_time_s"] / trained, 4),
        "log_ms_per_train_img": round(1000 * m["cost/log_time_s"] / trained, 4),
    }


def decoded_batches(facts: dict[str, Any]) -> str:
    """The decoder of every split, as the run recorded them (``train=nvjpeg, test=nvjpeg``)."""
    return ", ".join(
        f"{k.removeprefix('data/decoder/')}={v}" for k, v in facts.items() if k.startswith("data/decoder/")
    )


def evaluation_speed(
    n: int,
    dim: int,
    device: torch.device,
    ks: tuple[int, ...] = (1, 10, 100),
    mean_class_size: float = 5.3,
    seed: int = 0,
) -> dict[str, Any]:
    """Seconds and peak memory of exact Recall@K + MAP@R + R-precision of ``n`` x ``dim``."""
    from harness.retrieval.metrics import evaluate_retrieval

    rng = np.random.default_rng(seed)
    classes = max(2, int(n / mean_class_size))
    labels = torch.as_tensor(np.sort(rng.integers(0, classes, n)))
    centres = torch.as_tensor(rng.standard_normal((classes, dim)), dtype=torch.float32)
    x = centres[labels] + 0.9 * torch.as_tensor(rng.standard_normal((n, dim)), dtype=torch.float32)
    x, labels = x.to(device), labels.to(device)
    synchronize(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    metrics = evaluate_retrieval(x, labels, ks=ks)
    synchronize(device)
    return {
        "eval_n": n,
        "eval_dim": dim,
        "eval_s": round(time.perf_counter() - start, 2),
        "eval_peak_gb": round(peak_memory_gb(device), 3),
        "eval_map_at_r": round(metrics["map@r"], 4),
    }


def cuda_syncs_per_step(
    method: str,
    backbone: str,
    dataset: str,
    root: Path,
    *,
    pipeline: str,
    image_size: int,
    batch_size: int,
    samples_per_class: int,
    workers: int,
    overrides: dict[str, Any] | None = None,
) -> float:
    """Host-device syncs per training step on CUDA, counted by ``torch.cuda.set_sync_debug_mode``
    over the real ``train_epoch`` (data pipeline included) after a warm-up epoch, less the
    epoch's one read of its loss sums. The device pipeline's decode guard (pytorch/vision#9606:
    its side stream is drained before each nvJPEG call) counts here when batches are decoded."""
    import warnings

    from harness.training.loop import train_epoch
    from harness.training.resolution import resolve
    from harness.training.setup import prepare

    cfg = resolve(
        method=method,
        backbone=backbone,
        dataset=dataset,
        overrides={
            "data.root": str(root),
            "data.check_published": False,
            "data.pipeline": pipeline,
            "data.image_size": image_size,
            "data.resize_size": int(round(image_size * 256 / 224)),
            "data.batch_size": batch_size,
            "data.samples_per_class": samples_per_class,
            "data.num_workers": workers,
            "data.verify_images": False,
            "model.pretrained": False,
            "optim.epochs": 2,
            "tracking.system_metrics": False,
            **(overrides or {}),
        },
    )
    run = prepare(cfg)
    train_epoch(run, 1)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            before = run.images
            row = train_epoch(run, 2)
            images = run.images - before
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    reads = len([k for k in row if k.startswith("train/") and k not in ("train/lr", "train/epoch_time_s")])
    return round((syncs - reads) / max(1, images // batch_size), 3)
