"""The model every method returns: backbone + method modules + embedding head + criterion.

Methods customise it by freezing parameters, inserting modules whose attribute names start with
the method's declared prefixes (as in peft; see :mod:`harness.models.registry`), or subclassing to
change :meth:`features` / :meth:`training_loss`. Ownership by prefix drives the rest: parameter
groups, train/eval mode, feature caching, saving and counting. The loop only talks to this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.models.backbones import Backbone


class EmbeddingHead(nn.Module):
    """Shared head (SPECS section 2): optional LayerNorm + Linear(D -> embed_dim).

    ViT methods use LayerNorm + Linear on the CLS token; CNNs a Linear on pooled features.
    ``embed_dim == 0`` keeps the backbone features (no parameters): the untrained baseline.
    """

    def __init__(self, in_dim: int, embed_dim: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim) if norm else nn.Identity()
        self.proj = nn.Linear(in_dim, embed_dim) if embed_dim else nn.Identity()
        self.out_dim = embed_dim or in_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(features))


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class DMLModel(nn.Module):
    """Backbone, head and criterion; ``forward`` is the inference path (L2-normalised embedding)."""

    #: prefixes of the method's own modules (set from the registration by :meth:`declare`)
    method_prefixes: tuple[str, ...] = ()
    #: the subset of ``method_prefixes`` used in training only
    training_only_prefixes: tuple[str, ...] = ()
    #: NHWC layout (set by :func:`harness.training.setup.prepare_for_device`)
    channels_last: bool = False
    #: capabilities a builder declares from its options, so the loop never reads option names:
    #: train the head on frozen features computed once (the linear probe's ``cache_features``)
    wants_feature_cache: bool = False
    #: test (and transfer) with the method folded into the backbone's weights (``merge`` of
    #: LoRA, SSF and peft's tuners; :meth:`merge_`)
    merges_on_test: bool = False

    def __init__(self, backbone: Backbone, head: nn.Module, criterion: nn.Module, *, frozen_backbone: bool) -> None:
        super().__init__()
        self.backbone = backbone.model
        self.head = head
        self.criterion = criterion
        self.frozen_backbone = frozen_backbone
        self.family = backbone.family
        self.feature_dim = backbone.feature_dim

    def declare(self, prefixes: tuple[str, ...], training_only: tuple[str, ...] = ()) -> DMLModel:
        """Record the method's registered prefixes (done by the harness after building)."""
        self.method_prefixes, self.training_only_prefixes = tuple(prefixes), tuple(training_only)
        return self

    # ------------------------------------------------------------------ ownership
    def owner(self, name: str) -> str | None:
        """The method prefix owning parameter/buffer/module ``name`` (any dotted component), or None."""
        for part in name.split("."):
            for prefix in self.method_prefixes:
                if part.startswith(prefix):
                    return prefix
        return None

    def is_training_only(self, name: str) -> bool:
        """Criterion parameters (proxies, classifiers) and training-only method modules."""
        return name.startswith("criterion.") or self.owner(name) in self.training_only_prefixes

    # ------------------------------------------------------------------ forward paths
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (timm model without classifier)."""
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(images)).float(), dim=-1)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch; extra tensors in the dict are logged as per-epoch means."""
        return self.loss_from_features(self.features(images), labels), {}

    def loss_from_features(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.head(features), labels)

    @property
    def features_are_frozen(self) -> bool:
        """True when :meth:`features` has no trainable parameter, so features can be cached.

        Features depend on the backbone and on the method's own (not training-only) modules.
        """
        return not any(
            p.requires_grad
            for n, p in self.named_parameters()
            if n.startswith("backbone.") or (self.owner(n) and not self.is_training_only(n))
        )

    def merge_(self) -> bool:
        """Fold the method's modules into the backbone's weights for inference (LoRA, SSF), so the
        merged model costs what the backbone costs; returns whether anything was merged. The
        method's parameters are then unused: call it on a model that has finished training."""
        return False

    def before_step(self, optimizer: torch.optim.Optimizer | None, labels: np.ndarray) -> None:
        """Hook before each training step's forward pass, given the batch's labels on the host
        (NumPy, as the sampler drew them): a method plans the step there without reading the device
        (VPTSP-G groups the batch by class and its memory bank loads the batch's rows)."""

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Hook after each optimizer step (VPTSP-G writes its proxy container; its memory bank
        starts copying the batch's rows back to the host)."""

    def resume_state(self) -> dict[str, Any]:
        """Training state held outside parameters, buffers and the optimizer (tensors only) that
        the next epoch depends on; saved in each checkpoint (VPTSP-G's CPU memory bank keeps its
        rows' optimizer state here)."""
        return {}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`resume_state`."""

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> DMLModel:
        super().train(mode)
        if mode and self.frozen_backbone:
            # a frozen backbone keeps its BatchNorm statistics and has no dropout; the method's
            # own modules (also those injected inside the backbone) train, dropout included
            self.backbone.eval()
            for name, module in self.named_modules():
                if self.owner(name):
                    module.train(mode)
        return self

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, optim_cfg: Any, loss_cfg: Any) -> list[dict[str, Any]]:
        """Parameter groups with per-role learning rates; each dict also carries a ``name`` and its ``role``."""
        # optim.weight_decay_bias >= 0: each role's biases form a group of their own ("<role>.bias")
        split_bias = optim_cfg.weight_decay_bias >= 0
        roles: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                bias = split_bias and name.rsplit(".", 1)[-1] == "bias"
                roles.setdefault((self.role_of(name), bias), []).append(p)
        mult = {"head": optim_cfg.head_lr_mult, "criterion": loss_cfg.lr_mult}
        groups = [
            {
                "name": role + (".bias" if bias else ""),
                "role": role,
                "params": params,
                "lr": optim_cfg.lr * mult.get(role, 1.0),
                **({"weight_decay": optim_cfg.weight_decay_bias} if bias else {}),
            }
            for (role, bias), params in roles.items()
        ]
        for g in groups:  # the VPTSP-G code's lr_proxy: an absolute lr for the proxies
            if g["role"] == "criterion" and loss_cfg.proxy_lr > 0:
                g["lr"] = loss_cfg.proxy_lr
        return groups

    def role_of(self, name: str) -> str:
        """Parameter-group role: the owning method prefix (``adapter``, ``lora``, ...), else the
        top-level part (``backbone``, ``head``, ``criterion``)."""
        owner = self.owner(name)
        if owner:
            return owner.rstrip("_")
        top = name.split(".", 1)[0]
        return top if top in ("backbone", "head", "criterion") else "method"

    # ------------------------------------------------------------------ counting and saving
    def count_parameters(self) -> dict[str, int]:
        trainable = inference = total = 0
        for name, p in self.named_parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
                if not self.is_training_only(name):
                    inference += p.numel()
        return {"params/trainable": trainable, "params/trainable_inference": inference, "params/total": total}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: trainable parameters, and the persistent buffers of the
        method's modules and the head (BatchNorm statistics, VPTSP-G's proxy container); the
        backbone's BatchNorm statistics too when the backbone itself trains."""
        state = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        persistent = set(self.state_dict(keep_vars=True))
        for n, b in self.named_buffers():
            if n not in persistent:
                continue
            if self.owner(n) or n.startswith("head."):
                state[n] = b.detach()
            elif n.startswith("backbone.") and "running_" in n and not self.frozen_backbone:
                state[n] = b.detach()  # BatchNorm statistics change under full fine-tuning
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        unknown_keys = [k for k in state if k not in own]
        if unknown_keys:
            raise KeyError(f"state has keys the model lacks: {unknown_keys[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)


@dataclass
class BuildContext:
    """What a method builder receives besides its own options."""

    backbone: Backbone
    num_classes: int
    cfg: Any  # harness.config.RunConfig

    @property
    def embed_dim(self) -> int:
        return self.cfg.model.embed_dim

    def head(self, in_dim: int | None = None, norm: bool | None = None) -> EmbeddingHead:
        in_dim = in_dim or self.backbone.feature_dim
        norm = (self.backbone.family == "vit") if norm is None else norm
        head = EmbeddingHead(in_dim, self.cfg.model.embed_dim, norm)
        if self.cfg.model.head_init == "xavier" and isinstance(head.proj, nn.Linear):
            nn.init.xavier_uniform_(head.proj.weight)  # the VPTSP-G code's _init_weights
            nn.init.zeros_(head.proj.bias)
        return head

    def criterion(self, embed_dim: int) -> nn.Module:
        from harness.models.losses import build_loss

        return build_loss(self.cfg.loss.name, self.num_classes, embed_dim, self.cfg.loss)

    def model(self, *, frozen_backbone: bool, cls: type[DMLModel] = DMLModel, **kwargs: Any) -> DMLModel:
        """Standard model: the context's backbone, shared head and configured loss."""
        head = self.head()
        return cls(self.backbone, head, self.criterion(head.out_dim), frozen_backbone=frozen_backbone, **kwargs)
