"""Data layer: dataset specs, class-disjoint splits, sampler, transforms and loaders.

Datasets are declared in ``datasets/<name>.yaml`` (a data folder, not a Python package) and
parsed by a reader in :mod:`harness.readers`. :func:`load_splits` turns the reader's raw
class-disjoint train/test split into the run's splits (SPECS 1): a seeded validation split of
held-out *training* classes for model selection, plus optional few-shot and quick-run subsets.
"""
from __future__ import annotations

import functools
import os
import random
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Sampler

from harness.errors import UserError, unknown

REPO = Path(__file__).resolve().parent.parent
DATASETS_DIR = REPO / "datasets"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

# ----------------------------------------------------------------------------- specs


@dataclass
class DatasetSpec:
    """One ``datasets/<name>.yaml``: how to read a dataset and its protocol defaults."""

    name: str
    reader: str
    description: str
    how_to_get: str
    default_root: str
    ks: list[int]
    has_boxes: bool
    query_gallery: bool
    split: dict
    defaults: dict
    #: expected folder layout, shown in errors
    layout: str = ""


def spec_names() -> list[str]:
    """Names of all declared datasets (the yaml file stems)."""
    return sorted(p.stem for p in DATASETS_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def _load_spec(name: str) -> DatasetSpec:
    path = DATASETS_DIR / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text()) or {}
    allowed = {f.name for f in fields(DatasetSpec)}
    extra = set(raw) - allowed
    if extra:
        raise UserError(f"{path}: unknown keys {sorted(extra)}; valid: {sorted(allowed)}")
    raw.setdefault("name", name)
    raw.setdefault("ks", [1, 2, 4, 8])
    raw.setdefault("has_boxes", False)
    raw.setdefault("query_gallery", False)
    raw.setdefault("split", {})
    raw.setdefault("defaults", {})
    raw.setdefault("default_root", f"data/{name}")
    for key in ("reader", "description", "how_to_get"):
        if key not in raw:
            raise UserError(f"{path}: missing key '{key}'")
    return DatasetSpec(**raw)


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; an unknown name raises the standard UserError."""
    if name not in spec_names():
        raise unknown("dataset", name, spec_names())
    return _load_spec(name)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------- tables


@dataclass
class ImageTable:
    """One split: contiguous labels 0..C-1 plus either image paths or an in-memory array."""

    labels: np.ndarray
    class_names: list[str]
    paths: list[str] | None = None
    array: np.ndarray | None = None
    boxes: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.labels))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "ImageTable":
        """Rows ``idx`` (in that order), relabelled contiguously in old-label order."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        old = self.labels[idx]
        kept, labels = np.unique(old, return_inverse=True)
        return ImageTable(
            labels=labels.astype(np.int64).reshape(-1),
            class_names=[self.class_names[k] for k in kept.tolist()],
            paths=[self.paths[i] for i in idx] if self.paths is not None else None,
            array=self.array[idx] if self.array is not None else None,
            boxes=self.boxes[idx] if self.boxes is not None else None,
        )


@dataclass
class Splits:
    """The run's splits; ``val`` is None when ``data.val_fraction`` is 0."""

    train: ImageTable
    val: ImageTable | None
    test: ImageTable | None
    query: ImageTable | None = None
    gallery: ImageTable | None = None
    ks: tuple[int, ...] = (1, 2, 4, 8)

    def eval_splits(self) -> dict[str, ImageTable]:
        """The evaluation splits present, in a fixed order."""
        names = ("val", "test", "query", "gallery")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


# ----------------------------------------------------------------------------- roots


def _fashion_candidates() -> list[Path]:
    cands = []
    if os.environ.get("DMLBENCH_DATA"):
        cands.append(Path(os.environ["DMLBENCH_DATA"]) / "fashion_mnist")
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(
                ["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, timeout=20
            ).stdout
            cands += sorted({Path(ln).parent for ln in out.splitlines() if "idx" in ln})
        except (OSError, subprocess.SubprocessError):
            pass
    if DEBIAN_FASHION not in cands:
        cands.append(DEBIAN_FASHION)
    cands.append(REPO / "data" / "fashion_mnist")
    return cands


def _resolve_fashion() -> Path:
    """Fashion-MNIST: env folder, Debian package, repo data folder, else a torchvision download."""
    from harness.readers import fashion_dir

    cands = _fashion_candidates()
    for c in cands:
        found = fashion_dir(c)
        if found is not None:
            return found
    target = REPO / "data" / "fashion_mnist"
    try:
        import torchvision

        torchvision.datasets.FashionMNIST(root=str(target), download=True)
    except Exception as exc:  # network errors come in many types
        tried = ", ".join(str(c) for c in cands)
        raise UserError(
            f"Fashion-MNIST not found (looked in {tried}) and download failed ({_one_line(exc)}); "
            f"install it with 'apt-get install dataset-fashion-mnist' or pass --set data.root=DIR"
        ) from None
    found = fashion_dir(target)
    if found is None:  # pragma: no cover - torchvision changed its layout
        raise UserError(f"Fashion-MNIST download to {target} left no idx files")
    return found


def resolve_root(spec: DatasetSpec, root: str = "") -> Path:
    """Where dataset ``spec`` lives; a missing folder raises a UserError listing what was tried."""
    how = f"get it from: {_one_line(spec.how_to_get)}"
    if root:
        path = Path(root).expanduser()
        if not path.exists():
            raise UserError(f"{spec.name} data folder {path} does not exist; {how}")
        return path
    if spec.reader == "fashion_mnist":
        return _resolve_fashion()
    rel = Path(spec.default_root)
    cands = []
    if os.environ.get("DMLBENCH_DATA"):
        cands.append(Path(os.environ["DMLBENCH_DATA"]) / rel.name)
    cands.append(rel if rel.is_absolute() else REPO / rel)
    for c in cands:
        if c.exists():
            return c
    tried = " and ".join(str(c) for c in cands)
    raise UserError(
        f"{spec.name} not found: tried {tried}; {how}; or set $DMLBENCH_DATA or pick another "
        f"folder with --set data.root=DIR"
    )


def _read_raw(spec: DatasetSpec, root: Path) -> dict[str, ImageTable]:
    """Run the spec's reader, adding the expected layout and download hint to layout errors."""
    from harness.readers import READERS

    if spec.reader not in READERS:
        raise unknown(f"reader of dataset '{spec.name}'", spec.reader, READERS)
    try:
        return READERS[spec.reader](root, spec.split)
    except UserError as exc:
        extra = f"; expected layout: {_one_line(spec.layout)}" if spec.layout else ""
        raise UserError(f"{exc}{extra}; get it from: {_one_line(spec.how_to_get)}") from None


# ----------------------------------------------------------------------------- splitting


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
    return [order[bounds[c]:bounds[c + 1]] for c in range(num_classes)]


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
                labels=remap[t.labels[idx]], class_names=[t.class_names[k] for k in keep],
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
                    labels=t.labels[idx], class_names=t.class_names,
                    paths=[t.paths[j] for j in idx] if t.paths is not None else None,
                    array=t.array[idx] if t.array is not None else None,
                )
            setattr(out, name, t)
    return out


def load_splits(cfg: Any) -> Splits:
    """The run's splits for ``cfg`` (a RunConfig), seeded by ``cfg.seed`` (SPECS 1)."""
    spec = get_spec(cfg.dataset)
    raw = _read_raw(spec, resolve_root(spec, cfg.data.root))
    ks = cfg.eval.ks or spec.ks
    return _carve(raw, cfg.data, cfg.seed, ks)


# ----------------------------------------------------------------------------- checking


def _verify_image(path: str) -> str | None:
    """Decode ``path`` fully (JPEG at reduced DCT scale for speed); the error text or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
        return f"{type(exc).__name__}: {_one_line(exc)}"
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
    from harness.config import DataConfig

    spec = get_spec(name)
    raw = _read_raw(spec, resolve_root(spec, root))
    data = DataConfig()
    data.val_fraction = float(spec.defaults.get("data", {}).get("val_fraction", 0.2))
    splits = _carve(raw, data, 0, spec.ks)
    tables = splits.eval_splits()
    tables = {"train": splits.train, **tables}
    if verify_images:
        verify_tables(tables)
    return {k: {"images": len(t), "classes": t.num_classes} for k, t in tables.items()}


# ----------------------------------------------------------------------------- sampling


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size // m`` classes x ``m`` images, each class's images consecutive.

    VPTSP-G's semantic-proxy step averages the ``m`` consecutive features of a class, so the
    grouping is part of the contract. Classes are drawn without replacement within a batch when
    there are enough of them (else with replacement); images without replacement from a
    reshuffled per-class pool, or with replacement for classes smaller than ``m``.
    Deterministic given ``seed`` and the epoch set with :meth:`set_epoch`.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, batch_size: int, samples_per_class: int,
                 seed: int = 0) -> None:
        if samples_per_class <= 0 or batch_size % samples_per_class:
            raise ValueError(f"samples_per_class={samples_per_class} must divide batch_size={batch_size}")
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.size == 0:
            raise UserError("cannot sample batches from an empty training split")
        self.batch_size = int(batch_size)
        self.m = int(samples_per_class)
        self.seed = int(seed)
        self.epoch = 0
        self.classes, dense = np.unique(self.labels, return_inverse=True)
        self.by_class = class_groups(dense.reshape(-1), len(self.classes))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return max(1, len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch])
        per_batch = self.batch_size // self.m
        n_cls = len(self.classes)
        pools: list[list[int]] = [[] for _ in range(n_cls)]
        for _ in range(len(self)):
            chosen = rng.choice(n_cls, size=per_batch, replace=n_cls < per_batch)
            batch: list[int] = []
            for c in chosen.tolist():
                members = self.by_class[c]
                if len(members) < self.m:
                    batch.extend(rng.choice(members, size=self.m, replace=True).tolist())
                    continue
                if len(pools[c]) < self.m:
                    pools[c] = rng.permutation(members).tolist()
                batch.extend(pools[c][: self.m])
                del pools[c][: self.m]
            yield batch


# ----------------------------------------------------------------------------- transforms


def make_transform(cfg: Any, mean: Sequence[float], std: Sequence[float], train: bool) -> Any:
    """SPECS 1 transforms (torchvision v2); output 3xSxS float, normalised with mean/std."""
    from torchvision.transforms import v2

    d = cfg.data
    size, resize = int(d.image_size), int(d.resize_size)
    head = [v2.ToImage(), v2.RGB()]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if train and d.augment == "standard":
        body = [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]
    elif train and d.augment == "frpt":
        body = [
            v2.Resize((resize, resize)), v2.RandomCrop(size), v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.25, 0.25, 0.25),
        ]
    elif train and d.augment != "none":
        raise unknown("data.augment", d.augment, ["standard", "frpt", "none"])
    else:
        body = [v2.Resize(resize), v2.CenterCrop(size)]
    return v2.Compose(head + body + tail)


# ----------------------------------------------------------------------------- datasets


def _decode(path: str, short_side: int = 0, box: Sequence[float] | None = None) -> Any:
    """PIL RGB image, optionally cropped to ``box`` (x0, y0, x1, y1 pixels), then optionally
    resized so the shorter side is ``short_side``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if short_side and box is None:
                im.draft("RGB", (short_side, short_side))
            img = im.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise UserError(f"unreadable image {path} ({type(exc).__name__}: {_one_line(exc)})") from None
    if box is not None:
        img = crop_box(img, box)
    if short_side:
        w, h = img.size
        s = short_side / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    return img


def crop_box(img: Any, box: Sequence[float]) -> Any:
    """Crop a PIL image or an (H, W[, C]) array to ``box``, clipped to the image, >= 1 pixel."""
    if isinstance(img, np.ndarray):
        h, w = img.shape[:2]
    else:
        w, h = img.size
    x0, y0 = int(max(0, min(w - 1, np.floor(box[0])))), int(max(0, min(h - 1, np.floor(box[1]))))
    x1, y1 = int(max(x0 + 1, min(w, np.ceil(box[2])))), int(max(y0 + 1, min(h, np.ceil(box[3]))))
    return img[y0:y1, x0:x1] if isinstance(img, np.ndarray) else img.crop((x0, y0, x1, y1))


class _DecodeOnly(Dataset):
    """Images as resized uint8 arrays: what the cache holds, decoded in worker processes."""

    def __init__(self, paths: Sequence[str], short_side: int, boxes: np.ndarray | None) -> None:
        self.paths, self.short_side, self.boxes = paths, short_side, boxes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        box = None if self.boxes is None else self.boxes[i]
        return np.asarray(_decode(self.paths[i], self.short_side, box))


def decode_all(paths: Sequence[str], short_side: int, boxes: np.ndarray | None, workers: int) -> list[np.ndarray]:
    """Decode every image once, in ``workers`` processes: PIL holds the GIL for much of a JPEG
    decode and resize, so threads gave almost no speed-up on a 16-core GPU host."""
    dataset = _DecodeOnly(paths, short_side, boxes)
    if workers <= 0:
        return [dataset[i] for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=32, num_workers=workers, collate_fn=list)
    return [image for batch in loader for image in batch]


class ImageDataset(Dataset):
    """``(image_tensor, label, index)`` items of one table.

    ``cache_size > 0`` decodes every image once up front (shorter side resized to
    ``cache_size``) and keeps uint8 arrays, shared copy-on-write with forked workers.
    A file that fails to decode raises a UserError naming it; nothing is skipped.
    """

    def __init__(self, table: ImageTable, transform: Any = None, cache_size: int = 0,
                 crop_to_box: bool = False, decode_workers: int = 0) -> None:
        if table.paths is None and table.array is None:
            raise ValueError("ImageTable needs paths or array")
        if crop_to_box and table.boxes is None:
            raise UserError(
                "data.crop_to_box needs bounding boxes and this dataset has none; "
                "datasets with boxes: cub200, cars196, aircraft"
            )
        self.table = table
        self.transform = transform
        self.crop_to_box = crop_to_box
        self.cache: list[np.ndarray] | None = None
        if cache_size and table.array is None:
            boxes = table.boxes if crop_to_box else None
            self.cache = decode_all(table.paths, cache_size, boxes, decode_workers)

    def _box(self, i: int) -> Any:
        return self.table.boxes[i] if self.crop_to_box else None

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        if self.table.array is not None:
            img: Any = self.table.array[i]
            if self.crop_to_box:
                img = crop_box(img, self.table.boxes[i])
        elif self.cache is not None:
            img = self.cache[i]
        else:
            img = _decode(self.table.paths[i], box=self._box(i))
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.table.labels[i]), int(i)


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
    cache = int(d.resize_size) if d.cache_images else 0
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
