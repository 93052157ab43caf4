"""The stages of the GPU window that train through ``train()`` (they need MLflow, the last one
Optuna too): end to end on the CUB-shaped folder, the SOP-shaped folder decoded every batch, and
concurrent trials of a shrunk study."""

from __future__ import annotations

import time
from pathlib import Path

from harness.bench.measuring import E2E, TINY, VIT, Sizes, each, generated_folder
from harness.bench.records import Recorder


def e2e(rec: Recorder, sizes: Sizes, o: dict) -> None:
    """The data path alone per pipeline, then train() end to end for the representative methods."""
    import torch

    from harness.bench.endtoend import cuda_syncs_per_step, end_to_end
    from harness.bench.run import data_path_figures

    started = time.monotonic()
    dataset, root = generated_folder("cub", sizes, o)
    rec.add("folder", kind="folder", dataset=dataset, seconds=round(time.monotonic() - started, 1))
    common = dict(image_size=sizes.image, batch_size=sizes.batch, samples_per_class=2, workers=sizes.workers)
    kwargs = {"model.backbone_kwargs": sizes.vit_kwargs} if sizes.vit_kwargs else {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    each(
        rec,
        ["cpu", "device"],
        5.0,
        lambda p: data_path_figures(VIT, dataset, root, p, device, overrides=kwargs, **common),
        name=lambda p: f"data path ({p})",
    )
    runs = [(m, extra, p) for m, extra in E2E for p in ("cpu", "device")]
    each(
        rec,
        runs,
        10.0,
        lambda r: end_to_end(
            r[0],
            VIT,
            dataset,
            root,
            Path(o["workdir"]) / "stores",
            pipeline=r[2],
            epochs=1,
            overrides={**kwargs, **r[1]},
            **common,
        ),
        name=lambda r: r[0] + (" (memory bank)" if r[1] else ""),
    )
    if device.type == "cuda":
        each(
            rec,
            ["bitfit"],
            10.0,
            lambda m: {
                "pipeline": "device",
                "syncs_per_step": cuda_syncs_per_step(
                    m, VIT, dataset, root, pipeline="device", overrides=kwargs, **common
                ),
            },
            name=lambda m: f"{m} syncs",
        )


def sop(rec: Recorder, sizes: Sizes, o: dict) -> None:
    """BitFit on a SOP-shaped folder with no pixel cache: every batch is decoded on the device."""
    from harness.bench.endtoend import end_to_end

    started = time.monotonic()
    dataset, root = generated_folder("sop", sizes, o)
    rec.add("folder", kind="folder", dataset=dataset, seconds=round(time.monotonic() - started, 1))
    kwargs = {"model.backbone_kwargs": sizes.vit_kwargs} if sizes.vit_kwargs else {}
    each(
        rec,
        ["bitfit"],
        10.0,
        lambda m: end_to_end(
            m,
            VIT,
            dataset,
            root,
            Path(o["workdir"]) / "stores",
            pipeline="device",
            epochs=1,
            image_size=sizes.image,
            batch_size=sizes.batch,
            samples_per_class=2,
            workers=sizes.workers,
            overrides={**kwargs, "data.pixel_cache_gb": 0},
        ),
    )


def concurrency(rec: Recorder, sizes: Sizes, o: dict) -> None:
    """A shrunk study with K = 1, 2, 4 concurrent trials per device, one record per K."""
    import torch

    from harness.bench.concurrency import concurrent_trial

    dataset, root = generated_folder("cub", sizes, o, scale=sizes.study_scale)
    device = "0" if torch.cuda.is_available() else "cpu"
    overrides = {
        "data.image_size": sizes.image,
        "data.resize_size": round(sizes.image * 256 / 224),
        "data.batch_size": sizes.batch,
        "data.samples_per_class": 2,
        "data.num_workers": sizes.workers,
    }
    if sizes.vit_kwargs:
        overrides["model.backbone_kwargs"] = sizes.vit_kwargs
    ks = [2] if sizes is TINY else [1, 2, 4]  # a CPU test: the spawned workers are the cost
    each(
        rec,
        ks,
        15.0,
        lambda k: concurrent_trial(
            k,
            device,
            Path(o["workdir"]) / "concurrency",
            dataset=dataset,
            root=root,
            backbone=VIT,
            methods=list(sizes.study_methods),
            trials=2,
            epochs=1,
            overrides=overrides,
        ),
        name=lambda k: f"K={k}",
    )
