"""FRPT, Fine-grained Retrieval Prompt Tuning (Wang et al., AAAI 2023; SPECS 5) and its ablations.

The backbone stays frozen and runs twice: once up to an early stage to parse the content into a
saliency map that drives a zoom-warp of the input (the discriminative perturbation prompt, DPP),
then on the warped image; the category-specific awareness head (CAH) re-weights the last feature
map before pooling, and a classifier is trained with cross-entropy. Registry names:

- ``frpt``: DPP + frozen backbone + CAH (paper Table 1, last row);
- ``frpt_dpp`` (DPP + PT), ``frpt_cah`` (PT + CAH), ``frpt_no_in`` (CAH without IN): Table 1;
- ``frpt_bbox`` (crop to the annotated box, via ``data.crop_to_box``) and ``frpt_cam`` (crop to
  the thresholded activation map) replace DPP by a fixed prompt: Table 5.

"Pre-trained only" is the frozen backbone evaluated untrained (e.g. ``linear_probe`` with
``optim.epochs=0`` and ``model.embed_dim=0``); "fine-tuning" is ``full_finetune`` with
``loss.name=cross_entropy``; the few-shot Table 4 is any of these with ``data.shots=K``.

``method_args.variant``: ``paper`` (default) uses a 31x31 convolution on block-1 features at
their own resolution, GAP and CAH reduction 8; ``code`` follows the released code: ReLU + 1x1
convolution on the third stage resized to a 31x31 grid, CAH reduction 1 plus its two-convolution
block, GeM pooling (p=3) and a BatchNorm neck (preset ``code`` also sets its label smoothing and
optimiser, and fast-reid's backbone: IBN-a ResNet-50 with last stride 1, fp16 with a GradScaler,
no weight decay on biases).

The IN ablation needs ``variant=code``: IN(M) has zero spatial mean in every channel and W_C is
constant over space, so GAP(W_C*M + (1-W_C)*IN(M)) = GAP(W_C*M). With the paper's CAH -> GAP
the IN term cannot change the embedding, and ``frpt_no_in`` trains exactly like ``frpt``. The
paper's Table 1 still reports a gap (72.2 vs 74.3 R@1 on CUB), which only a non-linearity between
CAH and pooling can produce, as the released code's conv block and GeM pooling are.

The DPP is fragile to large steps: its parser sums k*k*C inputs per saliency logit, so one
unclipped SGD step at the paper's lr 1e-3 collapsed the map to a point on pretrained
EfficientNet-Lite0 (a Fashion-MNIST batch at 96 px: peak 100x uniform, loss up), while gradient clipping at 1.0
trains it smoothly. DPP and CAH get their own optimiser groups (``dpp``, ``cah``); under AdamW the
DPP lr is divided by k^2 (``dpp_lr_mult``).

The content-parsing convolution starts at zero (``parser_init``): a uniform map, i.e. the
identity warp, so training starts from the frozen model's features; preset ``code`` uses PyTorch's
default init as the released code does.

Parameter arithmetic (ResNet-50, C training classes; ``params/trainable_inference`` excludes the
classifier, ``params/trainable`` includes it):

- DPP (paper): one 31x31 convolution 256 -> 1 without bias = 31*31*256 = 246,016, the paper's
  "0.25M" (a bias would add 1 but has no gradient under the spatial softmax, so there is none).
- CAH (paper, r = 8, bias-free): 2048*256 + 256*2048 = 1,048,576.
- Classifier: 2048*C bias-free; CUB with all 100 training classes 204,800 (80 classes, 163,840,
  with the default 20% validation carve-out).
- ``frpt``/``frpt_no_in``: 1,294,592 at inference, 1,499,392 with the CUB classifier.
  ``frpt_cah``/``frpt_bbox``/``frpt_cam``: 1,048,576 (+ classifier). ``frpt_dpp``: 246,016 (+ classifier).
- The paper reports 2.62M for PT + CAH and 2.86M for DPP + PT + CAH. Their difference (0.24M)
  matches our DPP, but no reading of the paper's CAH gives 2.62M: r = 8 gives 1.05M and the
  classifier adds only 0.20M (1.25M in all). r = 4 would give 2.10M (2.30M with the classifier),
  r = 2 4.19M. 2.62M would fit 2,621,440 = 2.5 * 2^20, e.g. the code's first 1x1 convolution
  2048 -> 1024 (2,097,152) plus an r = 16 attention (524,288), but neither is in the paper, and
  adding the DPP would print as 2.87M, not 2.86M. The released code's head counts far more:
  r = 1 attention 8,388,608 plus the conv block 20,977,664 (with BatchNorms), 29.4M. Our paper
  variant is therefore ~1.37M smaller than the paper's count, and we report our own counts. (The
  paper's fine-tuning count, 23.53M, is also not ResNet-50 without fc, 23,508,032, plus the CUB
  classifier, 23.71M.)
- ``variant=code``: DPP 1x1 on layer3 = 1,024; CAH 29,366,272; BN neck 2,048 (bias frozen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from harness.models import Backbone, BuildContext, DMLModel, UserError, freeze, ranged, register_method
from methods._frpt_parts import (
    CategoryAwareHead,
    ContentParser,
    DiscriminativePerturbationPrompt,
    SaliencySampler,
    cam_boxes,
    crop_and_resize,
    gem_pool,
    saliency_peak,
)


@dataclass
class FRPTConfig:
    #: paper (31x31 conv on block 1, CAH r=8, GAP) or code (ReLU + 1x1 conv on stage 3 resized
    #: to a 31x31 grid, CAH r=1 + conv block, GeM pooling, BatchNorm neck)
    variant: Literal["paper", "code"] = "paper"
    #: discriminative perturbation prompt (saliency-driven zoom of the input)
    use_dpp: bool = True
    #: category-specific awareness head on the last feature map
    use_cah: bool = True
    #: CAH mixes in the instance-normalised map: M_R = W_C*M + (1-W_C)*IN(M); false: W_C*M
    use_in: bool = True
    #: fixed prompt instead of DPP: none | cam (crop to the thresholded activation map's box)
    crop: Literal["none", "cam"] = "none"
    #: relative threshold of the activation map for crop=cam (fraction of its maximum)
    cam_threshold: float = ranged(0.5, "[0, 1)")
    #: index into the backbone's timm feature_info for content parsing; -1 = the variant's
    #: choice (CNN: first stride-4 stage for paper, stride-16 for code; ViT: block at 1/4 or 3/4 depth)
    parse_stage: int = -1
    #: kernel size of the paper's content-aware projection (odd)
    sigma: int = 31
    #: saliency grid size; 0 = the variant's (paper: the parsed map's size, code: 31)
    grid_size: int = 0
    #: Gaussian kernel D of the sampler: size (odd; the replication padding is size // 2) and FWHM
    gaussian_size: int = 61
    gaussian_fwhm: float = ranged(13.0, "> 0", finite=True)
    #: CAH channel reduction r; 0 = the variant's (paper 8, code 1)
    cah_reduction: int = 0
    #: initialisation of the content-parsing convolution: zero (uniform map = identity warp at
    #: the start) or default (PyTorch's conv init, as the released code)
    parser_init: Literal["zero", "default"] = "zero"
    #: learning-rate multiplier of the DPP parser; 0 = auto: 1 with SGD (the paper), 1/k^2 with
    #: AdamW (k = its kernel size). Adam moves each of the k*k*C weights by about lr per step, so
    #: the saliency logits would move k^2 times further than with a 1x1 parser: a 31x31 parser
    #: collapses the map to a point within a few AdamW steps at lr 1e-3
    dpp_lr_mult: float = ranged(0.0, ">= 0", "0 = auto", finite=True)


def default_parse_stage(feature_info: list[dict[str, Any]], variant: str) -> int:
    """Feature-info index of the paper's "block 1" (stride 4) or the code's "layer3" (stride 16).

    Token models have one entry per block, all at the same stride: use the block that ends the
    first (paper) or third (code) quarter of the depth, the ViT analogue of ResNet's stages.
    """
    reductions = [int(f["reduction"]) for f in feature_info]
    if len(set(reductions)) == 1:
        q = 0.25 if variant == "paper" else 0.75
        return max(0, math.ceil(len(reductions) * q) - 1)
    target = 4 if variant == "paper" else 16
    for i, r in enumerate(reductions):
        if r >= target:
            return i
    return len(reductions) - 1


def final_feature_map(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last feature map ``(B, C, h, w)``; token models' patch tokens reshaped to their grid."""
    out = model.forward_features(images)
    if out.ndim == 4:
        return out
    tokens = out[:, getattr(model, "num_prefix_tokens", 0) :]
    ph, pw = model.patch_embed.patch_size
    h, w = images.shape[-2] // ph, images.shape[-1] // pw
    if h * w != tokens.shape[1]:
        h = w = math.isqrt(tokens.shape[1])
    return tokens.transpose(1, 2).reshape(len(tokens), tokens.shape[2], h, w)


class FRPTModel(DMLModel):
    """Frozen backbone run twice (parse, then on the prompted image), CAH, pooling, classifier."""

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        criterion: nn.Module,
        *,
        dpp: DiscriminativePerturbationPrompt | None,
        cah: CategoryAwareHead | None,
        parse_index: int,
        pool: str,
        crop: str,
        cam_threshold: float,
        dpp_lr_mult: float = 0.0,
    ) -> None:
        super().__init__(backbone, head, criterion, frozen_backbone=True)
        self.dpp_prompt = dpp
        self.cah_head = cah
        self.parse_index = parse_index
        self.pool = pool
        self.crop = crop
        self.cam_threshold = cam_threshold
        self.dpp_lr_mult = dpp_lr_mult

    def param_groups(self, optim_cfg: Any, loss_cfg: Any) -> list[dict[str, Any]]:
        groups = super().param_groups(optim_cfg, loss_cfg)
        for g in groups:
            if g["role"] == "dpp":
                g["lr"] *= self.dpp_lr_factor(optim_cfg.name)
        return groups

    def dpp_lr_factor(self, optimizer: str) -> float:
        """The DPP group's lr multiplier (see ``FRPTConfig.dpp_lr_mult``)."""
        if self.dpp_lr_mult > 0 or self.dpp_prompt is None:
            return self.dpp_lr_mult or 1.0
        k = self.dpp_prompt.parser.proj.kernel_size
        return 1.0 if optimizer == "sgd" else 1.0 / (k[0] * k[1])

    @property
    def has_dpp(self) -> bool:
        return self.dpp_prompt is not None

    def parse_map(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen early feature map M_S (no gradient needed: nothing before it trains)."""
        with torch.no_grad():
            return self.backbone.forward_intermediates(
                images, indices=[self.parse_index], intermediates_only=True, stop_early=True
            )[0]

    def prompt(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prompted input and, for DPP, its saliency map and coarse sampling grid."""
        if self.dpp_prompt is not None:
            warped, saliency, grid = self.dpp_prompt(images, self.parse_map(images))
            return {"images": warped, "saliency": saliency, "grid": grid}
        if self.crop == "cam":
            with torch.no_grad():
                boxes = cam_boxes(self.feature_map(images), images.shape[-2:], self.cam_threshold)
                return {"images": crop_and_resize(images, boxes), "boxes": boxes}
        return {"images": images}

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's last feature map of ``images`` as they are (no prompt, no CAH):
        what class activation maps are drawn over (``dmlbench visualize cam``)."""
        return final_feature_map(self.backbone, images)

    def pool_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """The run's pooling of a feature map: GeM (the code variant) or average."""
        return gem_pool(fmap) if self.pool == "gem" else fmap.mean(dim=(2, 3))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.prompted_features(self.prompt(images)["images"])

    def prompted_features(self, prompted: torch.Tensor) -> torch.Tensor:
        """Features of already prompted images: the frozen backbone, the CAH, the pooling."""
        fmap = self.feature_map(prompted)
        if self.cah_head is not None:
            fmap = self.cah_head(fmap)
        return self.pool_map(fmap)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss, and with DPP ``train/dpp_saliency_peak`` (:func:`saliency_peak`, summed on the
        device like the loss), so a collapsing map shows in MLflow."""
        prompted = self.prompt(images)
        loss = self.loss_from_features(self.prompted_features(prompted["images"]), labels)
        return loss, ({"dpp_saliency_peak": saliency_peak(prompted["saliency"])} if "saliency" in prompted else {})


class BNNeck(nn.Module):
    """fast-reid's BatchNorm neck: BatchNorm1d with its bias frozen at zero (code variant)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


def _check(cfg: FRPTConfig, backbone: Backbone) -> list[dict[str, Any]]:
    """Validate options against the backbone; returns its feature_info."""
    if cfg.use_dpp and cfg.crop != "none":
        raise UserError(f"method_args.crop={cfg.crop} replaces the DPP; set method_args.use_dpp=false or crop=none")
    for key in ("sigma", "gaussian_size"):
        v = getattr(cfg, key)
        if v < 1 or v % 2 == 0:
            raise UserError(f"bad value {v!r} for 'method_args.{key}': must be odd and positive")
    if cfg.grid_size == 1 or cfg.grid_size < 0:
        raise UserError(f"bad value {cfg.grid_size!r} for 'method_args.grid_size': must be 0 or >= 2")
    info = list(getattr(backbone.model, "feature_info", []) or [])
    if not info or not hasattr(backbone.model, "forward_intermediates"):
        raise UserError(f"backbone '{backbone.name}' has no timm feature_info/forward_intermediates; FRPT needs both")
    if not -1 <= cfg.parse_stage < len(info):
        stages = ", ".join(f"{i}={f['module']}" for i, f in enumerate(info))
        raise UserError(f"bad value {cfg.parse_stage!r} for 'method_args.parse_stage'; valid: -1 (auto), {stages}")
    r = cfg.cah_reduction
    if r < 0 or r > backbone.feature_dim:
        raise UserError(
            f"bad value {r!r} for 'method_args.cah_reduction': must be 0 (auto) or 1..{backbone.feature_dim}"
        )
    return info


def build_frpt(ctx: BuildContext, cfg: FRPTConfig) -> FRPTModel:
    """Assemble the FRPT model described by ``cfg`` on the frozen context backbone."""
    info = _check(cfg, ctx.backbone)
    paper = cfg.variant == "paper"
    freeze(ctx.backbone.model)
    parse_index = cfg.parse_stage if cfg.parse_stage >= 0 else default_parse_stage(info, cfg.variant)
    dpp = None
    side = math.ceil(ctx.cfg.data.image_size / int(info[parse_index]["reduction"]))
    if cfg.use_dpp and paper and not cfg.grid_size and side < 2:
        raise UserError(
            f"the DPP saliency grid would be {side}x{side} at data.image_size={ctx.cfg.data.image_size} "
            f"(stage {info[parse_index]['module']}); it needs 2x2: raise the image size, pick an "
            "earlier method_args.parse_stage or set method_args.grid_size"
        )
    if cfg.use_dpp:
        parser = ContentParser(
            int(info[parse_index]["num_chs"]),
            kernel=cfg.sigma if paper else 1,
            relu=not paper,
            grid_size=cfg.grid_size if (cfg.grid_size or paper) else 31,
            zero_init=cfg.parser_init == "zero",
        )
        sampler = SaliencySampler(cfg.gaussian_size, cfg.gaussian_fwhm, upsample_align_corners=paper)
        dpp = DiscriminativePerturbationPrompt(parser, sampler)
    dim = ctx.backbone.feature_dim
    cah = None
    if cfg.use_cah:
        cah = CategoryAwareHead(dim, cfg.cah_reduction or (8 if paper else 1), use_in=cfg.use_in, conv_block=not paper)
    shared = ctx.head(dim, norm=False)  # identity with model.embed_dim=0: the pooled feature
    head: nn.Module = shared if paper else nn.Sequential(BNNeck(dim), shared)
    return FRPTModel(
        ctx.backbone,
        head,
        ctx.criterion(shared.out_dim),
        dpp=dpp,
        cah=cah,
        parse_index=parse_index,
        pool="gap" if paper else "gem",
        crop=cfg.crop,
        cam_threshold=cfg.cam_threshold,
        dpp_lr_mult=cfg.dpp_lr_mult,
    )


# ----------------------------------------------------------------------------- registrations

#: the paper's training recipe (SPECS 5): cross-entropy on the pooled feature, SGD 1e-3,
#: momentum 0.9, wd 1e-4, batch 32, lr x0.9 every 50 epochs, FRPT augmentation, no warmup
#: and, as the paper states, no gradient clipping (random-init or early DPP gradients can be large
#: and an unclipped step can collapse the softmax map to a point: set optim.grad_clip to guard it)
PAPER_DEFAULTS: dict[str, Any] = {
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
        "head_lr_mult": 1.0,
        "grad_clip": 0.0,  # the paper states no clipping (see the module docstring on the DPP)
    },
    "data": {"batch_size": 32, "samples_per_class": 0, "augment": "frpt", "image_size": 224, "resize_size": 256},
}

PRESETS: dict[str, dict[str, Any]] = {
    # the paper's training (Sec. 4.1): the defaults above with the full 500 epochs
    "paper": {
        "optim": {"epochs": 500},
        "recipe_source": "FRPT paper (AAAI 2023) Sec. 4.1: SGD lr 1e-3 momentum 0.9 wd 1e-4, batch 32, "
        "500 epochs, lr x0.9 every 50 epochs, no gradient clipping",
    },
    # the released code: projects/FastRetri/configs/base-image_retri.yml + cub.yml, fast-reid
    # defaults for the rest (INPUT.CJ.PROB 0.5, SOLVER.CLIP_GRADIENTS.CLIP_VALUE 5.0 by norm)
    "code": {
        # MODEL.BACKBONE: WITH_IBN True, LAST_STRIDE 1 (the recipe's kwargs are dropped when
        # --backbone picks another network)
        "backbone": "resnet50_ibn_a",
        "model": {"backbone_kwargs": {"last_stride": 1}},
        "method_args": {"variant": "code", "parser_init": "default"},
        "loss": {"label_smoothing": 0.3, "smoothing_form": "fastreid"},
        "optim": {
            "lr": 0.02,
            "momentum": 0.0,
            "weight_decay": 5e-4,
            "schedule": "cosine",
            "epochs": 500,
            "min_lr": 2e-5,
            "warmup_epochs": 0.0,
            "warmup_steps": 1000,
            "warmup_factor": 0.1,
            "grad_clip": 5.0,
            "amp": "fp16",
            "weight_decay_bias": 0.0,  # SOLVER.AMP (fast-reid: GradScaler), WEIGHT_DECAY_BIAS
        },
        # INPUT.REA is not enabled in either config (fast-reid's default: off), so no random erasing
        "data": {"batch_size": 256, "augment": "frpt_code", "test_resize": "square", "random_erasing": 0.0},
        "recipe_source": "Pual2013/FRPT projects/FastRetri/configs/base-image_retri.yml + cub.yml "
        "+ fastreid/config/defaults.py",
    },
}

SEARCH_SPACE = {
    "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "optim.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
}
#: DPP and CAH parameters form their own optimiser groups (``dpp``, ``cah``) by prefix
PREFIXES = ("dpp_", "cah_")


def _defaults(**method_args: Any) -> dict[str, Any]:
    out = {k: dict(v) for k, v in PAPER_DEFAULTS.items()}
    if method_args:
        out["method_args"] = method_args
    return out


def _register(name: str, display: str, method_args: dict[str, Any], data: dict[str, Any] | None = None):
    defaults = _defaults(**method_args)
    if data:
        defaults["data"].update(data)
    return register_method(
        name,
        config=FRPTConfig,
        families=("vit", "cnn"),
        prefixes=PREFIXES,
        search_space=SEARCH_SPACE,
        defaults=defaults,
        presets=PRESETS,
        display=display,
    )


@_register("frpt", "FRPT", {})
def frpt(ctx: BuildContext, cfg: FRPTConfig) -> FRPTModel:
    """FRPT: DPP zoom prompt + frozen backbone + category-specific awareness head."""
    return build_frpt(ctx, cfg)


@_register("frpt_dpp", "DPP + PT", {"use_cah": False})
def frpt_dpp(ctx: BuildContext, cfg: FRPTConfig) -> FRPTModel:
    """FRPT ablation DPP + PT: the zoom prompt on a frozen backbone, no CAH (Table 1)."""
    return build_frpt(ctx, cfg)


@_register("frpt_cah", "PT + CAH", {"use_dpp": False})
def frpt_cah(ctx: BuildContext, cfg: FRPTConfig) -> FRPTModel:
    """FRPT ablation PT + CAH: frozen backbone with the awareness head, no prompt (Table 1)."""
    return build_frpt(ctx, cfg)


@_register("frpt_no_in", "FRPT w/o IN", {"use_in": False})
def frpt_no_in(ctx: BuildContext, cfg: FRPTConfig) -> FRPTModel:
    """FRPT ablation without instance norm in CAH: M_R = W_C * M_P (Table 1; use variant=code)."""
    return build_frpt(ctx, cfg)


@_register("frpt_bbox", "Box crop + CAH", {"use_dpp": False}, data={"crop_to_box": True})
def frpt_bbox(ctx: BuildContext, cfg: FRPTConfig) -> FRPTModel:
    """FRPT with a fixed prompt: images cropped to the annotated bounding box, + CAH (Table 5)."""
    if not getattr(ctx.cfg.data, "crop_to_box", False):
        raise UserError("frpt_bbox needs data.crop_to_box=true (without it the method is frpt_cah)")
    if cfg.use_dpp or cfg.crop != "none":
        raise UserError("frpt_bbox's prompt is the box crop; keep method_args.use_dpp=false and crop=none")
    return build_frpt(ctx, cfg)


@_register("frpt_cam", "CAM crop + CAH", {"use_dpp": False, "crop": "cam"})
def frpt_cam(ctx: BuildContext, cfg: FRPTConfig) -> FRPTModel:
    """FRPT with a fixed prompt: crop to the box of the frozen backbone's activation map, + CAH (Table 5)."""
    return build_frpt(ctx, cfg)
