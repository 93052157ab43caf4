"""``dmlbench benchmark``: the model step, the data path stage by stage, end to end, evaluation.

One record per (method, pipeline) with at least ``method``, ``img_s`` (the harness step on a
resident batch), ``peak_gb``, ``baseline_img_s`` (the plain timm loop, same process),
``pipeline_img_s`` (the data path alone), ``data_img_s`` (``train()`` end to end) and
``stages_ms`` (per-image host milliseconds: read, decode, augment, to_float_normalise,
collate_transfer, host_to_device, step, evaluation, logging); one ``evaluation`` record for the
retrieval timing; one ``plain_pipeline`` record for the torchvision ImageFolder pipeline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.bench.concurrency import concurrent_trials
from harness.bench.datapath import pipeline_throughput, plain_pipeline_throughput, stage_breakdown
from harness.bench.endtoend import cuda_syncs_per_step, end_to_end, evaluation_speed
from harness.bench.folders import SHAPES, make_folder
from harness.bench.step import measure_step
from harness.errors import UserError
from harness.runtime import pick_device
from methods import get_method

#: normalisation for the data-path timings (the values do not change the cost)
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class BenchOptions:
    methods: list[str]
    backbone: str
    image_size: int = 224
    batch_size: int = 64
    samples_per_class: int = 2
    steps: int = 20
    warmup: int = 5
    device: str = ""
    amp: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False
    end_to_end: bool = False
    folder: str = "cub"  # a shape of harness.bench.folders, or an existing image_folder path
    folder_scale: float = 1.0
    folder_size: tuple[int, int] | None = None
    workdir: Path = Path("benchmark-data")
    pipelines: list[str] = field(default_factory=lambda: ["auto"])
    epochs: int = 1
    workers: int = -1
    pipeline_batches: int = 20
    stage_images: int = 128
    eval_size: tuple[int, int] | None = None
    concurrent: list[int] = field(default_factory=list)  # K values of concurrent trials per device
    study_methods: list[str] = field(default_factory=list)
    study_trials: int = 2
    study_epochs: int = 1


def check(o: BenchOptions) -> None:
    """Every name checked before anything runs or is written."""
    for name in o.methods + o.study_methods:
        get_method(name)
    if any(k < 1 for k in o.concurrent):
        raise UserError(f"bad value {o.concurrent} for --concurrent: each K must be >= 1")
    bad = [p for p in o.pipelines if p not in ("auto", "cpu", "device", "legacy")]
    if bad:
        raise UserError(f"bad pipeline '{bad[0]}' for --pipelines; valid: auto, cpu, device, legacy")
    if o.end_to_end and o.folder not in SHAPES and not Path(o.folder).is_dir():
        raise UserError(f"bad value '{o.folder}' for --folder: not a shape ({', '.join(SHAPES)}) nor a folder")


def run_benchmark(o: BenchOptions) -> list[dict[str, Any]]:
    check(o)
    device = pick_device(o.device)
    records: list[dict[str, Any]] = []
    if o.eval_size:
        records.append({"kind": "evaluation", "device": str(device), **evaluation_speed(*o.eval_size, device)})
    steps = {
        m: measure_step(
            m,
            o.backbone,
            image_size=o.image_size,
            batch_size=o.batch_size,
            samples_per_class=o.samples_per_class,
            steps=o.steps,
            warmup=o.warmup,
            device=o.device,
            amp=o.amp,
            baseline=o.baseline,
            overrides=o.overrides,
        )
        for m in o.methods
    }
    if not o.end_to_end and not o.concurrent:
        return records + [{"kind": "method", **r} for r in steps.values()]
    dataset, root = folder_for(o)
    if o.concurrent:
        study_overrides = {k: v for k, v in o.overrides.items()}
        study_overrides.update(
            {
                "data.image_size": o.image_size,
                "data.resize_size": int(round(o.image_size * 256 / 224)),
                "data.batch_size": o.batch_size,
                "data.samples_per_class": o.samples_per_class,
            }
        )
        records += concurrent_trials(
            o.concurrent,
            "0" if device.type == "cuda" else "cpu",
            o.workdir / "concurrency",
            dataset=dataset,
            root=root,
            backbone=o.backbone,
            methods=o.study_methods or o.methods,
            trials=o.study_trials,
            epochs=o.study_epochs,
            overrides=study_overrides,
        )
    if not o.end_to_end:
        return records + [{"kind": "method", **r} for r in steps.values()]
    workers = o.workers if o.workers >= 0 else min(8, os.cpu_count() or 1)
    pipelines = [("device" if device.type == "cuda" else "cpu") if p == "auto" else p for p in o.pipelines]
    data_path = {
        p: data_path_figures(
            o.backbone,
            dataset,
            root,
            p,
            device,
            image_size=o.image_size,
            batch_size=o.batch_size,
            samples_per_class=o.samples_per_class,
            workers=workers,
            overrides=o.overrides,
            stage_images=o.stage_images,
            pipeline_batches=o.pipeline_batches,
        )
        for p in dict.fromkeys(pipelines)
    }
    if o.baseline:
        images = root / "images" if (root / "images").is_dir() else root
        cfg = _data_cfg(o, dataset, root, "cpu", workers)
        records.append(
            {
                "kind": "plain_pipeline",
                "pipeline": "torchvision ImageFolder + PIL + DataLoader",
                "workers": workers,
                "pipeline_img_s": round(
                    plain_pipeline_throughput(str(images), cfg, _MEAN, _STD, device, workers, o.pipeline_batches), 1
                ),
            }
        )
    for method, step in steps.items():
        for pipeline in dict.fromkeys(pipelines):
            record = {"kind": "method", **step, "folder": o.folder, **data_path[pipeline], "pipeline": pipeline}
            stages = dict(record.pop("stages"))
            stages["step"] = round(1000 / step["img_s"], 4)
            if pipeline != "legacy":
                e2e = end_to_end(
                    method,
                    o.backbone,
                    dataset,
                    root,
                    o.workdir / "stores",
                    pipeline=pipeline,
                    epochs=o.epochs,
                    image_size=o.image_size,
                    batch_size=o.batch_size,
                    samples_per_class=o.samples_per_class,
                    workers=workers,
                    device=o.device,
                    overrides=o.overrides,
                )
                stages["evaluation"] = e2e.pop("eval_ms_per_train_img")
                stages["logging"] = e2e.pop("log_ms_per_train_img")
                record.update(e2e)
                if device.type == "cuda" and method == o.methods[0]:  # the loop's and pipeline's syncs
                    record["syncs_per_step"] = cuda_syncs_per_step(
                        method,
                        o.backbone,
                        dataset,
                        root,
                        pipeline=pipeline,
                        image_size=o.image_size,
                        batch_size=o.batch_size,
                        samples_per_class=o.samples_per_class,
                        workers=workers,
                        overrides=o.overrides,
                    )
            record["stages_ms"] = stages
            records.append(record)
    return records


def folder_for(o: BenchOptions) -> tuple[str, Path]:
    if o.folder in SHAPES:
        size = f"-{o.folder_size[0]}x{o.folder_size[1]}" if o.folder_size else ""
        return make_folder(
            o.folder, o.workdir / f"{o.folder}-{o.folder_scale:g}{size}", scale=o.folder_scale, size=o.folder_size
        )
    root = Path(o.folder)
    return ("sop" if (root / "Info_Files").is_dir() else "image_folder"), root


def _data_cfg(o: BenchOptions, dataset: str, root: Path, pipeline: str, workers: int) -> Any:
    return data_config(
        o.backbone,
        dataset,
        root,
        pipeline,
        image_size=o.image_size,
        batch_size=o.batch_size,
        samples_per_class=o.samples_per_class,
        workers=workers,
        overrides=o.overrides,
    )


def data_config(
    backbone: str,
    dataset: str,
    root: Path,
    pipeline: str,
    *,
    image_size: int,
    batch_size: int,
    samples_per_class: int,
    workers: int,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """A run config of the generated folder, as the benchmark's data-path timings read it."""
    from harness.training.resolution import resolve

    return resolve(
        method="linear_probe",
        backbone=backbone,
        dataset=dataset,
        overrides={
            "data.root": str(root),
            "data.check_published": False,
            "data.pipeline": pipeline,
            "data.image_size": image_size,
            "data.resize_size": int(round(image_size * 256 / 224)),
            "data.batch_size": batch_size,
            "data.samples_per_class": samples_per_class,
            "data.num_workers": workers,
            "model.pretrained": False,
            **{k: v for k, v in (overrides or {}).items() if k.startswith(("data.", "model.backbone_kwargs"))},
        },
    )


def data_path_figures(
    backbone: str,
    dataset: str,
    root: Path,
    pipeline: str,
    device: torch.device,
    *,
    image_size: int,
    batch_size: int,
    samples_per_class: int,
    workers: int,
    overrides: dict[str, Any] | None = None,
    stage_images: int = 128,
    pipeline_batches: int = 20,
) -> dict[str, Any]:
    """The pipeline's per-image stage costs and its throughput without a model, and what decoded."""
    from harness import data
    from harness.training.setup import splits_for

    cfg = data_config(
        backbone,
        dataset,
        root,
        "cpu" if pipeline == "legacy" else pipeline,
        image_size=image_size,
        batch_size=batch_size,
        samples_per_class=samples_per_class,
        workers=workers,
        overrides=overrides,
    )
    splits = splits_for(cfg)
    files = splits.train.paths[:stage_images]
    out: dict[str, Any] = {
        "pipeline": pipeline,
        "stages": {
            k: round(v, 4)
            for k, v in stage_breakdown(files, cfg, _MEAN, _STD, device, pipeline, batch=batch_size).items()
        },
    }
    if pipeline != "legacy":
        batches = data.make_loaders(splits, cfg.data, cfg.seed, cfg.eval.batch_size, _MEAN, _STD, device)["train"]
        out["pipeline_img_s"] = round(pipeline_throughput(batches, pipeline_batches, device), 1)
        out["workers"] = workers
        out["decoder"] = batches.decoders()
    return out


def markdown(records: list[dict[str, Any]]) -> str:
    """The records as Markdown tables: methods, then stages per pipeline, then evaluation."""
    lines: list[str] = []
    methods = [r for r in records if r.get("kind") == "method"]
    if methods:
        for r in methods:  # the method-dependent stages as columns
            for stage in ("step", "evaluation", "logging"):
                if stage in r.get("stages_ms", {}):
                    r[f"{stage}_ms"] = r["stages_ms"][stage]
        cols = [
            "method",
            "pipeline",
            "img_s",
            "baseline_img_s",
            "step_vs_baseline",
            "pct_bf16_peak",
            "pipeline_img_s",
            "data_img_s",
            "eval_share",
            "peak_gb",
            "step_ms",
            "evaluation_ms",
            "logging_ms",
            "syncs_per_step",
        ]
        cols = [c for c in cols if any(c in r for r in methods)]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in methods]
        staged = {r["pipeline"]: r["stages_ms"] for r in methods if "stages_ms" in r}
        names = [
            n
            for n in dict.fromkeys(n for s in staged.values() for n in s)
            if n not in ("step", "evaluation", "logging")
        ]
        if staged:
            lines += [
                "",
                "| data path, host ms per image | " + " | ".join(staged) + " |",
                "|---|" + "---|" * len(staged),
            ]
            lines += [f"| {n} | " + " | ".join(_cell(s.get(n)) for s in staged.values()) + " |" for n in names]
            lines += [
                "| total | " + " | ".join(_cell(sum(s.get(n, 0.0) for n in names)) for s in staged.values()) + " |"
            ]
    runs = [r for r in records if r.get("kind") == "concurrency"]
    if runs:
        lines += [
            "",
            "| concurrent trials per device | trials | wall s | trained img/s | trials/min |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['k']} | {r['trials']}/{r['budget']} | {r['wall_s']} | {_cell(r['trained_img_s'])} | "
            f"{r['trials_per_min']} |"
            for r in runs
        ]
    for r in records:
        if r.get("kind") == "plain_pipeline":
            lines += ["", f"plain pipeline ({r['pipeline']}, {r['workers']} workers): {r['pipeline_img_s']:,} img/s"]
        if r.get("kind") == "evaluation":
            lines += [
                "",
                f"evaluation of {r['eval_n']:,} x {r['eval_dim']} on {r['device']}: {r['eval_s']} s, "
                f"peak {r['eval_peak_gb']} GB",
            ]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def write(records: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(records, indent=2))
    (out / "benchmark.md").write_text(markdown(records))
