"""Which epoch a run reports: the best validation (fair) or test (paper protocol) epoch, and the
test metrics of that checkpoint."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from harness.config import RunConfig
from harness.retrieval.evaluation import metric_name
from harness.models.model import DMLModel


def selection_key(cfg: RunConfig) -> str:
    """The metric that picks the reported epoch: validation (fair) or test R@1 (paper protocol)."""
    return "epoch_test/recall_at_1" if cfg.protocol == "paper" else f"val/{metric_name(cfg.eval.select)}"


def has_test(run: Any) -> bool:
    return run.cfg.eval.test and (run.splits.test is not None or run.splits.query is not None)


@dataclass
class Best:
    """The best-validation epoch so far and a copy of its trainable state (last epoch without val)."""

    score: float = -math.inf
    epoch: int = 0
    state: dict[str, torch.Tensor] | None = None

    def offer(self, model: DMLModel, epoch: int, row: dict[str, float], key: str) -> None:
        score = row.get(key, float(epoch))  # no val split (fair protocol): the last epoch
        if score > self.score:
            self.score, self.epoch = score, epoch
            self.state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}


def final_metrics(run: Any, history: list[dict[str, float]], best: Best) -> dict[str, float]:
    """Test metrics of the best-validation checkpoint, plus the papers' test-selected R@1."""
    row = next(h for h in history if h["epoch"] == best.epoch)
    final: dict[str, float] = {"best/epoch": float(best.epoch)}
    if run.splits.val is not None:
        final["best/val_recall_at_1"] = row["val/recall_at_1"]
        final["best/val_map_at_r"] = row["val/map_at_r"]
    if not has_test(run):
        return final
    merge = bool(getattr(run.cfg.method_args, "merge", False))
    if "epoch_test/recall_at_1" in row and not merge:
        test = {k.removeprefix("epoch_test/"): v for k, v in row.items() if k.startswith("epoch_test/")}
    else:
        run.model.load_trainable_state_dict(best.state)
        if merge:  # LoRA, SSF: the test split sees the merged backbone, at the backbone's own cost
            final["model/merged"] = float(run.model.merge_())
        test = {metric_name(k): v for k, v in run.evaluate("test").items()}
    final.update({f"test/{k}": v for k, v in test.items()})
    tested = [h for h in history if "epoch_test/recall_at_1" in h]
    if tested and run.cfg.eval.test_every_epoch:  # the papers' protocol; epoch 0 alone selects nothing
        top = max(tested, key=lambda h: h["epoch_test/recall_at_1"])
        final["test/selected_recall_at_1"] = top["epoch_test/recall_at_1"]
        final["test/selected_epoch"] = top["epoch"]
    return final
