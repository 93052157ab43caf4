"""Fashion-MNIST, the embedded dataset: the four idx files (Debian's package or torchvision's
download), all 70,000 images pooled and split by class."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from harness.data.readers import _split_by_ranges, register
from harness.data.table import ImageTable
from harness.errors import UserError


FASHION_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
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


@register("fashion_mnist")
def read_fashion_mnist(root: Path, split_spec: dict) -> dict[str, ImageTable]:
    """All 70,000 images pooled, then split by class (0-4 train, 5-9 test by default)."""
    d = fashion_dir(root)
    if d is None:
        raise UserError(
            f"missing {root / FASHION_FILES[0]}.gz (Fashion-MNIST needs the four idx files "
            f"{', '.join(FASHION_FILES)}, optionally .gz)"
        )
    images = np.concatenate([read_idx(d / FASHION_FILES[0]), read_idx(d / FASHION_FILES[2])])
    labels = np.concatenate([read_idx(d / FASHION_FILES[1]), read_idx(d / FASHION_FILES[3])])
    if len(images) != len(labels):
        raise UserError(f"Fashion-MNIST in {d}: {len(images)} images but {len(labels)} labels")
    names = dict(enumerate(FASHION_NAMES))
    return _split_by_ranges(labels.astype(np.int64), split_spec, names, array=images)
