"""peft's tuners as methods (``methods/peft_tuners.py``): the same layers and counts as peft's own
``get_peft_model``, merged outputs equal to unmerged ones, state that saves and loads, prefixes as
peft names them, and bad configs refused in one line. The registry-wide tests
(test_registry_methods, test_step_syncs) cover them as every other method."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from harness.errors import UserError
from harness.models.backbones import create_backbone
from harness.models.inject import module_key
from harness.training.resolution import resolve
from harness.training.setup import build_model
from methods import get_method
from methods.peft_tuners import ALL_PREFIXES, TUNERS

peft = pytest.importorskip("peft")
REPO = Path(__file__).resolve().parent.parent

BACKBONES = {
    "vit": ("vit_small_patch16_224", {"img_size": 32, "depth": 2}),
    "cnn": ("tf_efficientnet_lite0", {}),
}
CASES = [(m, f) for m in [*TUNERS, "peft"] for f in BACKBONES if get_method(m).applies_to(f)]


def build(method: str, family: str, **method_args):
    name, kwargs = BACKBONES[family]
    cfg = resolve(
        method=method,
        backbone=name,
        overrides={
            "model.pretrained": False,
            "model.backbone_kwargs": kwargs,
            "model.embed_dim": 16,
            "data.image_size": 32,
            **{f"method_args.{k}": v for k, v in method_args.items()},
        },
    )
    torch.manual_seed(0)
    backbone = create_backbone(name, pretrained=False, kwargs=kwargs)
    untouched = copy.deepcopy(backbone.model)
    return build_model(cfg, num_classes=4, backbone=backbone), untouched


def owned_trainable(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and model.owner(n))


def perturb(model) -> None:
    """Move every tuner parameter off its init (many start as the identity)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and model.owner(n):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.mark.parametrize("method, family", CASES)
def test_counts_equal_peft_get_nb_trainable_parameters(method, family):
    model, untouched = build(method, family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(untouched, copy.deepcopy(model.peft_config))
    trainable, _ = reference.get_nb_trainable_parameters()
    assert owned_trainable(model) == trainable > 0
    ours = {n.removeprefix("backbone.") for n, p in model.named_parameters() if p.requires_grad and model.owner(n)}
    theirs = {n.removeprefix("base_model.model.") for n, p in reference.named_parameters() if p.requires_grad}
    assert ours == theirs  # the same layers, the same parameter names


@pytest.mark.parametrize("method, family", CASES)
def test_merged_outputs_equal_unmerged_and_state_round_trips(method, family):
    model, _ = build(method, family, merge=True)
    perturb(model)
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
    state = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    fresh, _ = build(method, family)
    fresh.load_trainable_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), before, rtol=1e-4, atol=1e-5)  # saved and loaded
        assert model.merge_() and not model.merge_()  # merges once
        torch.testing.assert_close(model(images), before, rtol=1e-3, atol=1e-4)


def full_vit_s(method: str, backbone=None):
    """``method`` on the full 12-block ViT-S/16 (random init, 32 px: the tuners' counts do not
    depend on the image size), on ``backbone`` when given (two methods on one set of weights)."""
    overrides = {
        "model.pretrained": False,
        "model.embed_dim": 16,
        "data.image_size": 32,
        "model.backbone_kwargs": {"img_size": 32},
    }
    if backbone is None:
        backbone = create_backbone("vit_small_patch16_224", pretrained=False, kwargs={"img_size": 32})
    return build_model(
        resolve(method=method, backbone="vit_small_patch16_224", overrides=overrides), 4, backbone=backbone
    )


def test_peft_lora_on_vit_s_is_our_lora_arithmetic_and_equal_to_our_lora():
    """16 r D per block: ViT-S/16 at r = 8 is 589,824, for peft's LoRA and for ours; with the same
    A and B the two compute the same function."""
    backbone = create_backbone("vit_small_patch16_224", pretrained=False, kwargs={"img_size": 32})
    theirs = full_vit_s("peft_lora", copy.deepcopy(backbone))
    ours = full_vit_s("lora", backbone)
    assert owned_trainable(theirs) == owned_trainable(ours) == 589_824
    perturb(theirs)
    with torch.no_grad():
        copied = 0
        for path, layer in theirs.backbone.named_modules():
            if hasattr(layer, "lora_A"):
                update = ours.lora_modules[module_key(path)]
                update.A.copy_(layer.lora_A["default"].weight)
                update.B.copy_(layer.lora_B["default"].weight)
                copied += 1
        assert copied == len(ours.lora_modules) == 48
        ours.head.load_state_dict(theirs.head.state_dict())
        images = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(ours.eval()(images), theirs.eval()(images), rtol=1e-4, atol=1e-5)


#: the README's row of peft's tuners
README_PEFT_ROW = next(
    line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `peft_lora`, `dora`")
)

#: ViT-S/16: 12 blocks of width D = 384 and MLP width 1,536; the four targets as (in, out)
D, MLP, BLOCKS = 384, 1536, 12
LAYERS = {"qkv": (D, 3 * D), "proj": (D, D), "fc1": (D, MLP), "fc2": (MLP, D)}


def _near_square(n: int) -> tuple[int, int]:
    """n = a * b with a <= b as close as can be (LoKr's split of a dimension for the Kronecker factor)."""
    a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return a, n // a


def _lokr(i: int, o: int, r: int = 8) -> int:
    """W = w1 (x) (w2_a w2_b): w1 is (o1 x i1) full, the second factor rank r of (o2 x i2)."""
    (o1, o2), (i1, i2) = _near_square(o), _near_square(i)
    return o1 * i1 + r * (o2 + i2)


#: the README's counts for ViT-S/16 with each tuner's defaults, from each paper's arithmetic
VIT_S_COUNTS = {
    "peft_lora": (589_824, BLOCKS * sum(8 * (i + o) for i, o in LAYERS.values())),  # r (in + out)
    "dora": (631_296, BLOCKS * sum(8 * (i + o) + o for i, o in LAYERS.values())),  # LoRA + a magnitude per output
    "loha": (1_179_648, BLOCKS * sum(2 * 8 * (i + o) for i, o in LAYERS.values())),  # two rank-8 pairs
    "lokr": (45_696, BLOCKS * sum(_lokr(i, o) for i, o in LAYERS.values())),
    # OFT: one skew-symmetric 32 x 32 block per 32 inputs, b (b - 1) / 2 free entries each
    "oft": (499_968, BLOCKS * sum(i // 32 * 32 * 31 // 2 for i, _ in LAYERS.values())),
    # BOFT: one butterfly factor of full 4 x 4 blocks over the inputs, and a scale per output
    "boft": (170_496, BLOCKS * sum(i // 4 * 16 + o for i, o in LAYERS.values())),
    "ia3": (32_256, BLOCKS * (3 * D + MLP)),  # scales qkv's outputs and fc2's inputs
    "vera": (53_760, BLOCKS * sum(o + 256 for _, o in LAYERS.values())),  # lambda_b per output, lambda_d per rank
    "fourierft": (48_000, BLOCKS * len(LAYERS) * 1000),  # 1,000 spectral coefficients per layer
}


@pytest.mark.parametrize("method", list(VIT_S_COUNTS))
def test_vit_s_counts_are_the_readmes_and_the_papers_arithmetic(method):
    """Not peft against peft: the full 12-block ViT-S/16 with the defaults the README quotes, its
    trainable tuner parameters against the number printed there and each method's arithmetic."""
    readme, arithmetic = VIT_S_COUNTS[method]
    assert owned_trainable(full_vit_s(method)) == readme == arithmetic
    assert f"{readme:,}" in README_PEFT_ROW


def test_prefixes_are_the_ones_peft_gives_its_parameters():
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    for name, tuner in TUNERS.items():
        peft_type = getattr(peft, tuner.peft_config)().peft_type
        assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type].startswith(tuner.prefixes), name
        assert get_method(name).prefixes == tuner.prefixes
    assert get_method("peft").prefixes == ALL_PREFIXES


def test_tuner_knobs_reach_peft_and_dropout_trains():
    model, _ = build("loha", "vit", r=4, alpha=2.0, module_dropout=0.5, peft_config={"use_effective_conv2d": True})
    cfg = model.peft_config
    assert (cfg.r, cfg.alpha, cfg.module_dropout, cfg.use_effective_conv2d) == (4, 2.0, 0.5, True)
    model.train()  # the tuner layer applies module_dropout only while it trains
    layers = [m for n, m in model.backbone.named_modules() if n.endswith("attn.qkv")]
    assert layers and all(m.training for m in layers)
    model.eval()
    assert not any(m.training for m in layers)


def test_any_peft_config_by_mapping_and_bad_ones_in_one_line():
    model, _ = build("peft", "vit", peft_config={"peft_type": "hra", "r": 4})  # a tuner we did not name
    assert type(model.peft_config).__name__ == "HRAConfig" and owned_trainable(model) > 0
    assert type(build("peft", "vit")[0].peft_config).__name__ == "LoraConfig"  # the default
    with pytest.raises(UserError, match=r"bad peft_type 'NOPE'.*valid: .*HRA, IA3, LOHA, LOKR, LORA, OFT, VERA"):
        build("peft", "vit", peft_config={"peft_type": "NOPE"})
    with pytest.raises(UserError, match="bad peft_type 'PROMPT_TUNING'"):
        build("peft", "vit", peft_config={"peft_type": "PROMPT_TUNING"})
    with pytest.raises(UserError, match="peft refuses the oft config: TypeError: .*'bogus'"):
        build("oft", "vit", peft_config={"bogus": 1})
    with pytest.raises(UserError, match="unknown config key 'method_args.rank'.*method_args.r"):
        build("dora", "vit", rank=4)


@pytest.mark.parametrize(
    "method", [m for m in TUNERS if any(k.startswith("method_args.") for k in TUNERS[m].search_space)]
)
def test_every_choice_of_the_default_search_space_builds_on_every_family(method):
    """A study samples these: a choice peft refuses on a backbone (BOFT's block size 16 on
    EfficientNet's 24-channel convolutions) would stop the study mid-tuning."""
    for key, dist in TUNERS[method].search_space.items():
        for choice in dist["choices"]:
            for family in BACKBONES:
                if get_method(method).applies_to(family):
                    model, _ = build(method, family, **{key.removeprefix("method_args."): choice})
                    assert owned_trainable(model) > 0
