"""VPTSP-G's memory bank: every class's prompts and their optimizer state on the host, the batch's
rows on the device, and no step that waits for the device.

With thousands of classes (SOP 11,318, In-Shop 3,997) the class prompts and their Adam moments
would hold GBs of device memory for rows a batch never touches, so the released code keeps them
in host memory. The outer optimizer sees one slot parameter per layer, a row per class of the
batch. The batch's classes are known on the host before the batch reaches the device (the sampler
drew them), so every step is planned there:

1. :meth:`HostBank.load` (before the forward pass): rows of classes that were in the previous
   batch are copied slot to slot on the device (they hold the newest values and moments); the
   others are gathered from the host bank into pinned memory and copied over without blocking;
   the same for each per-row optimizer state (momentum, Adam's moments; the shared step count
   stays the optimizer's, as in the code).
2. :meth:`HostBank.save` (after the optimizer step): the batch's rows go back to pinned host
   buffers with non-blocking copies and an event. A buffer is written into the bank once its event
   has passed, at the latest when one of its classes is read from the bank again (in order, so an
   older row never overwrites a newer one), or when the whole bank is read (checkpoints, the best
   state, parameter counts).

Classes absent from a batch are not touched ("lazy" update: no momentum or weight-decay drift, as
in the code); with every class in every batch it equals the on-device update exactly
(``tests/test_peft_methods.py``). Nothing here reads a device value on the host: indices are
NumPy arrays, copies go through pinned memory (``tests/test_step_syncs.py`` counts syncs and
transfers with ``memory_bank=true``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from harness.models import to_device


def per_row_state(optimizer: torch.optim.Optimizer | None, slot: nn.Parameter) -> Iterator[tuple[str, torch.Tensor]]:
    """The optimizer's state tensors of ``slot`` with a row per slot row (momentum, moments)."""
    if optimizer is None:
        return
    for key, value in optimizer.state.get(slot, {}).items():
        if torch.is_tensor(value) and value.shape == slot.shape:
            yield key, value


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t`` started without blocking (pinned memory on CUDA): valid once the
    device has reached this point of its stream."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
    out.copy_(t, non_blocking=True)
    return out


@dataclass
class Outbox:
    """One step's rows on their way back to the host bank."""

    classes: np.ndarray
    copies: list[tuple[torch.Tensor, torch.Tensor]]  # (bank tensor, its rows' host copy)
    event: torch.cuda.Event | None

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def write(self) -> None:
        if self.event is not None:
            self.event.synchronize()  # passed already in all but the rarest cases (see _flush)
        rows = torch.from_numpy(self.classes)
        for bank, rows_values in self.copies:
            bank[rows] = rows_values


class HostBank:
    """Class prompts per layer ``(C, n_l, D)`` and their optimizer state, in host memory."""

    def __init__(self, tables: list[torch.Tensor]) -> None:
        self.values = [t.contiguous() for t in tables]
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in tables]
        self.slot_classes = np.zeros(0, np.int64)  # the classes in slot rows 0..n-1, sorted
        self.pending: list[Outbox] = []

    def load(self, slots: nn.ParameterList, optimizer: torch.optim.Optimizer | None, classes: np.ndarray) -> None:
        """Slot rows ``0..len(classes)-1`` := these classes' rows (values and optimizer state)."""
        prev = self.slot_classes
        pos = np.searchsorted(prev, classes)
        in_prev = (
            (pos < len(prev)) & (prev[np.minimum(pos, max(len(prev) - 1, 0))] == classes)
            if len(prev)
            else np.zeros(len(classes), bool)
        )
        fresh = classes[~in_prev]
        self._flush(needed=fresh)
        keep_dst, keep_src, load_dst = np.flatnonzero(in_prev), pos[in_prev], np.flatnonzero(~in_prev)
        device = slots[0].device
        packed = to_device(np.concatenate([keep_dst, keep_src, load_dst]).astype(np.int64), device)
        kd, ks, ld = packed.split([len(keep_dst), len(keep_src), len(load_dst)])
        rows = torch.from_numpy(fresh)
        with torch.no_grad():
            for layer, slot in enumerate(slots):
                self._fill(slot.data, self.values[layer], kd, ks, ld, rows)
                for key, value in per_row_state(optimizer, slot):
                    bank = self.state[layer].setdefault(key, torch.zeros_like(self.values[layer]))
                    self._fill(value, bank, kd, ks, ld, rows)
        self.slot_classes = classes

    @staticmethod
    def _fill(
        target: torch.Tensor,
        bank: torch.Tensor,
        keep_dst: torch.Tensor,
        keep_src: torch.Tensor,
        load_dst: torch.Tensor,
        rows: torch.Tensor,
    ) -> None:
        new = torch.zeros_like(target)
        if len(keep_dst):
            new[keep_dst] = target[keep_src]
        if len(load_dst):
            new[load_dst] = to_device(bank[rows], target.device, target.dtype)
        target.copy_(new)

    def save(self, slots: nn.ParameterList, optimizer: torch.optim.Optimizer | None) -> None:
        """Start copying the batch's updated rows (values and state) back to the host."""
        n = len(self.slot_classes)
        if not n:
            return
        copies = []
        for layer, slot in enumerate(slots):
            copies.append((self.values[layer], host_copy(slot.detach()[:n])))
            for key, value in per_row_state(optimizer, slot):
                bank = self.state[layer].setdefault(key, torch.zeros_like(self.values[layer]))
                copies.append((bank, host_copy(value[:n])))
        event = None
        if slots[0].is_cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append(Outbox(self.slot_classes, copies, event))

    def _flush(self, needed: np.ndarray | None = None) -> None:
        """Write pending rows into the bank, oldest first: all of them (``needed`` None), else every
        buffer up to the newest that is done or holds a class about to be read from the bank."""
        last = len(self.pending) - 1 if needed is None else -1
        if needed is not None:
            for i, box in enumerate(self.pending):
                if box.done() or (len(needed) and np.isin(box.classes, needed).any()):
                    last = i
        for box in self.pending[: last + 1]:
            box.write()
        del self.pending[: last + 1]

    def synced(self) -> HostBank:
        """The bank with every pending row written (before reading it whole)."""
        self._flush()
        return self

    def replace(self, values: list[torch.Tensor] | None = None, state: list[dict] | None = None) -> None:
        """Load a checkpoint's rows: the slot no longer holds the newest values of any class."""
        self._flush()
        if values is not None:
            for bank, new in zip(self.values, values):
                bank.copy_(new)
        if state is not None:
            self.state = [dict(layer) for layer in state]
        self.slot_classes = np.zeros(0, np.int64)
