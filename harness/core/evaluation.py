"""Evaluation: embed a split and compute its retrieval metrics, or reuse cached frozen features."""
from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from harness import data
from harness.core import interrupts
from harness.core.backbones import Backbone
from harness.core.config import RunConfig
from harness.core.metrics import evaluate_retrieval
from harness.core.model import DMLModel


@torch.inference_mode()
def embed(model: DMLModel, loader: torch.utils.data.DataLoader, device: torch.device, amp: Any, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    embeddings, labels = [], []
    for images, y, _ in tqdm(loader, desc=desc, leave=False, disable=None):
        with amp:
            embeddings.append(model(images.to(device, non_blocking=True)).float())
        labels.append(y)
        interrupts.check()
    return torch.cat(embeddings), torch.cat(labels).to(device)


def evaluate(model: DMLModel, loaders: dict, device: torch.device, amp: Any, ks: tuple[int, ...], split: str) -> dict[str, float]:
    """Retrieval metrics of ``split``: self-retrieval, or query vs gallery for In-Shop."""
    if split == "test" and "query" in loaders:
        q, ql = embed(model, loaders["query"], device, amp, "query")
        g, gl = embed(model, loaders["gallery"], device, amp, "gallery")
        return evaluate_retrieval(q, ql, g, gl, ks=ks)
    e, el = embed(model, loaders[split], device, amp, split)
    return evaluate_retrieval(e, el, ks=ks)


def metric_name(key: str) -> str:
    """MLflow forbids '@': ``recall@1 -> recall_at_1``."""
    return key.replace("@", "_at_")


# ----------------------------------------------------------------------------- feature cache


class FeatureCache:
    """Frozen features computed once (linear probe): training and evaluation reuse them."""

    def __init__(self, model: DMLModel, splits: data.Splits, cfg: RunConfig, device: torch.device, amp: Any, backbone: Backbone) -> None:
        self.features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        transform = data.make_transform(cfg, backbone.mean, backbone.std, train=False)
        model.eval()
        for name in ("train", "val", "test", "query", "gallery"):
            table = getattr(splits, name)
            if table is None:
                continue
            loader = torch.utils.data.DataLoader(
                data.ImageDataset(table, transform, 0, cfg.data.crop_to_box), batch_size=cfg.eval.batch_size,
                num_workers=data.loader_workers(cfg.data.num_workers), pin_memory=device.type == "cuda",
            )
            feats, labels = [], []
            with torch.inference_mode():
                for images, y, _ in tqdm(loader, desc=f"features {name}", leave=False, disable=None):
                    with amp:
                        feats.append(model.features(images.to(device, non_blocking=True)).float())
                    labels.append(y)
            self.features[name] = (torch.cat(feats), torch.cat(labels).to(device))

    def batches(self, loader: torch.utils.data.DataLoader):
        """The training sampler's batches as (None, labels, indices): no image is decoded."""
        labels = self.features["train"][1]
        for idx in loader.batch_sampler:
            index = torch.as_tensor(idx, device=labels.device)
            yield None, labels[index], index

    def evaluate(self, model: DMLModel, ks: tuple[int, ...], split: str) -> dict[str, float]:
        model.eval()

        def emb(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            feats, labels = self.features[name]
            with torch.inference_mode():
                return torch.nn.functional.normalize(model.head(feats).float(), dim=-1), labels

        if split == "test" and "query" in self.features:
            return evaluate_retrieval(*emb("query"), *emb("gallery"), ks=ks)
        return evaluate_retrieval(*emb(split), ks=ks)


