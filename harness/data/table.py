"""The two containers every data module passes around: one split's images, and a run's splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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

    def subset(self, idx: Sequence[int] | np.ndarray) -> ImageTable:
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
