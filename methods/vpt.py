"""Visual Prompt Tuning (Jia et al., ECCV 2022; SPECS section 3): ``vpt_shallow`` and ``vpt_deep``.

ViT backbones: learnable prompt tokens run through the frozen blocks. Two placements:

* ``variant="vpt"`` (KMnP/vpt, default): tokens ``[CLS, prompts, patches]``; shallow inserts one
  set before block 0 and carries it through; deep gives each of the first ``depth`` blocks a fresh
  set that replaces the previous block's prompt outputs. Init uniform(+-sqrt(6/(3*p*p + D))).
* ``variant="vptspg"`` (VPTSP-G code): layer ``l < depth`` gets ``max(N - l*block_step, 0)``
  tokens put in front of CLS and stripped after that block; xavier-normal init.

CNN backbones (VPT paper, ConvNets): the prompt is a learnable frame of ``pad_pixels`` pixels
around the image. The image is *padded* (it grows from S to S + 2p) rather than shrunk to keep S:
padding is what the reference code does, it keeps every input pixel, and a global-pooling CNN
accepts the larger input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from harness.models import BuildContext, DMLModel, UserError, freeze, ranged, register_method
from methods import _vptspg_recipes as vptspg_recipes
from methods._vit import (
    check_plain_vit,
    embed_tokens,
    pool_tokens,
    resolve_depth,
    run_blocks,
    token_counts,
    vpt_uniform_,
    xavier_normal_as,
)

PREFIX = "prompt_"


@dataclass
class VPTShallowConfig:
    #: prompt tokens N (ViT backbones)
    num_prompts: int = ranged(10, "> 0")
    #: dropout on the prompt embeddings (KMnP/vpt PROMPT.DROPOUT)
    dropout: float = ranged(0.0, "[0, 1)")
    #: "vpt": KMnP/vpt placement [CLS, prompts, patches], uniform init; "vptspg": VPTSP-G's
    #: placement (before CLS, stripped after each block), xavier-normal init
    variant: Literal["vpt", "vptspg"] = "vpt"
    #: CNN backbones: width in pixels of the learnable frame padded around the image
    pad_pixels: int = ranged(8, "> 0")


@dataclass
class VPTDeepConfig(VPTShallowConfig):
    #: prompted blocks: the first ``depth`` blocks get their own prompts (0 = all blocks)
    depth: int = 0
    #: variant "vptspg" only: layer l gets max(N - l*block_step, 0) tokens
    block_step: int = 0


class PromptedViT(DMLModel):
    """Frozen ViT run block by block with the learnable prompts in ``prompt_embeddings``."""

    def __init__(self, backbone, head, criterion, *, prompts: nn.ParameterList, mode: str, dropout: float) -> None:
        super().__init__(backbone, head, criterion, frozen_backbone=True)
        self.prompt_embeddings = prompts
        self.prompt_dropout = nn.Dropout(dropout)
        self.prompt_mode = mode

    def layer_prompts(self) -> list[torch.Tensor]:
        """One ``(1, n_l, D)`` tensor per prompted block, dropout applied."""
        return [self.prompt_dropout(p) for p in self.prompt_embeddings]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        tokens = embed_tokens(self.backbone, images)
        tokens = run_blocks(self.backbone, tokens, self.layer_prompts(), self.prompt_mode)
        return pool_tokens(self.backbone, tokens)


def make_vit_prompts(model: nn.Module, counts: list[int], variant: str) -> nn.ParameterList:
    """Per-layer prompt parameters ``(1, n_l, D)`` initialised as the chosen variant's reference."""
    dim = model.embed_dim
    params = []
    for n in counts:
        if variant == "vpt":
            t = vpt_uniform_(torch.empty(1, n, dim), model)
        else:
            t = xavier_normal_as((1, counts[0], dim), n)
        params.append(nn.Parameter(t))
    return nn.ParameterList(params)


class PaddedPromptCNN(DMLModel):
    """Frozen CNN whose input is framed by ``pad`` learnable pixels on each side (VPT "pad")."""

    def __init__(self, backbone, head, criterion, *, image_size: int, pad: int) -> None:
        super().__init__(backbone, head, criterion, frozen_backbone=True)
        self.image_size, self.pad = image_size, pad
        # raw pixel values in [0, 1], normalised like the images at forward (as KMnP/vpt)
        self.prompt_top_bottom = nn.Parameter(torch.rand(1, 3, 2 * pad, image_size + 2 * pad))
        self.prompt_left_right = nn.Parameter(torch.rand(1, 3, image_size, 2 * pad))
        self.register_buffer("prompt_mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("prompt_std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)

    def prompt_input(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised image inside a frame of normalised learnable pixels: (B, 3, S+2p, S+2p)."""
        b, _, h, w = images.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"padding prompts were built for {self.image_size}px images, got {h}x{w}")
        p = self.pad
        lr = ((self.prompt_left_right - self.prompt_mean) / self.prompt_std).expand(b, -1, -1, -1).to(images.dtype)
        tb = ((self.prompt_top_bottom - self.prompt_mean) / self.prompt_std).expand(b, -1, -1, -1).to(images.dtype)
        x = torch.cat([lr[..., :p], images, lr[..., p:]], dim=-1)
        return torch.cat([tb[..., :p, :], x, tb[..., p:, :]], dim=-2)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.prompt_input(images))


def build_vpt(ctx: BuildContext, cfg: VPTShallowConfig, depth: int, block_step: int, method: str) -> DMLModel:
    """Shared builder: shallow is deep with one prompted block."""
    freeze(ctx.backbone.model)
    head = ctx.head()
    criterion = ctx.criterion(head.out_dim)
    if ctx.backbone.family == "cnn":
        return PaddedPromptCNN(ctx.backbone, head, criterion, image_size=ctx.cfg.data.image_size, pad=cfg.pad_pixels)
    model = check_plain_vit(ctx.backbone.model, method)
    if block_step < 0 or (block_step and cfg.variant == "vpt"):
        raise UserError(
            f"bad value {block_step!r} for 'method_args.block_step': must be >= 0, and 0 unless variant=vptspg"
        )
    counts = [n for n in token_counts(cfg.num_prompts, depth, block_step) if n > 0]
    prompts = make_vit_prompts(model, counts, cfg.variant)
    return PromptedViT(ctx.backbone, head, criterion, prompts=prompts, mode=cfg.variant, dropout=cfg.dropout)


_SEARCH = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}


@register_method(
    "vpt_shallow",
    display="VPT-Shallow",
    config=VPTShallowConfig,
    prefixes=(PREFIX,),
    search_space=_SEARCH,
    presets=vptspg_recipes.presets("vpt_shallow"),
)
def vpt_shallow(ctx: BuildContext, cfg: VPTShallowConfig) -> DMLModel:
    """VPT-shallow: one set of prompt tokens before the first block (CNN: learnable padding frame)."""
    return build_vpt(ctx, cfg, depth=1, block_step=0, method="vpt_shallow")


@register_method(
    "vpt_deep",
    display="VPT-Deep",
    config=VPTDeepConfig,
    prefixes=(PREFIX,),
    search_space=_SEARCH,
    presets=vptspg_recipes.presets("vpt_deep"),
)
def vpt_deep(ctx: BuildContext, cfg: VPTDeepConfig) -> DMLModel:
    """VPT-deep: fresh prompt tokens for each of the first ``depth`` blocks (CNN: learnable padding frame)."""
    depth = 0
    if ctx.backbone.family == "vit":
        depth = resolve_depth(cfg.depth, check_plain_vit(ctx.backbone.model, "vpt_deep"), "depth")
    return build_vpt(ctx, cfg, depth=depth, block_step=cfg.block_step, method="vpt_deep")
