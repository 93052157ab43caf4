"""The ``dmlbench benchmark`` sub-command: its options and what it prints (imports stay light)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    b = sub.add_parser("benchmark", help="model step, data path stage by stage, end to end, evaluation speed")
    b.add_argument("--methods", default="full_finetune,linear_probe,bitfit")
    b.add_argument("--backbone", default="tf_efficientnet_lite0")
    b.add_argument("--image-size", type=int, default=224)
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--samples-per-class", type=int, default=2)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--device", default="")
    b.add_argument("--no-amp", action="store_true")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument(
        "--baseline",
        action="store_true",
        help="also time a plain timm loop (and, end to end, a plain torchvision ImageFolder pipeline)",
    )
    b.add_argument(
        "--end-to-end",
        action="store_true",
        help="train() on a generated JPEG folder: data path stages, pipeline and end-to-end img/s",
    )
    b.add_argument("--folder", default="cub", help="folder shape (cub: 200x60 of 500x375; sop: SOP-sized) or a path")
    b.add_argument("--folder-scale", type=float, default=1.0, help="fraction of the shape's classes to generate")
    b.add_argument("--folder-size", default="", metavar="WxH", help="image size instead of the shape's")
    b.add_argument("--workdir", default="benchmark-data", help="generated folders and the benchmark's MLflow store")
    b.add_argument("--pipelines", default="auto", help="comma-separated: auto, cpu, device, legacy (stages only)")
    b.add_argument("--epochs", type=int, default=1, help="end-to-end epochs")
    b.add_argument("--workers", type=int, default=-1, help="loader workers (-1: one per core, at most 8)")
    b.add_argument("--eval-size", default="", metavar="NxD", help="time exact MAP@R of N embeddings of dim D")
    b.add_argument(
        "--concurrent",
        default="",
        metavar="K,...",
        help="run a shrunk study with K concurrent trials per device for each K (e.g. 1,2,4)",
    )
    b.add_argument("--study-methods", default="", help="methods of that study (default: --methods)")
    b.add_argument("--study-trials", type=int, default=2, help="trials per method in that study")
    b.add_argument("--study-epochs", type=int, default=1, help="epochs per trial in that study")
    b.add_argument("--out", default="", help="write benchmark.json and benchmark.md into this folder")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=run)
    return b


def _pair(text: str, what: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"bad value '{text}' for {what}: expected AxB, e.g. 500x375") from None
    return a, b


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"bad value '{text}' for {what}: expected integers like 1,2,4") from None


def run(args: argparse.Namespace) -> int:
    from harness.bench.run import BenchOptions, markdown, run_benchmark, write
    from harness.config import parse_overrides

    options = BenchOptions(
        methods=[m for m in args.methods.split(",") if m],
        backbone=args.backbone,
        image_size=args.image_size,
        batch_size=args.batch_size,
        samples_per_class=args.samples_per_class,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        amp=not args.no_amp,
        overrides=parse_overrides(args.set),
        baseline=args.baseline,
        end_to_end=args.end_to_end,
        folder=args.folder,
        folder_scale=args.folder_scale,
        folder_size=_pair(args.folder_size, "--folder-size"),
        workdir=Path(args.workdir),
        pipelines=[p for p in args.pipelines.split(",") if p],
        epochs=args.epochs,
        workers=args.workers,
        eval_size=_pair(args.eval_size, "--eval-size"),
        concurrent=_ints(args.concurrent, "--concurrent"),
        study_methods=[m for m in args.study_methods.split(",") if m],
        study_trials=args.study_trials,
        study_epochs=args.study_epochs,
    )
    records = run_benchmark(options)
    if args.out:
        write(records, Path(args.out))
    print(json.dumps(records, indent=2) if args.json else markdown(records), end="")
    return 0
