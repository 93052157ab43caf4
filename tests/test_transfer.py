"""eval.transfer: the selected checkpoint evaluated zero-shot on other datasets beside the untrained
backbone (cached once per backbone), and the retained fraction; bad names refused up front."""

from __future__ import annotations

import mlflow
import pytest

from harness.errors import UserError
from harness.retrieval import transfer
from harness.training import loop, prepare
from harness.training.resolution import resolve

TRANSFER = {"eval.transfer": ["fashion_styles"], "data.max_per_class": 16}


def test_the_untrained_backbone_retains_everything_and_its_metrics_are_cached(tiny_overrides, monkeypatch):
    """The pretrained-only row (no training, raw backbone features) *is* the untrained backbone:
    retained exactly 1. A second run reuses the cached untrained metrics."""
    reference = resolve(
        method="linear_probe", overrides={**tiny_overrides, **TRANSFER, "optim.epochs": 0, "model.embed_dim": 0}
    )
    result = loop.train(reference)
    m = result.metrics
    for metric in transfer.METRICS:
        assert m[f"transfer/fashion_styles/{metric}"] == pytest.approx(m[f"transfer/fashion_styles/untrained_{metric}"])
        assert m[f"transfer/fashion_styles/retained_{metric}"] == pytest.approx(1.0)
    logged = mlflow.get_run(result.run_id).data.metrics
    assert logged["transfer/fashion_styles/retained_recall_at_1"] == pytest.approx(1.0)

    computed = []
    real = transfer.UntrainedBackbone
    monkeypatch.setattr(transfer, "UntrainedBackbone", lambda *a: computed.append(a) or real(*a))
    trained = loop.train(resolve(method="bitfit", overrides={**tiny_overrides, **TRANSFER, "optim.lr": 1e-2}))
    assert computed == []  # the untrained metrics came from the store's cache
    t = trained.metrics
    assert t["transfer/fashion_styles/untrained_recall_at_1"] == m["transfer/fashion_styles/untrained_recall_at_1"]
    for metric in transfer.METRICS:
        assert t[f"transfer/fashion_styles/retained_{metric}"] == pytest.approx(
            t[f"transfer/fashion_styles/{metric}"] / t[f"transfer/fashion_styles/untrained_{metric}"]
        )
    assert t["transfer/fashion_styles/recall_at_1"] != m["transfer/fashion_styles/recall_at_1"]  # it trained


def test_transfer_names_are_checked_before_anything_runs(tiny_overrides):
    with pytest.raises(UserError, match=r"unknown dataset 'nope' in eval.transfer; valid: .*fashion_styles"):
        resolve(method="bitfit", overrides={**tiny_overrides, "eval.transfer": ["nope"]})
    with pytest.raises(UserError, match="eval.transfer lists 'fashion_mnist', the dataset the run trains on"):
        resolve(method="bitfit", overrides={**tiny_overrides, "eval.transfer": ["fashion_mnist"]})
    with pytest.raises(UserError, match="does not exist"):
        prepare(
            resolve(method="bitfit", overrides={**tiny_overrides, "eval.transfer": ["fashion_styles=/nonexistent/dir"]})
        )
