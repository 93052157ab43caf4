"""Generated JPEG folders shaped like the benchmark datasets, for end-to-end timing anywhere.

The pixels are synthetic (smooth gradients, a few shapes per class, mild noise) so the files
compress like photographs (tens of KB at quality 90, 4:2:0) and decode at a photograph's cost;
the shapes make classes separable, so a run also learns something. Shapes:

- ``cub``: 200 classes x 60 images of 500x375 in ``images/<class>/`` (read by the
  ``image_folder`` dataset: classes 1-100 train, 101-200 test), like CUB-200-2011's 11,788.
- ``sop``: 22,634 classes, 2-12 images each (mean ~5.3), sides 256-640 px, with SOP's
  ``Info_Files/Ebay_{train,test}.txt`` (read by the ``sop`` dataset): 120k images like SOP.

``scale`` shrinks the number of classes (tests, quick checks), ``size`` overrides the image size.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.errors import UserError


@dataclass(frozen=True)
class FolderShape:
    dataset: str  # the dataset spec that reads it
    classes: int
    per_class: tuple[int, int]  # inclusive range of images per class
    sizes: tuple[tuple[int, int], tuple[int, int]]  # (min w, max w), (min h, max h)


SHAPES = {
    "cub": FolderShape("image_folder", 200, (60, 60), ((500, 500), (375, 375))),
    "sop": FolderShape("sop", 22634, (2, 12), ((256, 640), (256, 640))),
}


#: photograph-like sensor noise, drawn once per process and cropped at a random place per image
#: (drawing 500x375x3 normal values per image cost most of the 21 ms an image took to write)
_NOISE: list[np.ndarray] = []


def _noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    if not _NOISE:
        _NOISE.append(np.random.default_rng(12345).normal(0, 6, (768, 768, 3)).astype(np.float32))
    tile = _NOISE[0]
    y, x = rng.integers(0, tile.shape[0] - height + 1), rng.integers(0, tile.shape[1] - width + 1)
    return tile[y : y + height, x : x + width]


def _image(rng: np.random.Generator, cls: int, width: int, height: int) -> bytes:
    """One JPEG: a class-coloured gradient with the class's shapes at jittered places."""
    from PIL import Image, ImageDraw

    crng = np.random.default_rng(cls)  # the class's look
    base, accent = crng.integers(30, 225, 3).astype(np.float32), crng.integers(0, 255, (3, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (
        np.cos(angle) * np.arange(width, dtype=np.float32)[None, :] / width
        + np.sin(angle) * np.arange(height, dtype=np.float32)[:, None] / height
    )[..., None]
    pixels = base + 60 * ramp + _noise(rng, height, width)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for k in range(3):
        cx, cy = (crng.uniform(0.2, 0.8, 2) + rng.normal(0, 0.05, 2)) * (width, height)
        r = crng.uniform(0.08, 0.2) * min(width, height) * rng.uniform(0.8, 1.2)
        box = (cx - r, cy - r * crng.uniform(0.5, 1.5), cx + r, cy + r * crng.uniform(0.5, 1.5))
        (draw.ellipse if k % 2 == 0 else draw.rectangle)(box, fill=tuple(int(v) for v in accent[k]))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_class(args: tuple[Path, str, int, list[tuple[int, int]], int]) -> list[str]:
    root, rel_dir, cls, sizes, seed = args
    rng = np.random.default_rng([seed, cls])
    (root / rel_dir).mkdir(parents=True, exist_ok=True)
    out = []
    for k, (w, h) in enumerate(sizes):
        rel = f"{rel_dir}/{cls:05d}_{k:02d}.jpg"
        (root / rel).write_bytes(_image(rng, cls, w, h))
        out.append(rel)
    return out


def make_folder(
    kind: str,
    root: str | Path,
    *,
    scale: float = 1.0,
    size: tuple[int, int] | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> tuple[str, Path]:
    """Write the folder (once: an existing complete folder is reused); returns (dataset, root)."""
    if kind not in SHAPES:
        raise UserError(f"unknown folder shape '{kind}'; valid: {', '.join(SHAPES)}")
    shape = SHAPES[kind]
    root = Path(root).expanduser()
    done = root / ".complete"
    if done.exists():
        return shape.dataset, root
    classes = max(2, int(round(shape.classes * scale)))
    rng = np.random.default_rng(seed)
    counts = rng.integers(shape.per_class[0], shape.per_class[1] + 1, classes)
    jobs = []
    for cls in range(classes):
        if size is not None:
            dims = [tuple(size)] * int(counts[cls])
        else:
            (w0, w1), (h0, h1) = shape.sizes
            dims = [(int(rng.integers(w0, w1 + 1)), int(rng.integers(h0, h1 + 1))) for _ in range(counts[cls])]
        rel_dir = f"images/{cls:05d}" if shape.dataset == "image_folder" else f"class_{cls:05d}"
        jobs.append((root, rel_dir, cls, dims, seed))
    workers = workers or min(16, os.cpu_count() or 1)
    if workers > 1 and classes > 8:
        with ProcessPoolExecutor(workers) as pool:
            files = list(pool.map(_write_class, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        files = [_write_class(job) for job in jobs]
    if shape.dataset == "sop":  # SOP's list files: first half of the classes train, the rest test
        info = root / "Info_Files"
        info.mkdir(parents=True, exist_ok=True)
        half = classes // 2
        for split, cls_range in (("train", range(0, half)), ("test", range(half, classes))):
            lines = ["image_id class_id super_class_id path"]
            for cls in cls_range:
                lines += [f"{len(lines)} {cls + 1} 1 {rel}" for rel in files[cls]]
            (info / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    done.write_text(f"{kind} scale={scale} size={size} seed={seed}\n")
    return shape.dataset, root
