"""Parameter counts of every registered method on a given backbone (``dmlbench methods``)."""

from __future__ import annotations

from typing import Any

from harness.models.backbones import create_backbone
from harness.training.resolution import resolve
from harness.training.setup import build_model
from methods import get_method, method_names


def describe_methods(
    backbone: str = "tf_efficientnet_lite0",
    num_classes: int = 100,
    pretrained: bool = False,
    backbone_kwargs: dict | None = None,
    embed_dim: int | None = None,
    image_size: int = 224,
) -> list[dict[str, Any]]:
    """One row per registered method: family fit and trainable/total parameter counts.

    Counts come from building the real model through the run path (``resolve`` + ``build_model``,
    random init unless ``pretrained``), so they are exactly what a run logs. ``embed_dim`` None
    keeps each method's default; ``image_size`` matters for VPT's padding prompts on CNNs. Methods
    that do not apply to the backbone family get no counts.
    """
    overrides: dict[str, Any] = {
        "model.pretrained": pretrained,
        "data.image_size": image_size,
        "data.resize_size": image_size,
        "model.backbone_kwargs": dict(backbone_kwargs or {}),
    }
    if embed_dim is not None:
        overrides["model.embed_dim"] = embed_dim
    rows = []
    for name in method_names():
        spec = get_method(name)
        bb = create_backbone(backbone, pretrained=pretrained, kwargs=backbone_kwargs)
        row: dict[str, Any] = {
            "name": name,
            "description": spec.description,
            "families": list(spec.families),
            "applies": spec.applies_to(bb.family),
        }
        if row["applies"]:
            cfg = resolve(method=name, backbone=backbone, overrides=overrides)
            row.update(build_model(cfg, num_classes, bb).count_parameters())
        rows.append(row)
    return rows
