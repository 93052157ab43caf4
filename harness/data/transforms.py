"""Train and test transforms (SPECS 1 and the released codes' variants), from torchvision's v2."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def make_transform(cfg: Any, mean: Sequence[float], std: Sequence[float], train: bool) -> Any:
    """Output 3xSxS float, normalised with mean/std. Train: ``data.augment`` (+ random erasing);
    test: resize (shorter side, or square for FRPT's code) and centre crop."""
    from torchvision.transforms import InterpolationMode, v2

    d = cfg.data
    size, resize = int(d.image_size), int(d.resize_size)
    head = [v2.ToImage(), v2.RGB()]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    bicubic = InterpolationMode.BICUBIC
    if train and d.augment == "standard":
        body = [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]
    elif train and d.augment == "frpt":
        body = [
            v2.Resize((resize, resize)), v2.RandomCrop(size), v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.25, 0.25, 0.25),
        ]
    elif train and d.augment == "frpt_code":  # fast-reid build_transforms with FRPT's cub.yml
        body = [
            v2.Resize((resize, resize), interpolation=bicubic),
            v2.RandomResizedCrop(size, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3), interpolation=bicubic),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.25, 0.25, 0.25, 0.0)], p=0.5),
        ]
    elif d.test_resize == "square":  # FRPT's code: Resize((256, 256)) + CenterCrop(224), bicubic
        body = [v2.Resize((resize, resize), interpolation=bicubic), v2.CenterCrop(size)]
    else:
        body = [v2.Resize(resize), v2.CenterCrop(size)]
    if train and d.random_erasing > 0:
        tail.append(v2.RandomErasing(p=d.random_erasing))
    return v2.Compose(head + body + tail)
