"""What a run is about to do, and how far it is: the plan line before training, progress during it.

``dmlbench train`` says what it will train (images, epochs, device) and how long that should take,
estimated from two forward passes of a blank batch in eval mode (no random draw, no state changed:
a training step costs about three forward passes, an evaluated image one). During an epoch a
terminal shows a bar (step k/N, img/s, ETA); elsewhere (a log file, Slurm's output) a line is
printed every ``every_s`` seconds (``DMLBENCH_PROGRESS_EVERY_S``, 30). Only host counters are read:
no host-device sync.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from harness.runtime import synchronize


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@torch.no_grad()
def forward_seconds(run: Any) -> float:
    """Seconds of one inference forward of a training-sized blank batch (the second of two)."""
    d = run.cfg.data
    batch = torch.zeros(d.batch_size, 3, d.image_size, d.image_size, device=run.device)
    if run.model.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    run.model.eval()
    timings = []
    for _ in range(2):
        synchronize(run.device)
        start = time.perf_counter()
        with run.amp():
            run.model(batch)
        synchronize(run.device)
        timings.append(time.perf_counter() - start)
    return timings[-1]


#: a run estimated longer than this on the CPU gets a hint for a quick first result
LONG_ON_CPU_S = 900.0


def plan_line(run: Any) -> str:
    """``training M on D with B on DEVICE: N images x E epochs (...); about T``."""
    cfg, splits = run.cfg, run.splits
    steps = len(run.loaders["train"])
    images = steps * cfg.data.batch_size
    evaluated = sum(len(t) for t in (splits.val,) if t is not None)
    tested = sum(len(t) for t in (splits.test, splits.query, splits.gallery) if t is not None)
    per_epoch_eval = evaluated + (tested if cfg.eval.test_every_epoch else 0)
    forward = forward_seconds(run)
    per_image = forward / cfg.data.batch_size
    total = run.epochs * (steps * 3 * forward + per_epoch_eval * per_image) + tested * per_image
    device = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else str(run.device)
    line = (
        f"training {cfg.method} on {cfg.dataset} with {cfg.backbone} on {device}: {images:,} images x "
        f"{run.epochs} epoch(s), {evaluated:,} validation images per epoch, {tested:,} test images; "
        f"about {duration(total)} (estimated from a forward pass)"
    )
    if run.device.type == "cpu" and total > LONG_ON_CPU_S:  # the defaults are the GPU recipe's: say so
        line += (
            "\n  long for a CPU; a first result in minutes: --set data.max_per_class=100 --set optim.epochs=3 "
            "(Ctrl-C stops cleanly and prints the command that resumes)"
        )
    return line


class EpochProgress:
    """Wrap an epoch's batches: a bar on a terminal, else (with ``lines``) a line every ``every_s`` s."""

    def __init__(
        self,
        batches: Iterable,
        epoch: int,
        epochs: int,
        steps: int,
        batch_size: int,
        lines: bool,
        every_s: float | None = None,
    ) -> None:
        self.batches, self.epoch, self.epochs, self.steps = batches, epoch, epochs, steps
        self.batch_size, self.lines = batch_size, lines
        self.every_s = float(os.environ.get("DMLBENCH_PROGRESS_EVERY_S", "30")) if every_s is None else every_s

    def __iter__(self) -> Iterator[Any]:
        steps = self.steps
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            with tqdm(
                total=steps * self.batch_size,
                unit="img",
                unit_scale=True,
                leave=False,
                desc=f"epoch {self.epoch}/{self.epochs}",
            ) as bar:
                for batch in self.batches:
                    yield batch
                    bar.update(self.batch_size)
            return
        if not self.lines:  # studies: their own line per trial
            yield from self.batches
            return
        start = last = time.monotonic()
        for step, batch in enumerate(self.batches, start=1):
            yield batch
            now = time.monotonic()
            if now - last >= self.every_s and step < steps:
                rate = step * self.batch_size / (now - start)
                print(
                    f"epoch {self.epoch}/{self.epochs}: step {step}/{steps}, {rate:,.0f} img/s, "
                    f"ETA {duration((steps - step) * self.batch_size / rate)}",
                    flush=True,
                )
                last = now


def epoch_line(epochs: int) -> Callable[[int, dict[str, float]], None]:
    """One summary line per epoch: loss, validation (or test) R@1 and MAP@R, seconds."""

    def show(epoch: int, row: dict[str, float]) -> None:
        split = "val" if "val/recall_at_1" in row else "epoch_test"
        parts = [f"epoch {epoch}/{epochs}"]
        if "train/loss" in row:
            parts.append(f"loss {row['train/loss']:.4f}")
        if f"{split}/recall_at_1" in row:
            name = "val" if split == "val" else "test"
            parts.append(
                f"{name} R@1 {100 * row[f'{split}/recall_at_1']:.1f}  MAP@R {100 * row[f'{split}/map_at_r']:.1f}"
            )
        if "train/epoch_time_s" in row:
            parts.append(f"{row['train/epoch_time_s']:.1f} s")
        print("  ".join(parts), flush=True)

    return show
