"""FRPT and its ablations (SPECS 5): sampler geometry, CAH algebra, counts, training, DPP figure.

CPU only, random-init backbones; training uses timm's ``test_resnet`` (0.37M parameters) at
64 px so each end-to-end run takes seconds. ResNet-50 is only built (no forward) for the counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config import RunConfig, to_yaml
from harness.errors import UserError
from harness.models.backbones import create_backbone
from harness.models.model import BuildContext
from harness.training.resolution import resolve
from methods import get_method, method_names
from methods._frpt_parts import (
    CategoryAwareHead,
    SaliencySampler,
    cam_boxes,
    instance_norm,
)
from methods.frpt import FRPTConfig, FRPTModel, default_parse_stage

FRPT_METHODS = ["frpt", "frpt_bbox", "frpt_cah", "frpt_cam", "frpt_dpp", "frpt_no_in"]
DPP_METHODS = ["frpt", "frpt_dpp", "frpt_no_in"]
SMALL = "test_resnet"


def build(
    method: str,
    backbone: str = SMALL,
    num_classes: int = 4,
    dataset: str = "fashion_mnist",
    backbone_kwargs: dict | None = None,
    **overrides,
) -> FRPTModel:
    """The registered builder on a random-init backbone, config resolved as the CLI would."""
    return build_with_cfg(method, backbone, num_classes, dataset, backbone_kwargs, **overrides)[1]


def build_with_cfg(
    method: str,
    backbone: str = SMALL,
    num_classes: int = 4,
    dataset: str = "fashion_mnist",
    backbone_kwargs: dict | None = None,
    **overrides,
) -> tuple[RunConfig, FRPTModel]:
    ov = {"model.pretrained": False, **overrides}
    if backbone_kwargs:
        ov["model.backbone_kwargs"] = backbone_kwargs
        if "img_size" in backbone_kwargs:  # the run's image size is the ViT's
            ov.setdefault("data.image_size", backbone_kwargs["img_size"])
    if method == "frpt_bbox":
        dataset = "cub200"  # the builder needs data.crop_to_box, which resolve sets; no data is read
    cfg = resolve(method=method, dataset=dataset, backbone=backbone, overrides=ov)
    torch.manual_seed(0)  # same random backbone and method weights on every call
    bb = create_backbone(backbone, pretrained=False, kwargs=cfg.model.backbone_kwargs)
    return cfg, get_method(method).builder(BuildContext(bb, num_classes, cfg), cfg.method_args)


def identity_grid(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([xs, ys], dim=-1)[None]


def peaked(h: int, w: int, cy: float, cx: float, amplitude: float = 20.0, width: float = 3.0) -> torch.Tensor:
    """A saliency map: uniform floor plus a Gaussian bump at (cy, cx), summing to 1."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    bump = 1 + amplitude * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * width**2))
    return (bump / bump.sum()).view(1, 1, h, w)


# ----------------------------------------------------------------------------- sampler


def test_uniform_saliency_gives_identity_warp():
    sampler = SaliencySampler(61, 13.0)
    grid = sampler.grid(torch.full((2, 1, 9, 12), 1 / 108))
    assert torch.allclose(grid, identity_grid(9, 12).expand(2, -1, -1, -1), atol=1e-5)
    images = torch.randn(2, 3, 20, 24)
    assert torch.allclose(sampler.resample(images, grid), images, atol=1e-3)


def test_peaked_saliency_zooms_into_the_peak():
    sampler = SaliencySampler(61, 13.0)
    n = 31
    grid = sampler.grid(peaked(n, n, 15, 15))[0]
    assert grid.abs().max() <= 1.0
    row = grid[15, :, 0]  # x coordinates along the middle row
    step = row.diff()
    assert (step > 0).all(), "the warp must stay monotonic"
    assert step[13:17].mean() < 0.5 * torch.cat([step[:3], step[-3:]]).mean()  # zoom: denser at the peak
    assert step[13:17].mean() < 2 / (n - 1)  # denser than the identity grid near the peak
    # an off-centre peak pulls the sampling points towards it
    off = sampler.grid(peaked(n, n, 8, 24))[0]
    assert off[..., 0].mean() > 0.02 and off[..., 1].mean() < -0.02
    assert off.abs().max() <= 1.0


def test_sampler_stays_in_range_for_random_maps():
    sampler = SaliencySampler(61, 13.0)
    logits = torch.randn(4, 1, 16, 16) * 5
    sal = torch.softmax(logits.flatten(1), 1).view_as(logits)
    grid = sampler.grid(sal)
    assert grid.shape == (4, 16, 16, 2) and grid.abs().max() <= 1.0 and torch.isfinite(grid).all()


# ----------------------------------------------------------------------------- CAH


def test_cah_extremes_and_no_in():
    m = torch.randn(2, 16, 5, 5) * 3 + 1
    cah = CategoryAwareHead(16, 4, use_in=True)
    ones, zeros = torch.ones(2, 16, 1, 1), torch.zeros(2, 16, 1, 1)
    assert torch.allclose(cah.mix(m, ones), m)
    normed = cah.mix(m, zeros)
    assert torch.allclose(normed, instance_norm(m))
    assert torch.allclose(normed.mean(dim=(2, 3)), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(normed.std(dim=(2, 3), unbiased=False), torch.ones(2, 16), atol=1e-3)
    no_in = CategoryAwareHead(16, 4, use_in=False)
    assert torch.allclose(no_in.mix(m, zeros), torch.zeros_like(m))
    half = torch.full((2, 16, 1, 1), 0.5)
    assert torch.allclose(no_in.mix(m, half), 0.5 * m)
    w = cah.attention(m)
    assert w.shape == (2, 16, 1, 1) and ((w > 0) & (w < 1)).all()
    assert all(mod.bias is None for mod in (cah.squeeze, cah.excite))


def test_registered_ablations_switch_the_right_parts():
    full, no_in = build("frpt"), build("frpt_no_in")
    assert full.cah_head.use_in and not no_in.cah_head.use_in
    assert full.has_dpp and no_in.has_dpp
    assert build("frpt_dpp").cah_head is None
    for name in ("frpt_cah", "frpt_bbox", "frpt_cam"):
        model = build(name)
        assert not model.has_dpp and model.cah_head is not None
    assert build("frpt_cam").crop == "cam" and build("frpt_cah").crop == "none"


def test_in_term_cancels_under_gap_but_not_in_the_code_head():
    """GAP(W*M + (1-W)*IN(M)) = GAP(W*M): the paper's no-IN ablation only differs with variant=code."""
    images = torch.randn(4, 3, 48, 48)
    for variant, same in (("paper", True), ("code", False)):
        with_in = build("frpt", **{"method_args.variant": variant, "method_args.parser_init": "default"}).eval()
        without = build("frpt_no_in", **{"method_args.variant": variant, "method_args.parser_init": "default"}).eval()
        with torch.no_grad():
            a, b = with_in.features(images), without.features(images)
        assert torch.allclose(a, b, atol=1e-5) == same, variant


def test_zero_initialised_prompt_starts_as_identity_warp():
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = build("frpt").prompt(images)
        assert torch.allclose(out["saliency"], torch.full_like(out["saliency"], 1 / out["saliency"][0].numel()))
        assert torch.allclose(out["images"], images, atol=1e-3)
        warped = build("frpt", **{"method_args.parser_init": "default"}).prompt(images)["images"]
    assert not torch.allclose(warped, images, atol=1e-2)


def test_param_groups_scale_the_dpp_lr_for_adamw_only():
    def groups(**ov) -> dict[str, float]:
        cfg, model = build_with_cfg("frpt", **ov)
        return {g["name"]: g["lr"] for g in model.param_groups(cfg.optim, cfg.loss)}

    sgd = groups(**{"optim.lr": 0.01})
    assert sgd == {"dpp": 0.01, "cah": 0.01, "criterion": 0.01}  # paper: one lr (loss.lr_mult=1)
    adamw = groups(**{"optim.lr": 0.01, "optim.name": "adamw"})
    assert adamw["dpp"] == pytest.approx(0.01 / 31**2) and adamw["cah"] == 0.01
    code = groups(**{"optim.lr": 0.01, "optim.name": "adamw", "method_args.variant": "code"})
    assert code["dpp"] == 0.01  # a 1x1 parser needs no correction
    explicit = groups(**{"optim.lr": 0.01, "optim.name": "adamw", "method_args.dpp_lr_mult": 0.5})
    assert explicit["dpp"] == 0.005


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", FRPT_METHODS)
def test_registered_with_paper_recipe(name):
    assert name in method_names()
    spec = get_method(name)
    assert spec.families == ("vit", "cnn") and spec.config_cls is FRPTConfig
    cfg = resolve(method=name, dataset="cub200" if name == "frpt_bbox" else "fashion_mnist")
    assert cfg.loss.name == "cross_entropy" and cfg.model.embed_dim == 0
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 1e-3, 0.9, 1e-4)
    assert (cfg.optim.schedule, cfg.optim.step_epochs, cfg.optim.step_gamma) == ("step", 50, 0.9)
    assert cfg.data.batch_size == 32 and cfg.data.augment == "frpt"
    assert cfg.data.crop_to_box == (name == "frpt_bbox")
    code = resolve(method=name, dataset=cfg.dataset, preset="code")
    assert code.method_args.variant == "code" and code.loss.label_smoothing == 0.3
    assert cfg.optim.grad_clip == 0.0 and code.optim.grad_clip == 5.0  # paper: none; code: fast-reid's 5.0
    assert cfg.method_args.parser_init == "zero" and code.method_args.parser_init == "default"


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="variant.*valid: paper, code"):
        build("frpt", **{"method_args.variant": "papr"})
    with pytest.raises(UserError, match="parse_stage.*1=layer1"):
        build("frpt", **{"method_args.parse_stage": 9})
    with pytest.raises(UserError, match="crop=cam replaces the DPP"):
        build("frpt", **{"method_args.crop": "cam"})
    with pytest.raises(UserError, match="parser_init.*valid: zero, default"):
        build("frpt", **{"method_args.parser_init": "random"})
    with pytest.raises(UserError, match="sigma"):
        build("frpt", **{"method_args.sigma": 4})
    with pytest.raises(UserError, match="saliency grid would be 1x1"):
        build(
            "frpt",
            backbone="vit_small_patch16_224",
            backbone_kwargs={"img_size": 16, "depth": 2},
            **{"data.image_size": 16},
        )
    with pytest.raises(UserError, match="crop_to_box=true"):
        build("frpt_bbox", **{"data.crop_to_box": False})


def test_default_parse_stage_per_family():
    r50 = create_backbone("resnet50", pretrained=False).model.feature_info
    eff = create_backbone("tf_efficientnet_lite0", pretrained=False).model.feature_info
    vit = [{"reduction": 16, "num_chs": 384, "module": f"blocks.{i}"} for i in range(12)]
    assert r50[default_parse_stage(r50, "paper")]["module"] == "layer1"
    assert r50[default_parse_stage(r50, "code")]["module"] == "layer3"
    assert eff[default_parse_stage(eff, "paper")]["reduction"] == 4
    assert eff[default_parse_stage(eff, "code")]["reduction"] == 16
    assert (default_parse_stage(vit, "paper"), default_parse_stage(vit, "code")) == (2, 8)


# ----------------------------------------------------------------------------- counts

C = 100  # CUB training classes with data.val_fraction=0
DPP_R50 = 31 * 31 * 256  # 246,016: the paper's "0.25M"
CAH_R50 = 2 * 2048 * (2048 // 8)  # 1,048,576
CODE_DPP = 1024  # ReLU + 1x1 conv on layer3, no bias
CODE_CAH = 2 * 2048 * 2048 + (2048 * 1024 + 2 * 1024) + (1024 * 2048 * 9 + 2 * 2048)
NECK = 2048  # BatchNorm1d weight (bias frozen)


@pytest.mark.parametrize(
    "method,variant,inference",
    [
        ("frpt", "paper", DPP_R50 + CAH_R50),
        ("frpt_no_in", "paper", DPP_R50 + CAH_R50),
        ("frpt_dpp", "paper", DPP_R50),
        ("frpt_cah", "paper", CAH_R50),
        ("frpt_bbox", "paper", CAH_R50),
        ("frpt_cam", "paper", CAH_R50),
        ("frpt", "code", CODE_DPP + CODE_CAH + NECK),
        ("frpt_dpp", "code", CODE_DPP + NECK),
    ],
)
def test_resnet50_parameter_counts_match_hand_arithmetic(method, variant, inference):
    model = build(method, backbone="resnet50", num_classes=C, **{"method_args.variant": variant})
    counts = model.count_parameters()
    assert counts["params/trainable_inference"] == inference
    assert counts["params/trainable"] == inference + 2048 * C  # bias-free classifier
    assert counts["params/total"] == 23_508_032 + counts["params/trainable"] + (2048 if variant == "code" else 0)


def test_hand_arithmetic_constants():
    assert (DPP_R50, CAH_R50, CODE_CAH) == (246_016, 1_048_576, 29_366_272)


def test_trainable_parameters_carry_the_method_prefixes():
    for name in FRPT_METHODS:
        model = build(name, **{"method_args.variant": "code"})
        for pname, p in model.named_parameters():
            if p.requires_grad and not pname.startswith(("head.", "criterion.")):
                assert pname.startswith(model.method_prefixes), pname
        assert not any(p.requires_grad for p in model.backbone.parameters())


# ----------------------------------------------------------------------------- training


def _batch(n: int = 8, size: int = 48, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    images = torch.randn(n, 3, size, size, generator=g) * 0.3
    images[:, :, : size // 2] += labels.view(-1, 1, 1, 1) * 0.5  # learnable class signal
    return images, labels


def test_the_saliency_peak_is_one_at_the_identity_warp_and_grows_as_the_map_concentrates():
    """train/dpp_saliency_peak is the batch mean of the map's largest cell over the uniform map's;
    logging it leaves the loss as it was (the loss of the features of the prompted images)."""
    model = build("frpt")
    images, labels = _batch()
    with torch.no_grad():
        loss, extras = model.training_loss(images, labels)
        assert set(extras) == {"dpp_saliency_peak"} and extras["dpp_saliency_peak"].item() == pytest.approx(1.0)
        assert loss == model.loss_from_features(model.features(images), labels)
        torch.manual_seed(1)
        model.dpp_prompt.parser.proj.weight.normal_(0, 0.05)
        saliency = model.prompt(images)["saliency"].flatten(1)
        loss, extras = model.training_loss(images, labels)
        assert loss == model.loss_from_features(model.features(images), labels)
    by_hand = (saliency.max(dim=1).values * saliency.shape[1]).mean()
    assert extras["dpp_saliency_peak"].item() == pytest.approx(by_hand.item()) and by_hand > 1.5
    with torch.no_grad():
        assert build("frpt_cah").training_loss(images, labels)[1] == {}  # no DPP, nothing to report


def test_gradients_reach_dpp_through_the_second_frozen_pass():
    model = build("frpt_dpp")
    model.train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    images, labels = _batch()
    loss, _ = model.training_loss(images, labels)
    loss.backward()
    grad = model.dpp_prompt.parser.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    w0 = model.dpp_prompt.parser.proj.weight.detach().clone()
    for _ in range(2):
        opt.step()
        opt.zero_grad()
        model.training_loss(images, labels)[0].backward()
    assert not torch.equal(w0, model.dpp_prompt.parser.proj.weight)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen backbone (incl. BN stats) changed"


@pytest.mark.parametrize(
    "name,variant", [(m, "paper") for m in FRPT_METHODS] + [("frpt", "code"), ("frpt_cam", "code")]
)
def test_loss_goes_down_on_a_fixed_batch(name, variant):
    from harness.training.setup import make_optimizer

    # AdamW at a high lr: random-init features are small, so SGD would need many steps to show
    # learning; the DPP group gets its automatic 1/k^2 factor from the model's param groups
    cfg, model = build_with_cfg(name, **{"method_args.variant": variant, "optim.name": "adamw", "optim.lr": 0.05})
    model.train()
    images, labels = _batch()
    opt = make_optimizer(model, cfg)
    losses = []
    for _ in range(8):
        loss, _ = model.training_loss(images, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05 and losses[-1] == min(losses), losses
    model.eval()
    emb = model(images)
    assert emb.shape == (len(images), model.feature_dim)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(images)), atol=1e-4)


def test_trainable_state_roundtrip_restores_outputs():
    model = build("frpt", **{"method_args.variant": "code"})
    model.train()
    images, labels = _batch()
    model.training_loss(images, labels)  # moves BatchNorm statistics of the CAH block and neck
    with torch.no_grad():
        model.dpp_prompt.parser.proj.weight.normal_()
    state = model.trainable_state_dict()
    assert any("running_mean" in k for k in state)
    fresh = build("frpt", **{"method_args.variant": "code"})
    fresh.load_trainable_state_dict(state)
    model.eval(), fresh.eval()
    assert not torch.allclose(model(images), build("frpt", **{"method_args.variant": "code"}).eval()(images))
    assert torch.allclose(model(images), fresh(images), atol=1e-5)


@pytest.mark.parametrize("name", FRPT_METHODS)
def test_builds_on_efficientnet_lite0_and_vit(name):
    eff = build(name, backbone="tf_efficientnet_lite0")
    vit = build(name, backbone="vit_small_patch16_224", backbone_kwargs={"img_size": 32, "depth": 2})
    eff.eval(), vit.eval()
    with torch.no_grad():
        assert eff(torch.randn(2, 3, 64, 64)).shape == (2, 1280)
        assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 384)
    if name == "frpt":
        assert eff.dpp_prompt.parser.proj.weight.shape == (1, 24, 31, 31)  # blocks.1, stride 4
        assert eff.cah_head.squeeze.weight.shape == (160, 1280)


def test_cam_box_encloses_the_activation():
    fmap = torch.zeros(1, 8, 4, 4)
    fmap[:, :, 1:3, 2:4] = 1.0
    box = cam_boxes(fmap, (32, 32), 0.5)[0].tolist()
    assert box[0] >= 8 and box[2] == 32 and 2 <= box[1] <= 8 and 24 <= box[3] <= 30


# ----------------------------------------------------------------------------- shared loop


def _e2e(overrides: dict) -> dict:
    return {
        **overrides,
        "data.image_size": 48,
        "data.resize_size": 48,
        "data.max_per_class": 8,
        "data.batch_size": 16,
        "data.samples_per_class": 0,
        "optim.epochs": 1,
        "optim.lr": 0.05,
        "model.embed_dim": 0,
    }


@pytest.mark.parametrize("name", [m for m in FRPT_METHODS if m not in ("frpt", "frpt_bbox")])
def test_trains_through_the_shared_loop(name, tiny_overrides):
    """frpt itself goes through the loop in the DPP-figure test, frpt_bbox on a boxed dataset."""
    from harness.training.loop import train

    cfg = resolve(method=name, backbone=SMALL, overrides=_e2e(tiny_overrides))
    result = train(cfg)
    losses = [h["train/loss"] for h in result.history if "train/loss" in h]
    assert len(losses) == 1 and all(np.isfinite(losses))
    assert 0.0 <= result.metrics["test/recall_at_1"] <= 1.0
    assert result.metrics["params/trainable"] > result.metrics["params/trainable_inference"] > 0
    peaks = [h["train/dpp_saliency_peak"] for h in result.history if "train/dpp_saliency_peak" in h]
    assert len(peaks) == (1 if cfg.method_args.use_dpp else 0), name  # one epoch, one mean
    assert all(p >= 1.0 for p in peaks)  # a map's largest cell is never below the uniform one


def make_cub_with_boxes(root: Path, classes: int = 102, per_class: int = 3) -> Path:
    """Official CUB layout; the box marks a flat bright square in each otherwise black image,
    aligned to JPEG's 16-pixel blocks so that compression leaves both flat."""
    base = root / "CUB_200_2011"
    rows: dict[str, list[str]] = {
        "images.txt": [],
        "image_class_labels.txt": [],
        "bounding_boxes.txt": [],
        "classes.txt": [],
    }
    iid = 0
    for c in range(1, classes + 1):
        name = f"{c:03d}.Bird_{c}"
        rows["classes.txt"].append(f"{c} {name}")
        for j in range(per_class):
            iid += 1
            rel = f"{name}/img_{j}.jpg"
            img = np.zeros((64, 64, 3), np.uint8)
            img[16:48, 16:48] = (c * 37 % 255, 200, j * 60)
            (base / "images" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(base / "images" / rel)
            rows["images.txt"].append(f"{iid} {rel}")
            rows["image_class_labels.txt"].append(f"{iid} {c}")
            rows["bounding_boxes.txt"].append(f"{iid} 16.0 16.0 32.0 32.0")
    for fname, lines in rows.items():
        (base / fname).write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_frpt_bbox_trains_on_boxes_and_refuses_datasets_without(tmp_path, tiny_overrides, pipeline):
    """Every image the model sees, in training and evaluation, is the box's content: the boxed
    square is bright green in an otherwise black image, so no pixel the model sees is black
    (without the crop three quarters would be). Both pipelines (the device one on CPU)."""
    from harness.training.loop import train

    root = make_cub_with_boxes(tmp_path / "cub")
    ov = {
        **_e2e(tiny_overrides),
        "data.root": str(root),
        "data.max_classes": 4,
        "data.check_published": False,
        "data.pipeline": pipeline,
    }
    seen: list[torch.Tensor] = []

    def record(module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 and args[0].shape[1] == 3:
            seen.append(args[0][:, 1].min())  # the darkest green (normalised) of the batch

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        result = train(resolve(method="frpt_bbox", dataset="cub200", backbone=SMALL, overrides=ov))
    finally:
        handle.remove()
    assert 0.0 <= result.metrics["test/recall_at_1"] <= 1.0
    # test_resnet normalises with mean and std 0.5: black is -1.0, the box's green (200) about
    # +0.5 (augmentation darkens some to 0)
    assert len(seen) > 2 and min(seen) > -0.5, min(seen)
    with pytest.raises(UserError, match="bounding boxes"):
        train(
            resolve(
                method="frpt_bbox",
                dataset="fashion_mnist",
                backbone=SMALL,
                overrides={**_e2e(tiny_overrides), "data.crop_to_box": True},
            )
        )


# ----------------------------------------------------------------------------- DPP figure


def test_visualize_dpp_draws_and_logs_the_figure(tmp_path, tiny_overrides, tracking_uri):
    from mlflow import MlflowClient

    from harness.reports.visualize import visualize_dpp
    from harness.training.loop import train

    run = train(resolve(method="frpt", backbone=SMALL, overrides=_e2e(tiny_overrides)))
    assert np.isfinite(run.history[-1]["train/loss"]) and 0.0 <= run.metrics["test/recall_at_1"] <= 1.0
    path = visualize_dpp(run.run_id, n=3, out_dir=tmp_path / "fig", tracking_uri=tracking_uri)
    assert path.is_file() and path.suffix == ".png"
    image = np.asarray(Image.open(path))
    assert image.shape[0] > 100 and image.std() > 0
    logged = [a.path for a in MlflowClient(tracking_uri).list_artifacts(run.run_id)]
    assert path.name in logged


def run_with_config(tracking_uri: str, folder, method: str) -> str:
    """An MLflow run holding only the resolved config of ``method`` (what visualize reads first)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment(f"only-{method}", artifact_location=(folder / "art").as_uri()))
    client.log_text(run.info.run_id, to_yaml(resolve(method=method)), "config.yaml")
    return run.info.run_id


def test_visualize_dpp_refuses_runs_without_dpp(tracking_uri, tmp_path):
    from harness.reports.visualize import visualize_dpp

    with pytest.raises(UserError, match="without a DPP"):
        visualize_dpp(run_with_config(tracking_uri, tmp_path, "frpt_cah"), tracking_uri=tracking_uri)
    with pytest.raises(UserError, match="unknown MLflow run"):
        visualize_dpp("0123456789abcdef", tracking_uri=tracking_uri)


# ----------------------------------------------------------------------------- CAM figure (Fig. 4)


def test_grad_cam_of_a_pooled_linear_classifier_is_the_classic_cam():
    """With global average pooling and a linear classifier, Grad-CAM's channel weights are the
    class weights / (h w): the map is Zhou et al.'s CAM, sum_k w_ck A_k (ReLU'd)."""
    from harness.reports.cam import grad_cam, normalised

    torch.manual_seed(0)
    fmap, weight = torch.randn(3, 8, 5, 5), torch.randn(4, 8)
    cam = grad_cam(fmap, lambda x: x.mean(dim=(2, 3)) @ weight.T)
    top = (fmap.mean(dim=(2, 3)) @ weight.T).argmax(1)
    classic = torch.relu(torch.einsum("bk,bkhw->bhw", weight[top], fmap))
    assert torch.allclose(cam * 25, classic, atol=1e-5)
    assert torch.allclose(normalised(cam, (10, 10)), normalised(classic, (10, 10)), atol=1e-5)


def test_visualize_cam_draws_pretrained_without_cah_and_frpt_maps(
    tmp_path, tiny_overrides, tracking_uri, capsys, monkeypatch
):
    from mlflow import MlflowClient

    from harness.cli import main
    from harness.reports.cam import cam_maps
    from harness.reports.visualize import load_run_model
    from harness.training.loop import train

    run = train(resolve(method="frpt", backbone=SMALL, overrides=_e2e(tiny_overrides)))
    monkeypatch.chdir(tmp_path)  # the figure is written to the working directory
    assert main(["visualize", "cam", "--run", run.run_id, "--n", "2", "--tracking-uri", tracking_uri]) == 0
    assert "class activation maps" in capsys.readouterr().out
    logged = {a.path for a in MlflowClient(tracking_uri).list_artifacts(run.run_id)}
    assert {f"cam_{run.run_id}.png", f"cam_{run.run_id}.pdf"} <= logged
    assert (tmp_path / f"cam_{run.run_id}.png").is_file()
    _, cfg, splits, backbone, model = load_run_model(run.run_id, tracking_uri)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # a CAH that visibly re-weights channels
        model.cah_head.excite.weight.copy_(torch.randn_like(model.cah_head.excite.weight))
    maps = cam_maps(model, images)
    assert list(maps) == ["pretrained backbone", "FRPT without CAH", "FRPT"]
    for m in maps.values():
        assert m.shape == (2, 32, 32) and m.min() >= 0 and m.max() <= 1 + 1e-6
    assert not torch.allclose(maps["FRPT"], maps["FRPT without CAH"], atol=1e-3)


def test_visualize_cam_refuses_runs_without_a_classifier(tracking_uri, tmp_path):
    from harness.reports.cam import visualize_cam

    with pytest.raises(UserError, match="needs an FRPT run"):
        visualize_cam(run_with_config(tracking_uri, tmp_path, "bitfit"), tracking_uri=tracking_uri)
