"""The device data path on CPU tensors: per-sample draws with torchvision's distributions, its
kernels' pixels, batched jitter equal to torchvision's per-image functions, determinism, and a
tiny run that matches the CPU pipeline."""

from __future__ import annotations

import glob
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from harness.bench.folders import make_folder
from harness.data import augment as A
from harness.data.decode import Decoder, as_encoded
from harness.data.pipeline import BatchTransform
from harness.data.transforms import make_transform
from harness.training.setup import splits_for

DRAWS = 4000


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """A CUB-shaped folder, shrunk: 6 classes x 60 JPEGs of 120x90."""
    dataset, root = make_folder("cub", tmp_path_factory.mktemp("cub"), scale=0.03, size=(120, 90), workers=1)
    return dataset, root, sorted(glob.glob(str(root / "images" / "*" / "*.jpg")))


def _cfg(**data):
    base = dict(image_size=64, resize_size=73, augment="standard", test_resize="short", random_erasing=0.0)
    return SimpleNamespace(data=SimpleNamespace(**{**base, **data}))


def _same_distribution(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    """Two-sample KS test at p > 1e-3 (seeded draws: the verdict is the same every run)."""
    p = stats.ks_2samp(ours, theirs).pvalue
    assert p > 1e-3, f"{what}: KS p={p:.2g}, ours mean {ours.mean():.3f} vs torchvision {theirs.mean():.3f}"


@pytest.mark.parametrize(
    "height,width,scale", [(375, 500, (0.08, 1.0)), (40, 500, (0.08, 1.0)), (256, 256, (0.16, 1.0))]
)
def test_resized_crop_boxes_follow_torchvision(height, width, scale):
    """Per-sample RandomResizedCrop boxes have the distribution of torchvision's get_params,
    the centre-crop fallback of narrow images included (40x500 falls back often)."""
    ratio = (3 / 4, 4 / 3)
    ours = A.sample_resized_crops(np.random.default_rng(0), np.full(DRAWS, height), np.full(DRAWS, width), scale, ratio)
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = np.array([T.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(DRAWS)])
    for k, name in enumerate(("top", "left", "height", "width")):
        _same_distribution(ours[:, k].astype(float), theirs[:, k].astype(float), f"{name} of {height}x{width}")
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)  # noqa: E731
    _same_distribution(area(ours), area(theirs), "area fraction")
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()


def test_erasing_boxes_follow_torchvision():
    p = 0.5
    ours = A.sample_erasing(np.random.default_rng(1), DRAWS, 64, 64, p)
    torch.manual_seed(1)
    image = torch.zeros(3, 64, 64)
    theirs = np.array([T.RandomErasing.get_params(image, (0.02, 0.33), (0.3, 3.3), [0])[:4] for _ in range(DRAWS)])
    erased = ours[:, 2] > 0
    assert abs(erased.mean() - p) < 0.03  # every size fits a 64x64 image here, so erasing happens with p
    for k, name in enumerate(("top", "left", "height", "width")):
        _same_distribution(ours[erased, k].astype(float), theirs[:, k].astype(float), f"erasing {name}")


def test_jitter_factors_and_order_follow_torchvision():
    ours = A.sample_jitter(np.random.default_rng(2), DRAWS, 0.25, 0.25, 0.25, 0.1, p=0.5)
    torch.manual_seed(2)
    theirs = [T.ColorJitter.get_params((0.75, 1.25), (0.75, 1.25), (0.75, 1.25), (-0.1, 0.1)) for _ in range(DRAWS)]
    for name, k in (("brightness", 1), ("contrast", 2), ("saturation", 3), ("hue", 4)):
        _same_distribution(getattr(ours, name), np.array([float(t[k]) for t in theirs]), f"jitter {name}")
    first_ours = np.bincount(ours.order[:, 0], minlength=4) / DRAWS
    first_theirs = np.bincount([int(t[0][0]) for t in theirs], minlength=4) / DRAWS
    assert np.abs(first_ours - first_theirs).max() < 0.03 and np.abs(first_ours - 0.25).max() < 0.03
    assert abs(ours.applied.mean() - 0.5) < 0.03
    assert all(sorted(row) == [0, 1, 2, 3] for row in ours.order[:50].tolist())


def test_batched_jitter_equals_torchvision_per_image():
    """One batched pass with per-sample factors and orders = torchvision's functional ops per image."""
    rng = np.random.default_rng(3)
    batch = torch.rand(6, 3, 8, 8) * 255
    params = A.sample_jitter(rng, 6, 0.4, 0.4, 0.4, 0.2, p=0.7)
    ours = A.color_jitter(batch, params) / 255
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(6):
        expected = batch[i] / 255
        if params.applied[i]:
            factors = [params.brightness[i], params.contrast[i], params.saturation[i], params.hue[i]]
            for op in params.order[i]:
                expected = ops[op](expected, float(factors[op]))
        torch.testing.assert_close(ours[i], expected, atol=2e-5, rtol=0)


def test_crops_and_test_transform_give_the_cpu_pipelines_pixels(jpeg_folder):
    """On CPU tensors the device path runs torchvision's own kernels on libjpeg-turbo's pixels:
    the test transform (shorter side or square resize, centre crop) is bit-identical to the CPU
    pipeline, and a RandomResizedCrop box gives exactly torchvision's crop. (On CUDA, nvJPEG's
    IDCT and the float resize differ by a few levels; benchmarks/gpu.sh measures it.)"""
    _, _, files = jpeg_folder
    files = files[:16]
    images = Decoder(torch.device("cpu"))([as_encoded(open(f, "rb").read()) for f in files], files)
    for test_resize in ("short", "square"):
        cfg = _cfg(test_resize=test_resize)
        cpu = torch.stack([make_transform(cfg.data, train=False)(Image.open(f).convert("RGB")) for f in files])
        device = BatchTransform.from_config(cfg.data, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"), False, True)
        assert torch.equal(device._geometry(images, np.random.default_rng(0)), cpu), test_resize
    boxes = A.sample_resized_crops(np.random.default_rng(4), np.full(16, 90), np.full(16, 120))
    ours = A.crop_resize(images, boxes, 64, "bilinear")
    for img, box, out in zip(images, boxes.tolist(), ours):
        assert torch.equal(out, TF.resized_crop(img, *box, [64, 64], antialias=True))


def test_normalisation_is_bit_identical_to_torchvision():
    batch = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = torch.stack(
        [TF.normalize(TF.to_dtype(b, torch.float32, scale=True), list(mean), list(std)) for b in batch]
    )
    assert torch.equal(A.normalize(batch, torch.tensor(mean), torch.tensor(std)), expected)


@pytest.mark.parametrize("augment", ["standard", "frpt", "frpt_code", "none"])
def test_train_transforms_are_seeded_per_sample(augment, jpeg_folder):
    _, _, files = jpeg_folder
    images = Decoder(torch.device("cpu"))([as_encoded(open(f, "rb").read()) for f in files[:8]], files[:8])
    bt = BatchTransform.from_config(
        _cfg(augment=augment, random_erasing=0.5).data, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"), True, True
    )
    a = bt(images, np.random.default_rng(7))
    b = bt(images, np.random.default_rng(7))
    c = bt(images, np.random.default_rng(8))
    assert a.shape == (8, 3, 64, 64) and a.dtype == torch.float32 and torch.equal(a, b)
    if augment != "none":
        assert not torch.equal(a, c)
        same = [torch.equal(a[i], a[j]) for i in range(8) for j in range(i)]
        assert not any(same)  # one draw per sample, not one per batch


def test_tiny_run_matches_the_cpu_pipeline_bit_for_bit(tiny_overrides, jpeg_folder):
    """Same data, same seed, no random augmentation (resize and centre crop for training too): on
    CPU tensors the device pipeline must train exactly as the CPU pipeline does, the same loss
    every epoch and the same test metrics to the last bit. A crop or resize one pixel off on either
    path changes them (planted once: resize_size + 1 on the device path fails it). Normalisation
    is one function both paths share on the device, bit-identical to torchvision's (test above).
    (With augmentation the two draw differently; the draws' distributions are the KS tests above.)"""
    from harness.training.loop import train
    from harness.training.resolution import resolve

    dataset, root, _ = jpeg_folder
    results = {}
    for pipeline in ("cpu", "device"):
        cfg = resolve(
            method="bitfit",
            backbone="tf_efficientnet_lite0",
            overrides={
                **tiny_overrides,
                "dataset": dataset,
                "data.root": str(root),
                "data.pipeline": pipeline,
                "data.augment": "none",
                "data.random_erasing": 0.0,
                "model.pretrained": True,
                "data.max_per_class": 0,
                "data.image_size": 64,
                "data.resize_size": 73,
                "data.batch_size": 32,
                "data.samples_per_class": 4,
                "data.val_fraction": 0.34,
                "optim.epochs": 2,
            },
        )
        result = train(cfg)
        results[pipeline] = (
            [h["train/loss"] for h in result.history if "train/loss" in h],
            {k: v for k, v in result.metrics.items() if k.startswith(("test/", "best/"))},
        )
    assert results["device"] == results["cpu"]
    assert len(results["cpu"][0]) == 2 and results["cpu"][1]["test/map_at_r"] > 0.3


def test_pixel_cache_fits_a_budget_and_is_reused_across_runs(jpeg_folder):
    """The device pipeline decodes each split once into the pixel cache when it fits
    data.pixel_cache_gb; the next run of the process on the same files reuses it; budget 0
    decodes every batch, with the same pixels."""
    from harness import data
    from harness.data import loaders
    from harness.training.resolution import resolve

    dataset, root, _ = jpeg_folder
    cfg = resolve(
        method="bitfit",
        backbone="tf_efficientnet_lite0",
        dataset=dataset,
        overrides={
            "data.root": str(root),
            "data.pipeline": "device",
            "data.image_size": 32,
            "data.resize_size": 37,
            "data.batch_size": 16,
            "data.samples_per_class": 2,
            "data.num_workers": 0,
            "model.pretrained": False,
        },
    )
    splits = splits_for(cfg)
    first = data.make_loaders(splits, cfg.data, cfg.seed, cfg.eval.batch_size, (0.5,) * 3, (0.5,) * 3, "cpu")
    assert all(b.pixels is not None for b in first.values())
    assert first["train"].pixels.nbytes == sum(3 * 90 * 120 for _ in splits.train.paths)
    again = data.make_loaders(splits, cfg.data, cfg.seed, cfg.eval.batch_size, (0.5,) * 3, (0.5,) * 3, "cpu")
    assert again["train"].pixels is first["train"].pixels  # no second decode
    cfg.data.pixel_cache_gb = 0.0
    uncached = data.make_loaders(splits, cfg.data, cfg.seed, cfg.eval.batch_size, (0.5,) * 3, (0.5,) * 3, "cpu")
    assert all(b.pixels is None for b in uncached.values())
    a, b = next(iter(first["test"])), next(iter(uncached["test"]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    cfg.data.pixel_cache_gb = 1e-4  # 100 kB: nothing fits
    assert loaders.pixel_caches({"train": splits.train}, cfg.data, torch.device("cpu")) == {}


def test_channels_last_auto_is_nhwc_for_cnns_on_cpu_and_recorded(tiny_overrides):
    """model.channels_last=auto resolves to NHWC for a CNN on the CPU (oneDNN's convolutions
    are faster in it) and to NCHW for a ViT (no convolution to speed up but the patch embedding),
    and the config the run logs says which layout it used."""
    from conftest import TINY_VIT

    from harness.training.resolution import resolve
    from harness.training.setup import build_model, prepare_for_device

    cpu = torch.device("cpu")
    for backbone, extra, expected in (("resnet18", {}, "on"), ("vit_small_patch16_224", TINY_VIT, "off")):
        cfg = resolve(method="bitfit", backbone=backbone, overrides={**tiny_overrides, **extra})
        assert cfg.model.channels_last == "auto"
        model = prepare_for_device(build_model(cfg, 4), cfg, cpu)
        assert model.channels_last == (expected == "on")
        assert cfg.model.channels_last == expected, backbone
        if expected == "on":
            conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_and_compile_are_wired(tiny_overrides):
    """model.channels_last=on puts a CNN and its batches in NHWC; optim.compile compiles the
    training forward (aot_eager here: the graph capture without code generation) and trains to
    the same numbers; fused kernels are for CUDA only, so a CPU run keeps torch's default AdamW."""
    from harness.training.loop import train
    from harness.training.resolution import resolve
    from harness.training.setup import prepare

    base = {**tiny_overrides, "optim.epochs": 1}
    run = prepare(resolve(method="bitfit", backbone="resnet18", overrides={**base, "model.channels_last": "on"}))
    images, _, _ = next(iter(run.loaders["train"]))
    assert run.model.channels_last and images.is_contiguous(memory_format=torch.channels_last)
    conv = next(m for m in run.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not run.optimizer.defaults.get("fused")
    plain = train(resolve(method="bitfit", backbone="resnet18", overrides=base))
    compiled_cfg = resolve(
        method="bitfit",
        backbone="resnet18",
        overrides={**base, "optim.compile": "default", "optim.compile_backend": "aot_eager"},
    )
    run = prepare(compiled_cfg)
    assert hasattr(run.model.training_loss, "_torchdynamo_orig_callable")  # dynamo's wrapper
    assert not hasattr(
        prepare(resolve(method="bitfit", backbone="resnet18", overrides=base)).model.training_loss,
        "_torchdynamo_orig_callable",
    )
    compiled = train(compiled_cfg)
    for key in ("test/recall_at_1", "test/map_at_r"):
        assert compiled.metrics[key] == pytest.approx(plain.metrics[key], abs=1e-6)
