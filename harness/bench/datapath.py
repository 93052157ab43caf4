"""Where a training image's host time goes, stage by stage, and the data path's own throughput.

:func:`stage_breakdown` times each stage of a pipeline on its own, in this process, over the
same images (per-image milliseconds, as one loader worker would spend them): read the file,
decode, crop/resize/flip/jitter, to float and normalise, collate and worker-to-main transfer,
host-to-device copy. ``legacy`` is the CPU pipeline as it was before uint8 batches (float32
normalised in the workers, 4x the bytes to collate, transfer and copy), kept to show the change.

:func:`pipeline_throughput` runs a split's real :class:`harness.data.Batches` (workers, prefetch,
device-side work) without a model; :func:`plain_pipeline_throughput` does the same for the
torchvision ``ImageFolder`` + PIL + ``DataLoader`` pipeline a user would write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from harness.data import augment as A
from harness.data.decode import Decoder, as_encoded
from harness.data.images import read_file
from harness.data.pipeline import BatchTransform
from harness.data.transforms import make_transform
from harness.runtime import synchronize

PIPELINES = ("legacy", "cpu", "device")


def _ms_per_item(fn: Callable[[], Any], items: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / max(items, 1)


class _Repeat(Dataset):
    """One precomputed item, ``n`` times: a DataLoader over it costs collate + transfer only."""

    def __init__(self, item: Any, n: int) -> None:
        self.item, self.n = item, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.item


def _loader_ms(item: Any, n: int, batch: int, device: torch.device, collate: Callable | None = None) -> float:
    """Per item: collating ``batch`` of ``item`` in one worker process and moving it to the main
    process (shared memory), pinned when the device is CUDA."""
    loader = DataLoader(
        _Repeat(item, n),
        batch_size=batch,
        num_workers=1,
        pin_memory=device.type == "cuda",
        **({"collate_fn": collate} if collate else {}),
    )
    iterator = iter(loader)
    next(iterator)  # worker start-up is not per item
    return _ms_per_item(lambda: [None for _ in iterator], n - batch, device)


def stage_breakdown(
    files: list[str], cfg: Any, mean: Any, std: Any, device: torch.device, pipeline: str, batch: int = 64
) -> dict[str, float]:
    """Per-image host milliseconds of each stage of ``pipeline`` (see the module docstring)."""
    from PIL import Image

    n = len(files)
    out: dict[str, float] = {}
    encoded: list[bytes] = []
    out["read"] = _ms_per_item(lambda: encoded.extend(read_file(f) for f in files), n, device)
    if pipeline == "device":
        decoder = Decoder(device, on_device=cfg.data.decode == "device")
        tensors = [as_encoded(b) for b in encoded]
        decoded: list[torch.Tensor] = []
        out["decode"] = _ms_per_item(
            lambda: [decoded.extend(decoder(tensors[i : i + batch], files[i : i + batch])) for i in range(0, n, batch)],
            n,
            device,
        )
        bt = BatchTransform.from_config(cfg.data, mean, std, device, train=True, geometry=True)
        crops: list[torch.Tensor] = []
        rng = np.random.default_rng(0)
        out["augment"] = _ms_per_item(
            lambda: crops.extend(bt._geometry(decoded[i : i + batch], rng) for i in range(0, n, batch)), n, device
        )
        out["to_float_normalise"] = _ms_per_item(lambda: [A.normalize(c, bt.mean, bt.std) for c in crops], n, device)
        out["collate_transfer"] = _loader_ms(tensors[0], max(4 * batch, n), batch, device, collate=list)
        out["host_to_device"] = 0.0  # the encoded bytes go to the GPU inside nvJPEG's decode (counted there)
        return out
    pils: list[Any] = []
    out["decode"] = _ms_per_item(lambda: pils.extend(Image.open(f).convert("RGB") for f in files), n, device)
    tf = make_transform(cfg.data, train=True)
    crops = []
    out["augment"] = _ms_per_item(lambda: crops.extend(tf(p) for p in pils), n, device)
    mean_t = torch.tensor(mean, dtype=torch.float32)
    std_t = torch.tensor(std, dtype=torch.float32)
    if pipeline == "legacy":  # ToDtype + Normalize on each image in the worker, float32 batches
        floats: list[torch.Tensor] = []
        out["to_float_normalise"] = _ms_per_item(
            lambda: floats.extend(A.normalize(c[None], mean_t, std_t)[0] for c in crops), n, torch.device("cpu")
        )
        item, moved = (floats[0], 0, 0), torch.stack(floats[:batch])
    else:  # uint8 batches; normalised on the device, batched
        dev_mean, dev_std = mean_t.to(device), std_t.to(device)
        stacked = [torch.stack(crops[i : i + batch]).to(device) for i in range(0, n, batch)]
        out["to_float_normalise"] = _ms_per_item(
            lambda: [A.normalize(s, dev_mean, dev_std) for s in stacked], n, device
        )
        item, moved = (crops[0], 0, 0), torch.stack(crops[:batch])
    out["collate_transfer"] = _loader_ms(item, max(4 * batch, n), batch, device)
    if device.type == "cuda":
        pinned = moved.pin_memory()
        out["host_to_device"] = _ms_per_item(
            lambda: [pinned.to(device, non_blocking=True) for _ in range(10)], 10 * len(moved), device
        )
    else:
        out["host_to_device"] = 0.0
    return out


def pipeline_throughput(batches: Any, max_batches: int, device: torch.device) -> float:
    """Images/s of a split's real batches (workers, prefetch, device work) with no model."""
    iterator = iter(batches)
    first = next(iterator)  # worker start-up and caches are not the steady state
    seen, start = 0, time.perf_counter()
    last = first
    for k, last in enumerate(iterator):
        seen += len(last[1])
        if k + 1 >= max_batches:
            break
    last[0].sum()  # the last batch's work has to finish on the device too
    synchronize(device)
    return seen / max(time.perf_counter() - start, 1e-9)


def plain_pipeline_throughput(
    image_root: str, cfg: Any, mean: Any, std: Any, device: torch.device, workers: int, max_batches: int
) -> float:
    """torchvision ``ImageFolder`` + PIL + RandomResizedCrop/flip/ToTensor/Normalize + DataLoader."""
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose(
        [T.RandomResizedCrop(int(cfg.data.image_size)), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    )
    loader = DataLoader(
        datasets.ImageFolder(image_root, tf),
        batch_size=int(cfg.data.batch_size),
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=False,
    )
    moved = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)
    return pipeline_throughput(moved, max_batches, device)
