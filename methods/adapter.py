"""Adapters (SPECS section 2): small trainable modules inside a frozen backbone.

ViT: AdaptFormer-style bottleneck (D -> bottleneck -> D, ReLU, scale s, up-projection zero-init so
the model starts as the backbone) in each chosen block. ``parallel`` (AdaptFormer, VPTSP-G's code)
feeds it the post-attention residual stream and adds it to the MLP branch; ``sequential``
(Houlsby) applies it to the MLP branch output with its own residual.

CNN: residual 1x1-conv adapters (Rebuffi et al. 2017) ``x + BN(conv1x1(x))`` after each residual
block or stage. The BN scale starts at zero (the conv itself when ``cnn_norm=false``), so the model
starts as the backbone; zeroing the conv instead would make the first train-mode BN divide a
zero batch by sqrt(eps), i.e. a gradient ~300x too large.

The adapters are attached with forward hooks rather than by replacing timm modules: the backbone
keeps its own attention/MLP code and parameter names (so any head count and qkv bias work, unlike
the VPTSP-G code's hard-coded 12-head block), and the adapters live in ``adapter_modules``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from timm.models.vision_transformer import Block
from torch import nn

from harness.errors import UserError
from harness.core.model import BuildContext, DMLModel, freeze
from harness.core.registry import register_method


@dataclass
class AdapterConfig:
    #: ViT: bottleneck width of each adapter (D -> bottleneck -> D)
    bottleneck: int = 64
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
    #: CNN: BatchNorm after the 1x1 conv (x + BN(conv1x1(x))); false: x + conv1x1(x)
    cnn_norm: bool = True


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
    """``BN(conv1x1(x))`` (or ``conv1x1(x)``), zero at init; the hook adds the residual."""

    def __init__(self, channels: int, norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=not norm)
        self.norm = nn.BatchNorm2d(channels) if norm else nn.Identity()
        if norm:
            nn.init.zeros_(self.norm.weight)
        else:
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class _Tap:
    """Forward pre-hook remembering a module's input (the block's post-attention stream)."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.x = args[0]


class _AddAdapter:
    """Forward hook: ``output + adapter(source)``, source = the tapped input or the output itself."""

    def __init__(self, adapter: nn.Module, tap: _Tap | None = None) -> None:
        self.adapter, self.tap = adapter, tap

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.tap is None:
            return output + self.adapter(output)
        source, self.tap.x = self.tap.x, None
        return output + self.adapter(source).to(output.dtype)


class AdapterModel(DMLModel):
    """Frozen backbone with hooked adapters in ``adapter_modules``."""

    # CNN adapters have BatchNorm statistics: they are trained state too
    saved_buffer_prefixes = ("adapter_",)

    @property
    def features_are_frozen(self) -> bool:
        """Adapters change the features, so they can never be cached."""
        return False


def _select(n: int, chosen: list, what: str) -> list[int]:
    if not chosen:
        return list(range(n))
    bad = [b for b in chosen if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < n]
    if bad:
        raise UserError(f"bad value {bad[0]!r} in 'method_args.blocks': valid {what} indices are 0..{n - 1}")
    return sorted(set(chosen))


def attach_vit_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.ModuleDict:
    """Hook an adapter into each chosen timm ``Block``; returns them keyed ``block_<i>``."""
    blocks = list(getattr(model, "blocks", []))
    if not blocks or not all(isinstance(b, Block) for b in blocks):
        kinds = sorted({type(b).__name__ for b in blocks}) or ["none"]
        raise UserError(f"adapter needs timm ViT 'Block' blocks, got {', '.join(kinds)}; valid: vit_*/deit_* models")
    if cfg.bottleneck <= 0:
        raise UserError(f"bad value {cfg.bottleneck!r} for 'method_args.bottleneck': must be > 0")
    adapters = nn.ModuleDict()
    for i in _select(len(blocks), cfg.blocks, "block"):
        block = blocks[i]
        adapter = BottleneckAdapter(model.embed_dim, cfg.bottleneck, cfg.scale, cfg.layernorm)
        tap = None
        if cfg.style == "parallel":
            tap = _Tap()
            block.norm2.register_forward_pre_hook(tap)
        # ls2 is the last op of the MLP branch (Identity without LayerScale): its output is the
        # MLP branch, to which the parallel adapter is added / on which the sequential one acts
        block.ls2.register_forward_hook(_AddAdapter(adapter, tap))
        adapters[f"block_{i}"] = adapter
    return adapters


def _residual_units(stage: nn.Module) -> list[nn.Module]:
    """The residual blocks of a timm CNN stage (ResNet layerN, EfficientNet blocks.N, ConvNeXt stages.N)."""
    inner = getattr(stage, "blocks", None)
    if isinstance(inner, nn.Sequential):
        return list(inner)
    return list(stage.children()) if isinstance(stage, nn.Sequential) else []


def attach_cnn_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.ModuleDict:
    """Hook ``x + adapter(x)`` after each chosen residual block or stage of a timm CNN."""
    info = getattr(model, "feature_info", None)
    stages = [(f["module"], model.get_submodule(f["module"])) for f in (info or [])]
    stages = [(name, m) for name, m in stages if _residual_units(m)]
    if cfg.cnn_placement == "stage":
        units = stages
    else:
        units = [(f"{name}.{j}", u) for name, m in stages for j, u in enumerate(_residual_units(m))]
    if not units:
        raise UserError(f"adapter finds no residual stages in {type(model).__name__}; valid: timm CNNs with feature_info")
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
    adapters = nn.ModuleDict()
    for i in _select(len(units), cfg.blocks, cfg.cnn_placement):
        name, unit = units[i]
        adapter = ConvAdapter(channels[name], cfg.cnn_norm)
        unit.register_forward_hook(_AddAdapter(adapter))
        adapters[name.replace(".", "_")] = adapter
    return adapters


@register_method(
    "adapter",
    config=AdapterConfig,
    search_space={
        "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "optim.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    },
)
def adapter(ctx: BuildContext, cfg: AdapterConfig) -> DMLModel:
    """Frozen backbone with bottleneck adapters (ViT: AdaptFormer; CNN: residual 1x1 convs) and the head."""
    backbone = ctx.backbone.model
    freeze(backbone)
    if ctx.backbone.family == "vit":
        adapters = attach_vit_adapters(backbone, cfg)
    else:
        adapters = attach_cnn_adapters(backbone, cfg)
    model = ctx.model(frozen_backbone=True, cls=AdapterModel)
    model.adapter_modules = adapters
    return model
