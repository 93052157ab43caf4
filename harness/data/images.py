"""Decoding images (optionally cropped to a box) and the dataset of one split, with its cache."""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from harness.data.specs import one_line
from harness.data.table import ImageTable
from harness.errors import UserError


def _decode(source: str | bytes, box: Sequence[float] | None = None, name: str = "") -> Any:
    """PIL RGB image from a path or the file's bytes, optionally cropped to ``box``
    (x0, y0, x1, y1 pixels). Bytes decode to exactly the pixels the file does."""
    from PIL import Image

    name = name or str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            img = im.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise UserError(f"unreadable image {name} ({type(exc).__name__}: {one_line(exc)})") from None
    return crop_box(img, box) if box is not None else img


def box_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` integer pixels of ``box`` clipped to the image, at least 1 pixel."""
    x0, y0 = int(max(0, min(width - 1, np.floor(box[0])))), int(max(0, min(height - 1, np.floor(box[1]))))
    x1, y1 = int(max(x0 + 1, min(width, np.ceil(box[2])))), int(max(y0 + 1, min(height, np.ceil(box[3]))))
    return x0, y0, x1, y1


def crop_box(img: Any, box: Sequence[float]) -> Any:
    """Crop a PIL image or an (H, W[, C]) array to ``box``, clipped to the image, >= 1 pixel."""
    h, w = img.shape[:2] if isinstance(img, np.ndarray) else (img.size[1], img.size[0])
    x0, y0, x1, y1 = box_pixels(box, h, w)
    return img[y0:y1, x0:x1] if isinstance(img, np.ndarray) else img.crop((x0, y0, x1, y1))


def read_file(path: str) -> bytes:
    """A file's encoded bytes; an unreadable file is a UserError naming it."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"unreadable image {path} ({type(exc).__name__}: {one_line(exc)})") from None


def read_all(paths: Sequence[str], workers: int = 8) -> list[bytes]:
    """Every file's encoded bytes, read once (threads: file reads release the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(read_file, paths, chunksize=256))


class ImageDataset(Dataset):
    """``(image_tensor, label, index)`` items of one table.

    ``cache=True`` reads every file's encoded bytes once and keeps them (shared copy-on-write
    with forked workers); each use decodes them, so the transforms see exactly the pixels of the
    file (the released pipelines crop from the original JPEG) at the cost of the files' size in
    memory (:attr:`cache_bytes`), not of their decoded pixels. A file that fails to decode raises
    a UserError naming it; nothing is skipped.
    """

    def __init__(
        self,
        table: ImageTable,
        transform: Any = None,
        cache: bool = False,
        crop_to_box: bool = False,
        read_workers: int = 8,
    ) -> None:
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
        self.cache: list[bytes] | None = None
        if cache and table.array is None:
            self.cache = read_all(table.paths, read_workers)

    @property
    def cache_bytes(self) -> int:
        """Memory the cache holds (the encoded files), 0 without a cache."""
        return sum(len(b) for b in self.cache) if self.cache is not None else 0

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
            img = _decode(self.cache[i], box=self._box(i), name=self.table.paths[i])
        else:
            img = _decode(self.table.paths[i], box=self._box(i))
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.table.labels[i]), int(i)
