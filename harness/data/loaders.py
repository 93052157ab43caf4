"""DataLoaders of a run: the train loader (class-balanced or shuffled) and one per evaluation split."""
from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from harness.data.images import ImageDataset
from harness.data.sampler import ClassBalancedBatchSampler
from harness.data.table import Splits
from harness.data.transforms import make_transform


def _worker_init(worker_id: int) -> None:
    """Seed numpy and random in each worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def loader_workers(requested: int) -> int:
    """``-1`` means one worker per core, at most 8; other values as given."""
    return min(8, os.cpu_count() or 1) if requested < 0 else int(requested)


def make_loaders(splits: Splits, cfg: Any, mean: Sequence[float], std: Sequence[float],
                 device_type: str) -> dict[str, DataLoader]:
    """``train`` plus one loader per evaluation split present (test transform, no shuffle)."""
    d = cfg.data
    workers = loader_workers(d.num_workers)
    cache = bool(d.cache_images)
    common: dict[str, Any] = dict(
        num_workers=workers,
        pin_memory=device_type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers > 0 else None,
    )
    gen = torch.Generator().manual_seed(int(cfg.seed))
    crop = bool(getattr(d, "crop_to_box", False))
    train_ds = ImageDataset(splits.train, make_transform(cfg, mean, std, train=True), cache, crop, workers)
    if d.samples_per_class > 0:
        sampler = ClassBalancedBatchSampler(splits.train.labels, d.batch_size, d.samples_per_class, cfg.seed)
        loaders = {"train": DataLoader(train_ds, batch_sampler=sampler, generator=gen, **common)}
    else:
        loaders = {"train": DataLoader(
            train_ds, batch_size=d.batch_size, shuffle=True, generator=gen,
            drop_last=len(splits.train) >= d.batch_size, **common,
        )}
    test_tf = make_transform(cfg, mean, std, train=False)
    for name, table in splits.eval_splits().items():
        loaders[name] = DataLoader(
            ImageDataset(table, test_tf, cache, crop, workers), batch_size=cfg.eval.batch_size, shuffle=False,
            generator=gen, **common,
        )
    return loaders


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a train loader's class-balanced sampler the epoch (no-op for plain shuffling)."""
    sampler = getattr(loader, "batch_sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
