"""Per-epoch checkpoints, so a killed or failed run continues in the same MLflow run.

A checkpoint holds everything the next epoch depends on: the trainable state (parameters and
saved buffers), the optimiser and schedule, every random generator (Python, NumPy, torch CPU and
CUDA, the train loader's generator), the best-so-far epoch and state, the per-epoch history and
the throughput counters. With the same seed on CPU a resumed run equals an uninterrupted one bit
for bit. The file lives beside the store (``<dir of mlflow.db>/checkpoints/<run id>.pt``, or
``~/.cache/dmlbench/checkpoints`` for a server store; ``tracking.checkpoint_dir`` moves it), its
path is the run's ``dmlbench.checkpoint`` tag, and it is deleted when the run finishes unless
``tracking.keep_checkpoints`` is set.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import UserError


def checkpoint_dir(tracking_uri: str, configured: str = "") -> Path:
    if configured:
        return Path(configured).expanduser()
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.endswith(":memory:"):
        return Path(tracking_uri.removeprefix("sqlite:///")).parent / "checkpoints"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dmlbench" / "checkpoints"


def rng_state(loader_generator: torch.Generator | None) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }


def _numpy_state() -> tuple:
    """NumPy's legacy generator state with its key array as a tensor (loadable with weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and state["loader"] is not None:
        loader_generator.set_state(state["loader"])


def save(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a kill during the write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path, run_id: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"run {run_id} has no checkpoint at {path}; it finished, or it was started "
                        "before checkpoints existed, or the file was removed")
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
