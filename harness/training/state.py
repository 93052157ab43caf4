"""The state of one run: what :func:`harness.training.setup.prepare` built, what its epochs
have produced so far, and the MLflow run and checkpoint it writes to.

A checkpoint is :meth:`Run.snapshot`: everything the next epoch depends on (the trainable state,
the method's state held outside parameters, optimiser, schedule, scaler, every random generator,
the best-so-far epoch and state, the history and the throughput counters); :meth:`Run.restore`
loads one into a freshly prepared run, so on the CPU a resumed run equals an uninterrupted one bit
for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness import data
from harness.config import RunConfig
from harness.models import Backbone, DMLModel
from harness.retrieval import FeatureCache, PerQuery, TransferSet, evaluate_queries
from harness.training import checkpoint


@dataclass
class Best:
    """The best-validation epoch so far and a copy of its trainable state (last epoch without val)."""

    score: float = -math.inf
    epoch: int = 0
    state: dict[str, torch.Tensor] | None = None
    tested: PerQuery | None = None  # its test split per query, when tested that epoch (not checkpointed)

    def offer(self, model: DMLModel, epoch: int, row: dict[str, float], key: str, tested: PerQuery | None) -> None:
        score = row.get(key, float(epoch))  # no val split (fair protocol): the last epoch
        if score > self.score:
            self.score, self.epoch, self.tested = score, epoch, tested
            self.state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}


@dataclass
class RunResult:
    run_id: str
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    config: RunConfig | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # the run's constants, logged as params


@dataclass
class Run:
    """One run: its data, model and optimisation state, then what its epochs produced."""

    cfg: RunConfig
    device: torch.device
    splits: data.Splits
    backbone: Backbone
    model: DMLModel
    loaders: dict[str, data.Batches]
    ks: tuple[int, ...]
    amp: Callable[[], Any]
    counts: dict[str, float]  # parameter counts: metrics, logged once, so runs sort by them
    facts: dict[str, Any]  # constants of the run's data: params (not charted)
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    epochs: int
    scaler: torch.amp.GradScaler  # disabled (a no-op) unless optim.amp=fp16 on CUDA
    transfer: list[TransferSet] = field(default_factory=list)  # eval.transfer's datasets
    checkpoints: Path = Path("checkpoints")  # the folder of the run's per-epoch checkpoint
    cache: FeatureCache | None = None
    progress: bool = False  # progress lines off a terminal (dmlbench train)
    # what the epochs have produced: saved in every checkpoint
    history: list[dict[str, float]] = field(default_factory=list)
    best: Best = field(default_factory=Best)
    images: int = 0  # training images seen
    seconds: float = 0.0  # seconds spent training them
    eval_seconds: float = 0.0  # wall time spent embedding and scoring splits (cost/eval_share)
    log_seconds: float = 0.0  # per-epoch MLflow logging and checkpointing
    queries: dict[str, PerQuery] = field(default_factory=dict)  # each split's last evaluation, per query
    # the MLflow run, its checkpoint file and the claim on it (a process that trains a run holds it)
    run_id: str = ""
    checkpoint: Path | None = None
    claim: checkpoint.Claim | None = None

    @property
    def completed(self) -> int:
        """Epochs whose metrics and checkpoint are written."""
        return max((int(h["epoch"]) for h in self.history), default=0)

    def evaluate(self, split: str) -> dict[str, float]:
        """Retrieval metrics of ``split`` (from the cached frozen features when there are some);
        the per-query results behind them stay in :attr:`queries`."""
        started = time.perf_counter()
        if self.cache is not None:
            scored = self.cache.evaluate(self.model, self.ks, split)
        else:
            scored = evaluate_queries(self.model, self.loaders, self.amp(), self.ks, split)
        self.queries[split] = scored
        self.eval_seconds += time.perf_counter() - started  # the results are host arrays: synced
        return scored.means()

    def snapshot(self, epoch: int) -> dict[str, Any]:
        """Everything the next epoch depends on (the module docstring)."""
        return {
            "epoch": epoch,
            "history": self.history,
            "images": self.images,
            "seconds": self.seconds,
            "model": {k: v.detach().cpu() for k, v in self.model.trainable_state_dict().items()},
            "model_extra": self.model.resume_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(self.loaders["train"].generator),
            "best_score": self.best.score,
            "best_epoch": self.best.epoch,
            "best_state": {k: v.cpu() for k, v in (self.best.state or {}).items()},
        }

    def restore(self, state: dict[str, Any]) -> int:
        """Load a :meth:`snapshot` into this freshly prepared run; returns the next epoch."""
        self.model.load_trainable_state_dict({k: v.to(self.device) for k, v in state["model"].items()})
        self.model.load_resume_state(state.get("model_extra", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"], self.loaders["train"].generator)
        self.history, self.images, self.seconds = state["history"], state["images"], state["seconds"]
        self.best = Best(state["best_score"], state["best_epoch"], state["best_state"] or None)
        return state["epoch"] + 1
