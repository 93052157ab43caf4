"""harness.models.losses against explicit reference formulas and pytorch-metric-learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.config import LossConfig
from harness.errors import UserError
from harness.models.losses import (
    CrossEntropyLoss,
    NormSoftmaxLoss,
    ProxyAnchorLoss,
    build_loss,
)


def proxy_anchor_reference(x, y, proxies, alpha, margin, positive_average):
    """Kim et al. eq. (4), one proxy at a time, in float64."""
    x = F.normalize(x.double(), dim=1)
    p = F.normalize(proxies.double(), dim=1)
    n_classes = len(p)
    pos_total, neg_total, with_pos = 0.0, 0.0, 0
    for c in range(n_classes):
        pos_sum = neg_sum = 0.0
        for i in range(len(x)):
            cos = float(x[i] @ p[c])
            if int(y[i]) == c:
                pos_sum += math.exp(-alpha * (cos - margin))
            else:
                neg_sum += math.exp(alpha * (cos + margin))
        with_pos += pos_sum > 0
        pos_total += math.log1p(pos_sum)
        neg_total += math.log1p(neg_sum)
    divisor = with_pos if positive_average == "with_positives" else n_classes
    return pos_total / divisor + neg_total / n_classes


def random_batch(seed, n=12, dim=8, n_classes=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, n_classes - 1, (n,), generator=g)  # the last class has no positives
    return x, y


@pytest.mark.parametrize("positive_average", ["with_positives", "all"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proxy_anchor_matches_loop_reference(positive_average, seed):
    x, y = random_batch(seed)
    loss_fn = ProxyAnchorLoss(6, 8, alpha=32.0, margin=0.1, positive_average=positive_average)
    expected = proxy_anchor_reference(x, y, loss_fn.proxies.detach(), 32.0, 0.1, positive_average)
    assert loss_fn(x, y).item() == pytest.approx(expected, rel=1e-5)


def test_proxy_anchor_external_proxies_and_averaging_modes_differ():
    x, y = random_batch(3)
    loss_fn = ProxyAnchorLoss(6, 8, alpha=16.0, margin=0.2)
    proxies = torch.randn(6, 8)
    expected = proxy_anchor_reference(x, y, proxies, 16.0, 0.2, "with_positives")
    assert loss_fn(x, y, proxies).item() == pytest.approx(expected, rel=1e-5)
    code_avg = ProxyAnchorLoss(6, 8, positive_average="all")
    assert code_avg(x, y, proxies) < ProxyAnchorLoss(6, 8)(x, y, proxies)  # 5 of 6 have positives


def test_proxy_anchor_matches_pytorch_metric_learning():
    """pml's ProxyAnchorLoss is the original definition (pos / proxies with positives, neg / C)."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, y = random_batch(4, n=20, dim=16, n_classes=7)
    ours = ProxyAnchorLoss(7, 16, alpha=32.0, margin=0.1)
    theirs = pml_losses.ProxyAnchorLoss(7, 16, margin=0.1, alpha=32)
    theirs.proxies.data.copy_(ours.proxies.data)
    assert ours(x, y).item() == pytest.approx(theirs(x, y).item(), rel=1e-5)


def test_proxy_anchor_separated_embeddings_score_lower_than_random():
    n_classes, dim = 8, 64
    loss_fn = ProxyAnchorLoss(n_classes, dim)
    proxies = torch.eye(n_classes, dim)
    y = torch.arange(n_classes).repeat(4)
    separated = loss_fn(proxies[y], y, proxies)
    random = loss_fn(torch.randn(len(y), dim, generator=torch.Generator().manual_seed(0)), y, proxies)
    assert separated < random


def test_proxy_anchor_gradients_reach_proxies_and_embeddings():
    x, y = random_batch(5)
    x.requires_grad_(True)
    loss_fn = ProxyAnchorLoss(6, 8)
    loss_fn(x, y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert loss_fn.proxies.grad is not None and loss_fn.proxies.grad.abs().sum() > 0
    assert torch.isfinite(loss_fn.proxies.grad).all()


def test_losses_compute_in_float32_from_bf16():
    x, y = random_batch(6)
    for loss_fn in (ProxyAnchorLoss(6, 8), NormSoftmaxLoss(6, 8), CrossEntropyLoss(6, 8)):
        full, half = loss_fn(x, y), loss_fn(x.bfloat16(), y)
        assert half.dtype == torch.float32
        assert half.item() == pytest.approx(full.item(), rel=5e-2)


def test_proxy_anchor_is_stable_for_large_alpha():
    x, y = random_batch(7)
    loss = ProxyAnchorLoss(6, 8, alpha=1e4)(x, y)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_norm_softmax_equals_cross_entropy_on_cosine_logits(label_smoothing):
    x, y = random_batch(8)
    loss_fn = NormSoftmaxLoss(6, 8, temperature=0.05, label_smoothing=label_smoothing)
    w = loss_fn.weight.detach()
    cos = torch.stack([torch.stack([F.cosine_similarity(xi, wc, dim=0) for wc in w]) for xi in x])
    expected = F.cross_entropy(cos / 0.05, y, label_smoothing=label_smoothing)
    assert loss_fn(x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_cross_entropy_is_bias_free_linear_classifier():
    x, y = random_batch(9)
    loss_fn = CrossEntropyLoss(6, 8, label_smoothing=0.2)
    assert loss_fn.classifier.bias is None
    expected = F.cross_entropy(x @ loss_fn.classifier.weight.detach().T, y, label_smoothing=0.2)
    assert loss_fn(x, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_build_loss_uses_config_and_rejects_typos():
    cfg = LossConfig(alpha=16.0, margin=0.2, temperature=0.1, label_smoothing=0.1)
    pa = build_loss("proxy_anchor", 5, 4, cfg)
    assert isinstance(pa, ProxyAnchorLoss) and (pa.alpha, pa.margin) == (16.0, 0.2)
    assert build_loss("norm_softmax", 5, 4, cfg).temperature == 0.1
    assert build_loss("cross_entropy", 5, 4, cfg).label_smoothing == 0.1
    with pytest.raises(UserError) as err:
        build_loss("proxy_ancor", 5, 4, cfg)
    message = str(err.value)
    assert "proxy_anchor" in message and "norm_softmax" in message and "cross_entropy" in message
    with pytest.raises(UserError):
        ProxyAnchorLoss(5, 4, positive_average="mean")


def test_losses_stay_float32_under_autocast():
    from harness.models.losses import CrossEntropyLoss, NormSoftmaxLoss, ProxyAnchorLoss

    emb = torch.randn(8, 16)
    labels = torch.arange(4).repeat_interleave(2)
    for loss in (ProxyAnchorLoss(4, 16), NormSoftmaxLoss(4, 16), CrossEntropyLoss(4, 16)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(emb.bfloat16(), labels)
        assert value.dtype == torch.float32
        assert torch.allclose(value, loss(emb.bfloat16().float(), labels), atol=1e-5)
