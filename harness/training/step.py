"""One optimiser step, as the loop and the benchmark take it.

The model's ``before_step`` gets the batch's labels on the host (a method plans its step there
without reading the device), the loss runs under autocast, then one backward path: the loss
scaled by the run's GradScaler (disabled, a no-op, unless ``optim.amp=fp16`` on CUDA), the true
gradients clipped (``optim.grad_clip`` > 0), the step (skipped by fp16's scaler where gradients hold
inf/NaN, its scale adapted), and the model's ``after_step``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from harness.models import DMLModel


def train_step(
    model: DMLModel,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    host_labels: np.ndarray,
    *,
    amp: Callable[[], Any],
    scaler: torch.amp.GradScaler,
    grad_clip: float,
    trainable: list[torch.nn.Parameter],
    from_features: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the loss and the method's extra loss terms, still on the device. ``from_features``:
    ``images`` are cached frozen features (the linear probe's feature cache)."""
    model.before_step(optimizer, host_labels)
    with amp():
        if from_features:
            loss, extras = model.loss_from_features(images, labels), {}
        else:
            loss, extras = model.training_loss(images, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    model.after_step(optimizer)
    return loss, extras
