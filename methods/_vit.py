"""Token plumbing for prompt methods: run a timm ViT block by block with prompt tokens inserted.

Prompt methods (VPT, VPTSP-G) need the token sequence between blocks, which ``model(x)`` hides.
These helpers reproduce timm's ``VisionTransformer.forward_features`` step by step (embedding,
positional embedding *before* prompts are inserted, pre-norm, blocks, final norm, pooling) so the
frozen backbone's own modules do all the work and only the prompt bookkeeping lives here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from harness.models import UserError

#: prompt placement modes: "vpt" = KMnP/vpt ([prefix, prompts, patches], carried through the
#: blocks, deep prompts replace the previous outputs); "vptspg" = VPTSP-G code (prompts put before
#: every token and stripped again after each block)
MODES = ("vpt", "vptspg")


def check_plain_vit(model: nn.Module, method: str) -> VisionTransformer:
    """Return ``model`` if it is a plain timm ``VisionTransformer`` whose blocks take one tensor.

    Subclasses (distilled DeiT, EVA, BEiT ...) change the token layout or the block call
    signature (rotary or relative position bias), so prompts cannot be inserted blindly.
    """
    if type(model) is not VisionTransformer:
        raise UserError(
            f"method '{method}' needs a plain timm VisionTransformer backbone, got {type(model).__name__}; "
            "valid: vit_*/deit_* (non-distilled) models"
        )
    if getattr(model, "attn_pool", None) is not None:
        raise UserError(f"method '{method}' does not support attention pooling (global_pool='map'); valid: token, avg")
    return model


def embed_tokens(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding + prefix tokens + positional embedding (prompts get no position)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def pool_tokens(model: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Final norm and timm's own pooling (CLS token or average) on prompt-free tokens."""
    return model.forward_head(model.norm(tokens), pre_logits=True)


def run_blocks(
    model: VisionTransformer,
    tokens: torch.Tensor,
    prompts: Sequence[torch.Tensor | None],
    mode: str,
) -> torch.Tensor:
    """Run every block; ``prompts[i]`` (``(B or 1, n_i, D)`` or None) belongs to block ``i``.

    mode "vpt": the first prompt set is inserted after the prefix tokens (CLS, registers) and
    carried through; a later non-None set *replaces* the previous block's prompt outputs (VPT-deep).
    mode "vptspg": each set is put in front of the sequence before its block and stripped after.
    Returns the tokens without prompts, so timm's pooling sees the usual layout.
    """
    if mode not in MODES:
        raise ValueError(f"unknown prompt mode {mode!r}")
    batch = tokens.shape[0]
    npt = model.num_prefix_tokens
    carried = 0  # number of prompt tokens currently in the sequence (mode "vpt")
    for i, block in enumerate(model.blocks):
        p = prompts[i] if i < len(prompts) else None
        if p is not None:
            p = p.expand(batch, -1, -1).to(tokens.dtype)
        if mode == "vptspg":
            n = 0 if p is None else p.shape[1]
            if n:
                tokens = torch.cat([p, tokens], dim=1)
            tokens = block(tokens)[:, n:]
            continue
        if p is not None:
            if carried and p.shape[1] != carried:
                raise ValueError(f"block {i}: {p.shape[1]} prompts replace {carried}")
            rest = tokens[:, npt + carried :]
            tokens = torch.cat([tokens[:, :npt], p, rest], dim=1)
            carried = p.shape[1]
        tokens = block(tokens)
    if mode == "vpt" and carried:
        tokens = torch.cat([tokens[:, :npt], tokens[:, npt + carried :]], dim=1)
    return tokens


def resolve_depth(depth: int, model: VisionTransformer, key: str) -> int:
    """``0`` means every block; larger than the backbone's block count is a user error."""
    blocks = len(model.blocks)
    if depth < 0 or depth > blocks:
        raise UserError(f"bad value {depth!r} for 'method_args.{key}': must be in 0..{blocks} (0 = all blocks)")
    return depth or blocks


def token_counts(num: int, depth: int, step: int) -> list[int]:
    """VPTSP-G's per-layer prompt count: layer ``l < depth`` gets ``max(num - l*step, 0)``."""
    return [max(num - layer * step, 0) for layer in range(depth)]


def vpt_uniform_(t: torch.Tensor, model: VisionTransformer) -> torch.Tensor:
    """KMnP/vpt init: uniform(+-sqrt(6 / (3 * patch_h * patch_w + D))), patch size from the model."""
    ph, pw = model.patch_embed.patch_size
    bound = math.sqrt(6.0 / float(3 * ph * pw + model.embed_dim))
    return nn.init.uniform_(t, -bound, bound)


def xavier_normal_as(shape: tuple[int, ...], used: int) -> torch.Tensor:
    """VPTSP-G init: xavier-normal of the code's full ``(rows, num, D)`` tensor, first ``used`` tokens.

    The code allocates ``num`` tokens per layer and uses only the first ``used``; the init scale
    depends on the full shape, so it is drawn on that shape and only the used part is kept.
    """
    return nn.init.xavier_normal_(torch.zeros(shape))[:, :used].clone()
