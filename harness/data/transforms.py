"""Train and test transforms (SPECS 1), built from torchvision's v2 transforms."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from harness.errors import unknown

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


