"""Pinning study worker processes to devices: ``study run --devices 0,1 --workers-per-device K``."""

from __future__ import annotations

import os

from harness.errors import UserError
from harness.studies.spec import StudySpec


def place(spec: StudySpec, placement: tuple[str, int] | None) -> StudySpec:
    """Pin this worker process to one device of ``--devices``: a GPU index is made the only
    visible GPU (before CUDA starts in this process), ``cpu`` keeps it off the GPU; the K workers
    sharing a device split its pixel-cache budget (``DMLBENCH_PROCS_PER_DEVICE``)."""
    if placement is None:
        return spec
    device, per_device = placement
    os.environ["DMLBENCH_PROCS_PER_DEVICE"] = str(per_device)
    if device == "cpu":
        spec.overrides["device"] = "cpu"
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        spec.overrides["device"] = "cuda"
    return spec


def parse_devices(devices: str | None, workers_per_device: int) -> list[str] | None:
    """``--devices 0,1`` / ``--devices cpu`` -> one entry per worker process (each device K times)."""
    if not devices:
        return None
    if workers_per_device < 1:
        raise UserError(f"bad value {workers_per_device!r} for --workers-per-device: must be >= 1")
    names = [d.strip() for d in devices.split(",") if d.strip()]
    bad = [d for d in names if d != "cpu" and not d.isdigit()]
    if bad or not names:
        raise UserError(f"bad value {devices!r} for --devices; valid: GPU indices (0,1,...) or cpu")
    gpus = [d for d in names if d != "cpu"]
    if gpus:
        import torch

        visible = torch.cuda.device_count()
        missing = [d for d in gpus if int(d) >= visible]
        if missing:
            raise UserError(
                f"bad value {devices!r} for --devices: GPU {missing[0]} does not exist "
                f"(this machine has {visible} visible GPU(s)); valid: 0..{visible - 1} or cpu"
            )
    return [d for d in names for _ in range(workers_per_device)]
