"""Evaluation: embed a split and compute its retrieval metrics, or reuse cached frozen features."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from harness import data
from harness.config import DataConfig
from harness.models.backbones import Backbone
from harness.models.model import DMLModel
from harness.retrieval.metrics import PerQuery, per_query_retrieval
from harness.runtime import interrupts, to_device


@torch.inference_mode()
def embed(model: DMLModel, batches: data.Batches, amp: Any, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and labels of a split, both on the model's device (batches arrive there)."""
    model.eval()
    embeddings, labels = [], []
    for images, y, _ in tqdm(batches, desc=desc, leave=False, disable=None):
        with amp:
            embeddings.append(model(images).float())
        labels.append(y)
        interrupts.check()
    return torch.cat(embeddings), torch.cat(labels)


def evaluate(model: DMLModel, loaders: dict, amp: Any, ks: tuple[int, ...], split: str) -> dict[str, float]:
    """Retrieval metrics of ``split``: self-retrieval, or query vs gallery for In-Shop."""
    return evaluate_queries(model, loaders, amp, ks, split).means()


def evaluate_queries(model: DMLModel, loaders: dict, amp: Any, ks: tuple[int, ...], split: str) -> PerQuery:
    """:func:`evaluate`'s per-query results (their means are its metrics)."""
    if split == "test" and "query" in loaders:
        q, ql = embed(model, loaders["query"], amp, "query")
        g, gl = embed(model, loaders["gallery"], amp, "gallery")
        return per_query_retrieval(q, ql, g, gl, ks=ks)
    e, el = embed(model, loaders[split], amp, split)
    return per_query_retrieval(e, el, ks=ks)


def metric_name(key: str) -> str:
    """MLflow forbids '@': ``recall@1 -> recall_at_1``."""
    return key.replace("@", "_at_")


# ----------------------------------------------------------------------------- feature cache


class FeatureCache:
    """Frozen features computed once (linear probe): training and evaluation reuse them."""

    def __init__(
        self,
        model: DMLModel,
        loaders: dict[str, data.Batches],
        d: DataConfig,
        seed: int,
        eval_batch_size: int,
        device: torch.device,
        amp: Any,
        backbone: Backbone,
    ) -> None:
        self.features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        pipeline = data.resolve_pipeline(d.pipeline, device)
        model.eval()
        for name, split in loaders.items():  # every split with the test transform (train included)
            batches = data.split_batches(
                split.table,
                d,
                seed,
                eval_batch_size,
                backbone.mean,
                backbone.std,
                device,
                pipeline,
                train=False,
                split="features",
                pixels=split.pixels,
            )
            feats, labels = [], []
            with torch.inference_mode():
                for images, y, _ in tqdm(batches, desc=f"features {name}", leave=False, disable=None):
                    with amp:
                        feats.append(model.features(images).float())
                    labels.append(y)
            self.features[name] = (torch.cat(feats), torch.cat(labels))

    def batches(self, loader: data.Batches):
        """The training sampler's batches as (features, labels, host indices): no image is decoded."""
        features, labels = self.features["train"]
        for idx in loader.batch_sampler:
            index = np.asarray(idx, dtype=np.int64)
            rows = to_device(index, labels.device)
            yield features[rows], labels[rows], index

    def evaluate(self, model: DMLModel, ks: tuple[int, ...], split: str) -> PerQuery:
        """Per-query results of ``split`` from the cached features through the trained head."""
        model.eval()

        def emb(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            feats, labels = self.features[name]
            with torch.inference_mode():
                return torch.nn.functional.normalize(model.head(feats).float(), dim=-1), labels

        if split == "test" and "query" in self.features:
            return per_query_retrieval(*emb("query"), *emb("gallery"), ks=ks)
        return per_query_retrieval(*emb(split), ks=ks)
