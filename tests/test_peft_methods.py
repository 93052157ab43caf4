"""PEFT methods (adapter, vpt_shallow, vpt_deep, vptsp_g, vptsp_ema): each is the method it claims.

Random-init timm models only: a 2-block ViT-S at 32 px (6 heads, qkv bias) for behaviour, a
12-block ViT-S at 32 px for the published parameter counts, resnet10t for the CNN variants.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from harness.config import RunConfig
from harness.errors import UserError
from harness.models.backbones import create_backbone
from harness.models.losses import ProxyAnchorLoss
from harness.models.model import BuildContext
from harness.training.resolution import resolve
from methods import get_method
from methods.vptsp_g import device_grouping, group_by_class, host_grouping

VIT = "vit_small_patch16_224"
TINY_VIT = {"img_size": 32, "depth": 2}
VIT_S12 = {"img_size": 32}  # all 12 blocks, D = 384
CNN = "resnet10t"  # smallest timm ResNet: keeps the CNN tests fast
D = 384  # ViT-S width

#: method-owned parameter prefixes (peft style)
PREFIXES = {
    "adapter": ("adapter_",),
    "vpt_shallow": ("prompt_",),
    "vpt_deep": ("prompt_",),
    "vptsp_g": ("prompt_", "proxy_"),
    "vptsp_ema": ("prompt_", "proxy_"),
}
OURS = sorted(PREFIXES)

_BACKBONES: dict = {}


def backbone(name: str = VIT, kwargs: dict | None = None):
    """A fresh copy of a cached random-init backbone (builders attach hooks and freeze it)."""
    key = (name, tuple(sorted((kwargs or {}).items())))
    if key not in _BACKBONES:
        torch.manual_seed(0)
        _BACKBONES[key] = create_backbone(name, pretrained=False, kwargs=kwargs)
    return copy.deepcopy(_BACKBONES[key])


def build(
    method: str,
    bb=None,
    *,
    num_classes: int = 4,
    embed_dim: int = 32,
    batch: int = 8,
    k: int = 2,
    seed: int = 0,
    **args,
):
    """Builder output for a resolved config (method defaults apply; options via method_args)."""
    overrides = {
        "model.embed_dim": embed_dim,
        "data.image_size": 32,
        "data.batch_size": batch,
        "data.samples_per_class": k,
        **{f"method_args.{key}": v for key, v in args.items()},
    }
    cfg = resolve(method=method, overrides=overrides)
    spec = get_method(method)
    bb = bb if bb is not None else backbone(VIT, TINY_VIT)
    torch.manual_seed(seed)
    return spec.builder(BuildContext(bb, num_classes, cfg), cfg.method_args)


def batch(n_classes: int = 4, k: int = 2, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_classes * k, 3, size, size, generator=g)
    return x, torch.arange(n_classes).repeat_interleave(k)


def optimizer(model, name: str = "sgd", lr: float = 0.05):
    cfg = RunConfig()
    cfg.optim.lr = lr  # groups carry their own lr: base lr times the role's multiplier
    groups = model.param_groups(cfg.optim, cfg.loss)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=1e-4)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2)


def step(model, opt, x, y, clip: float = 0.0) -> float:
    """One step as the loop takes it: the host-side hook first, then loss, backward, step, hook."""
    model.before_step(opt, y.numpy())
    loss, _ = model.training_loss(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    opt.step()
    model.after_step(opt)
    return loss.item()


def n_params(model, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


# ----------------------------------------------------------------------------- all methods


@pytest.mark.parametrize("method", OURS)  # tests/test_registry_methods.py does the whole registry
def test_backbone_weights_get_no_gradient_and_stay(method):
    model = build(method)
    model.train()
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    x, y = batch()
    step(model, optimizer(model), x, y)
    for name, p in model.backbone.named_parameters():
        if name.endswith("bias") and p.requires_grad:  # BitFit-style methods train only biases
            continue
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("method", OURS)
def test_method_parameters_share_the_prefix(method):
    model = build(method)
    outside = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(("head.", "criterion."))]
    assert outside
    for name in outside:
        assert name.startswith(PREFIXES[method]) or (name.startswith("backbone.") and name.endswith("bias")), name
    assert not model.features_are_frozen  # features must never be cached for these methods


@pytest.mark.parametrize(
    "method,bb_name,args,lr",
    [(m, VIT, {}, 3e-3) for m in OURS]
    + [("adapter", CNN, {}, 3e-3), ("vpt_deep", CNN, {}, 0.1)],  # padding prompts live in pixel space: larger steps
)
def test_method_parameters_alone_lower_the_loss(method, bb_name, args, lr):
    """Head and criterion frozen: the fixed batch's loss must fall through the method's own parameters."""
    model = build(method, backbone(bb_name, TINY_VIT if bb_name == VIT else None), **args).train()
    own = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(PREFIXES[method])]
    x, y = batch()
    opt = torch.optim.Adam(own, lr=lr)
    losses = [step(model, opt, x, y) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses


# ----------------------------------------------------------------------------- adapter


@pytest.mark.parametrize("style", ["parallel", "sequential"])
def test_adapter_is_identity_at_init_on_vit_s(style):
    bb = backbone(VIT, TINY_VIT)
    attn = bb.model.blocks[0].attn
    assert attn.num_heads == 6 and attn.qkv.bias is not None  # ViT-S layout the VPTSP-G code breaks
    x, _ = batch()
    with torch.no_grad():
        reference = bb.model(x)
        model = build("adapter", bb, style=style).eval()
        assert torch.equal(model.features(x), reference)
        for a in model.adapter_modules.values():
            torch.nn.init.normal_(a.up.weight)
        assert not torch.allclose(model.features(x), reference, atol=1e-3)


@pytest.mark.parametrize("style", ["parallel", "sequential"])
def test_adapter_block_matches_hand_written_formula(style):
    model = build("adapter", style=style, scale=0.5).eval()
    block, adapter = model.backbone.blocks[0], model.adapter_modules["blocks_0"]
    torch.nn.init.normal_(adapter.up.weight, std=0.1)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        mid = x + block.attn(block.norm1(x))
        mlp = block.mlp(block.norm2(mid))
        source = mid if style == "parallel" else mlp
        branch = 0.5 * (
            torch.relu(source @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
        )
        assert torch.allclose(block(x), mid + mlp + branch, atol=1e-5)


@pytest.mark.parametrize("norm", [True, False])
def test_adapter_cnn_is_identity_at_init_and_counts(norm):
    bb = backbone(CNN)
    x, _ = batch()
    with torch.no_grad():
        reference = bb.model.eval()(x)
        model = build("adapter", bb, cnn_norm=norm).train()  # train mode: BN on batch statistics
        assert torch.equal(model.features(x), reference)
    # resnet10t: 4 basic blocks with 64, 128, 256, 512 channels; C -> C/16 -> C 1x1 convs, then
    # BN (2C) or the up-projection's bias (C)
    assert n_params(model, "adapter_") == sum(c * c // 8 + (2 * c if norm else c) for c in (64, 128, 256, 512))
    state = model.trainable_state_dict()
    assert ("adapter_modules.layer1_0.norm.running_mean" in state) == norm  # BN statistics are saved
    x2 = x.clone()
    step(model, optimizer(model, "sgd", lr=0.05), x, torch.arange(4).repeat_interleave(2))
    with torch.no_grad():
        assert not torch.allclose(model.eval().features(x2), reference, atol=1e-5)  # adapters now act


def test_adapter_vit_s_parameter_count():
    model = build("adapter", backbone(VIT, VIT_S12), embed_dim=384)
    per_block = (D * 64 + 64) + (64 * D + D)  # down + up, weights and biases
    assert n_params(model, "adapter_") == 12 * per_block == 595_200
    head = 2 * D + D * 384 + 384
    counts = model.count_parameters()
    assert counts["params/trainable_inference"] == 595_200 + head
    only_one = build("adapter", blocks=[1])
    assert list(only_one.adapter_modules) == ["blocks_1"] and n_params(only_one, "adapter_") == per_block


def test_adapter_bad_block_index_is_a_user_error():
    with pytest.raises(UserError, match="blocks"):
        build("adapter", blocks=[5])


# ----------------------------------------------------------------------------- VPT


def test_vpt_parameter_counts_vit_s():
    deep = build("vpt_deep", backbone(VIT, VIT_S12), embed_dim=384)
    assert n_params(deep, "prompt_") == 12 * 10 * D == 46_080
    shallow = build("vpt_shallow", backbone(VIT, VIT_S12), embed_dim=384)
    assert n_params(shallow, "prompt_") == 10 * D
    stepped = build(
        "vpt_deep", backbone(VIT, VIT_S12), embed_dim=384, variant="vptspg", num_prompts=80, depth=11, block_step=2
    )
    assert n_params(stepped, "prompt_") == sum(80 - 2 * layer for layer in range(11)) * D  # 770 tokens
    bound = math.sqrt(6 / (3 * 16 * 16 + D))
    values = deep.prompt_embeddings[0]
    assert values.abs().max() <= bound and values.abs().max() > 0.95 * bound


def _block_inputs(model, x):
    """Inputs of every block during ``model.features(x)``."""
    seen = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone())) for b in model.backbone.blocks
    ]
    with torch.no_grad():
        out = model.features(x)
    for h in hooks:
        h.remove()
    return seen, out


def test_vpt_deep_replaces_and_shallow_carries_prompts():
    x, _ = batch(1, 2)
    n = 10
    deep = build("vpt_deep", num_prompts=n).eval()
    inputs, _ = _block_inputs(deep, x)
    patches = (32 // 16) ** 2
    for i, tokens in enumerate(inputs):  # [CLS, prompts_i, patches] at every block
        assert tokens.shape[1] == 1 + n + patches
        assert torch.equal(tokens[:, 1 : 1 + n], deep.prompt_embeddings[i].expand(2, -1, -1))
    shallow = build("vpt_shallow", num_prompts=n).eval()
    assert len(shallow.prompt_embeddings) == 1 and len(deep.prompt_embeddings) == 2
    inputs, _ = _block_inputs(shallow, x)
    assert torch.equal(inputs[0][:, 1 : 1 + n], shallow.prompt_embeddings[0].expand(2, -1, -1))
    with torch.no_grad():  # block 1 sees block 0's prompt outputs, not fresh prompts
        carried = shallow.backbone.blocks[0](inputs[0])[:, 1 : 1 + n]
    assert torch.allclose(inputs[1][:, 1 : 1 + n], carried)


def test_vpt_features_match_a_hand_rolled_forward():
    model = build("vpt_deep", num_prompts=3).eval()
    vit = model.backbone
    x, _ = batch(1, 2)
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))  # pos-embed before prompts
        t = torch.cat([t[:, :1], model.prompt_embeddings[0].expand(2, -1, -1), t[:, 1:]], 1)
        t = vit.blocks[0](t)
        t[:, 1:4] = model.prompt_embeddings[1]
        t = vit.blocks[1](t)
        expected = vit.norm(t)[:, 0]
        assert torch.allclose(model.features(x), expected, atol=1e-6)
        plain = vit(x)
        assert not torch.allclose(model.features(x), plain, atol=1e-3)  # prompts change the output
        model.prompt_embeddings[1].add_(torch.randn_like(model.prompt_embeddings[1]))  # not a constant: LayerNorm
        assert not torch.allclose(model.features(x), expected, atol=1e-3)


def test_vptspg_variant_puts_prompts_before_cls_and_strips_them():
    model = build("vpt_deep", num_prompts=6, variant="vptspg", block_step=4).eval()
    assert [p.shape[1] for p in model.prompt_embeddings] == [6, 2]
    x, _ = batch(1, 2)
    inputs, _ = _block_inputs(model, x)
    for tokens, p in zip(inputs, model.prompt_embeddings):
        assert tokens.shape[1] == p.shape[1] + 1 + 4  # the previous block's prompts were stripped
        assert torch.equal(tokens[:, : p.shape[1]], p.expand(2, -1, -1))


def test_vpt_handles_register_tokens_and_rejects_other_vits():
    model = build("vpt_deep", backbone(VIT, {**TINY_VIT, "reg_tokens": 2}), num_prompts=3).eval()
    inputs, _ = _block_inputs(model, batch(1, 2)[0])
    assert torch.equal(inputs[1][:, 3:6], model.prompt_embeddings[1].expand(2, -1, -1))  # after CLS + 2 registers
    with pytest.raises(UserError, match="VisionTransformer"):
        build("vpt_deep", backbone("deit_tiny_distilled_patch16_224", TINY_VIT))
    with pytest.raises(UserError, match="depth"):
        build("vpt_deep", depth=3)


def test_cnn_padding_prompts_change_only_the_border():
    pad = 4
    model = build("vpt_deep", backbone(CNN), pad_pixels=pad).eval()
    x, _ = batch(1, 2)
    framed = model.prompt_input(x)
    assert framed.shape[-2:] == (32 + 2 * pad, 32 + 2 * pad)
    assert torch.equal(framed[..., pad:-pad, pad:-pad], x)
    mean = torch.tensor(model.backbone.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.pretrained_cfg["std"]).view(1, 3, 1, 1)
    top = (model.prompt_top_bottom[:, :, :pad] - mean) / std
    assert torch.allclose(framed[:, :, :pad], top.expand(2, -1, -1, -1))
    assert n_params(model, "prompt_") == 3 * 2 * pad * (32 + 2 * pad) + 3 * 32 * 2 * pad
    with torch.no_grad():
        before = model.features(x)
        model.prompt_left_right.add_(0.5)
        assert not torch.allclose(model.features(x), before, atol=1e-4)


# ----------------------------------------------------------------------------- VPTSP-G


def _np_gru(params: dict, x: np.ndarray, h: np.ndarray) -> np.ndarray:
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    z = sig(x @ params["W_z"] + h @ params["U_z"] + params["b_z"])
    r = sig(x @ params["W_r"] + h @ params["U_r"] + params["b_r"])
    n = np.maximum(x @ params["W_n"] + r * (h @ params["U_n"]) + params["b_n"], 0)
    return (1 - z) * n + z * h


def test_gru_integration_equals_hand_computation():
    model = build("vptsp_g", embed_dim=4, num_classes=3)
    with torch.no_grad():
        for p in model.proxy_integrator.parameters():
            p.normal_(0, 0.5)
    params = {n: p.detach().double().numpy() for n, p in model.proxy_integrator.named_parameters()}
    container = model.proxy_container.double().numpy()
    obs = F.normalize(torch.randn(6, 4), dim=1)
    labels = torch.tensor([2, 2, 0, 0, 2, 1])  # class 2 seen 3 times, not consecutively
    classes, h = model.integrate(obs, host_grouping(labels.numpy(), obs.device))
    assert classes.tolist() == [0, 1, 2]
    o = obs.double().numpy()
    expected = {
        0: _np_gru(params, o[3], _np_gru(params, o[2], container[0])),
        1: _np_gru(params, o[5], container[1]),
        2: _np_gru(params, o[4], _np_gru(params, o[1], _np_gru(params, o[0], container[2]))),
    }
    for row, c in enumerate(classes.tolist()):
        e = expected[c] / np.linalg.norm(expected[c])
        assert np.allclose(h[row].detach().double().numpy(), e, atol=1e-5)


@pytest.mark.parametrize("labels", [[2, 2, 0, 0, 2, 1], [5, 5, 1, 1, 3, 3, 1, 5], [7], [0, 1, 2, 3]])
def test_host_grouping_is_the_device_grouping(labels):
    """The grouping the loop plans on the host (no sync) is exactly torch.unique's on the device."""
    y = torch.tensor(labels)
    values = torch.randn(len(labels), 3)
    host, dev = host_grouping(y.numpy(), y.device), device_grouping(y)
    for name in ("classes", "rows", "order", "sorted_rows", "rank", "counts"):
        assert torch.equal(getattr(host, name), getattr(dev, name)), name
    assert host.width == dev.width and host.host_classes.tolist() == sorted(set(labels))
    per_class, mask = group_by_class(values, host)
    for u, c in enumerate(sorted(set(labels))):  # the t-th sample of class c, in batch order
        members = [i for i, v in enumerate(labels) if v == c]
        assert torch.equal(per_class[u, : len(members)], values[members]) and mask[u].sum() == len(members)


def test_ema_integration_equals_hand_computation():
    model = build("vptsp_ema", embed_dim=4, num_classes=2, ema_momentum=0.7)
    obs = F.normalize(torch.randn(4, 4), dim=1)
    labels = torch.tensor([1, 1, 0, 0])
    classes, h = model.integrate(obs, device_grouping(labels))
    c = model.proxy_container
    for row, cls, (a, b) in ((0, 0, (2, 3)), (1, 1, (0, 1))):
        e = 0.7 * c[cls] + 0.3 * (obs[a] + obs[b]) / 2
        assert torch.allclose(h[row], e / e.norm(), atol=1e-6)


def test_proxies_gradients_and_container_write_back():
    model = build("vptsp_g", num_classes=6, proxy_bias_ratio=0.3).train()
    x, y = batch(3, 2)  # classes 0..2 of 6
    stored = model.proxy_container.clone()
    g = device_grouping(y)
    classes, h = model.integrate(model.proxy_observations(x, y, g), g)
    proxies = model.proxies(classes, h)
    mixed = stored.clone()
    mixed[classes] = h
    assert torch.allclose(proxies, F.normalize(0.3 * model.proxy_bias + 0.7 * mixed, dim=1), atol=1e-6)
    # the training loss is Proxy Anchor of the shared-prompt embeddings against those proxies
    loss, _ = model.training_loss(x, y)
    expected = ProxyAnchorLoss(6, 32)(model.head(model.features(x)), y, proxies=proxies)
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert model.proxy_bias.grad.abs().sum(1).gt(0).all()  # every proxy row learns
    class_grad = model.proxy_class_prompts[0].grad.abs().sum((1, 2))
    assert class_grad[:3].gt(0).all() and class_grad[3:].eq(0).all()  # only the batch's classes
    for name in (
        "proxy_integrator.W_z",
        "proxy_head.proj.weight",
        "prompt_embeddings.0",
        "backbone.blocks.0.attn.qkv.bias",
    ):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert torch.equal(model.proxy_container, stored)  # written only after the step
    model.after_step()
    assert torch.allclose(model.proxy_container[:3], h.detach()) and torch.equal(model.proxy_container[3:], stored[3:])
    assert not model.proxy_container.requires_grad
    assert "proxy_container" in model.trainable_state_dict()


def test_vptsp_inference_path_uses_only_shared_prompts():
    model = build("vptsp_g").eval()
    x, _ = batch()
    with torch.no_grad():
        before = model(x)
        for p in list(model.proxy_class_prompts) + [model.proxy_bias]:
            p.add_(torch.randn_like(p))
        assert torch.equal(model(x), before)
        model.prompt_embeddings[0].add_(torch.randn_like(model.prompt_embeddings[0]))
        assert not torch.allclose(model(x), before, atol=1e-4)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_memory_bank_matches_on_device_training(opt_name):
    x, y = batch(4, 2)
    models = {bank: build("vptsp_g", num_classes=4, batch=16, memory_bank=bank).train() for bank in (False, True)}
    opts = {bank: optimizer(m, opt_name, lr=0.01) for bank, m in models.items()}
    # the outer optimizer never holds a class-prompt tensor with a row per class
    bank_model = models[True]
    held = [p for g in opts[True].param_groups for p in g["params"]]
    assert not any(p.dim() == 3 and p.shape[0] == 4 for p in held)  # no (C, n, D) tensor
    assert bank_model.proxy_class_slot[0].shape[0] == 8 and bank_model.class_prompt_values()[0].shape[0] == 4
    for i in range(3):
        xi = x + 0.1 * i
        losses = {bank: step(m, opts[bank], xi, y, clip=1.0) for bank, m in models.items()}
        assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    for a, b in zip(models[False].class_prompt_values(), models[True].class_prompt_values()):
        assert b.device.type == "cpu"
        assert torch.allclose(a, b, atol=1e-6)
    dense_state, bank_state = models[False].trainable_state_dict(), models[True].trainable_state_dict()
    assert dense_state.keys() == bank_state.keys()
    for k in dense_state:
        assert torch.allclose(dense_state[k], bank_state[k], atol=1e-6), k
    fresh = build("vptsp_g", num_classes=4, batch=16, memory_bank=True, seed=1)
    fresh.load_trainable_state_dict(dense_state)  # checkpoints move between the two modes
    assert torch.equal(fresh.class_prompt_values()[1], dense_state["proxy_class_prompts.1"])


def test_vptsp_param_groups_and_vit_s_counts():
    model = build("vptsp_g", backbone(VIT, VIT_S12), embed_dim=384, num_classes=5, lr_proxy=0.2)
    groups = {g["name"]: g for g in model.param_groups(RunConfig().optim, RunConfig().loss)}
    assert groups["proxy_bias"]["lr"] == 0.2 and groups["proxy_bias"]["schedule"] == "cosine"
    assert groups["proxy_bias"]["params"] == [model.proxy_bias]
    shared = 12 * 10 * D
    bitfit = 12 * (D + 3 * D + D + D + 4 * D + D) + D + D  # per block: norm1, qkv, proj, norm2, fc1, fc2
    head = 2 * D + D * 384 + 384
    class_prompts = 5 * 12 * 3 * D
    gru = 6 * 384 * 384 + 3 * 384
    counts = model.count_parameters()
    assert counts["params/trainable_inference"] == shared + bitfit + head == 246_144
    assert counts["params/trainable"] == 246_144 + class_prompts + head + gru + 5 * 384
    assert n_params(model, "proxy_integrator") == 885_888
    bank = build("vptsp_g", backbone(VIT, VIT_S12), embed_dim=384, num_classes=5, memory_bank=True)
    assert bank.count_parameters() == counts
    no_bitfit = build("vptsp_g", backbone(VIT, VIT_S12), embed_dim=384, num_classes=5, bitfit=False)
    assert no_bitfit.count_parameters()["params/trainable_inference"] == shared + head


def test_vptsp_presets_resolve_to_the_published_configs():
    assert "vit_small_patch16_224.augreg_in21k" in timm.list_pretrained("vit_small_patch16_224*")
    cub = resolve(method="vptsp_g", dataset="cub200", preset="cub")
    assert (cub.backbone, cub.model.embed_dim, cub.optim.name, cub.optim.lr, cub.optim.cosine_epochs) == (
        "vit_small_patch16_224.augreg_in21k",
        384,
        "sgd",
        5e-3,
        50,
    )
    assert (cub.data.batch_size, cub.data.samples_per_class, cub.method_args.lr_proxy) == (64, 2, 0.1)
    cars = resolve(method="vptsp_g", dataset="cars196", preset="cars")
    assert (cars.method_args.num_prompt, cars.method_args.prompt_depth, cars.method_args.prompt_block_step) == (
        80,
        11,
        2,
    )
    assert (
        cars.method_args.num_class_prompt,
        cars.method_args.class_prompt_depth,
        cars.method_args.proxy_bias_ratio,
    ) == (50, 8, 0.7)
    sop = resolve(method="vptsp_ema", dataset="sop", preset="sop")
    assert sop.method_args.memory_bank and sop.data.samples_per_class == 1 and sop.optim.epochs == 120
    inshop = resolve(method="vptsp_g", dataset="inshop", preset="inshop", overrides={"method_args.lr_proxy": 0.01})
    assert inshop.method_args.num_class_prompt == 80 and inshop.method_args.lr_proxy == 0.01
    with pytest.raises(UserError, match="preset"):
        resolve(method="vptsp_g", dataset="cub200", preset="cub2011")


def test_vptsp_rejects_other_losses_and_cnns():
    cfg_loss = RunConfig()
    cfg_loss.loss.name = "norm_softmax"
    spec = get_method("vptsp_g")
    with pytest.raises(UserError, match="loss.name"):
        spec.builder(BuildContext(backbone(VIT, TINY_VIT), 4, cfg_loss), spec.config_cls())
    assert not spec.applies_to("cnn")


# ----------------------------------------------------------------------------- shared loop


@pytest.fixture(scope="module")
def loop_overrides(tmp_path_factory) -> dict:
    """Tiny Fashion-MNIST runs on a 2-block ViT-S; one MLflow store for the module (its creation is slow)."""
    from conftest import TINY, TINY_VIT

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return {
        **TINY,
        **TINY_VIT,
        "tracking.uri": uri,
        "tracking.log_artifacts": False,
        "optim.epochs": 1,
        "data.max_per_class": 16,
        "data.batch_size": 32,
        "data.samples_per_class": 8,
    }


@pytest.mark.parametrize(
    "method,extra", [(m, {}) for m in OURS if m != "vptsp_g"] + [("vptsp_g", {"method_args.memory_bank": True})]
)
def test_trains_through_the_shared_loop(method, extra, loop_overrides):
    from harness.training.loop import train

    result = train(resolve(method=method, backbone=VIT, overrides={**loop_overrides, **extra}))
    assert math.isfinite(result.history[-1]["train/loss"])
    assert 0.0 <= result.metrics["test/recall_at_1"] <= 1.0
    assert result.metrics["params/trainable"] >= result.metrics["params/trainable_inference"] > 0
