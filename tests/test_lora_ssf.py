"""LoRA and SSF: equality with Hugging Face peft's LoRA, exact merging, the papers' initialisation
and parameter arithmetic, dropout that is active in training, and a merged run through the loop."""

from __future__ import annotations

import copy

import mlflow
import pytest
import torch
from torch import nn

from harness.errors import UserError
from harness.models.backbones import create_backbone
from harness.training.resolution import resolve
from harness.training.setup import build_model
from methods.lora import LowRankUpdate
from methods.ssf import ScaleShift

TINY_VIT = ("vit_small_patch16_224", {"img_size": 32, "depth": 2})
CNN = ("tf_efficientnet_lite0", {})


def build(method: str, bb=TINY_VIT, **args):
    name, kwargs = bb
    over = {"model.pretrained": False, "model.backbone_kwargs": kwargs, "model.embed_dim": 16, "data.image_size": 32}
    over.update({f"method_args.{k}": v for k, v in args.items()})
    cfg = resolve(method=method, backbone=name, overrides=over)
    return build_model(cfg, num_classes=4, backbone=create_backbone(name, pretrained=False, kwargs=kwargs))


def randomise(model: nn.Module, prefix: str) -> None:
    """Move the method's parameters away from their (identity) init, as training would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(prefix):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def n_owned(model, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


# ----------------------------------------------------------------------------- LoRA


def test_lora_equals_peft_on_the_same_timm_vit():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = build("lora", rank=4, alpha=16.0).eval()
    randomise(model, "lora_")
    reference = copy.deepcopy(create_backbone(TINY_VIT[0], pretrained=False, kwargs=TINY_VIT[1]).model)
    reference.load_state_dict(model.backbone.state_dict())
    cfg = peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.0, target_modules=r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    )
    reference = peft.inject_adapter_in_model(cfg, reference).eval()
    copied = 0
    with torch.no_grad():
        for key, update in model.lora_modules.items():
            layer = reference.get_submodule(
                key.replace("blocks_", "blocks.").replace("_attn_", ".attn.").replace("_mlp_", ".mlp.")
            )
            layer.lora_A["default"].weight.copy_(update.A)
            layer.lora_B["default"].weight.copy_(update.B)
            copied += 1
    assert copied == 2 * 4
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = model.features(x), reference.forward_head(reference.forward_features(x), pre_logits=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # both start from the backbone: peft's B and ours are zero at init
    fresh = build("lora", rank=4, alpha=16.0)
    assert all(torch.count_nonzero(u.B) == 0 for u in fresh.lora_modules.values())


def test_lora_on_1x1_convs_equals_peft_conv_lora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = build("lora", bb=CNN, rank=2, alpha=4.0).eval()
    randomise(model, "lora_")
    reference = create_backbone(CNN[0], pretrained=False).model
    reference.load_state_dict(model.backbone.state_dict())
    paths = [k for k in model.lora_modules]
    names = [p for p, _ in reference.named_modules() if p.replace(".", "_") in paths]
    assert len(names) == len(paths) > 10
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=names)
    reference = peft.inject_adapter_in_model(cfg, reference).eval()
    with torch.no_grad():
        for name in names:
            layer, update = reference.get_submodule(name), model.lora_modules[name.replace(".", "_")]
            layer.lora_A["default"].weight.copy_(update.A[:, :, None, None])
            layer.lora_B["default"].weight.copy_(update.B[:, :, None, None])
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model.features(x), reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bb", [TINY_VIT, CNN], ids=["vit", "cnn"])
def test_lora_merge_gives_equal_outputs_without_extra_modules(bb):
    torch.manual_seed(0)
    model = build("lora", bb=bb, rank=4, alpha=8.0).eval()
    randomise(model, "lora_")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        calls = []
        for m in model.lora_modules.values():
            m.register_forward_hook(lambda *a: calls.append(1))
        assert model.merge_() and not model.merge_()  # a second merge does nothing
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert calls == []  # the merged model runs the plain backbone


def test_lora_vit_s_parameter_count_is_16_r_d_per_block():
    model = build("lora", bb=("vit_small_patch16_224", {}), rank=8)
    assert n_owned(model, "lora_") == 12 * 16 * 8 * 384 == 589_824
    one = build("lora", rank=2, targets=["attn.qkv"], blocks=[1])
    assert list(one.lora_modules) == ["blocks_1_attn_qkv"] and n_owned(one, "lora_") == 2 * (384 + 3 * 384)


def test_lora_dropout_is_active_in_training_only():
    model = build("lora", dropout=0.5)
    model.train()
    drops = [m for n, m in model.named_modules() if n.startswith("lora_") and isinstance(m, nn.Dropout)]
    assert drops and all(d.training for d in drops)
    assert not any(m.training for m in model.backbone.modules())
    update = LowRankUpdate(8, 8, 2, 2.0, 0.5)
    update.B.data.normal_()
    x = torch.randn(4, 8)
    update.train()
    assert not torch.equal(update(x), update(x))  # dropout draws differ
    update.eval()
    assert torch.equal(update(x), update(x))


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"rank": 0}, "method_args.rank"),
        ({"targets": ["attn.nope"]}, "attn.nope.*valid: attn.proj"),
        ({"blocks": [5]}, "method_args.blocks.*0..1"),
        ({"dropout": 1.0}, "method_args.dropout"),
    ],
)
def test_lora_bad_options_are_user_errors(bad, match):
    with pytest.raises(UserError, match=match):
        build("lora", **bad)


# ----------------------------------------------------------------------------- SSF


def test_ssf_init_follows_the_paper_or_is_exactly_the_identity():
    torch.manual_seed(0)
    model = build("ssf", bb=("vit_small_patch16_224", {}))
    scales = torch.cat([m.scale.detach() for m in model.ssf_modules.values()])
    shifts = torch.cat([m.shift.detach() for m in model.ssf_modules.values()])
    assert len(scales) == 51_456
    assert abs(scales.mean().item() - 1) < 1e-3 and abs(scales.std().item() - 0.02) < 1e-3
    assert abs(shifts.mean().item()) < 1e-3 and abs(shifts.std().item() - 0.02) < 1e-3
    identity = build("ssf", init="identity").eval()
    plain = create_backbone(TINY_VIT[0], pretrained=False, kwargs=TINY_VIT[1]).model.eval()
    plain.load_state_dict(identity.backbone.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(identity.features(x), plain(x))


def test_ssf_parameter_counts_match_the_paper_arithmetic():
    # 2 (11 L + 2) D: ViT-S 102,912; ViT-B 205,824, the paper's 0.21M
    assert n_owned(build("ssf", bb=("vit_small_patch16_224", {})), "ssf_") == 2 * (11 * 12 + 2) * 384 == 102_912
    assert n_owned(build("ssf", bb=("vit_base_patch16_224", {})), "ssf_") == 2 * (11 * 12 + 2) * 768 == 205_824
    cnn = build("ssf", bb=CNN)
    convs = [m for m in cnn.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert n_owned(cnn, "ssf_") == 2 * sum(c.out_channels for c in convs)


@pytest.mark.parametrize("bb", [TINY_VIT, CNN], ids=["vit", "cnn"])
def test_ssf_merges_exactly_into_the_preceding_operations(bb):
    torch.manual_seed(0)
    model = build("ssf", bb=bb).eval()
    randomise(model, "ssf_")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        assert model.merge_()
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    ops = dict(model._injection.targets)
    assert all(not op._forward_hooks for op in ops.values())  # no SSF runs after the merge


def test_scale_shift_uses_the_channel_dimension():
    s = ScaleShift(3, 1, "identity", 0.0)
    s.scale.data = torch.tensor([1.0, 2.0, 3.0])
    x = torch.ones(1, 3, 2, 2)
    assert torch.equal(s(x)[0, :, 0, 0], torch.tensor([1.0, 2.0, 3.0]))
    t = ScaleShift(3, -1, "identity", 0.0)
    t.shift.data = torch.tensor([0.0, 1.0, 2.0])
    assert torch.equal(t(torch.zeros(2, 5, 3))[1, 4], torch.tensor([0.0, 1.0, 2.0]))


def test_merged_runs_through_the_loop(tiny_vit_overrides):
    from harness.training.loop import train

    for method in ("lora", "ssf"):
        cfg = resolve(
            method=method,
            backbone="vit_small_patch16_224",
            overrides={**tiny_vit_overrides, "optim.epochs": 1, "method_args.merge": True},
        )
        result = train(cfg)
        assert (
            mlflow.get_run(result.run_id).data.params["model/merged"] == "True"
            and 0 <= result.metrics["test/recall_at_1"] <= 1
        )
