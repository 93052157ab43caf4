"""The class-balanced batch sampler: ``m`` consecutive images per class (VPTSP-G's contract)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from harness.data.splits import class_groups
from harness.errors import UserError


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size // m`` classes x ``m`` images, each class's images consecutive.

    VPTSP-G's semantic-proxy step averages the ``m`` consecutive features of a class, so the
    grouping is part of the contract. Classes are drawn without replacement within a batch when
    there are enough of them (else with replacement); images without replacement from a
    reshuffled per-class pool, or with replacement for classes smaller than ``m``.
    Deterministic given ``seed`` and the epoch set with :meth:`set_epoch`.
    """

    def __init__(
        self, labels: Sequence[int] | np.ndarray, batch_size: int, samples_per_class: int, seed: int = 0
    ) -> None:
        if samples_per_class <= 0 or batch_size % samples_per_class:
            raise ValueError(f"samples_per_class={samples_per_class} must divide batch_size={batch_size}")
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.size == 0:
            raise UserError("cannot sample batches from an empty training split")
        self.batch_size = int(batch_size)
        self.m = int(samples_per_class)
        self.seed = int(seed)
        self.epoch = 0
        self.classes, dense = np.unique(self.labels, return_inverse=True)
        self.by_class = class_groups(dense.reshape(-1), len(self.classes))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return max(1, len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch])
        per_batch = self.batch_size // self.m
        n_cls = len(self.classes)
        pools: list[list[int]] = [[] for _ in range(n_cls)]
        for _ in range(len(self)):
            chosen = rng.choice(n_cls, size=per_batch, replace=n_cls < per_batch)
            batch: list[int] = []
            for c in chosen.tolist():
                members = self.by_class[c]
                if len(members) < self.m:
                    batch.extend(rng.choice(members, size=self.m, replace=True).tolist())
                    continue
                if len(pools[c]) < self.m:
                    pools[c] = rng.permutation(members).tolist()
                batch.extend(pools[c][: self.m])
                del pools[c][: self.m]
            yield batch
