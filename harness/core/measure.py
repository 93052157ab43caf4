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


def autocast_for(device: torch.device, enabled: bool) -> Callable[[], Any]:
    """A factory of bf16 autocast contexts on CUDA (when enabled), else of no-op contexts."""
    if enabled and device.type == "cuda":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


