"""Linear probe: frozen backbone, only the embedding head trains (SPECS section 2)."""

from __future__ import annotations

from dataclasses import dataclass

from harness.models import BuildContext, DMLModel, freeze, register_method
from methods import _vptspg_recipes as vptspg_recipes


@dataclass
class LinearProbeConfig:
    #: compute the frozen features of the training set once (test transform, no augmentation)
    #: and train the head on that cache; much faster, but gives up data augmentation
    cache_features: bool = False


@register_method(
    "linear_probe",
    display="Linear probe",
    config=LinearProbeConfig,
    presets={
        **vptspg_recipes.presets("linear_probe"),
        # FRPT Table 1 "PT (pre-trained only)": the frozen backbone's pooled features, untrained
        "untrained": {
            "optim": {"epochs": 0},
            "model": {"embed_dim": 0},
            "recipe_source": "FRPT paper (AAAI 2023) Table 1 'PT': the pre-trained backbone, no training",
        },
    },
    search_space={"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
)
def linear_probe(ctx: BuildContext, cfg: LinearProbeConfig) -> DMLModel:
    """Frozen backbone; train the embedding head only."""
    freeze(ctx.backbone.model)
    model = ctx.model(frozen_backbone=True)
    model.wants_feature_cache = cfg.cache_features
    return model
