"""The CPU pipeline's per-image transforms (SPECS 1 and the released codes' variants), from
torchvision's v2, up to the uint8 crop: conversion to float, normalisation and random erasing
happen on the device, batched (:class:`harness.data.pipeline.BatchTransform`)."""

from __future__ import annotations

from typing import Any

from harness.config import DataConfig


def make_transform(d: DataConfig, train: bool) -> Any:
    """Output 3xSxS uint8. Train: ``data.augment``; test: resize (shorter side, or square for
    FRPT's code) and centre crop."""
    from torchvision.transforms import InterpolationMode, v2

    size, resize = int(d.image_size), int(d.resize_size)
    head = [v2.ToImage(), v2.RGB()]
    bicubic = InterpolationMode.BICUBIC
    if train and d.augment == "standard":
        body = [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]
    elif train and d.augment == "frpt":
        body = [
            v2.Resize((resize, resize)),
            v2.RandomCrop(size),
            v2.RandomHorizontalFlip(),
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
    return v2.Compose(head + body + [v2.ToPureTensor()])
