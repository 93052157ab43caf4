"""Run artifacts: the trainable weights (safetensors) and the per-run curves figure."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def log_artifacts(state: dict[str, torch.Tensor], history: list[dict[str, float]], weights: bool = True) -> None:
    """Trainable weights only (safetensors, unless ``weights`` is false) and a curves figure."""
    import mlflow
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        if weights:
            path = Path(tmp) / "trainable.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
            mlflow.log_artifact(str(path))
        curves = Path(tmp) / "curves.png"
        plot_curves(history, curves)
        mlflow.log_artifact(str(curves))


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    epochs = [h["epoch"] for h in history if "train_loss" in h]
    axes[0].plot(epochs, [h["train_loss"] for h in history if "train_loss" in h], marker="o")
    axes[0].set(title="training loss", xlabel="epoch")
    for key, label in (("val_recall_at_1", "val R@1"), ("val_map_at_r", "val MAP@R"), ("epoch_test_recall_at_1", "test R@1")):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=label)
    axes[1].set(title="retrieval", xlabel="epoch")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


