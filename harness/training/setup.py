"""Everything a run needs before its first step, and every check of its input.

:func:`prepare` reads and carves the data, builds the backbone and the method's model on the
device (:func:`build_model`, :func:`prepare_for_device`), the loaders, the optimiser and its
schedule (:func:`make_optimizer`, :func:`make_scheduler`), and checks what would otherwise fail
half-way (the images decode, the checkpoint folder is writable, the store answers). Nothing is
created in MLflow here: bad input is one line and exit 2 with nothing half-written.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch

from harness import data
from harness.config import RunConfig
from harness.models import Backbone, BuildContext, DMLModel, backbone_from
from harness.retrieval import prepare_transfer
from harness.runtime import autocast_for, grad_scaler_for, pick_device, seed_everything
from harness.tracking import store as tracking
from harness.training import checkpoint
from harness.training.state import Run
from methods import get_method


def build_model(cfg: RunConfig, num_classes: int, backbone: Backbone | None = None) -> DMLModel:
    """Backbone with its weights, then the method's builder (seeded, so heads init the same)."""
    if backbone is None:
        backbone = backbone_from(cfg)
    spec = get_method(cfg.method)
    torch.manual_seed(cfg.seed)
    return spec.builder(BuildContext(backbone=backbone, num_classes=num_classes, cfg=cfg), cfg.method_args)


def make_optimizer(model: DMLModel, cfg: RunConfig) -> torch.optim.Optimizer | None:
    """SGD or AdamW over the model's parameter groups; on CUDA the fused kernels (one launch
    for all parameters, ``optim.fused``), elsewhere torch's default implementation."""
    groups = [g for g in model.param_groups(cfg.optim, cfg.loss) if g["params"]]
    if not groups:
        return None
    for g in groups:
        g.setdefault("schedule", cfg.optim.schedule)
    fused = (
        {"fused": True}
        if cfg.optim.fused and all(p.is_cuda and p.is_floating_point() for g in groups for p in g["params"])
        else {}
    )
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay, **fused
        )
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, **fused)


def prepare_for_device(model: DMLModel, cfg: RunConfig, device: torch.device) -> DMLModel:
    """channels_last for CNNs on CUDA and the CPU (``model.channels_last``: tensor cores and
    oneDNN's convolutions read NHWC without transposes; on 2 CPU cores the demo's EfficientNet-Lite0
    runs train 1.1-1.8x faster, README "Reproducibility and speed") and ``torch.compile`` of the
    training forward (``optim.compile``). Sets ``model.channels_last`` so the data pipeline hands
    over batches in the same layout. The layout changes float rounding only, not the computation."""
    mode = cfg.model.channels_last
    nhwc_device = device.type in ("cuda", "cpu")
    model.channels_last = mode == "on" or (mode == "auto" and nhwc_device and model.family == "cnn")
    cfg.model.channels_last = "on" if model.channels_last else "off"  # the run records what it used
    if model.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.optim.compile != "off":
        model.training_loss = torch.compile(
            model.training_loss, mode=cfg.optim.compile, backend=cfg.optim.compile_backend
        )
    return model


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: RunConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-group multipliers of each group's own lr: linear warmup (from ``warmup_factor``), then the
    group's schedule (cosine, step or constant) with the floor ``min_lr`` (CosineAnnealingLR's
    ``eta_min``: cosine anneals to it, step never goes below it). ``schedule_unit="epoch"`` moves
    the schedule once per epoch, as the released codes' per-epoch ``scheduler.step()`` does."""
    o = cfg.optim
    warmup = o.warmup_steps or int(o.warmup_epochs * steps_per_epoch)
    epochs = o.cosine_epochs or o.epochs
    period = max(1, epochs * steps_per_epoch - warmup)

    def factor(kind: str, base: float) -> Callable[[int], float]:
        floor = min(o.min_lr, base) / base if base > 0 else 0.0

        def f(step: int) -> float:
            if step < warmup:
                return o.warmup_factor + (1.0 - o.warmup_factor) * (step + 1) / warmup
            if kind == "cosine":
                if o.schedule_unit == "epoch":  # as torch's CosineAnnealingLR: past T_max it rises again
                    t = (step // steps_per_epoch) / max(1, epochs)
                else:
                    t = min(1.0, (step - warmup) / period)
                return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
            if kind == "step":
                return max(floor, o.step_gamma ** ((step // steps_per_epoch) // o.step_epochs))
            return 1.0

        return f

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [factor(g["schedule"], g["lr"]) for g in optimizer.param_groups]
    )


def splits_for(cfg: RunConfig) -> data.Splits:
    """The run's splits: ``cfg.dataset`` carved by ``cfg.data`` and ``cfg.seed`` (SPECS 1)."""
    return data.load_splits(cfg.dataset, cfg.data, cfg.seed, cfg.eval.ks)


def prepare(cfg: RunConfig) -> Run:
    """Data, backbone, model, loaders, optimiser and schedule; raises on any bad input."""
    import mlflow

    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    splits = splits_for(cfg)
    if cfg.data.verify_images:
        data.verify_splits(splits)
    backbone = backbone_from(cfg)
    # a copy of the backbone is taken before the method changes it (random-init backbones have no other)
    transfers = prepare_transfer(
        cfg.eval.transfer if cfg.eval.test else [],
        cfg.dataset,
        cfg.data,
        cfg.seed,
        cfg.eval.batch_size,
        cfg.model.backbone_kwargs,
        backbone,
        device,
    )
    model = prepare_for_device(build_model(cfg, splits.train.num_classes, backbone).to(device), cfg, device)
    tracking.configure(cfg.tracking.uri, cfg.tracking.experiment or cfg.dataset)
    checkpoints = checkpoint.checkpoint_dir(mlflow.get_tracking_uri(), cfg.tracking.checkpoint_dir)
    checkpoint.ensure_writable(checkpoints)  # not after the first epoch, with a run half-made
    cfg.data.pipeline = data.resolve_pipeline(cfg.data.pipeline, device)  # the run records what it used
    loaders = data.make_loaders(splits, cfg.data, cfg.seed, cfg.eval.batch_size, backbone.mean, backbone.std, device)
    for batches in loaders.values():  # batches arrive in the model's memory layout
        batches.channels_last = model.channels_last
    if cfg.optim.epochs == 0:  # evaluate only: nothing is trained, so nothing counts as trainable
        for p in model.parameters():
            p.requires_grad_(False)
    counts = model.count_parameters()
    backbone_params = sum(p.numel() for p in backbone.model.parameters())
    for key in ("params/trainable", "params/trainable_inference"):  # share of the backbone's size
        counts[f"{key}_share"] = counts[key] / backbone_params
    optimizer = make_optimizer(model, cfg)
    return Run(
        cfg=cfg,
        device=device,
        splits=splits,
        backbone=backbone,
        model=model,
        loaders=loaders,
        ks=tuple(cfg.eval.ks) or tuple(splits.ks),
        amp=autocast_for(device, cfg.optim.amp),
        counts=counts,
        facts=data_facts(cfg, splits, loaders),
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg, len(loaders["train"])) if optimizer else None,
        epochs=cfg.optim.epochs if optimizer is not None else 0,
        checkpoints=checkpoints,
        scaler=grad_scaler_for(device, cfg.optim.amp if optimizer else "off"),
        transfer=transfers,
    )


def data_facts(cfg: RunConfig, splits: data.Splits, loaders: dict[str, data.Batches]) -> dict[str, float]:
    """Constants of the run's data (params): classes sampled with replacement, and what the
    caches hold (the encoded files in memory, the decoded pixels on the device)."""
    m = cfg.data.samples_per_class  # classes smaller than m are sampled with replacement: say so
    small = int((np.bincount(splits.train.labels) < m).sum()) if m else 0
    if small:
        warnings.warn(
            f"{small} training classes have fewer than data.samples_per_class={m} images; "
            "their images are drawn with replacement (logged as data/classes_below_samples_per_class)",
            stacklevel=2,
        )
    return {
        "data/classes_below_samples_per_class": small,
        "data/cache_gb": round(sum(getattr(ld.dataset, "cache_bytes", 0) for ld in loaders.values()) / 1e9, 3),
        "data/pixel_cache_gb": round(sum(ld.pixels.nbytes for ld in loaders.values() if ld.pixels) / 1e9, 3),
    }
