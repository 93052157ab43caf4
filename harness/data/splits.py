"""From a reader's raw train/test split to the run's splits (SPECS 1), and image checking.

A seeded validation split of held-out *training* classes serves model selection; few-shot and
quick-run subsets are drawn from independent seeded streams, so changing one leaves the others.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from harness.config import DataConfig
from harness.data.specs import get_spec, one_line, read_raw, resolve_root
from harness.data.table import ImageTable, Splits
from harness.errors import UserError


def _rng(seed: int, step: int) -> np.random.Generator:
    """Independent stream per step, so e.g. changing ``shots`` leaves the val split unchanged."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, step])


def _keep_classes(table: ImageTable, n: int, rng: np.random.Generator) -> ImageTable:
    if not n or table.num_classes <= n:
        return table
    keep = np.sort(rng.choice(table.num_classes, size=n, replace=False))
    return table.subset(np.flatnonzero(np.isin(table.labels, keep)))


def class_groups(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Indices of each class 0..num_classes-1 (ascending), in O(N log N) not O(N*C)."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(num_classes)]


def _per_class(table: ImageTable, k: int, rng: np.random.Generator) -> ImageTable:
    """At most ``k`` seeded images per class (original order kept)."""
    if not k:
        return table
    keep = []
    for idx in class_groups(table.labels, table.num_classes):
        keep.append(idx if len(idx) <= k else np.sort(rng.choice(idx, size=k, replace=False)))
    return table.subset(np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64))


def n_val_classes(num_classes: int, val_fraction: float) -> int:
    """round(val_fraction * C), at least 1 when val_fraction > 0."""
    if val_fraction <= 0:
        return 0
    return max(1, int(np.floor(val_fraction * num_classes + 0.5)))


def _carve(raw: dict[str, ImageTable], data: Any, seed: int, ks: Sequence[int]) -> Splits:
    """Apply max_classes, the validation split, shots and max_per_class to raw splits."""
    raw = dict(raw)
    # quick-run class cap: train (before carving val) and each test split
    raw["train"] = _keep_classes(raw["train"], data.max_classes, _rng(seed, 1))
    if "test" in raw:
        raw["test"] = _keep_classes(raw["test"], data.max_classes, _rng(seed, 2))
    if "query" in raw and data.max_classes and raw["query"].num_classes > data.max_classes:
        keep = np.sort(_rng(seed, 2).choice(raw["query"].num_classes, data.max_classes, replace=False))
        for name in ("query", "gallery"):  # same classes in both, labels stay joint
            t = raw[name]
            idx = np.flatnonzero(np.isin(t.labels, keep))
            remap = np.full(t.num_classes, -1, np.int64)
            remap[keep] = np.arange(len(keep))
            raw[name] = ImageTable(
                labels=remap[t.labels[idx]],
                class_names=[t.class_names[k] for k in keep],
                paths=[t.paths[i] for i in idx] if t.paths is not None else None,
                array=t.array[idx] if t.array is not None else None,
            )
    train, val = raw["train"], None
    n_val = n_val_classes(train.num_classes, data.val_fraction)
    if n_val:
        if n_val >= train.num_classes:
            raise UserError(
                f"data.val_fraction={data.val_fraction} leaves no training classes "
                f"({train.num_classes} classes); lower it or set it to 0"
            )
        val_cls = _rng(seed, 3).choice(train.num_classes, size=n_val, replace=False)
        is_val = np.isin(train.labels, val_cls)
        val = train.subset(np.flatnonzero(is_val))
        train = train.subset(np.flatnonzero(~is_val))
    train = _per_class(train, data.shots, _rng(seed, 4))
    cap = data.max_per_class
    out = Splits(
        train=_per_class(train, cap, _rng(seed, 5)),
        val=_per_class(val, cap, _rng(seed, 6)) if val is not None else None,
        test=_per_class(raw["test"], cap, _rng(seed, 7)) if "test" in raw else None,
        ks=tuple(int(k) for k in ks),
    )
    for i, name in enumerate(("query", "gallery")):
        if name in raw:  # capping keeps all classes, so the joint label space survives
            t = raw[name]
            if cap:
                r = _rng(seed, 8 + i)
                keep = [
                    idx if len(idx) <= cap else np.sort(r.choice(idx, cap, replace=False))
                    for idx in class_groups(t.labels, t.num_classes)
                ]
                idx = np.sort(np.concatenate(keep))
                t = ImageTable(
                    labels=t.labels[idx],
                    class_names=t.class_names,
                    paths=[t.paths[j] for j in idx] if t.paths is not None else None,
                    array=t.array[idx] if t.array is not None else None,
                )
            setattr(out, name, t)
    return out


def evaluation_tables(raw: dict[str, ImageTable], data: Any, seed: int) -> dict[str, ImageTable]:
    """A dataset's test split (or query and gallery) under the run's caps, for evaluating a model
    trained elsewhere (``eval.transfer``)."""
    caps = copy.copy(data)
    caps.val_fraction, caps.shots = 0.0, 0
    return {k: v for k, v in _carve(raw, caps, seed, ()).eval_splits().items() if k != "val"}


def load_splits(dataset: str, d: DataConfig, seed: int, ks: Sequence[int] = ()) -> Splits:
    """The splits of ``dataset`` under the data config ``d``, seeded by ``seed`` (SPECS 1); ``ks``
    the Recall@K values (empty: the dataset spec's)."""
    spec = get_spec(dataset)
    raw = read_raw(spec, resolve_root(spec, d.root), check=getattr(d, "check_published", True))
    return _carve(raw, d, seed, ks or spec.ks)


# ----------------------------------------------------------------------------- checking


def _verify_image(path: str) -> str | None:
    """Decode ``path`` fully (JPEG at reduced DCT scale for speed); the error text or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
        return f"{type(exc).__name__}: {one_line(exc)}"
    return None


def verify_tables(tables: dict[str, ImageTable]) -> None:
    """Open every image; raise a UserError naming the first (in split order) that fails."""
    paths = [p for t in tables.values() if t.paths is not None for p in t.paths]
    if not paths:
        return
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for path, err in zip(paths, pool.map(_verify_image, paths, chunksize=64)):
            if err is not None:
                raise UserError(f"unreadable image {path} ({err})")


_VERIFIED: set[tuple[str, ...]] = set()


def verify_splits(splits: Splits) -> None:
    """Decode every image of the run's splits once per process, before any run starts, so a
    corrupt file stops the run up front with its name instead of half-way through training."""
    tables = {"train": splits.train, **splits.eval_splits()}
    paths = tuple(p for t in tables.values() if t.paths is not None for p in t.paths)
    key = (str(len(paths)), paths[0] if paths else "", paths[-1] if paths else "")
    if not paths or key in _VERIFIED:
        return
    verify_tables(tables)
    _VERIFIED.add(key)


def check_dataset(name: str, root: str = "", verify_images: bool = True) -> dict:
    """Counts per split with the default validation split; optionally decodes every image."""
    spec = get_spec(name)
    raw = read_raw(spec, resolve_root(spec, root))
    data = DataConfig()
    data.val_fraction = float(spec.defaults.get("data", {}).get("val_fraction", 0.2))
    splits = _carve(raw, data, 0, spec.ks)
    tables = splits.eval_splits()
    tables = {"train": splits.train, **tables}
    if verify_images:
        verify_tables(tables)
    return {k: {"images": len(t), "classes": t.num_classes} for k, t in tables.items()}
