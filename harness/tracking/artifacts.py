"""Run artifacts: the trainable weights (safetensors) and the per-run curves figure."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def log_artifacts(
    state: dict[str, torch.Tensor], history: list[dict[str, float]], weights: bool = True, title: str = ""
) -> None:
    """Trainable weights only (safetensors, unless ``weights`` is false) and a curves figure."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        if weights:
            path = Path(tmp) / "trainable.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
            log_whole(path)
        curves = Path(tmp) / "curves.png"
        plot_curves(history, curves, title)
        log_whole(curves)


def log_per_query(tables: dict) -> None:
    """``per_query/<name>.parquet``: one row per scored query of each evaluation (pandas frames
    from :meth:`harness.retrieval.PerQuery.frame`), the evidence the reports' intervals,
    paired tests and galleries are computed from."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, frame in tables.items():
            path = Path(tmp) / f"{name}.parquet"
            frame.to_parquet(path, index=False, compression="zstd")
            log_whole(path, "per_query")


def log_whole(path: Path, folder: str | None = None) -> None:
    """Log an artifact, or nothing: a copy cut short (a full disk) is removed from the store."""
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        mlflow.log_artifact(str(path), artifact_path=folder)
    except BaseException:
        try:
            name = f"{folder}/{path.name}" if folder else path.name
            get_artifact_repository(mlflow.get_artifact_uri()).delete_artifacts(name)
        except Exception:  # noqa: BLE001 - nothing was written, or the store is gone too
            pass
        raise


def plot_curves(history: list[dict[str, float]], path: Path, title: str = "") -> None:
    """Training loss, R@1 and MAP@R per epoch, each on its own axis (percent for retrieval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = [
        (axes[0], "training loss", [("train/loss", "train", 1.0)]),
        (axes[1], "R@1 (%)", [("val/recall_at_1", "validation", 100.0), ("epoch_test/recall_at_1", "test", 100.0)]),
        (axes[2], "MAP@R (%)", [("val/map_at_r", "validation", 100.0), ("epoch_test/map_at_r", "test", 100.0)]),
    ]
    for ax, name, series in panels:
        for key, label, scale in series:
            pts = [(h["epoch"], h[key] * scale) for h in history if key in h]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        ax.set(title=name, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=150, metadata={"Software": None})
    plt.close(fig)
