"""Device-side measurement: peak memory, autocast and synchronisation, shared by loop and benchmark."""
from __future__ import annotations

import resource
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch


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


def autocast_for(device: torch.device, amp: str | bool) -> Callable[[], Any]:
    """A factory of autocast contexts on CUDA (``optim.amp``: bf16 or fp16), else of no-op
    contexts: CPU runs compute in fp32, so CPU results do not depend on CPU autocast kernels."""
    mode = ("bf16" if amp else "off") if isinstance(amp, bool) else amp
    if device.type == "cuda" and mode in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mode == "bf16" else torch.float16
        return lambda: torch.autocast(device.type, dtype=dtype)
    return nullcontext


def grad_scaler_for(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scaler (None for bf16, off and CPU runs). With the fused optimisers
    (``optim.fused``) the inf check stays on the device; torch's unfused step reads it on the host
    once per step."""
    return torch.amp.GradScaler(device.type) if device.type == "cuda" and amp == "fp16" else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)




def system_sample(device: torch.device) -> dict[str, float]:
    """One sample of the machine per epoch, under ``system/`` (MLflow's System metrics tab): the
    CPU use since the last sample, the process's memory and, on CUDA, the epoch's peak allocation.
    MLflow's own sampler runs every ``tracking.system_metrics_interval_s`` and gives a short run no
    point at all; this gives every trained run one per epoch. Host-side reads only: no sync."""
    import psutil

    out = {"system/epoch_cpu_utilization_percentage": psutil.cpu_percent(interval=None),
           "system/epoch_process_rss_gb": psutil.Process().memory_info().rss / 1e9}
    if device.type == "cuda":
        out["system/epoch_gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out
