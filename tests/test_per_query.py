"""Per-query results: every test (and transfer) evaluation keeps one row per query as a run
artifact, ``per_query/<name>.parquet``, whose column means are the logged metrics exactly."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from harness.retrieval import PerQuery, column_of, evaluate_retrieval, per_query_retrieval
from harness.training import loop
from harness.training.resolution import resolve

METRICS = ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r", "r_precision")


def per_query_table(run_id: str, name: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"per_query/{name}.parquet")
    return pd.read_parquet(path)


def test_the_table_is_the_metrics_query_by_query():
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(300, 16, generator=g), torch.randint(0, 12, (300,), generator=g)
    labels[0] = 99  # a lone query: no other item of its class, skipped by every metric
    scored = per_query_retrieval(emb, labels, ks=(1, 4))
    assert scored.means() == evaluate_retrieval(emb, labels, ks=(1, 4))
    assert 0 not in scored.query and len(scored.query) == 299
    sims = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(emb, dim=1).T
    sims.fill_diagonal_(-np.inf)
    expected = torch.argsort(sims, dim=1, descending=True, stable=True)[:, :5].numpy()
    assert (scored.neighbours == expected[scored.query]).all()
    assert (scored.neighbour_labels == labels.numpy()[scored.neighbours]).all()
    frame = scored.frame()
    assert list(frame.columns) == [
        "query", "class", "hit_at_1", "hit_at_4", "ap_at_r", "r_precision",
        "nn_1", "nn_2", "nn_3", "nn_4", "nn_5", "nn1_class",
    ]  # fmt: skip
    assert frame["hit_at_1"].to_numpy().tolist() == (frame["nn1_class"] == frame["class"]).tolist()
    back = PerQuery.from_frame(frame)
    assert back.means() == scored.means()
    for key, value in scored.means().items():  # pandas agrees to the last bits
        assert frame[column_of(key)].mean() == pytest.approx(value, abs=1e-15)


def test_the_table_of_a_sop_sized_test_split_is_a_few_mb(tmp_path):
    """SOP's test split: 60,502 images of 11,316 classes, queries against the rest."""
    n = 60_502
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(11_316), 6)[:n]
    hits = rng.random((n, 4)) < 0.7
    values = np.concatenate([hits, rng.random((n, 2))], axis=1)
    nn = rng.integers(0, n, (n, 5))
    scored = PerQuery((1, 10, 100, 1000), np.arange(n), labels, values, nn, labels[nn])
    path = tmp_path / "test.parquet"
    scored.frame().to_parquet(path, index=False, compression="zstd")
    assert path.stat().st_size < 4e6, path.stat().st_size


def test_a_run_logs_its_test_and_transfer_queries_and_their_means_are_its_metrics(tiny_overrides):
    cfg = resolve(method="bitfit", overrides={**tiny_overrides, "eval.transfer": ["fashion_styles"]})
    result = loop.train(cfg)
    logged = mlflow.get_run(result.run_id).data.metrics
    test = per_query_table(result.run_id, "test")
    assert len(test) == len(loop.prepare(cfg).splits.test)  # every test image is a query
    means = PerQuery.from_frame(test).means()
    for m in METRICS:
        assert means[m.replace("_at_", "@")] == logged[f"test/{m}"], m
    transferred = PerQuery.from_frame(per_query_table(result.run_id, "transfer_fashion_styles")).means()
    for m in ("recall_at_1", "map_at_r"):  # the transfer metrics logged (transfer.METRICS)
        assert transferred[m.replace("_at_", "@")] == logged[f"transfer/fashion_styles/{m}"], m


def test_under_the_paper_protocol_the_table_is_the_selected_epochs(tiny_overrides):
    """Test-selected runs report an epoch's test row: the table must be that epoch's, not the last."""
    overrides = {**tiny_overrides, "protocol": "paper", "optim.epochs": 3, "optim.lr": 3e-2}
    result = loop.train(resolve(method="linear_probe", overrides=overrides))
    logged = mlflow.get_run(result.run_id).data.metrics
    means = PerQuery.from_frame(per_query_table(result.run_id, "test")).means()
    best = next(h for h in result.history if h["epoch"] == logged["best/epoch"])
    for m in METRICS:
        assert means[m.replace("_at_", "@")] == logged[f"test/{m}"] == best[f"epoch_test/{m}"], m
