"""Process and device helpers the rest of the harness stands on: Ctrl-C and SIGTERM at safe
points (:mod:`.interrupts`), the device (choosing, seeding, moving host values, memory:
:mod:`.device`), mixed precision (:mod:`.precision`) and counting host-device syncs
(:mod:`.syncs`). It imports nothing of the project but :mod:`harness.errors`.

The names load lazily (PEP 562): the command line takes :mod:`.interrupts` from here before any
torch import, so a typo in a key is answered without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "interrupts": "harness.runtime.interrupts",
    "peak_memory_gb": "harness.runtime.device",
    "pick_device": "harness.runtime.device",
    "reset_peak_memory": "harness.runtime.device",
    "seed_everything": "harness.runtime.device",
    "synchronize": "harness.runtime.device",
    "system_sample": "harness.runtime.device",
    "to_device": "harness.runtime.device",
    "autocast_for": "harness.runtime.precision",
    "grad_scaler_for": "harness.runtime.precision",
    "SyncCounter": "harness.runtime.syncs",
    "count_syncs": "harness.runtime.syncs",
    "host_scalars": "harness.runtime.syncs",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'harness.runtime' has no attribute {name!r}")
    module = importlib.import_module(_WHERE[name])
    return module if name == "interrupts" else getattr(module, name)
