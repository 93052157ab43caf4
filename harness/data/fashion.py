"""Fashion-MNIST, the embedded dataset: the four idx files (Debian's package or torchvision's
download), all 70,000 images pooled and split by class."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

from harness.data.readers import _split_by_ranges, register
from harness.data.table import ImageTable
from harness.errors import UserError

FASHION_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def fashion_dir(root: Path) -> Path | None:
    """The folder under ``root`` holding the four idx files (plain or .gz), if any."""
    for d in (root, root / "FashionMNIST" / "raw", root / "raw"):
        if all((d / f).exists() or (d / f"{f}.gz").exists() for f in FASHION_FILES):
            return d
    return None


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (uint8 payload), gzipped or not."""
    real = path if path.exists() else path.with_name(path.name + ".gz")
    opener = gzip.open if real.suffix == ".gz" else open
    try:
        with opener(real, "rb") as fh:
            raw = fh.read()
        ndim = raw[3]
        dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
        # bytearray keeps the array writable (torch warns on read-only numpy arrays)
        return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, ValueError, EOFError, IndexError) as exc:
        raise UserError(f"cannot read idx file {real}: {exc}") from None


def load_fashion(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images (uint8 28x28) and garment labels, train and test files pooled.

    Decoded once per process and kept, read-only: a study worker trains dozens of runs on these
    files (every run reads them for its splits and again for a zero-shot transfer evaluation),
    and un-gzipping 55 MB took 0.5 s of each run. The key holds each file's size and mtime, so a
    replaced file is read again."""
    return _decoded(*_files_of(root))


def _files_of(root: Path) -> tuple[Path, tuple]:
    """The idx folder under ``root`` and each file's name, size and mtime (the caches' key)."""
    d = fashion_dir(root)
    if d is None:
        raise UserError(
            f"missing {root / FASHION_FILES[0]}.gz (Fashion-MNIST needs the four idx files "
            f"{', '.join(FASHION_FILES)}, optionally .gz)"
        )
    files = [d / f if (d / f).exists() else d / f"{f}.gz" for f in FASHION_FILES]
    return d.resolve(), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


@functools.lru_cache(maxsize=2)
def _decoded(d: Path, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    images = np.concatenate([read_idx(d / FASHION_FILES[0]), read_idx(d / FASHION_FILES[2])])
    labels = np.concatenate([read_idx(d / FASHION_FILES[1]), read_idx(d / FASHION_FILES[3])])
    if len(images) != len(labels):
        raise UserError(f"Fashion-MNIST in {d}: {len(images)} images but {len(labels)} labels")
    labels = labels.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller: splits copy
    return images, labels


@register("fashion_mnist")
def read_fashion_mnist(root: Path, split_spec: dict) -> dict[str, ImageTable]:
    """All 70,000 images pooled, then split by class (0-4 train, 5-9 test by default)."""
    images, labels = load_fashion(root)
    return _split_by_ranges(labels, split_spec, dict(enumerate(FASHION_NAMES)), array=images)


#: readers of the Fashion-MNIST files (found by the same search: Debian's package, downloads)
FASHION_READERS = ("fashion_mnist", "fashion_styles")
#: ink: a pixel brighter than this (of 255)
INK = 32
AREA_BINS = ("smallest", "small", "large", "largest")
ASPECT_BINS = ("wide", "tall")


def style_labels(images: np.ndarray, garments: np.ndarray) -> np.ndarray:
    """Each image's style within its garment class: the quartile of its ink area (pixels above
    :data:`INK`) among that garment's images, times the half its ink bounding box's aspect
    (height/width) falls in among the images of that garment and quartile. Ranks and integer
    arithmetic only (ties broken by position): the same labels on every machine.
    Returns ``garment * 8 + area_quartile * 2 + tall`` (0-79)."""
    ink = images > INK
    area = ink.sum(axis=(1, 2)).astype(np.int64)
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    height = np.where(rows.any(1), 28 - rows.argmax(1) - rows[:, ::-1].argmax(1), 0)
    width = np.where(cols.any(1), 28 - cols.argmax(1) - cols[:, ::-1].argmax(1), 1)
    aspect = height * 1000 // np.maximum(width, 1)
    styles = np.zeros(len(images), np.int64)
    for g in np.unique(garments):
        idx = np.flatnonzero(garments == g)
        order = np.argsort(area[idx], kind="stable")  # quartiles by rank: ties split by position
        quartile = np.empty(len(idx), np.int64)
        quartile[order] = np.arange(len(idx)) * 4 // len(idx)
        tall = np.zeros(len(idx), np.int64)
        for q in range(4):  # taller or wider than the median of its garment and area quartile: halves
            members = np.flatnonzero(quartile == q)
            ranks = np.empty(len(members), np.int64)
            ranks[np.argsort(aspect[idx][members], kind="stable")] = np.arange(len(members))
            tall[members] = ranks * 2 // len(members)
        styles[idx] = g * 8 + quartile * 2 + tall
    return styles


@functools.lru_cache(maxsize=2)
def _styles_of(d: Path, stamp: tuple) -> np.ndarray:
    """:func:`style_labels` of the pooled images, once per process (as :func:`load_fashion`)."""
    styles = style_labels(*_decoded(d, stamp))
    styles.flags.writeable = False
    return styles


@register("fashion_styles")
def read_fashion_styles(root: Path, split_spec: dict) -> dict[str, ImageTable]:
    """Fashion-MNIST made fine-grained: each garment split into 8 styles (:func:`style_labels`),
    80 classes; classes are numbered so that the training classes hold the smallest and third
    area quartiles of every garment and the test classes the second and largest (class-disjoint,
    every garment on both sides, as CUB's birds are birds on both sides)."""
    files = _files_of(root)
    images, garments = _decoded(*files)
    styles = _styles_of(*files)
    garment, quartile, tall = styles // 8, styles % 8 // 2, styles % 2
    # ids 1-40: quartiles 0 and 2 of each garment (train); 41-80: quartiles 1 and 3 (test)
    ids = 1 + (quartile % 2) * 40 + garment * 4 + (quartile // 2) * 2 + tall
    names = {
        int(i): f"{FASHION_NAMES[g]} ({AREA_BINS[q]} area, {ASPECT_BINS[t]})"
        for i, g, q, t in zip(*np.unique(np.stack([ids, garment, quartile, tall]), axis=1))
    }
    return _split_by_ranges(ids, split_spec, names, array=images)
