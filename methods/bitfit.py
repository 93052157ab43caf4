"""BitFit (Ben Zaken et al. 2022): only the backbone's bias terms and the head train."""

from __future__ import annotations

from torch import nn

from harness.models import BuildContext, DMLModel, freeze, register_method
from methods import _vptspg_recipes as vptspg_recipes


def unfreeze_biases(module: nn.Module) -> int:
    """Make every parameter named ``*bias`` trainable; return how many elements that is."""
    count = 0
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)
            count += p.numel()
    return count


@register_method("bitfit", display="BitFit", backbone="biases", presets=vptspg_recipes.presets("bitfit"))
def bitfit(ctx: BuildContext, cfg: object) -> DMLModel:
    """Train the backbone's bias terms (every ``*bias`` parameter) and the head."""
    freeze(ctx.backbone.model)
    unfreeze_biases(ctx.backbone.model)
    # BatchNorm statistics stay frozen: only the biases adapt (as in BitFit for CNNs)
    return ctx.model(frozen_backbone=True)
