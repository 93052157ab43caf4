"""Training losses: Proxy Anchor (VPTSP-G), normalised softmax, and plain cross-entropy (FRPT).

Every loss takes ``(embeddings, labels)`` with int64 labels in ``0..C-1``, owns its class
parameters (proxies / class weights) so the trainer can give them their own learning rate, and
computes in float32 even under bf16/fp16 autocast: the exp(alpha * cos) terms of Proxy Anchor and
the 1/temperature logits overflow or lose all precision in half precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import unknown


def _float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def full_precision(forward):
    """Run a loss's forward with autocast off: autocast would recast its matmuls to bf16."""

    def wrapped(self, embeddings: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(embeddings.device.type, enabled=False):
            return forward(self, embeddings, *args, **kwargs)

    wrapped.__doc__ = forward.__doc__
    return wrapped


def _log1p_sum_exp(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per column: log(1 + sum_i mask[i] * exp(z[i])), computed stably as a logsumexp with a 0."""
    z = z.masked_fill(~mask, -math.inf)
    z = torch.cat([z, z.new_zeros(1, z.shape[1])], dim=0)
    return torch.logsumexp(z, dim=0)


class ProxyAnchorLoss(nn.Module):
    """Proxy Anchor loss (Kim et al., CVPR 2020).

    pos = (1/|P+|) sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (cos(x, p) - margin)))
    neg = (1/|P|)  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (cos(x, p) + margin)))

    ``positive_average="with_positives"`` divides pos by the number of proxies having a positive in
    the batch (paper and original code); ``"all"`` divides by all C proxies (VPTSP-G's code).
    """

    AVERAGES = ("with_positives", "all")

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        alpha: float = 32.0,
        margin: float = 0.1,
        positive_average: str = "with_positives",
        proxy_init: str = "kaiming",
    ) -> None:
        super().__init__()
        if positive_average not in self.AVERAGES:
            raise unknown("positive_average", positive_average, self.AVERAGES)
        self.num_classes, self.alpha, self.margin = num_classes, float(alpha), float(margin)
        self.positive_average = positive_average
        self.proxies = nn.Parameter(torch.empty(num_classes, embed_dim))
        if proxy_init == "xavier_div8":  # the VPTSP-G code's proxies_bias
            with torch.no_grad():
                self.proxies.copy_(nn.init.xavier_uniform_(torch.empty(num_classes, embed_dim)) / 8.0)
        else:
            nn.init.kaiming_normal_(self.proxies, mode="fan_out")  # as in the Proxy Anchor code

    @full_precision
    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss for a batch; ``proxies`` (C, D) overrides the owned parameter (VPTSP-G's proxies)."""
        proxies = self.proxies if proxies is None else proxies
        if proxies.shape[0] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} proxies, got {proxies.shape[0]}")
        cos = F.normalize(_float32(embeddings), dim=1) @ F.normalize(_float32(proxies), dim=1).T
        # (B, C); a comparison, not F.one_hot, which reads labels.min()/max() on the host off CUDA
        pos_mask = labels.long()[:, None] == torch.arange(self.num_classes, device=labels.device)
        pos = _log1p_sum_exp(-self.alpha * (cos - self.margin), pos_mask)
        neg = _log1p_sum_exp(self.alpha * (cos + self.margin), ~pos_mask)
        if self.positive_average == "with_positives":
            n_pos = pos_mask.any(dim=0).sum().clamp(min=1)
        else:
            n_pos = self.num_classes
        return pos.sum() / n_pos + neg.sum() / self.num_classes


class NormSoftmaxLoss(nn.Module):
    """Normalised softmax (Zhai & Wu, BMVC 2019): cross-entropy on cos(x, w_c) / temperature."""

    def __init__(
        self, num_classes: int, embed_dim: int, temperature: float = 0.05, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.temperature, self.label_smoothing = float(temperature), float(label_smoothing)
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default; only direction matters

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine logits scaled by 1/temperature, (B, C) float32."""
        x = F.normalize(_float32(embeddings), dim=1)
        return x @ F.normalize(_float32(self.weight), dim=1).T / self.temperature

    @full_precision
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings), labels.long(), label_smoothing=self.label_smoothing)


class CrossEntropyLoss(nn.Module):
    """Bias-free linear classifier + cross-entropy, as FRPT trains its embedding.

    ``smoothing_form="fastreid"`` puts 1 - eps on the true class and eps / (C - 1) on each other
    (fast-reid's ``cross_entropy_loss``, FRPT's released code); "torch" is PyTorch's
    (1 - eps + eps / C and eps / C).
    """

    def __init__(
        self, num_classes: int, embed_dim: int, label_smoothing: float = 0.0, smoothing_form: str = "torch"
    ) -> None:
        super().__init__()
        self.label_smoothing, self.smoothing_form = float(label_smoothing), smoothing_form
        self.classifier = nn.Linear(embed_dim, num_classes, bias=False)

    @full_precision
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.linear(_float32(embeddings), _float32(self.classifier.weight))
        if self.smoothing_form == "fastreid" and self.label_smoothing > 0:
            eps, classes = self.label_smoothing, logits.shape[1]
            targets = torch.full_like(logits, eps / (classes - 1))
            targets.scatter_(1, labels.long()[:, None], 1.0 - eps)
            return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        return F.cross_entropy(logits, labels.long(), label_smoothing=self.label_smoothing)


LOSSES = ("proxy_anchor", "norm_softmax", "cross_entropy")


def build_loss(name: str, num_classes: int, embed_dim: int, cfg) -> nn.Module:
    """Instantiate a loss from a :class:`harness.config.LossConfig`; unknown names are a UserError."""
    if name == "proxy_anchor":
        return ProxyAnchorLoss(
            num_classes,
            embed_dim,
            alpha=cfg.alpha,
            margin=cfg.margin,
            positive_average=cfg.positive_average,
            proxy_init=cfg.proxy_init,
        )
    if name == "norm_softmax":
        return NormSoftmaxLoss(num_classes, embed_dim, temperature=cfg.temperature, label_smoothing=cfg.label_smoothing)
    if name == "cross_entropy":
        return CrossEntropyLoss(
            num_classes, embed_dim, label_smoothing=cfg.label_smoothing, smoothing_form=cfg.smoothing_form
        )
    raise unknown("loss", name, LOSSES)
