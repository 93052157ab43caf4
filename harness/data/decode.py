"""Decoding image files into uint8 ``(3, H, W)`` tensors on the run's device, and the decoded-pixel cache.

On CUDA, JPEGs are decoded in batches by nvJPEG through ``torchvision.io.decode_jpeg(list,
device="cuda")`` (the hardware JPEG engine on A100/H100, nvJPEG's CUDA path elsewhere).
torchvision's wrapper allocates the output on the caller's current stream but decodes on a
private stream that is not ordered after the caller's queued work (pytorch/vision#9606): memory
that the caller's stream freed while reads of it were still queued can be decoded into before
those reads run, and nvJPEG's hardware path has the same hazard on its own. Draining the caller's
stream before the call removes it (0 corrupted of 200 in the reports there). So the decode runs
on a dedicated stream of this pipeline, which is synchronised before each call: the host waits
only for the previous batch's decode and crops, never for the training step on the default
stream. torchcodec would add a dependency and needs the same barrier on the hardware path.

Other formats (PNG, ...) and JPEGs that nvJPEG refuses (CMYK, a failed batch) are decoded on the
CPU by torchvision and copied over. That is never silent: the decoder counts what actually ran per
batch (``nvjpeg``, ``cpu-fallback`` where nvJPEG was asked for and did not decode the batch, ``cpu``
where the CPU was asked for), the first fallback prints one warning line with its reason, and runs
log the result per split (``data/decoder/<split>``), benchmark records too. A file that no decoder
reads is a :class:`UserError` naming it.
"""

from __future__ import annotations

import io
import sys
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from harness.data.augment import to_rgb
from harness.errors import UserError


def is_jpeg(encoded: torch.Tensor) -> bool:
    return encoded.numel() > 2 and int(encoded[0]) == 0xFF and int(encoded[1]) == 0xD8


def as_encoded(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """A file's bytes as the 1-D uint8 CPU tensor torchvision's decoders take (one copy)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def image_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` from the file's header, without decoding its pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.height, im.width


class Decoder:
    """Decode lists of encoded files to uint8 ``(3, H, W)`` tensors on ``device``.

    ``on_device``: decode JPEGs with nvJPEG on a CUDA ``device`` (else libjpeg-turbo on the CPU,
    then copied over, which is also how the same code runs on CPU tensors).
    """

    def __init__(self, device: torch.device, on_device: bool = True, name: str = "") -> None:
        self.device, self.name = device, name
        self.gpu = device.type == "cuda" and on_device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.batches: Counter[str] = Counter()  # batches decoded, by the decoder that decoded them
        self.warned = False

    def used(self) -> str:
        """What decoded this decoder's batches so far: ``nvjpeg``, ``cpu``, ``cpu-fallback``, or
        several joined by ``+`` (``nvjpeg+cpu-fallback``); empty before the first batch."""
        return "+".join(sorted(self.batches))

    def _fell_back(self, reason: str) -> None:
        self.batches["cpu-fallback"] += 1
        if not self.warned:  # once per decoder: the count says how often
            self.warned = True
            where = f" ({self.name})" if self.name else ""
            print(
                f"dmlbench: warning: nvJPEG did not decode a batch{where}: {reason}; decoding it on the CPU "
                f"(recorded as cpu-fallback)",
                file=sys.stderr,
                flush=True,
            )

    def _decode_on_device(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        """nvJPEG on the pipeline's own stream, drained first (pytorch/vision#9606)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        self.stream.synchronize()  # nothing queued may read the output's memory
        with torch.cuda.stream(self.stream):
            return decode_jpeg(batch, mode=ImageReadMode.RGB, device=self.device)

    def stream_context(self):
        """The pipeline's own stream (a no-op on CPU)."""
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def __call__(self, encoded: Sequence[torch.Tensor], names: Sequence[str]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        out: list[torch.Tensor | None] = [None] * len(encoded)
        jpegs = [i for i, e in enumerate(encoded) if is_jpeg(e)]
        fallback = ""
        if jpegs:
            batch = [encoded[i] for i in jpegs]
            try:
                if self.gpu:
                    decoded = self._decode_on_device(batch)
                else:
                    decoded = [self._to_device(t) for t in decode_jpeg(batch, mode=ImageReadMode.RGB)]
            except RuntimeError as exc:  # a JPEG the batched decoder refuses (CMYK, corrupt): one by one below
                fallback = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            else:
                for i, img in zip(jpegs, decoded):
                    out[i] = img
        if self.gpu and len(jpegs) < len(encoded) and not fallback:
            fallback = f"{len(encoded) - len(jpegs)} of {len(encoded)} files are not JPEGs"
        for i, img in enumerate(out):
            if img is None:
                try:
                    out[i] = self._to_device(to_rgb(decode_image(encoded[i], mode=ImageReadMode.RGB)))
                except RuntimeError as exc:
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise UserError(f"unreadable image {names[i]} ({reason})") from None
        if self.gpu and fallback:
            self._fell_back(fallback)
        elif encoded:
            self.batches["nvjpeg" if self.gpu else "cpu"] += 1
        return out  # type: ignore[return-value]

    def _to_device(self, image: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return image.to(self.device)
        return image.pin_memory().to(self.device, non_blocking=True)


class PixelCache:
    """Every image of a table decoded once and kept on the device at its own resolution (crops
    are taken from the original pixels, as without a cache): no decoding after the first pass.
    Built only when the decoded size fits the budget (see :func:`decoded_bytes`)."""

    def __init__(self, images: list[torch.Tensor], decoded_by: str = "") -> None:
        self.images = images
        self.decoded_by = decoded_by  # the decoder(s) that filled the cache (Decoder.used)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self.images)

    def __getitem__(self, index: Sequence[int]) -> list[torch.Tensor]:
        return [self.images[i] for i in index]

    @classmethod
    def build(cls, read: callable, names: Sequence[str], decoder: Decoder, chunk: int = 256) -> PixelCache:
        """Decode ``read(i)`` (encoded tensors) for every index, ``chunk`` files per call."""
        images: list[torch.Tensor] = []
        with decoder.stream_context():
            for start in range(0, len(names), chunk):
                idx = range(start, min(start + chunk, len(names)))
                images.extend(t.contiguous() for t in decoder([read(i) for i in idx], [names[i] for i in idx]))
        if decoder.stream is not None:
            decoder.stream.synchronize()  # the cache is read on other streams from now on
        return cls(images, decoder.used())


def decoded_bytes(sizes: np.ndarray) -> int:
    """Bytes of uint8 RGB pixels for ``(N, 2)`` (height, width) sizes."""
    return int((np.asarray(sizes, np.int64).prod(axis=1) * 3).sum()) if len(sizes) else 0
