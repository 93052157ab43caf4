"""Forgetting measured: the trained model evaluated zero-shot on other datasets' test splits.

``eval.transfer: [dataset, ...]`` (``name`` or ``name=DIR``) evaluates, at the end of a run, the
selected checkpoint's embedding on each dataset's test split (query vs gallery for In-Shop)
beside the untrained backbone's pooled features on the same split, and logs
``transfer/<dataset>/{recall_at_1,map_at_r}``, the untrained values
(``transfer/<dataset>/untrained_*``) and the retained fraction (``retained_* = trained / untrained``).
The untrained values depend only on the backbone, its weights, the test transform and the split,
so they are computed once and kept in ``<checkpoints>/transfer/`` (one JSON per key, written
atomically, shared by every run and study worker on that store).

The splits are read and checked when the run is prepared, before anything is created, and use
the run's ``data.max_per_class`` / ``data.max_classes`` caps (quick runs stay quick). Runs that do
not test (study tuning trials, ``eval.test=false``) do not transfer either: transfer splits are
test data.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness import data
from harness.config import DataConfig
from harness.data.specs import get_spec, read_raw, resolve_root, spec_names
from harness.errors import UserError
from harness.models.backbones import Backbone
from harness.retrieval.evaluation import evaluate, evaluate_queries, metric_name
from harness.retrieval.metrics import PerQuery

METRICS = ("recall_at_1", "map_at_r")


@dataclass
class TransferSet:
    """One transfer dataset: its evaluation batches, Recall@K values and baseline cache key; the
    untouched backbone (a CPU copy taken before the method changed it) for the untrained values."""

    name: str
    loaders: dict[str, Any]
    ks: tuple[int, ...]
    key: str
    pristine: nn.Module


def parse(entries: list, own: str) -> list[tuple[str, str]]:
    """``[(dataset, root)]`` from ``eval.transfer``; unknown names and the run's own dataset refused."""
    out = []
    for entry in entries:
        name, _, root = str(entry).partition("=")
        if name not in spec_names():
            raise UserError(f"unknown dataset '{name}' in eval.transfer; valid: {', '.join(spec_names())}")
        if name == own:
            raise UserError(
                f"eval.transfer lists '{name}', the dataset the run trains on; transfer is measured on other datasets"
            )
        out.append((name, root))
    return out


class UntrainedBackbone(nn.Module):
    """The backbone's pooled features, L2-normalised: the reference every method starts from."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(images).float(), dim=-1)


def prepare_transfer(
    entries: list,
    own: str,
    d: DataConfig,
    seed: int,
    eval_batch_size: int,
    backbone_kwargs: dict,
    backbone: Backbone,
    device: torch.device,
) -> list[TransferSet]:
    """Read and cap every transfer dataset's evaluation split (``eval.transfer`` entries, under the
    run's data config ``d`` and ``seed``) and build its batches; call it before the method is built
    on ``backbone`` (random-init backbones have no other copy). No entries: nothing to do (runs
    that do not test, like study tuning trials, pass none: transfer splits are test data)."""
    sets: list[TransferSet] = []
    if not entries:
        return sets
    pristine = copy.deepcopy(backbone.model).cpu()
    for name, root in parse(list(entries), own):
        spec = get_spec(name)
        raw = read_raw(spec, resolve_root(spec, root), check=getattr(d, "check_published", True))
        tables = data.evaluation_tables(raw, d, seed)
        if d.verify_images:
            data.verify_tables(tables)
        loaders = {
            split: data.split_batches(
                table,
                d,
                seed,
                eval_batch_size,
                backbone.mean,
                backbone.std,
                device,
                d.pipeline,
                train=False,
                split=split,
            )
            for split, table in tables.items()
        }
        weights = backbone.weight_source + (f":seed={seed}" if backbone.weight_source == "random-init" else "")
        facts = {
            "backbone": backbone.name,
            "weights": weights,
            "dataset": name,
            "root": str(resolve_root(spec, root)),
            "sizes": [len(t) for t in tables.values()],
            "image_size": d.image_size,
            "resize_size": d.resize_size,
            "test_resize": d.test_resize,
            "kwargs": backbone_kwargs,
            "ks": list(spec.ks),
            "caps": [d.max_per_class, d.max_classes, seed if d.max_per_class or d.max_classes else 0],
        }
        key = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:20]
        sets.append(TransferSet(name, loaders, tuple(spec.ks), key, pristine))
    return sets


def untrained_metrics(ts: TransferSet, amp: Any, device: torch.device, cache_dir: Path) -> dict[str, float]:
    """The untrained backbone's metrics on ``ts``, from the store's cache or computed and cached."""
    cached = Path(cache_dir) / f"{ts.key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    model = UntrainedBackbone(ts.pristine).to(device)
    metrics = {metric_name(k): v for k, v in evaluate(model, ts.loaders, amp, ts.ks, "test").items()}
    model.cpu()
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(metrics))
    os.replace(partial, cached)  # concurrent workers: the last identical write wins
    return metrics


def transfer_metrics(
    model: nn.Module,
    sets: list[TransferSet],
    selected: dict | None,
    *,
    merged: bool,
    amp: Any,
    device: torch.device,
    cache_dir: Path,
    queries: dict[str, PerQuery] | None = None,
) -> dict[str, float]:
    """``transfer/<dataset>/...`` of the selected checkpoint (``selected``: its trainable state,
    loaded unless the model already holds it ``merged``); untrained values cached in ``cache_dir``.
    ``queries``, when given, receives each dataset's per-query results of the trained model."""
    if not sets:
        return {}
    if selected and not merged:
        model.load_trainable_state_dict(selected)
    out: dict[str, float] = {}
    for ts in sets:
        scored = evaluate_queries(model, ts.loaders, amp, ts.ks, "test")
        if queries is not None:
            queries[ts.name] = scored
        trained = {metric_name(k): v for k, v in scored.means().items()}
        untrained = untrained_metrics(ts, amp, device, cache_dir)
        for m in METRICS:
            out[f"transfer/{ts.name}/{m}"] = trained[m]
            out[f"transfer/{ts.name}/untrained_{m}"] = untrained[m]
            out[f"transfer/{ts.name}/retained_{m}"] = trained[m] / untrained[m] if untrained[m] > 0 else 0.0
    return out
