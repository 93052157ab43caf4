"""Everything a study run needs, checked before it creates anything (parent runs, journal, trials).

A spec parses and its configs resolve in :func:`harness.studies.spec.load_spec`; here each run
config is taken further, as far as it goes without training: every dataset is found and read
(its published class counts included), every backbone's pretrained weights load (once per
backbone), every entry's model is built on the meta device (the method on that backbone family,
its options), and the MLflow store, the checkpoint folder and the Optuna storage are writable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.studies.spec import StudySpec


def preflight(spec: StudySpec, storage_url: str) -> None:
    """Raise a one-line UserError for the first thing that would stop the study later."""
    import torch

    from harness.models.backbones import create_backbone
    from harness.tracking.store import check_writable
    from harness.training.checkpoint import checkpoint_dir, ensure_writable
    from harness.training.setup import build_model, splits_for

    check_writable(spec.tracking_uri)
    check_storage_writable(storage_url)
    splits: dict[tuple, Any] = {}
    weights: set[tuple] = set()
    for dataset, entry in spec.units():
        cfg = spec.resolve(dataset, entry, {})
        where = f"entry '{entry.name}' on {dataset} of study {spec.name}"
        key = (cfg.dataset, cfg.data.root, cfg.seed)
        if key not in splits:
            splits[key] = _with_context(lambda: splits_for(cfg), where)
        source = (
            cfg.backbone,
            cfg.model.pretrained,
            cfg.model.weights,
            repr(sorted(cfg.model.backbone_kwargs.items())),
        )
        if source not in weights and cfg.model.pretrained:  # loads once per backbone: weights that fail, fail here
            _with_context(
                lambda: create_backbone(
                    cfg.backbone, pretrained=True, weights=cfg.model.weights, kwargs=cfg.model.backbone_kwargs
                ),
                where,
            )
            weights.add(source)
        with torch.device("meta"):  # the method on this backbone and its options, without memory
            backbone = _with_context(
                lambda: create_backbone(cfg.backbone, pretrained=False, kwargs=cfg.model.backbone_kwargs), where
            )
            _with_context(lambda: build_model(cfg, splits[key].train.num_classes, backbone), where)
        ensure_writable(checkpoint_dir(spec.tracking_uri, cfg.tracking.checkpoint_dir))


def _with_context(build: Any, where: str) -> Any:
    try:
        return build()
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def check_storage_writable(url: str) -> None:
    """A journal file's folder (or the file) must be writable before the journal is opened."""
    if "://" in url and not url.startswith("journal:"):
        return  # a database: opening it is the check (harness.studies.storage.open_rdb)
    path = Path(url.removeprefix("journal:")).expanduser()
    target = path if path.exists() else path.parent
    while not target.exists():
        target = target.parent
    if not os.access(target, os.W_OK):
        raise UserError(
            f"cannot write the Optuna journal {path}: {target} is not writable "
            "(pass --storage PATH or make the folder writable)"
        )
