"""Which epoch a run reports, and the test metrics of that checkpoint.

The fair protocol selects on validation (``eval.select``), the paper protocol on test R@1 (both
papers' protocol). :func:`select_and_test` loads the selected state into the model (and merges a
method that merges at test time, LoRA and SSF) before testing it: it changes the model, and says
so in what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness import data
from harness.config import RunConfig
from harness.retrieval import PerQuery, metric_name
from harness.training.state import Run


def selection_key(cfg: RunConfig) -> str:
    """The metric that picks the reported epoch: validation (fair) or test R@1 (paper protocol)."""
    return "epoch_test/recall_at_1" if cfg.protocol == "paper" else f"val/{metric_name(cfg.eval.select)}"


def has_test(cfg: RunConfig, splits: data.Splits) -> bool:
    return cfg.eval.test and (splits.test is not None or splits.query is not None)


@dataclass
class Selected:
    """The reported metrics (``best/``, ``test/``), the selected trainable state, and whether the
    model now holds it merged into the backbone's weights."""

    metrics: dict[str, float]
    state: dict[str, torch.Tensor] | None
    merged: bool = False
    queries: PerQuery | None = None  # the reported test metrics per query (their means)


def select_and_test(run: Run) -> Selected:
    """Test metrics of the best-validation checkpoint, plus the papers' test-selected R@1; the
    model holds the selected state afterwards (merged when the method merges at test time)."""
    best, history = run.best, run.history
    row = next(h for h in history if h["epoch"] == best.epoch)
    final: dict[str, float] = {"best/epoch": float(best.epoch)}
    if run.splits.val is not None:
        final["best/val_recall_at_1"] = row["val/recall_at_1"]
        final["best/val_map_at_r"] = row["val/map_at_r"]
    if not has_test(run.cfg, run.splits):
        return Selected(final, best.state)
    merged = False
    merge = run.model.merges_on_test
    if "epoch_test/recall_at_1" in row and not merge:
        test = {k.removeprefix("epoch_test/"): v for k, v in row.items() if k.startswith("epoch_test/")}
        queries = best.tested
        if queries is None:  # a resumed run tested that epoch before the restart: test it again
            run.model.load_trainable_state_dict(best.state)
            run.evaluate("test")
            queries = run.queries["test"]
    else:
        run.model.load_trainable_state_dict(best.state)
        if merge:  # LoRA, SSF: the test split sees the merged backbone, at the backbone's own cost
            merged = run.model.merge_()
        test = {metric_name(k): v for k, v in run.evaluate("test").items()}
        queries = run.queries["test"]
    final.update({f"test/{k}": v for k, v in test.items()})
    tested = [h for h in history if "epoch_test/recall_at_1" in h]
    if tested and run.cfg.eval.test_every_epoch:  # the papers' protocol; epoch 0 alone selects nothing
        top = max(tested, key=lambda h: h["epoch_test/recall_at_1"])
        final["test/selected_recall_at_1"] = top["epoch_test/recall_at_1"]
        final["test/selected_epoch"] = top["epoch"]
    return Selected(final, best.state, merged, queries)
