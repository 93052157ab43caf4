"""``dmlbench visualize cam``: FRPT's Figure 4, class activation maps beside the DPP warps.

For test images (and, when the run has a DPP, their warped versions) it draws three maps over the
last feature map of the frozen backbone:

- **pretrained backbone**: its activation map (channel mean of the final feature map: the
  backbone is loaded without its ImageNet classifier, so there is no class to explain);
- **FRPT without CAH**: Grad-CAM of the run's top-scoring training class with the CAH bypassed
  (pooled frozen features -> the run's head and classifier);
- **FRPT**: the same with the run's CAH in place.

Grad-CAM (Selvaraju et al.) weights each channel by the mean gradient of the class score, so it
works whatever sits between the feature map and the classifier (CAH mixing, GeM, a BN neck). Test
classes are disjoint from training classes in retrieval, hence the top-scoring training class.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness.errors import UserError
from harness.reports.figures import _save
from harness.reports.visualize import _test_images, displayable, load_run_model


def normalised(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, h, w)`` maps upsampled to ``size`` and scaled to [0, 1] per image."""
    up = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values.view(-1, 1, 1)
    hi = up.flatten(1).max(1).values.view(-1, 1, 1)
    return (up - lo) / (hi - lo).clamp_min(1e-12)


def grad_cam(fmap: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Grad-CAM of the top-scoring class: ``relu(sum_k mean(d score / d A_k) * A_k)``, ``(B, h, w)``."""
    fmap = fmap.detach().requires_grad_(True)
    logits = score(fmap)
    top = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (grads,) = torch.autograd.grad(top, fmap)
    return F.relu((grads.mean(dim=(2, 3), keepdim=True) * fmap).sum(1)).detach()


def cam_maps(model: Any, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three maps of :mod:`this module <harness.reports.cam>` for ``images``, ``(B, H, W)`` each."""

    def classify(x: torch.Tensor) -> torch.Tensor:
        return F.linear(model.head(model.pool_map(x)), model.criterion.classifier.weight)

    size = images.shape[-2:]
    with torch.no_grad():
        fmap = model.feature_map(images)  # through the loaded model: no import of the method's code
    maps = {"pretrained backbone": normalised(fmap.mean(1), size)}
    if model.cah_head is not None:
        maps["FRPT without CAH"] = normalised(grad_cam(fmap, classify), size)
        maps["FRPT"] = normalised(grad_cam(fmap, lambda x: classify(model.cah_head(x))), size)
    else:
        maps["this run"] = normalised(grad_cam(fmap, classify), size)
    return maps


def draw_cam_figure(rows: list[tuple[str, np.ndarray, dict[str, np.ndarray]]], path: Path, title: str) -> None:
    """One row per (image, original|warped): the image, then each map over it."""
    from harness.reports.style import report_style

    columns = ["image", *rows[0][2]]
    with report_style() as plt:
        fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.9 * len(columns), 1.9 * len(rows)), squeeze=False)
        for r, (label, image, maps) in enumerate(rows):
            axes[r, 0].imshow(image)
            axes[r, 0].set_ylabel(label, fontsize=7)
            for c, name in enumerate(maps, start=1):
                axes[r, c].imshow(image)
                axes[r, c].imshow(maps[name], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        for c, name in enumerate(columns):
            axes[0, c].set_title(name, fontsize=8, loc="center")
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        _save(fig, path)


def visualize_cam(run_id: str, n: int = 4, out_dir: Path | None = None, tracking_uri: str | None = None) -> Path:
    """Draw FRPT's Figure 4 for ``n`` test images of run ``run_id``; log and return the PNG."""
    if n < 1:
        raise UserError(f"bad value {n!r} for --n: must be >= 1")

    def need(cfg: Any) -> None:
        if not cfg.method.startswith("frpt") or cfg.loss.name != "cross_entropy":
            raise UserError(
                f"run {run_id} is a '{cfg.method}' run with loss '{cfg.loss.name}'; visualize cam "
                "needs an FRPT run with its classifier (frpt, frpt_dpp, frpt_cah, frpt_no_in, ...)"
            )

    client, cfg, splits, backbone, model = load_run_model(run_id, tracking_uri, need)
    images = _test_images(cfg, splits, backbone, n)
    with torch.no_grad():
        warped = model.prompt(images)["images"] if model.dpp_prompt is not None else None

    def to_np(x: torch.Tensor) -> np.ndarray:
        return displayable(x, backbone)

    variants = [("original", images)] + ([("DPP-warped", warped)] if warped is not None else [])
    drawn = {label: (to_np(x), {k: v.numpy() for k, v in cam_maps(model, x).items()}) for label, x in variants}
    rows = [
        (f"{i + 1}: {label}", drawn[label][0][i], {k: v[i] for k, v in drawn[label][1].items()})
        for i in range(len(images))
        for label, _ in variants
    ]
    out_dir = Path(out_dir) if out_dir is not None else Path.cwd()
    path = out_dir / f"cam_{run_id}.png"
    draw_cam_figure(
        rows, path, f"Class activation maps, run {run_id[:12]} ({cfg.method}, {cfg.backbone}, {cfg.dataset})"
    )
    client.log_artifact(run_id, str(path))
    client.log_artifact(run_id, str(path.with_suffix(".pdf")))
    return path
