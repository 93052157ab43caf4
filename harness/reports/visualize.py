"""Figures of trained runs: ``dmlbench visualize dpp`` (FRPT's Figure 3).

The DPP figure shows what the learned prompt does to test images: the original with a regular
grid, the saliency map A that drives the sampler, and the warped image with the same grid warped
by the same sampling grid, so magnified regions show as stretched cells. The model is rebuilt
from the run's own artifacts (``config.yaml`` + ``trainable.safetensors``), so the figure is of
exactly the checkpoint the run reported.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import UserError

#: regular grid lines drawn on the original image
GRID_CELLS = 8


def _download(client, run_id: str, name: str, dst: str) -> Path:
    try:
        return Path(client.download_artifacts(run_id, name, dst))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing artifact
        raise UserError(
            f"run {run_id} has no artifact '{name}' ({type(exc).__name__}); was it logged by dmlbench train?"
        ) from None


def _test_images(cfg, splits, backbone, n: int) -> torch.Tensor:
    """``n`` test images spread evenly over the evaluation split, with the test transform."""
    from harness import data

    cfg.data.num_workers = 0
    name = next((s for s in ("test", "query", "val") if getattr(splits, s) is not None), None)
    if name is None:
        raise UserError(f"dataset {cfg.dataset} has no evaluation split to draw images from")
    table = getattr(splits, name)
    batches = data.split_batches(
        table,
        cfg.data,
        cfg.seed,
        cfg.eval.batch_size,
        backbone.mean,
        backbone.std,
        torch.device("cpu"),
        "cpu",
        train=False,
        split=name,
    )
    idx = np.unique(np.linspace(0, len(table) - 1, num=min(n, len(table))).round().astype(int))
    return batches.images_at(idx.tolist())


def displayable(x: torch.Tensor, backbone: Any) -> np.ndarray:
    """Normalised ``(B, 3, H, W)`` images back to ``(B, H, W, 3)`` in [0, 1] for imshow."""
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def grid_lines(height: int, width: int, cells: int = GRID_CELLS) -> torch.Tensor:
    """``(1, 1, H, W)`` mask, 1 on a regular grid of ``cells`` x ``cells`` lines (1 px per 112 px)."""
    mask = torch.zeros(1, 1, height, width)
    t = max(1, round(min(height, width) / 112))
    for k in range(cells + 1):
        y = min(height - t, round(k * (height - 1) / cells))
        x = min(width - t, round(k * (width - 1) / cells))
        mask[..., y : y + t, :] = 1
        mask[..., :, x : x + t] = 1
    return mask


def _overlay(image: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """Blend red lines (mask in [0, 1]) into an ``(H, W, 3)`` image in [0, 1]."""
    a = np.clip(lines, 0, 1)[..., None]
    return image * (1 - a) + np.array([1.0, 0.1, 0.1]) * a


def draw_dpp_figure(
    images: np.ndarray,
    saliency: np.ndarray,
    warped: np.ndarray,
    lines: np.ndarray,
    warped_lines: np.ndarray,
    path: Path,
    title: str,
) -> None:
    """Three rows (original + grid, saliency A, warped + warped grid), one column per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(2.0 * n, 6.4), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(_overlay(images[i], lines))
        axes[1, i].imshow(images[i])
        axes[1, i].imshow(saliency[i], cmap="jet", alpha=0.5)
        axes[2, i].imshow(_overlay(warped[i], warped_lines[i]))
        for row in axes[:, i]:
            row.set_xticks([])
            row.set_yticks([])
    for row, label in enumerate(("original", "saliency A", "DPP-warped")):
        axes[row, 0].set_ylabel(label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_run_model(run_id: str, tracking_uri: str | None = None, need: Any = None) -> tuple[Any, Any, Any, Any, Any]:
    """Rebuild a run's model from its own artifacts: ``(client, cfg, splits, backbone, model)``.

    ``need(cfg)`` may raise a UserError before anything heavy is loaded (wrong method)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from safetensors.torch import load_file

    from harness.models import backbone_from
    from harness.runtime import seed_everything
    from harness.tracking.store import resolve_uri
    from harness.training.resolution import resolve
    from harness.training.setup import build_model, splits_for

    client = MlflowClient(tracking_uri=resolve_uri(tracking_uri or ""))
    try:
        client.get_run(run_id)
    except MlflowException:
        raise UserError(f"unknown MLflow run '{run_id}' in {resolve_uri(tracking_uri or '')}") from None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve(config_file=_download(client, run_id, "config.yaml", tmp))
        if need is not None:
            need(cfg)
        state = load_file(str(_download(client, run_id, "trainable.safetensors", tmp)))
    seed_everything(cfg.seed)  # as the loop does, so a random-init backbone is the run's own
    splits = splits_for(cfg)
    backbone = backbone_from(cfg)
    model = build_model(cfg, splits.train.num_classes, backbone)
    model.load_trainable_state_dict(state)
    model.eval()
    return client, cfg, splits, backbone, model


def visualize_dpp(run_id: str, n: int = 8, out_dir: Path | None = None, tracking_uri: str | None = None) -> Path:
    """Draw the DPP warps of ``n`` test images for MLflow run ``run_id``; log and return the PNG."""
    import torch.nn.functional as F

    if n < 1:
        raise UserError(f"bad value {n!r} for --n: must be >= 1")

    def need(cfg: Any) -> None:
        if not getattr(cfg.method_args, "use_dpp", False):
            raise UserError(
                f"run {run_id} used method '{cfg.method}' without a DPP; "
                "visualize dpp needs a run of frpt, frpt_dpp or frpt_no_in"
            )

    client, cfg, splits, backbone, model = load_run_model(run_id, tracking_uri, need)
    images = _test_images(cfg, splits, backbone, n)
    with torch.no_grad():
        out = model.prompt(images)
        h, w = images.shape[-2:]
        lines = grid_lines(h, w)
        warped_lines = model.dpp_prompt.sampler.resample(lines.expand(len(images), -1, -1, -1), out["grid"])
        saliency = F.interpolate(out["saliency"], size=(h, w), mode="bilinear", align_corners=False)

    def to_np(x: torch.Tensor) -> np.ndarray:
        return displayable(x, backbone)

    out_dir = Path(out_dir) if out_dir is not None else Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"dpp_{run_id}.png"
    draw_dpp_figure(
        to_np(images),
        saliency[:, 0].numpy(),
        to_np(out["images"]),
        lines[0, 0].numpy(),
        warped_lines[:, 0].numpy(),
        path,
        f"DPP of run {run_id[:12]} ({cfg.method}, {cfg.backbone}, {cfg.dataset})",
    )
    client.log_artifact(run_id, str(path))
    return path
