"""Adapters (SPECS section 2): small trainable modules inside a frozen backbone.

ViT: AdaptFormer-style bottleneck (D -> bottleneck -> D, ReLU, scale s, up-projection zero-init so
the model starts as the backbone) in each chosen block. ``parallel`` (AdaptFormer, VPTSP-G's code)
feeds it the post-attention residual stream and adds it to the MLP branch; ``sequential``
(Houlsby) applies it to the MLP branch output with its own residual.

CNN: residual bottleneck adapters ``x + BN(up(ReLU(down(x))))`` (1x1 convolutions C -> C/16 -> C,
Rebuffi et al. 2017 made parameter-efficient) after each residual block or stage. The BN scale
starts at zero (the up-projection when ``cnn_norm=false``), so the model starts as the backbone;
zeroing the conv instead would make the first train-mode BN divide a zero batch by sqrt(eps),
i.e. a gradient ~300x too large. On ResNet-50 (16 blocks, C = 256/512/1024/2048) that is
sum(C^2/8 + 2C) = 2,545,152 parameters (10% of the backbone; the full C x C version was 21.2M).

The adapters are attached with :mod:`harness.models.inject` (forward hooks, not module
replacement): the backbone keeps its own attention/MLP code and parameter names (so any head
count and qkv bias work, unlike the VPTSP-G code's hard-coded 12-head block), and the adapters
live in ``adapter_modules`` (prefix ``adapter_``; their BatchNorm statistics are saved with them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from timm.models.vision_transformer import Block
from torch import nn

from harness.models import BuildContext, DMLModel, Injection, UserError, freeze, ranged, register_method, select_indices
from methods import _vptspg_recipes as vptspg_recipes


@dataclass
class AdapterConfig:
    #: ViT: bottleneck width of each adapter (D -> bottleneck -> D)
    bottleneck: int = ranged(64, "> 0")
    #: ViT: output scale s of the adapter branch
    scale: float = 1.0
    #: indices of the blocks (ViT) or residual blocks/stages (CNN) that get an adapter; empty = all
    blocks: list = field(default_factory=list)
    #: ViT: "parallel" (AdaptFormer, beside the MLP) or "sequential" (Houlsby, after the MLP)
    style: Literal["parallel", "sequential"] = "parallel"
    #: ViT: LayerNorm in the adapter: "none" (SPECS), "pre" (on its input) or "post" (on its
    #: output; VPTSP-G code default)
    layernorm: Literal["none", "pre", "post"] = "none"
    #: CNN: one adapter after every residual "block" or after every "stage"
    cnn_placement: Literal["block", "stage"] = "block"
    #: CNN: BatchNorm after the up-projection (x + BN(up(ReLU(down(x))))); false: no BatchNorm
    cnn_norm: bool = True
    #: CNN: channel reduction of the bottleneck (C -> C/r -> C 1x1 convolutions)
    cnn_reduction: int = ranged(16, "> 0")


class BottleneckAdapter(nn.Module):
    """``s * up(ReLU(down(x)))`` with optional LayerNorm before or after; zero output at init."""

    def __init__(self, dim: int, bottleneck: int, scale: float, layernorm: str) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim) if layernorm == "pre" else nn.Identity()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.post_norm = nn.LayerNorm(dim) if layernorm == "post" else nn.Identity()
        self.scale = scale
        # AdaptFormer "lora" init: kaiming-uniform down, zeros elsewhere
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_norm(self.up(torch.relu(self.down(self.pre_norm(x)))) * self.scale)


class ConvAdapter(nn.Module):
    """``BN(up(ReLU(down(x))))`` with 1x1 convolutions C -> C/r -> C, zero at init (the BN scale,
    or the up-projection without BN); the hook adds the residual."""

    def __init__(self, channels: int, norm: bool, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.down = nn.Conv2d(channels, hidden, 1, bias=False)
        self.up = nn.Conv2d(hidden, channels, 1, bias=not norm)
        self.norm = nn.BatchNorm2d(channels) if norm else nn.Identity()
        if norm:
            nn.init.zeros_(self.norm.weight)
        else:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.up(torch.relu(self.down(x))))


def attach_vit_adapters(model: nn.Module, cfg: AdapterConfig) -> Injection:
    """Hook an adapter into each chosen timm ``Block`` (keys ``blocks_<i>``)."""
    blocks = list(getattr(model, "blocks", []))
    if not blocks or not all(isinstance(b, Block) for b in blocks):
        kinds = sorted({type(b).__name__ for b in blocks}) or ["none"]
        raise UserError(f"adapter needs timm ViT 'Block' blocks, got {', '.join(kinds)}; valid: vit_*/deit_* models")
    injection = Injection()
    for i in select_indices(len(blocks), cfg.blocks, "method_args.blocks"):
        block = blocks[i]
        adapter = BottleneckAdapter(model.embed_dim, cfg.bottleneck, cfg.scale, cfg.layernorm)
        # ls2 is the last op of the MLP branch (Identity without LayerScale): its output is the
        # MLP branch, to which the parallel adapter (fed the post-attention stream, i.e. norm2's
        # input) is added, or to which the sequential one adds its own residual branch
        tap = block.norm2 if cfg.style == "parallel" else None
        injection.add(f"blocks.{i}", block.ls2, adapter, tap_input_of=tap)
    return injection


def _residual_units(stage: nn.Module) -> list[nn.Module]:
    """The residual blocks of a timm CNN stage (ResNet layerN, EfficientNet blocks.N, ConvNeXt stages.N)."""
    inner = getattr(stage, "blocks", None)
    if isinstance(inner, nn.Sequential):
        return list(inner)
    return list(stage.children()) if isinstance(stage, nn.Sequential) else []


def attach_cnn_adapters(model: nn.Module, cfg: AdapterConfig) -> Injection:
    """Hook ``x + adapter(x)`` after each chosen residual block or stage of a timm CNN."""
    info = getattr(model, "feature_info", None)
    stages = [(f["module"], model.get_submodule(f["module"])) for f in (info or [])]
    stages = [(name, m) for name, m in stages if _residual_units(m)]
    if cfg.cnn_placement == "stage":
        units = stages
    else:
        units = [(f"{name}.{j}", u) for name, m in stages for j, u in enumerate(_residual_units(m))]
    if not units:
        raise UserError(
            f"adapter finds no residual stages in {type(model).__name__}; valid: timm CNNs with feature_info"
        )
    channels: dict[str, int] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            channels[name] = out.shape[1]

        return hook

    handles = [u.register_forward_hook(record(n)) for n, u in units]
    with torch.no_grad():
        was_training = model.training
        model.eval()
        model(torch.zeros(1, 3, 64, 64))
        model.train(was_training)
    for h in handles:
        h.remove()
    injection = Injection()
    for i in select_indices(len(units), cfg.blocks, "method_args.blocks", cfg.cnn_placement):
        name, unit = units[i]
        injection.add(name, unit, ConvAdapter(channels[name], cfg.cnn_norm, cfg.cnn_reduction))
    return injection


@register_method(
    "adapter",
    display="Adapter",
    config=AdapterConfig,
    prefixes=("adapter_",),
    presets=vptspg_recipes.presets("adapter"),
)
def adapter(ctx: BuildContext, cfg: AdapterConfig) -> DMLModel:
    """Frozen backbone with bottleneck adapters (ViT: AdaptFormer; CNN: residual 1x1 convs) and the head."""
    backbone = ctx.backbone.model
    freeze(backbone)
    attach = attach_vit_adapters if ctx.backbone.family == "vit" else attach_cnn_adapters
    injection = attach(backbone, cfg)
    model = ctx.model(frozen_backbone=True)
    model.adapter_modules = injection.modules
    return model
