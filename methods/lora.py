"""LoRA (Hu et al., ICLR 2022; SPECS 9): low-rank updates of frozen linear layers.

For a frozen linear map ``W`` (``d_out x d_in``) the layer computes
``W x + (alpha / r) * B A dropout(x)`` with ``A`` (``r x d_in``, kaiming-uniform as in peft) and
``B`` (``d_out x r``, zeros), so training starts from the backbone's own function. Merging folds
the update into the weight, ``W' = W + (alpha / r) B A``: the merged model is the backbone with
other weights, with no extra inference cost (``method_args.merge=true`` tests the merged model).

ViT: the chosen linear layers of each chosen block (default ``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``). CNN: every pointwise (1x1, ungrouped) convolution, the CNN's linear
layers over channels (peft's Conv2d LoRA with a 1x1 kernel), so LoRA also runs on the embedded
EfficientNet-Lite0. The updates are injected with :mod:`harness.models.inject` and live in
``lora_modules``.

Parameter arithmetic (ViT, width D, MLP width 4D, rank r): per block qkv r(D + 3D), proj
r(D + D), fc1 r(D + 4D), fc2 r(4D + D) = 16 r D; ViT-S/16 (D = 384, 12 blocks) at r = 8:
12 * 16 * 8 * 384 = 589,824.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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


@dataclass
class LoRAConfig:
    #: rank r of each update
    rank: int = ranged(8, "> 0")
    #: scale alpha: the update is (alpha / r) * B A (peft's lora_alpha)
    alpha: float = ranged(8.0, "> 0", finite=True)
    #: dropout on the layer input before A (peft's lora_dropout)
    dropout: float = ranged(0.0, "[0, 1)")
    #: ViT: linear layers of each block to adapt, named relative to the block
    targets: list = field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"])
    #: ViT: indices of the adapted blocks (empty = all)
    blocks: list = field(default_factory=list)
    #: evaluate the test split with the updates merged into the frozen weights
    merge: bool = False


class LowRankUpdate(nn.Module):
    """``(alpha / r) * B A dropout(x)`` for a linear layer, or a 1x1 convolution (``conv=True``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float,
        conv: bool = False,
        stride: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # peft: lora_A kaiming-uniform, lora_B zeros
        self.scaling = alpha / rank
        self.conv, self.stride = conv, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        if self.conv:
            h = F.conv2d(x, self.A[:, :, None, None].to(x.dtype), stride=self.stride)
            return F.conv2d(h, self.B[:, :, None, None].to(x.dtype)) * self.scaling
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The merged update ``(alpha / r) B A`` (``d_out x d_in``)."""
        return (self.B.float() @ self.A.float()) * self.scaling


class LoRAModel(MergeableModel):
    """Frozen backbone with low-rank updates hooked onto its linear layers (``lora_modules``)."""

    injected_attr = "lora_modules"

    def fold(self, target: nn.Module, injected: LowRankUpdate) -> None:
        """``W <- W + (alpha / r) B A``."""
        target.weight += injected.delta_weight().view_as(target.weight).to(target.weight.dtype)


def pointwise_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Every 1x1 ungrouped convolution of a CNN, by path."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and m.padding in ((0, 0), "valid")
    }


@register_method("lora", display="LoRA", config=LoRAConfig, prefixes=("lora_",))
def lora(ctx: BuildContext, cfg: LoRAConfig) -> DMLModel:
    """Frozen backbone with low-rank updates of its linear layers (ViT) or 1x1 convolutions (CNN)."""
    backbone = ctx.backbone.model
    freeze(backbone)
    injection = Injection()
    if ctx.backbone.family == "vit":
        targets = block_targets(
            backbone,
            cfg.blocks,
            cfg.targets,
            key_blocks="method_args.blocks",
            key_names="method_args.targets",
            types=(nn.Linear,),
        )
        for path, layer in targets.items():
            update = LowRankUpdate(layer.in_features, layer.out_features, cfg.rank, cfg.alpha, cfg.dropout)
            injection.add(path, layer, update, source="input")
    else:
        convs = pointwise_convs(backbone)
        if not convs:
            raise UserError(f"lora finds no 1x1 convolutions in {type(backbone).__name__}; valid: timm ViTs and CNNs")
        for path, conv in convs.items():
            update = LowRankUpdate(
                conv.in_channels, conv.out_channels, cfg.rank, cfg.alpha, cfg.dropout, conv=True, stride=conv.stride
            )
            injection.add(path, conv, update, source="input")
    model = ctx.model(frozen_backbone=True, cls=LoRAModel)
    model.attach(injection)
    model.merges_on_test = cfg.merge
    return model
