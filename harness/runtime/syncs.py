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

Transfers do not dispatch an op on CPU tensors, so the counter also patches the tensor methods that
bring a value to the host or move it without ``non_blocking``: ``.cpu()``, ``.numpy()``,
``.tolist()`` and ``.to(device)`` (on CUDA each waits for the device, or is a copy from pageable
memory). It counts those calls made by this project's code (``harness/``, ``methods/``): torch's
own same-device ``.to`` calls (gradient clipping, the optimisers) are no transfer. Host data
in the step is NumPy (the batch's indices and labels), so no tensor method is needed to read it.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
#: ops whose result the host needs before it can go on
SYNC_OPS = {
    _aten._local_scalar_dense.default,
    _aten.is_nonzero.default,
    _aten.equal.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.bincount.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.repeat_interleave.Tensor,
}
#: ops that sync only with a boolean index (they run nonzero first)
_MASK_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}


#: tensor methods that read a value on the host or move a tensor (see the module docstring)
TRANSFERS = ("cpu", "numpy", "tolist", "to")
#: where this project's code lives: transfers asked for there are counted
_PROJECT = tuple(str(Path(__file__).resolve().parents[i] / name) for i, name in ((1, ""), (2, "methods")))


def _is_transfer(name: str, args: tuple, kwargs: dict) -> bool:
    if name != "to":
        return True
    if kwargs.get("non_blocking") or any(a is True for a in args):
        return False
    target = kwargs.get("device", next((a for a in args if isinstance(a, (torch.device, str, torch.Tensor))), None))
    return target is not None


class SyncCounter(TorchDispatchMode):
    """Counts ops that would sync a CUDA host with its device (:data:`SYNC_OPS`) and the project's
    blocking transfers (:data:`TRANSFERS`), by name."""

    def __init__(self, ignore: Iterable[torch.Tensor] = (), roots: tuple[str, ...] = _PROJECT) -> None:
        super().__init__()
        self.ignore = {t.data_ptr() for t in ignore}
        self.roots = tuple(str(r) for r in roots)  # transfers asked for from code under these folders
        self.counts: Counter[str] = Counter()
        self._paused = False
        self._originals: dict[str, Callable] = {}

    def __enter__(self) -> SyncCounter:
        for name in TRANSFERS:
            self._originals[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name, original))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for name, original in self._originals.items():
                setattr(torch.Tensor, name, original)
            self._originals.clear()

    def _counting(self, name: str, original: Callable) -> Callable:
        def method(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            if not self._paused and caller.startswith(self.roots) and _is_transfer(name, args, kwargs):
                self.counts[f"Tensor.{name}"] += 1
            return original(tensor, *args, **kwargs)

        return method

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


def count_syncs(step: Callable[[], Any], device: torch.device, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Host syncs of one call of ``step``: on CUDA the driver's own check
    (``torch.cuda.set_sync_debug_mode("error")``: a sync raises, with the op that made it), on the
    CPU :class:`SyncCounter`. Call it after a first step (the optimiser creates its state there)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)
        return 0
    with SyncCounter(ignore=host_scalars(optimizer)) as counter:
        step()
    return counter.total
