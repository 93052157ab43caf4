"""What every stage of the GPU window shares: its sizes (the GPU's, or toy sizes for a CPU test),
its own deadline, one record per measurement, and the generated folders later stages reuse."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bench.records import Recorder, one_line

VIT = "vit_small_patch16_224"
#: the smoke stage builds ViT methods on this 2-block ViT-S at 32 px and CNN-only ones on this CNN;
#: an MLP as wide as the tokens, because peft's BOFT multiplies dense in_features-square matrices
#: every step: with ViT-S's 1,536-wide fc2, BOFT took 10 of the step stage's 31 s at toy sizes on a CPU
TOY_VIT = {"depth": 2, "mlp_ratio": 1}
SMOKE_VIT = {"img_size": 32, **TOY_VIT}
SMOKE_CNN = "resnet10t"
#: the end-to-end stage's representative methods: everything trains, biases only, the memory bank
E2E = (("full_finetune", {}), ("bitfit", {}), ("vptsp_g", {"method_args.memory_bank": True}))


@dataclass(frozen=True)
class Sizes:
    image: int
    batch: int
    steps: int
    warmup: int
    rounds: int = 2  # the step stage keeps the best of this many alternations with the plain loop
    vit_kwargs: dict = field(default_factory=dict)
    cub_scale: float = 1.0
    cub_size: tuple[int, int] | None = None
    sop_scale: float = 0.05
    sop_size: tuple[int, int] | None = None
    workers: int = 8
    eval_n: int = 60000
    eval_dim: int = 384
    ks: tuple[int, ...] = (1, 2, 4)
    study_scale: float = 0.25
    study_methods: tuple[str, ...] = ("bitfit", "lora")


FULL = Sizes(image=224, batch=64, steps=20, warmup=5)
TINY = Sizes(
    image=32,
    batch=16,
    steps=1,
    warmup=1,
    rounds=1,
    vit_kwargs=TOY_VIT,
    cub_scale=0.02,
    cub_size=(96, 72),
    sop_scale=0.002,
    sop_size=(64, 64),
    workers=0,
    eval_n=2000,
    eval_dim=64,
    ks=(1, 2),
    study_scale=0.02,
    study_methods=("bitfit",),
)


def time_left() -> float:
    """Seconds until the stage's own deadline (infinite when run by hand)."""
    deadline = os.environ.get("DMLBENCH_STAGE_DEADLINE")
    return float("inf") if not deadline else float(deadline) - time.time()


def say(line: str) -> None:
    print(line, flush=True)


def vit_methods() -> list[str]:
    from methods import get_method, method_names

    return [m for m in method_names() if get_method(m).applies_to("vit")]


def each(
    rec: Recorder,
    items: list,
    needs_s: float,
    body: Callable[[Any], dict[str, Any]],
    name: Callable[[Any], str] = str,
    **fields: Any,
) -> None:
    """``body(item)`` per item as one record: ok with its fields, failed with the error's line, or
    skipped once fewer than ``needs_s`` seconds are left before the stage's deadline."""
    for item in items:
        label = name(item)
        if time_left() < needs_s:
            rec.add(label, "skipped", "the stage's cap was reached before this measurement", **fields)
            say(f"{rec.stage} {label}: skipped (cap)")
            continue
        try:
            result = body(item)
        except Exception as exc:  # noqa: BLE001 - one method's failure is a finding, not the stage's end
            rec.add(label, "failed", exc, **fields)
            say(f"{rec.stage} {label}: failed: {one_line(exc)}")
            continue
        result.pop("method", None)
        rec.add(label, result.pop("status", "ok"), result.pop("error", None), **fields, **result)
        say(f"{rec.stage} {label}: ok " + ", ".join(f"{k}={v}" for k, v in list(result.items())[:4]))


def generated_folder(
    kind: str, sizes: Sizes, o: dict, scale: float | None = None, make: bool = True
) -> tuple[str, Path]:
    """The generated folder of this shape (written once, reused by later stages)."""
    from harness.bench.folders import SHAPES, make_folder

    scale = scale if scale is not None else (sizes.cub_scale if kind == "cub" else sizes.sop_scale)
    size = sizes.cub_size if kind == "cub" else sizes.sop_size
    suffix = f"-{size[0]}x{size[1]}" if size else ""
    root = Path(o["workdir"]) / f"{kind}-{scale:g}{suffix}"
    if not make:
        return SHAPES[kind].dataset, root
    return make_folder(kind, root, scale=scale, size=size)
