"""SSF, Scaling & Shifting Your Features (Lian et al., NeurIPS 2022; SPECS 9).

After each chosen operation with output ``x`` the features become ``gamma * x + beta``, one scale
and one shift per channel (the last dimension of ViT tokens, dimension 1 of CNN maps), with the
backbone frozen. The paper initialises ``gamma ~ N(1, 0.02)`` and ``beta ~ N(0, 0.02)``
(``init=paper``); ``init=identity`` starts at exactly 1 and 0, i.e. from the backbone itself.

Placement, as in the paper's code: ViT: after ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
``mlp.fc1`` and ``mlp.fc2`` of every block, plus after the patch embedding and the final norm
(``outer``); CNN: after every convolution. Every one of these operations is affine per output
channel, so ``gamma * (W x + b) + beta = (gamma W) x + (gamma b + beta)`` merges exactly into the
preceding linear, convolution or LayerNorm: the merged model is the backbone with other weights.

Parameter arithmetic (ViT, width D): per block D + 3D + D + D + 4D + D = 11D channels, plus D for
the patch embedding and D for the final norm, two parameters per channel: 2 (11 L + 2) D.
ViT-B/16 (D = 768, L = 12): 205,824, the paper's 0.21M; ViT-S/16 (D = 384): 102,912.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from harness.models import (
    BuildContext,
    DMLModel,
    Injection,
    MergeableModel,
    UserError,
    block_targets,
    freeze,
    ranged,
    register_method,
)

#: the paper's operations inside a timm ViT block
VIT_BLOCK_TARGETS = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]


@dataclass
class SSFConfig:
    #: "paper": scale ~ N(1, init_std), shift ~ N(0, init_std); "identity": exactly 1 and 0
    init: Literal["paper", "identity"] = "paper"
    #: standard deviation of the paper's initialisation
    init_std: float = ranged(0.02, ">= 0", finite=True)
    #: ViT: operations of each block followed by SSF, named relative to the block
    targets: list = field(default_factory=lambda: list(VIT_BLOCK_TARGETS))
    #: ViT: indices of the blocks with SSF (empty = all)
    blocks: list = field(default_factory=list)
    #: ViT: also after the patch embedding and the final norm
    outer: bool = True
    #: evaluate the test split with scales and shifts merged into the preceding operations
    merge: bool = False


class ScaleShift(nn.Module):
    """``scale * x + shift`` per channel (``channel_dim`` -1 for tokens, 1 for feature maps)."""

    def __init__(self, channels: int, channel_dim: int, init: str, std: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        if init == "paper":
            nn.init.normal_(self.scale, mean=1.0, std=std)
            nn.init.normal_(self.shift, mean=0.0, std=std)
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.channel_dim] = -1
        return x * self.scale.view(shape).to(x.dtype) + self.shift.view(shape).to(x.dtype)


def channels_of(module: nn.Module) -> tuple[int, int]:
    """``(output channels, channel dim)`` of an operation SSF can follow and merge into."""
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, nn.Conv2d):
        return module.out_channels, 1
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine and len(module.normalized_shape) == 1:
        return module.normalized_shape[0], -1
    raise UserError(f"SSF follows Linear, Conv2d or affine LayerNorm operations, not {type(module).__name__}")


@torch.no_grad()
def merge_scale_shift(op: nn.Module, ssf: ScaleShift) -> None:
    """Fold ``scale * op(x) + shift`` into ``op``'s own weight and bias (created when absent)."""
    scale, shift = ssf.scale.float(), ssf.shift.float()
    weight = op.weight
    view = [-1] + [1] * (weight.ndim - 1)
    weight.copy_((weight.float() * scale.view(view)).to(weight.dtype))
    if op.bias is None:
        op.bias = nn.Parameter(torch.zeros_like(shift, dtype=weight.dtype, device=weight.device), requires_grad=False)
    op.bias.copy_((op.bias.float() * scale + shift).to(op.bias.dtype))


class SSFModel(MergeableModel):
    """Frozen backbone with per-channel scale and shift after its operations (``ssf_modules``)."""

    injected_attr = "ssf_modules"

    def fold(self, target: nn.Module, injected: ScaleShift) -> None:
        merge_scale_shift(target, injected)


def ssf_targets(model: nn.Module, family: str, cfg: SSFConfig) -> dict[str, nn.Module]:
    """The operations SSF follows, by path in the backbone."""
    if family == "cnn":
        return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    targets: dict[str, nn.Module] = {}
    if cfg.outer:
        targets["patch_embed.proj"] = model.get_submodule("patch_embed.proj")
    targets.update(
        block_targets(
            model,
            cfg.blocks,
            cfg.targets,
            key_blocks="method_args.blocks",
            key_names="method_args.targets",
            types=(nn.Linear, nn.LayerNorm),
        )
    )
    final = next((n for n in ("norm", "fc_norm") if isinstance(getattr(model, n, None), nn.LayerNorm)), None)
    if cfg.outer and final:
        targets[final] = model.get_submodule(final)
    return targets


@register_method("ssf", display="SSF", config=SSFConfig, prefixes=("ssf_",))
def ssf(ctx: BuildContext, cfg: SSFConfig) -> DMLModel:
    """Frozen backbone with a learnable per-channel scale and shift after its operations (SSF)."""
    backbone = ctx.backbone.model
    freeze(backbone)
    injection = Injection()
    for path, op in ssf_targets(backbone, ctx.backbone.family, cfg).items():
        channels, dim = channels_of(op)
        injection.add(path, op, ScaleShift(channels, dim, cfg.init, cfg.init_std), combine="replace")
    model = ctx.model(frozen_backbone=True, cls=SSFModel)
    model.attach(injection)
    model.merges_on_test = cfg.merge
    return model
