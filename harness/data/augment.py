"""Per-sample augmentation applied to a whole batch, on whatever device the batch lives on.

torchvision's v2 transforms applied to a batch tensor draw *one* set of random parameters for
the whole batch; the recipes mean one draw per image. Here every parameter is drawn per sample
on the host (numpy, the same distributions as torchvision's ``get_params``: 10 attempts of
scale/log-ratio for RandomResizedCrop and RandomErasing, a random order of the colour-jitter
operations, uniform factors) and the batch is transformed on its device: crops resized one by
one (antialiased, as torchvision resizes tensors), then flips, jitter, normalisation and erasing
as batched tensor operations with per-sample factors. The same code runs on CPU tensors, which
is how it is tested against torchvision's own transforms.

Geometric operations run torchvision's own functional kernels on each uint8 image (so a crop box
gives the CPU pipeline's pixels); the batch stays uint8 until colour jitter (float, in [0, 1] as
torchvision's float kernels) or :func:`normalize`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from harness.runtime.device import to_device  # noqa: F401 - used as A.to_device too

#: ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale
_LUMA = (0.2989, 0.587, 0.114)


# ----------------------------------------------------------------------------- parameters


def sample_resized_crops(
    rng: np.random.Generator,
    heights: np.ndarray,
    widths: np.ndarray,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """``(B, 4)`` int boxes ``(top, left, h, w)``: RandomResizedCrop.get_params for each image.

    Ten attempts of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); the first
    attempt that fits is kept, else the centre crop clamped to ``ratio`` (torchvision's fallback).
    """
    heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    b = len(heights)
    area = (heights * widths).astype(np.float64)[:, None]
    target = area * rng.uniform(scale[0], scale[1], (b, 10))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (b, 10)))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.argmax(axis=1)
    rows = np.arange(b)
    h, w = h[rows, first], w[rows, first]
    found = fits.any(axis=1)
    # fallback: the whole image, its aspect clamped into [ratio[0], ratio[1]], centred
    in_ratio = widths / heights
    fw = np.where(in_ratio < min(ratio), widths, np.where(in_ratio > max(ratio), np.rint(heights * max(ratio)), widths))
    fh = np.where(in_ratio < min(ratio), np.rint(widths / min(ratio)), heights)
    h, w = np.where(found, h, fh).astype(np.int64), np.where(found, w, fw).astype(np.int64)
    top = np.where(found, (rng.random(b) * (heights - h + 1)).astype(np.int64), (heights - h) // 2)
    left = np.where(found, (rng.random(b) * (widths - w + 1)).astype(np.int64), (widths - w) // 2)
    return np.stack([top, left, h, w], axis=1)


def sample_erasing(
    rng: np.random.Generator,
    batch: int,
    height: int,
    width: int,
    p: float,
    scale: Sequence[float] = (0.02, 0.33),
    ratio: Sequence[float] = (0.3, 3.3),
) -> np.ndarray:
    """``(B, 4)`` boxes ``(top, left, h, w)`` of RandomErasing (value 0 after normalisation);
    ``h = w = 0`` where a sample is not erased (probability ``1 - p``, or no attempt fitted)."""
    area = float(height * width)
    erase_area = area * rng.uniform(scale[0], scale[1], (batch, 10))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (batch, 10)))
    h = np.rint(np.sqrt(erase_area * aspect)).astype(np.int64)
    w = np.rint(np.sqrt(erase_area / aspect)).astype(np.int64)
    fits = (h < height) & (w < width)
    first = fits.argmax(axis=1)
    rows = np.arange(batch)
    h, w = h[rows, first], w[rows, first]
    chosen = fits.any(axis=1) & (rng.random(batch) < p)
    top = (rng.random(batch) * (height - h + 1)).astype(np.int64)
    left = (rng.random(batch) * (width - w + 1)).astype(np.int64)
    return np.stack([top, left, np.where(chosen, h, 0), np.where(chosen, w, 0)], axis=1)


@dataclass
class JitterParams:
    """Per-sample colour-jitter draws: factors (1 = unchanged, hue 0 = unchanged), the order of
    the four operations (brightness 0, contrast 1, saturation 2, hue 3) and whether it applies."""

    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray
    order: np.ndarray  # (B, 4) a permutation per sample
    applied: np.ndarray  # (B,) bool


def sample_jitter(
    rng: np.random.Generator,
    batch: int,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    p: float = 1.0,
) -> JitterParams:
    """ColorJitter(brightness, contrast, saturation, hue).get_params per sample, each applied with
    probability ``p`` (RandomApply); factors of a disabled operation are exactly neutral."""

    def factor(x: float) -> np.ndarray:
        return rng.uniform(max(0.0, 1 - x), 1 + x, batch) if x > 0 else np.ones(batch)

    order = np.argsort(rng.random((batch, 4)), axis=1)
    b, c, s = factor(brightness), factor(contrast), factor(saturation)
    h = rng.uniform(-hue, hue, batch) if hue > 0 else np.zeros(batch)
    return JitterParams(b, c, s, h, order, rng.random(batch) < p)


# ----------------------------------------------------------------------------- application


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """``(..., C, H, W)`` with C = 1 or 3 -> 3 channels (grey repeated, as PIL's convert("RGB"))."""
    return image.expand(*image.shape[:-3], 3, *image.shape[-2:]) if image.shape[-3] == 1 else image


def crop_resize(images: Sequence[torch.Tensor], boxes: np.ndarray, size: int, interpolation: str) -> torch.Tensor:
    """Each uint8 image's own box ``(top, left, h, w)`` resized to ``size`` x ``size`` by
    torchvision's own ``resized_crop`` (antialiased; on the GPU float, clamped, rounded): the
    same kernel the CPU pipeline runs per image. ``(B, 3, S, S)`` uint8; one small resize per
    image (the boxes differ), kernel launches only, no host sync."""
    from torchvision.transforms.v2 import functional as TF

    mode = _interpolation(interpolation)
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=images[0].device)
    for i, (img, (t, left, h, w)) in enumerate(zip(images, boxes.tolist())):
        out[i] = to_rgb(TF.resized_crop(img, t, left, h, w, [size, size], interpolation=mode, antialias=True))
    return out


def resize_each(images: Sequence[torch.Tensor], size: int | tuple[int, int], interpolation: str) -> list[torch.Tensor]:
    """torchvision's Resize per image: ``int`` = shorter side, ``(h, w)`` = exact size."""
    from torchvision.transforms.v2 import functional as TF

    mode = _interpolation(interpolation)
    target = [size] if isinstance(size, int) else list(size)
    return [TF.resize(img, target, interpolation=mode, antialias=True) for img in images]


def center_crops(images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """torchvision's CenterCrop(size) of each image (each at least ``size`` on both sides), stacked."""
    from torchvision.transforms.v2 import functional as TF

    return torch.stack([to_rgb(TF.center_crop(img, [size, size])) for img in images])


def random_crops(rng: np.random.Generator, images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """RandomCrop(size) of each image (uniform top-left), stacked: FRPT's paper augmentation."""
    heights = np.array([img.shape[-2] for img in images])
    widths = np.array([img.shape[-1] for img in images])
    top = (rng.random(len(images)) * (heights - size + 1)).astype(np.int64)
    left = (rng.random(len(images)) * (widths - size + 1)).astype(np.int64)
    return torch.stack([to_rgb(img[:, t : t + size, x : x + size]) for img, t, x in zip(images, top, left)])


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def flip(batch: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """Horizontal flip of the samples where ``mask`` is true."""
    if not mask.any():
        return batch
    chosen = to_device(mask, batch.device).view(-1, 1, 1, 1)
    return torch.where(chosen, batch.flip(-1), batch)


def _per_sample(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return to_device(values, like.device, like.dtype).view(-1, 1, 1, 1)


def _grey(batch: torch.Tensor) -> torch.Tensor:
    r, g, b = batch.unbind(1)
    return (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (ratio * a + (1 - ratio) * b).clamp_(0.0, 1.0)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.long() % 6
    # sector -> (r, g, b) picks among (v, p, q, t)
    table = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=x.device)
    choices = torch.stack([v, p, q, t], 1)
    index = table[sector].permute(0, 3, 1, 2)
    return choices.gather(1, index).clamp_(0.0, 1.0)


def color_jitter(batch: torch.Tensor, params: JitterParams) -> torch.Tensor:
    """Brightness, contrast, saturation and hue with per-sample factors, each sample in its own
    random order; samples not ``applied`` are unchanged. ``batch`` uint8 or float in [0, 255];
    returns float in [0, 255]."""
    if not params.applied.any():
        return batch
    x = batch.float() / 255.0
    neutral = ~params.applied
    factors = {
        0: np.where(neutral, 1.0, params.brightness),
        1: np.where(neutral, 1.0, params.contrast),
        2: np.where(neutral, 1.0, params.saturation),
        3: np.where(neutral, 0.0, params.hue),
    }
    for position in range(4):
        for op in range(4):
            picked = params.order[:, position] == op
            f = np.where(picked, factors[op], 0.0 if op == 3 else 1.0)
            if (op == 3 and not f.any()) or (op != 3 and (f == 1.0).all()):
                continue
            ratio = _per_sample(f, x)
            if op == 0:
                x = _blend(x, torch.zeros_like(x), ratio)
            elif op == 1:
                x = _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True), ratio)
            elif op == 2:
                x = _blend(x, _grey(x), ratio)
            else:
                hsv = _rgb_to_hsv(x)
                hsv[:, 0] = (hsv[:, 0] + ratio[:, 0]) % 1.0
                x = _hsv_to_rgb(hsv)
    return x * 255.0


def normalize(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[0, 255]`` -> ``(x / 255 - mean) / std``, the same float32 operations, in the same order,
    as torchvision's ToDtype(scale=True) + Normalize (bit-identical on the CPU pipeline's batches)."""
    return batch.float().mul_(1.0 / 255).sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def erase(batch: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    """Zero each sample's box ``(top, left, h, w)`` (empty boxes leave it unchanged)."""
    if not (boxes[:, 2] > 0).any():
        return batch
    size_h, size_w = batch.shape[-2:]
    t, left, h, w = to_device(boxes, batch.device).T.reshape(4, -1, 1, 1)
    rows = torch.arange(size_h, device=batch.device).view(1, -1, 1)
    cols = torch.arange(size_w, device=batch.device).view(1, 1, -1)
    inside = (rows >= t) & (rows < t + h) & (cols >= left) & (cols < left + w)
    return batch.masked_fill(inside[:, None], 0.0)
