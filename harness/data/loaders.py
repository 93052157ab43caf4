"""The batches of a run: the train split (class-balanced or shuffled) and one per evaluation split,
through the CPU or the device pipeline (:mod:`harness.data.pipeline`)."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from harness.config import DataConfig
from harness.data import decode
from harness.data.images import ImageDataset, read_all
from harness.data.pipeline import Batches, BatchTransform, SourceDataset, collate_sources, resolve_pipeline
from harness.data.sampler import ClassBalancedBatchSampler
from harness.data.table import ImageTable, Splits
from harness.data.transforms import make_transform

#: split numbers in the augmentation seed (train, then the evaluation splits)
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "query": 3, "gallery": 4, "features": 5}

#: decoded-pixel caches kept between the runs of one process (study trials on the same data)
_PIXEL_CACHES: dict[tuple, decode.PixelCache] = {}


def _worker_init(worker_id: int) -> None:
    """Seed numpy and random in each worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def worker_context() -> Any:
    """Loader workers are forked where the platform can: they share the in-memory caches copy-on-
    write and start in milliseconds. A process started by ``spawn`` (a study worker) would
    otherwise spawn its loader workers too: each re-imports torch and is sent a pickled copy of
    the dataset and its cache, seconds per worker per trial. Workers never touch CUDA."""
    import multiprocessing

    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def loader_workers(requested: int) -> int:
    """``-1`` means one worker per core, at most 8; other values as given."""
    return min(8, os.cpu_count() or 1) if requested < 0 else int(requested)


def make_loaders(
    splits: Splits,
    d: DataConfig,
    seed: int,
    eval_batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
) -> dict[str, Batches]:
    """``train`` plus one entry per evaluation split present (test transform, no shuffle)."""
    device = torch.device(device)
    pipeline = resolve_pipeline(d.pipeline, device)
    tables = {"train": splits.train, **splits.eval_splits()}
    pixels = pixel_caches(tables, d, device) if pipeline == "device" else {}
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, table in tables.items():
        out[name] = split_batches(
            table,
            d,
            seed,
            eval_batch_size,
            mean,
            std,
            device,
            pipeline,
            train=name == "train",
            split=name,
            generator=gen,
            pixels=pixels.get(name),
        )
    return out


def split_batches(
    table: ImageTable,
    d: DataConfig,
    seed: int,
    eval_batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    pipeline: str,
    *,
    train: bool,
    split: str,
    generator: torch.Generator | None = None,
    pixels: decode.PixelCache | None = None,
) -> Batches:
    """One split's :class:`Batches`: the train sampler and augmentation, or the test transform."""
    workers = loader_workers(d.num_workers)
    crop = bool(getattr(d, "crop_to_box", False))
    geometry = pipeline == "device"
    transform = BatchTransform.from_config(d, mean, std, device, train=train, geometry=geometry)
    extra: dict[str, Any] = {}
    if geometry:
        if crop and table.boxes is None:
            ImageDataset(table, crop_to_box=True)  # the same one-line refusal as the CPU pipeline
        array = None
        if table.array is not None:  # in memory already: one uint8 tensor on the device
            array = torch.as_tensor(table.array).to(device)
        encoded = read_all(table.paths, workers) if (d.cache_images and pixels is None and array is None) else None
        files = array is None and pixels is None
        dataset: Any = SourceDataset(table, encoded, with_files=files)
        workers = workers if (files and encoded is None) else 0  # only reading from disk needs workers
        collate = collate_sources
        extra = dict(
            decoder=decode.Decoder(device, on_device=d.decode == "device", name=split),
            pixels=pixels,
            array=array,
            crop_to_box=crop,
        )
    else:
        dataset = ImageDataset(table, make_transform(d, train=train), bool(d.cache_images), crop, workers)
        collate = None
    common: dict[str, Any] = dict(
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=generator,
        multiprocessing_context=worker_context() if workers > 0 else None,
        **({"collate_fn": collate} if collate is not None else {}),
    )
    if train and d.samples_per_class > 0:
        sampler = ClassBalancedBatchSampler(table.labels, d.batch_size, d.samples_per_class, seed)
        loader = DataLoader(dataset, batch_sampler=sampler, **common)
    elif train:
        loader = DataLoader(
            dataset, batch_size=d.batch_size, shuffle=True, drop_last=len(table) >= d.batch_size, **common
        )
    else:
        loader = DataLoader(dataset, batch_size=eval_batch_size, shuffle=False, **common)
    return Batches(loader, transform, device, seed, _SPLIT_IDS[split], table, **extra)


def pixel_budget_bytes(d: DataConfig, device: torch.device) -> int:
    """``data.pixel_cache_gb`` in bytes; ``-1`` (auto) is 40% of the GPU's memory (25% of the
    host's on CPU) shared among the processes on that device (``DMLBENCH_PROCS_PER_DEVICE``)."""
    gb = float(d.pixel_cache_gb)
    if gb >= 0:
        return int(gb * 1e9)
    share = max(1, int(os.environ.get("DMLBENCH_PROCS_PER_DEVICE", "1")))
    if device.type == "cuda":
        total, fraction = torch.cuda.get_device_properties(device).total_memory, 0.4
    else:
        import psutil

        total, fraction = psutil.virtual_memory().total, 0.25
    return int(total * fraction / share)


def pixel_caches(tables: dict[str, ImageTable], d: DataConfig, device: torch.device) -> dict[str, decode.PixelCache]:
    """Decoded-pixel caches of the file-backed splits that fit the budget, train first; kept for
    the next run of this process on the same files (a study's trials decode once)."""
    budget = pixel_budget_bytes(d, device)
    keys = {
        name: (str(device), len(t.paths), t.paths[0], t.paths[-1], hash(tuple(t.paths)))
        for name, t in tables.items()
        if t.paths
    }
    for key in set(_PIXEL_CACHES) - set(keys.values()):  # other data now: free those pixels first
        del _PIXEL_CACHES[key]
    out: dict[str, decode.PixelCache] = {}
    for name, key in keys.items():
        if key in _PIXEL_CACHES:
            need = _PIXEL_CACHES[key].nbytes
        else:
            encoded = read_all(tables[name].paths, loader_workers(d.num_workers))
            need = decode.decoded_bytes(np.array([decode.image_size(b) for b in encoded]))
        if need > budget:
            continue
        if key not in _PIXEL_CACHES:
            decoder = decode.Decoder(device, on_device=d.decode == "device", name=f"{name} pixel cache")
            _PIXEL_CACHES[key] = decode.PixelCache.build(
                lambda i, e=encoded: decode.as_encoded(e[i]), tables[name].paths, decoder
            )
        out[name] = _PIXEL_CACHES[key]
        budget -= need
    return out


def set_epoch(loader: Batches | DataLoader, epoch: int) -> None:
    """Tell a train loader the epoch (its class-balanced sampler and augmentation seed)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
        return
    sampler = getattr(loader, "batch_sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
