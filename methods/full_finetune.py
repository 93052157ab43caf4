"""Full fine-tuning: every backbone parameter and the head are trained (SPECS section 2)."""
from __future__ import annotations

from harness.core.model import BuildContext, DMLModel
from harness.core.registry import register_method
from methods import _vptspg_recipes as vptspg_recipes


@register_method(
    "full_finetune",
    backbone="all",
    presets=vptspg_recipes.presets("full_finetune"),
    search_space={"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
)
def full_finetune(ctx: BuildContext, cfg: object) -> DMLModel:
    """Train the whole backbone and the embedding head."""
    return ctx.model(frozen_backbone=False)
