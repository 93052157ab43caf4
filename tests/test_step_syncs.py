"""No host-device sync in the training step, for every registered method.

The ops that sync a CUDA host (scalar reads, data-dependent shapes) dispatch the same on CPU, so
:class:`SyncCounter` counts them in a CPU run of the real ``train_epoch``: model forward and
backward, gradient clipping, the optimiser, the schedule, the interrupt check and the loss sums.
The data pipeline's host-side work on CPU tensors is not counted (it reads CPU tensors in a GPU
run too). The only sync an epoch may have is its one read of the summed loss at the end.
"""
from __future__ import annotations

import pytest

from harness.core.loop import prepare, train_epoch
from harness.core.registry import get_method, method_names
from harness.core.resolve import resolve
from harness.core.syncs import SyncCounter, host_scalars

#: syncs per step a method makes by design: VPTSP-G groups the batch by class with torch.unique
#: (the output size is data-dependent) and reads the largest class count
METHOD_SYNCS = {"vptsp_g": {"_unique2": 1, "_local_scalar_dense": 1},
                "vptsp_ema": {"_unique2": 1, "_local_scalar_dense": 1}}
CASES = [(m, f) for m in method_names() for f in ("cnn", "vit")
         if get_method(m).applies_to(f) and m != "frpt_bbox"]  # frpt_bbox needs boxes (CUB)


class PausedWhileFetching:
    """The train batches, with the counter paused while the next batch is prepared."""

    def __init__(self, batches, counter: SyncCounter) -> None:
        self.batches, self.counter = batches, counter

    def __getattr__(self, name):
        return getattr(self.batches, name)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        it = iter(self.batches)
        while True:
            with self.counter.paused():
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch


@pytest.mark.parametrize("method, family", CASES)
def test_training_step_never_syncs(method, family, tiny_overrides, tiny_vit_overrides):
    overrides = tiny_vit_overrides if family == "vit" else tiny_overrides
    backbone = "vit_small_patch16_224" if family == "vit" else "resnet18"
    run = prepare(resolve(method=method, backbone=backbone, overrides={**overrides, "data.max_per_class": 48}))
    train_epoch(run, 1)  # the optimiser creates its state (host step counters) in the first step
    counter = SyncCounter(ignore=host_scalars(run.optimizer))
    run.loaders["train"] = PausedWhileFetching(run.loaders["train"], counter)
    with counter:
        images, _, row = train_epoch(run, 2)
    steps = images // run.cfg.data.batch_size
    assert steps >= 3
    per_step = METHOD_SYNCS.get(method, {})
    expected = {k: v * steps for k, v in per_step.items()}
    reads = len([k for k in row if k.startswith("train/") and k not in ("train/lr", "train/epoch_time_s")])
    expected["_local_scalar_dense"] = expected.get("_local_scalar_dense", 0) + reads  # once per epoch
    assert dict(counter.counts) == expected


def test_counter_sees_the_syncs_it_is_for():
    """The counter is not blind: item(), bool(), nonzero, unique and mask indexing all count,
    host-side scalars passed as ignored do not."""
    import torch

    x, step = torch.arange(6.0), torch.tensor(3.0)
    with SyncCounter(ignore=[step]) as c:
        x.sum().item()
        bool((x > 2).any())
        torch.nonzero(x)
        torch.unique(x)
        x[x > 2]
        step.item()
        x * 2  # no sync
    assert dict(c.counts) == {"_local_scalar_dense": 2, "nonzero": 1, "_unique2": 1, "index": 1}
