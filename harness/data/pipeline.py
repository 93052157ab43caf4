"""Batches ready for the model: normalised float images on the run's device, from either pipeline.

``data.pipeline``:

- ``cpu``: DataLoader workers read, decode (PIL) and crop/resize/flip/jitter each image and hand
  over **uint8** batches (4x less to move between processes than float32); the conversion to
  float, the normalisation and random erasing happen on the device (:class:`BatchTransform` with
  ``geometry=False``). Bit-identical to normalising in the workers.
- ``device``: workers (or the in-memory caches) only hand over the encoded files; the batch is
  decoded on the device (:mod:`harness.data.decode`, nvJPEG on CUDA) or taken from the
  decoded-pixel cache, and every per-sample augmentation runs there (:mod:`harness.data.augment`).

Either way :class:`Batches` prepares batch *b + 1* on a side stream while the model runs batch
*b* (timm's prefetcher), with pinned memory and non-blocking copies, and hands it over with an
event, so the training step never waits on the host. Augmentation parameters come from a numpy
generator seeded by (seed, split, epoch, batch): the same seed gives the same crops whatever the
number of workers, and a resumed run the same as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from harness.config import DataConfig
from harness.data import augment as A
from harness.data.decode import Decoder, PixelCache, as_encoded
from harness.data.table import ImageTable

#: the RandomResizedCrop scale/ratio of each train augmentation that uses one
_RRC = {"standard": ((0.08, 1.0), (3 / 4, 4 / 3)), "frpt_code": ((0.16, 1.0), (3 / 4, 4 / 3))}


def resolve_pipeline(requested: str, device: torch.device) -> str:
    """``auto`` is ``device`` on CUDA (the GPU decodes and augments), else ``cpu``."""
    if requested == "auto":
        return "device" if device.type == "cuda" else "cpu"
    return requested


@dataclass
class BatchTransform:
    """What a config asks of one split's images, applied to a whole batch on its device.

    ``geometry=False`` (the CPU pipeline): the batch arrives cropped as uint8 ``(B, 3, S, S)``;
    only normalisation and random erasing remain. Otherwise it takes the images (a list of uint8
    ``(C, H, W)`` of any sizes, or one uint8 ``(B, C, H, W)``) and does everything, per sample.
    """

    train: bool
    augment: str
    size: int
    resize: int
    test_resize: str
    erasing: float
    mean: torch.Tensor
    std: torch.Tensor
    geometry: bool = True

    @classmethod
    def from_config(
        cls,
        d: DataConfig,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        train: bool,
        geometry: bool,
    ) -> BatchTransform:
        return cls(
            train=train,
            augment=d.augment if train else "none",
            size=int(d.image_size),
            resize=int(d.resize_size),
            test_resize=d.test_resize,
            erasing=float(d.random_erasing) if train else 0.0,
            mean=torch.tensor(mean, dtype=torch.float32, device=device),
            std=torch.tensor(std, dtype=torch.float32, device=device),
            geometry=geometry,
        )

    def __call__(self, images: list[torch.Tensor] | torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        batch = self._geometry(images, rng) if self.geometry else images
        out = A.normalize(batch, self.mean, self.std)
        if self.erasing > 0:
            out = A.erase(out, A.sample_erasing(rng, len(out), self.size, self.size, self.erasing))
        return out

    def _geometry(self, images: list[torch.Tensor] | torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Crops, flips and colour jitter as the config's torchvision pipeline, one draw per sample."""
        aug, s, r = self.augment, self.size, self.resize
        if aug == "none":
            if self.test_resize == "square":
                return A.center_crops(self._resize_all(images, (r, r), "bicubic"), s)
            return A.center_crops(self._resize_all(images, r, "bilinear"), s)
        if aug == "frpt":  # Resize((R, R)), RandomCrop(S), flip, ColorJitter(0.25, 0.25, 0.25)
            batch = A.random_crops(rng, self._resize_all(images, (r, r), "bilinear"), s)
            batch = A.flip(batch, rng.random(len(batch)) < 0.5)
            return A.color_jitter(batch, A.sample_jitter(rng, len(batch), 0.25, 0.25, 0.25, 0.0))
        if aug == "frpt_code":  # Resize((R, R), bicubic) first, then the bicubic RandomResizedCrop
            images = self._resize_all(images, (r, r), "bicubic")
        interpolation = "bicubic" if aug == "frpt_code" else "bilinear"
        scale, ratio = _RRC[aug]
        heights = np.array([img.shape[-2] for img in images])
        widths = np.array([img.shape[-1] for img in images])
        boxes = A.sample_resized_crops(rng, heights, widths, scale, ratio)
        batch = A.crop_resize(images, boxes, s, interpolation)
        batch = A.flip(batch, rng.random(len(batch)) < 0.5)
        if aug == "frpt_code":  # RandomApply([ColorJitter(0.25, 0.25, 0.25, 0)], p=0.5)
            batch = A.color_jitter(batch, A.sample_jitter(rng, len(batch), 0.25, 0.25, 0.25, 0.0, p=0.5))
        return batch

    @staticmethod
    def _resize_all(
        images: list[torch.Tensor] | torch.Tensor, size: int | tuple[int, int], interpolation: str
    ) -> list[torch.Tensor] | torch.Tensor:
        if isinstance(images, torch.Tensor):  # one size for all: a single batched resize
            return A.resize_each([images], size, interpolation)[0]
        return A.resize_each(images, size, interpolation)


class SourceDataset(Dataset):
    """Items for the device pipeline: ``(encoded file, label, index)``, or ``(None, label, index)``
    when the pixels come from a cache on the device. Reading is all a worker does."""

    def __init__(self, table: ImageTable, encoded_cache: list[bytes] | None, with_files: bool) -> None:
        self.table, self.cache, self.with_files = table, encoded_cache, with_files

    def __len__(self) -> int:
        return len(self.table)

    @property
    def cache_bytes(self) -> int:
        return sum(len(b) for b in self.cache) if self.cache is not None else 0

    def read(self, i: int) -> torch.Tensor:
        from harness.data.images import read_file

        return as_encoded(self.cache[i] if self.cache is not None else read_file(self.table.paths[i]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, int]:
        return (self.read(i) if self.with_files else None), int(self.table.labels[i]), int(i)


def collate_sources(items: list[tuple[torch.Tensor | None, int, int]]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    files = [f for f, _, _ in items]
    return (
        None if files[0] is None else files,
        torch.tensor([y for _, y, _ in items]),
        torch.tensor([i for _, _, i in items]),
    )


class Batches:
    """Iterate a DataLoader's batches as ``(images, labels, index)`` with images normalised float
    ``(B, 3, S, S)`` and labels on ``device``, and ``index`` the batch's rows of the table as a
    NumPy array on the host (the training step reads the batch's labels there, with no sync); the
    next batch is prepared on a side stream."""

    def __init__(
        self,
        loader: DataLoader,
        transform: BatchTransform,
        device: torch.device,
        seed: int,
        split: int,
        table: ImageTable,
        *,
        decoder: Decoder | None = None,
        pixels: PixelCache | None = None,
        array: torch.Tensor | None = None,
        crop_to_box: bool = False,
    ) -> None:
        self.loader, self.transform, self.device = loader, transform, device
        self.seed, self.split, self.epoch = int(seed), int(split), 0
        self.table, self.decoder, self.pixels, self.array = table, decoder, pixels, array
        self.crop_to_box = crop_to_box
        self.channels_last = False  # hand batches over in NHWC (set for channels_last models)
        self.stream = (
            decoder.stream if decoder is not None else (torch.cuda.Stream(device) if device.type == "cuda" else None)
        )

    # what the loop and the checkpoints read off a loader
    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    @property
    def batch_sampler(self) -> Any:
        return self.loader.batch_sampler

    @property
    def generator(self) -> torch.Generator | None:
        return self.loader.generator

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        sampler = getattr(self.loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def decoders(self) -> str:
        """What decoded this split's images (``data/decoder/<split>``): ``nvjpeg``, ``cpu``,
        ``cpu-fallback`` (several joined by ``+``) for the device pipeline, from its decoder and its
        pixel cache's; ``cpu`` (PIL, in the loader workers) for the CPU pipeline; ``in-memory`` for
        arrays that are never decoded."""
        if self.table.array is not None:
            return "in-memory"
        if not self.transform.geometry:
            return "cpu"
        used = set(filter(None, (self.decoder.used() if self.decoder else "").split("+")))
        if self.pixels is not None:
            used |= set(filter(None, self.pixels.decoded_by.split("+")))
        return "+".join(sorted(used)) or "none yet"

    def rng(self, batch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.split, self.epoch, batch])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        pending = None
        for b, raw in enumerate(self.loader):
            ready = self._prepare(raw, b)
            if pending is not None:
                yield self._hand_over(pending)
            pending = ready
        if pending is not None:
            yield self._hand_over(pending)

    def images_at(self, index: Sequence[int]) -> torch.Tensor:
        """The transformed images of the given rows (figures; no prefetching)."""
        items = [self.loader.dataset[int(i)] for i in index]
        raw = self.loader.collate_fn(items)
        return self._hand_over(self._prepare(raw, 0))[0]

    # ------------------------------------------------------------------ internals
    def _prepare(self, raw: tuple[Any, torch.Tensor, torch.Tensor], b: int) -> tuple:
        payload, labels, index = raw
        index = index.numpy()  # the loader's own host tensor: no device involved
        rng = self.rng(b)
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with ctx:
            labels = A.to_device(labels.numpy(), self.device) if self.device.type == "cuda" else labels
            images = self.transform(self._source_images(payload, index), rng)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            event = None
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        return images, labels, index, event

    def _source_images(self, payload: Any, index: np.ndarray) -> list[torch.Tensor] | torch.Tensor:
        if not self.transform.geometry:  # CPU pipeline: a uint8 batch, cropped by the workers
            return A.to_device(payload, self.device) if self.device.type == "cuda" else payload
        rows = index.tolist()  # host indices of the batch
        if self.array is not None:  # same-size in-memory images (Fashion-MNIST): one gather
            images = self.array[A.to_device(index, self.device)]
            images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
            return self._boxes(list(images), rows) if self.crop_to_box else images
        if self.pixels is not None:
            images = self.pixels[rows]
        else:
            images = self.decoder(payload, [self.table.paths[i] for i in rows])
        return self._boxes(images, rows) if self.crop_to_box else images

    def _boxes(self, images: list[torch.Tensor], rows: list[int]) -> list[torch.Tensor]:
        from harness.data.images import box_pixels

        out = []
        for img, i in zip(images, rows):
            x0, y0, x1, y1 = box_pixels(self.table.boxes[i], img.shape[-2], img.shape[-1])
            out.append(img[..., y0:y1, x0:x1])
        return out

    def _hand_over(self, ready: tuple) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        images, labels, index, event = ready
        if event is not None:  # the consumer's stream waits for exactly this batch's preparation
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            images.record_stream(current)
            labels.record_stream(current)
        return images, labels, index
