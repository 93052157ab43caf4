"""Every registered method, on every backbone family it applies to (parametrised over the
registry like timm's model tests), checked against its own registration: the declared backbone
training and prefixes are exactly what trains, frozen weights stay frozen, the loss goes down,
the inference path gives unit embeddings, counts, modes, caching and saving follow the prefixes."""

from __future__ import annotations

import pytest
import torch

from harness.bench.measuring import TOY_VIT
from harness.models.backbones import create_backbone
from harness.training.resolution import resolve
from harness.training.setup import build_model, make_optimizer
from methods import get_method, method_names

BACKBONES = {
    "cnn": ("tf_efficientnet_lite0", {}),
    "vit": ("vit_small_patch16_224", {"img_size": 32, **TOY_VIT}),  # a narrow MLP keeps BOFT quick
}
CASES = [(m, f) for m in method_names() for f in ("cnn", "vit") if get_method(m).applies_to(f)]


def build(method: str, family: str):
    name, kwargs = BACKBONES[family]
    cfg = resolve(
        method=method,
        backbone=name,
        overrides={
            "model.pretrained": False,
            "model.backbone_kwargs": kwargs,
            "model.embed_dim": 16,
            "data.image_size": 32,
            "optim.lr": 1e-3,
            "optim.name": "adamw",
            "optim.weight_decay": 0.0,
        },
    )
    backbone = create_backbone(name, pretrained=False, kwargs=kwargs)
    original = dict(backbone.model.named_parameters())
    model = build_model(cfg, num_classes=4, backbone=backbone)
    return cfg, model, original


@pytest.mark.parametrize("method, family", CASES)
def test_method_is_what_it_says(method, family):
    torch.manual_seed(0)
    cfg, model, original = build(method, family)
    spec = get_method(method)
    trainable_backbone = {n for n, p in original.items() if p.requires_grad}
    expected_backbone = {"none": set(), "all": set(original), "biases": {n for n in original if n.endswith("bias")}}[
        spec.backbone
    ]
    assert trainable_backbone == expected_backbone, sorted(trainable_backbone ^ expected_backbone)[:3]
    assert model.frozen_backbone == (spec.backbone != "all")
    assert model.method_prefixes == spec.prefixes and model.training_only_prefixes == spec.training_only
    owners = set()
    for n, p in model.named_parameters():
        if p.requires_grad and not n.startswith(("backbone.", "head.", "criterion.")):
            assert model.owner(n), f"{n} trains but carries none of the declared prefixes {spec.prefixes}"
        if p.requires_grad and model.owner(n):
            owners.add(model.owner(n))
    assert owners or not spec.prefixes, f"no parameter carries the declared prefixes {spec.prefixes}"
    assert model.features_are_frozen == (spec.backbone == "none" and not owners - set(spec.training_only))

    images = torch.randn(8, 3, 32, 32)
    labels = torch.arange(4).repeat_interleave(2)  # 2 consecutive images per class, as the sampler
    frozen_before = {n: p.detach().clone() for n, p in original.items() if not p.requires_grad}
    optimizer = make_optimizer(model, cfg)
    model.train()
    losses = []
    for _ in range(4):  # on one batch, every method's loss is down after four steps (FRPT-CAM, CNN, least: 1%)
        model.before_step(optimizer, labels.numpy())
        loss, _ = model.training_loss(images, labels)
        optimizer.zero_grad()
        loss.backward()
        for n, p in original.items():
            if not p.requires_grad:
                assert p.grad is None, n
        optimizer.step()
        model.after_step(optimizer)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for n, before in frozen_before.items():
        assert torch.equal(original[n].detach(), before), f"frozen {n} changed"

    model.eval()
    with torch.no_grad():
        emb = model(images)
    assert emb.shape[0] == 8 and torch.allclose(emb.norm(dim=-1), torch.ones(8), atol=1e-4)

    state = model.trainable_state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    persistent = set(model.state_dict())
    for key in set(state) - trainable:  # saved buffers: the method's, the head's, or trained BN stats
        assert key in persistent and (model.owner(key) or key.startswith("head.") or spec.backbone == "all"), key
    assert trainable <= set(state)
    counts = model.count_parameters()
    if not getattr(model, "memory_bank", False):  # the VPTSP-G bank counts CPU-held prompts too
        assert counts["params/trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        training_only = sum(
            p.numel()
            for n, p in model.named_parameters()
            if p.requires_grad and (n.startswith("criterion.") or model.owner(n) in spec.training_only)
        )
        assert counts["params/trainable_inference"] == counts["params/trainable"] - training_only
    assert counts["params/trainable_inference"] <= counts["params/trainable"] <= counts["params/total"]

    model.train()  # method modules train (dropout active); a frozen backbone stays in eval, but for
    # the layers that host method modules (peft's tuner layers apply the tuner's dropouts)
    for name, module in model.named_modules():
        hosts = any(model.owner(f"{name}.{child}") for child, _ in module.named_children())
        if model.owner(name):
            assert module.training, name
        elif name.startswith("backbone.") and model.frozen_backbone and not hosts:
            assert not module.training, name


def test_family_is_enforced_for_every_method():
    """One check in the registry, whichever builder: a ViT-only method on a CNN is a UserError."""
    from harness.errors import UserError

    vit_only = [m for m in method_names() if not get_method(m).applies_to("cnn")]
    assert vit_only
    for method in vit_only:
        with pytest.raises(UserError, match=f"method '{method}' supports vit backbones.*is a cnn"):
            build(method, "cnn")


def test_registry_covers_the_product():
    expected = {
        "full_finetune",
        "linear_probe",
        "bitfit",
        "adapter",
        "vpt_shallow",
        "vpt_deep",
        "vptsp_g",
        "vptsp_ema",
        "frpt",
        "frpt_dpp",
        "frpt_cah",
        "frpt_no_in",
        "frpt_bbox",
        "frpt_cam",
        "lora",
        "ssf",
        "peft_lora",
        "dora",
        "loha",
        "lokr",
        "oft",
        "boft",
        "ia3",
        "vera",
        "fourierft",
        "peft",
    }
    assert expected <= set(method_names())


def test_readme_example_method_passes_the_registry_checks():
    """The README's 'Adding a method' example registers and passes the same checks as every method."""
    import re
    from pathlib import Path

    from harness.models import registry

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Adding a method") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    try:
        exec(compile(code, "README.md", "exec"), namespace)
        assert "feature_scale" in method_names()
        for family in ("cnn", "vit"):
            test_method_is_what_it_says("feature_scale", family)
    finally:
        registry._METHODS.pop("feature_scale", None)
