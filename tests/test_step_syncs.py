"""No host-device sync in the training step, for every registered method.

The ops that sync a CUDA host (scalar reads, data-dependent shapes) dispatch the same on CPU, so
:class:`SyncCounter` counts them in a CPU run of the real ``train_epoch``: model forward and
backward, gradient clipping, the optimiser, the schedule, the interrupt check and the loss sums.
The data pipeline's host-side work on CPU tensors is not counted (it reads CPU tensors in a GPU
run too). Blocking transfers the project's code asks for (``.cpu()``, ``.numpy()``, ``.tolist()``,
``.to(device)`` without ``non_blocking``) are counted too. The only sync an epoch may have is its one
read of the summed loss at the end: VPTSP-G groups each batch by class on the host and its memory
bank moves rows through pinned memory, so neither syncs.
"""

from __future__ import annotations

import pytest

from harness.bench.measuring import TOY_VIT
from harness.runtime import SyncCounter, host_scalars
from harness.training.loop import train_epoch
from harness.training.resolution import resolve
from harness.training.setup import prepare
from methods import get_method, method_names

CASES = [
    (m, f, {}) for m in method_names() for f in ("cnn", "vit") if get_method(m).applies_to(f) and m != "frpt_bbox"
]  # frpt_bbox needs boxes (CUB)
CASES += [(m, "vit", {"method_args.memory_bank": True}) for m in ("vptsp_g", "vptsp_ema")]


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


@pytest.mark.parametrize(
    "method, family, extra", CASES, ids=lambda v: ("bank" if v else "plain") if isinstance(v, dict) else str(v)
)
def test_training_step_never_syncs(method, family, extra, tiny_overrides, tiny_vit_overrides):
    if family == "vit":  # a narrow MLP keeps BOFT quick (harness.bench.measuring.TOY_VIT)
        backbone = "vit_small_patch16_224"
        overrides = {**tiny_vit_overrides, "model.backbone_kwargs": {"img_size": 32, **TOY_VIT}}
    else:
        backbone, overrides = "resnet18", tiny_overrides
    run = prepare(
        resolve(
            method=method,
            backbone=backbone,
            overrides={
                **overrides,
                "data.max_per_class": 16,
                "data.batch_size": 16,
                "data.samples_per_class": 4,
                **extra,
            },
        )
    )
    train_epoch(run, 1)  # the optimiser creates its state (host step counters) in the first step
    first = run.images
    counter = SyncCounter(ignore=host_scalars(run.optimizer))
    run.loaders["train"] = PausedWhileFetching(run.loaders["train"], counter)
    with counter:
        row = train_epoch(run, 2)
    images = run.images - first
    steps = images // run.cfg.data.batch_size
    assert steps >= 3
    reads = len([k for k in row if k.startswith("train/") and k not in ("train/lr", "train/epoch_time_s")])
    assert dict(counter.counts) == {"_local_scalar_dense": reads}  # the epoch's loss sums, once


def test_counter_sees_the_syncs_it_is_for():
    """The counter is not blind: item(), bool(), nonzero, unique and mask indexing all count,
    host-side scalars passed as ignored do not; so do the blocking transfers asked for from the
    code it watches (here this file), and not the non-blocking ones or dtype casts."""
    from pathlib import Path

    import torch

    x, step = torch.arange(6.0), torch.tensor(3.0)
    with SyncCounter(ignore=[step], roots=(str(Path(__file__).parent),)) as c:
        x.sum().item()
        bool((x > 2).any())
        torch.nonzero(x)
        torch.unique(x)
        x[x > 2]
        step.item()
        x * 2  # no sync
        x.cpu(), x.numpy(), x.tolist(), x.to("cpu"), x.to(torch.device("cpu"), torch.float64)
        x.to("cpu", non_blocking=True), x.to(torch.float16)  # neither waits
    assert dict(c.counts) == {
        "_local_scalar_dense": 2,
        "nonzero": 1,
        "_unique2": 1,
        "index": 1,
        "Tensor.cpu": 1,
        "Tensor.numpy": 1,
        "Tensor.tolist": 1,
        "Tensor.to": 2,
    }
    with SyncCounter() as c:  # the project's code only: a test's own calls are not the step's
        x.cpu()
    assert not c.counts
    x.cpu()  # outside a counter, tensors are untouched
    assert torch.Tensor.cpu.__qualname__ == "TensorBase.cpu" or "counting" not in torch.Tensor.cpu.__qualname__
