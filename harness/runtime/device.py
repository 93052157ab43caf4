"""The device a run uses: choosing it, seeding, moving host values onto it without a sync,
synchronising, and what it costs (peak memory, a per-epoch system sample)."""

from __future__ import annotations

import random
import resource
from pathlib import Path

import numpy as np
import torch


def pick_device(name: str) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:1", "mps"), or CUDA when there is one, else the CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators (the data order has its own: the sampler's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(
    values: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Host values onto the device without a host-device sync: a copy from pageable memory may
    synchronise with the stream, so on CUDA the values go through pinned memory."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device, non_blocking=True)
    return tensor.pin_memory().to(device, non_blocking=True)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: max allocated tensor memory; CPU: process peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def system_sample(device: torch.device) -> dict[str, float]:
    """One sample of the machine per epoch, under ``system/`` (MLflow's System metrics tab): the
    CPU use since the last sample, the process's memory and, on CUDA, the epoch's peak allocation.
    MLflow's own sampler runs every ``tracking.system_metrics_interval_s`` and gives a short run no
    point at all; this gives every trained run one per epoch. Host-side reads only: no sync."""
    import psutil

    out = {
        "system/epoch_cpu_utilization_percentage": psutil.cpu_percent(interval=None),
        "system/epoch_process_rss_gb": psutil.Process().memory_info().rss / 1e9,
    }
    if device.type == "cuda":
        out["system/epoch_gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out
