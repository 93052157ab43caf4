"""Full fine-tuning: every backbone parameter and the head are trained (SPECS section 2)."""

from __future__ import annotations

from harness.models import BuildContext, DMLModel, register_method
from methods import _vptspg_recipes as vptspg_recipes


@register_method(
    "full_finetune",
    display="Full fine-tuning",
    backbone="all",
    presets={
        **vptspg_recipes.presets("full_finetune"),
        # FRPT's "fine-tuning" rows (Tables 1, 3, 4): the whole backbone with FRPT's paper training
        "frpt_paper": {
            "loss": {"name": "cross_entropy", "lr_mult": 1.0},
            "model": {"embed_dim": 0},
            "optim": {
                "name": "sgd",
                "lr": 1e-3,
                "momentum": 0.9,
                "weight_decay": 1e-4,
                "schedule": "step",
                "step_epochs": 50,
                "step_gamma": 0.9,
                "warmup_epochs": 0.0,
                "epochs": 500,
                "grad_clip": 0.0,
            },
            "data": {"batch_size": 32, "samples_per_class": 0, "augment": "frpt"},
            "recipe_source": "FRPT paper (AAAI 2023) Sec. 4.1 and Table 1 'fine-tuning': its training recipe "
            "with every backbone weight trained and a cross-entropy classifier",
        },
    },
    search_space={"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
)
def full_finetune(ctx: BuildContext, cfg: object) -> DMLModel:
    """Train the whole backbone and the embedding head."""
    return ctx.model(frozen_backbone=False)
