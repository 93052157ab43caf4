"""Parameter counts of every registered method on a given backbone (``dmlbench methods``)."""
from __future__ import annotations

from typing import Any

from harness.backbones import create_backbone
from harness.config import RunConfig, flatten, set_key
from harness.model import BuildContext
from harness.registry import get_method, method_names


def describe_methods(
    backbone: str = "tf_efficientnet_lite0",
    num_classes: int = 100,
    pretrained: bool = False,
    backbone_kwargs: dict | None = None,
    embed_dim: int = 512,
) -> list[dict[str, Any]]:
    """One row per registered method: family fit and trainable/total parameter counts.

    Counts come from building the real model (random init unless ``pretrained``), so they are
    exactly what a run logs. Methods that do not apply to the backbone family get no counts.
    """
    rows = []
    family = None
    for name in method_names():
        spec = get_method(name)
        bb = create_backbone(backbone, pretrained=pretrained, kwargs=backbone_kwargs)
        family = bb.family
        row: dict[str, Any] = {
            "name": name,
            "description": spec.description,
            "families": list(spec.families),
            "applies": spec.applies_to(family),
        }
        if row["applies"]:
            cfg = RunConfig(method=name, backbone=backbone)
            cfg.model.embed_dim = embed_dim
            cfg.model.backbone_kwargs = dict(backbone_kwargs or {})
            cfg.method_args = spec.config_cls()
            for key, value in flatten(spec.defaults).items():
                set_key(cfg, key, value)
            model = spec.builder(BuildContext(backbone=bb, num_classes=num_classes, cfg=cfg), cfg.method_args)
            row.update(model.count_parameters())
        rows.append(row)
    return rows
