"""Decoding images (optionally cropped to a box) and the dataset of one split, with its cache."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from harness.data.specs import one_line
from harness.data.table import ImageTable
from harness.errors import UserError

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
        raise UserError(f"unreadable image {path} ({type(exc).__name__}: {one_line(exc)})") from None
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
