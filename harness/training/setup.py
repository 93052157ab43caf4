"""What the loop needs before its first step: seeding, device, model, optimiser and schedule."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from harness.models.backbones import Backbone, backbone_from
from harness.config import RunConfig
from harness.models.model import BuildContext, DMLModel
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
    fused = {"fused": True} if cfg.optim.fused and all(
        p.is_cuda and p.is_floating_point() for g in groups for p in g["params"]) else {}
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                               weight_decay=cfg.optim.weight_decay, **fused)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, **fused)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter],
                      grad_clip: float, scaler: torch.amp.GradScaler | None) -> None:
    """Backward, clip (``grad_clip`` > 0) and step. With fp16's scaler: a scaled backward, the
    true gradients clipped, the step skipped where they hold inf/NaN and the scale adapted."""
    if scaler is None:
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    scaler.step(optimizer)
    scaler.update()


def train_step(model: DMLModel, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               host_labels: np.ndarray, *, amp: Callable[[], Any], scaler: torch.amp.GradScaler | None,
               grad_clip: float, trainable: list[torch.nn.Parameter],
               from_features: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step as the loop (and the benchmark) runs it: the model's ``before_step`` with
    the batch's labels on the host, the loss under autocast (from cached features when
    ``from_features``), backward, clipping and the step, then ``after_step``. Returns the loss and
    the method's extra loss terms, still on the device."""
    model.before_step(optimizer, host_labels)
    with amp():
        if from_features:
            loss, extras = model.loss_from_features(images, labels), {}
        else:
            loss, extras = model.training_loss(images, labels)
    optimizer.zero_grad(set_to_none=True)
    backward_and_step(loss, optimizer, trainable, grad_clip, scaler)
    model.after_step(optimizer)
    return loss, extras


def prepare_for_device(model: DMLModel, cfg: RunConfig, device: torch.device) -> DMLModel:
    """channels_last for CNNs on CUDA (``model.channels_last``: tensor cores read NHWC without
    transposes) and ``torch.compile`` of the training forward (``optim.compile``). Sets
    ``model.channels_last`` so the data pipeline hands over batches in the same layout."""
    mode = cfg.model.channels_last
    model.channels_last = mode == "on" or (mode == "auto" and device.type == "cuda" and model.family == "cnn")
    if model.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.optim.compile != "off":
        model.training_loss = torch.compile(model.training_loss, mode=cfg.optim.compile,
                                            backend=cfg.optim.compile_backend)
    return model


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
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
