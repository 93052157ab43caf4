"""Process and device helpers the rest of the harness stands on: Ctrl-C and SIGTERM at safe
points, the device (choosing, seeding, moving host values, memory), mixed precision, and counting
host-device syncs. It imports nothing of the project but :mod:`harness.errors`."""
from harness.runtime import interrupts
from harness.runtime.device import (
    peak_memory_gb,
    pick_device,
    reset_peak_memory,
    seed_everything,
    synchronize,
    system_sample,
    to_device,
)
from harness.runtime.precision import autocast_for, grad_scaler_for
from harness.runtime.syncs import SyncCounter, count_syncs, host_scalars

__all__ = [
    "SyncCounter", "autocast_for", "count_syncs", "grad_scaler_for", "host_scalars", "interrupts", "peak_memory_gb",
    "pick_device", "reset_peak_memory", "seed_everything", "synchronize", "system_sample", "to_device",
]
