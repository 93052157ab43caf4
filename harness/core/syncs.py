"""Counting host-device synchronisations without a GPU.

On CUDA an op syncs the host with the device when the host needs a value or a size that only the
device knows: reading a scalar (``.item()``, ``bool(t)``, ``float(t)``), data-dependent output
sizes (``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing, ``bincount``,
``repeat_interleave`` without an output size) and comparisons returning a Python bool. Those ops
dispatch the same on CPU tensors, so :class:`SyncCounter` (a ``TorchDispatchMode``) counts them
in a CPU run; where CUDA exists, ``torch.cuda.set_sync_debug_mode`` checks the same thing at the
driver (benchmarks/gpu.sh).

Scalars that live on the host in a CUDA run too (the optimiser's ``step`` counters when not
capturable/fused) are not syncs; pass them as ``ignore``.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
#: ops whose result the host needs before it can go on
SYNC_OPS = {
    _aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default,
    _aten.nonzero.default, _aten.masked_select.default, _aten.bincount.default,
    _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default,
    _aten.repeat_interleave.Tensor,
}
#: ops that sync only with a boolean index (they run nonzero first)
_MASK_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}


class SyncCounter(TorchDispatchMode):
    """Counts ops that would sync a CUDA host with its device (:data:`SYNC_OPS`), by name."""

    def __init__(self, ignore: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.ignore = {t.data_ptr() for t in ignore}
        self.counts: Counter[str] = Counter()
        self._paused = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Do not count inside (e.g. the data pipeline's host-side work on CPU tensors)."""
        self._paused, before = True, self._paused
        try:
            yield
        finally:
            self._paused = before

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if not self._paused and self._syncs(func, args):
            self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    def _syncs(self, func: Any, args: tuple) -> bool:
        if func in SYNC_OPS:
            first = args[0] if args else None
            return not (isinstance(first, torch.Tensor) and first.data_ptr() in self.ignore)
        if func in _MASK_OPS and len(args) > 1:
            return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())
        return False


def host_scalars(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """The optimiser's per-parameter ``step`` tensors that stay on the host (not syncs on CUDA)."""
    if optimizer is None:
        return []
    out = []
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.device.type == "cpu":
            out.append(step)
    return out
