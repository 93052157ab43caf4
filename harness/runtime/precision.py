"""Mixed precision: which autocast a run uses and fp16's loss scaler.

CPU runs compute in fp32 whatever ``optim.amp`` says, so CPU results do not depend on CPU
autocast kernels; on CUDA ``bf16`` or ``fp16`` (with a dynamic GradScaler, as the FRPT and VPTSP-G
codes train). The scaler always exists: disabled it is a no-op, so the step has one backward path.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch


def autocast_for(device: torch.device, amp: str | bool) -> Callable[[], Any]:
    """A factory of autocast contexts on CUDA (``optim.amp``: bf16 or fp16), else of no-op
    contexts: CPU runs compute in fp32, so CPU results do not depend on CPU autocast kernels."""
    mode = ("bf16" if amp else "off") if isinstance(amp, bool) else amp
    if device.type == "cuda" and mode in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mode == "bf16" else torch.float16
        return lambda: torch.autocast(device.type, dtype=dtype)
    return nullcontext


def grad_scaler_for(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """fp16's dynamic loss scaler on CUDA, disabled (a no-op: the loss as it is, the plain step)
    for bf16, off and CPU runs. With the fused optimisers (``optim.fused``) the inf check stays on
    the device; torch's unfused step reads it on the host once per step."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and amp == "fp16")
