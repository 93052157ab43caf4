"""The released codes' training parts: fast-reid's IBN-a ResNet-50 (last stride 1), fp16 with a
GradScaler, and bias weight decay; and the FRPT ``code`` recipe that uses them."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import timm
import torch
import torchvision
from torch import nn

from harness.errors import UserError
from harness.models.backbones import create_backbone
from harness.runtime import precision
from harness.training.resolution import resolve
from harness.training.setup import build_model, make_optimizer
from harness.training.step import train_step


class ReferenceIBN(nn.Module):
    """Pan et al.'s IBN layer as the IBN-Net release writes its state: ``IN`` on the first half
    of the channels (affine), ``BN`` on the rest."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.half = planes // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x):
        a, b = torch.split(x, self.half, 1)
        return torch.cat((self.IN(a.contiguous()), self.BN(b.contiguous())), 1)


def reference_resnet50_ibn_a(last_stride: int = 2) -> nn.Module:
    """torchvision's ResNet-50 (stride on conv2, as IBN-Net) with IBN in stages 1-3, randomised
    norm statistics so that a wrong split or a wrong stage shows in the outputs."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=1000)
    for stage in (net.layer1, net.layer2, net.layer3):
        for block in stage:
            block.bn1 = ReferenceIBN(block.bn1.num_features)
    if last_stride == 1:
        net.layer4[0].conv2.stride = (1, 1)
        net.layer4[0].downsample[0].stride = (1, 1)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def reference_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


@pytest.mark.parametrize("last_stride", [2, 1])
def test_resnet50_ibn_a_loads_the_ibn_net_state_dict_and_computes_the_same(tmp_path, last_stride):
    ref = reference_resnet50_ibn_a(last_stride)
    path = tmp_path / "resnet50_ibn_a-d9d0bb7b.pth"
    torch.save(ref.state_dict(), path)
    backbone = create_backbone("resnet50_ibn_a", weights=str(path), kwargs={"last_stride": last_stride})
    model = backbone.model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model.forward_features(x), reference_features(ref, x)
    assert ours.shape == theirs.shape == (2, 2048, 4 if last_stride == 1 else 2, 4 if last_stride == 1 else 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the same parameter count as ResNet-50 (IN + BN affine = BN affine): the paper's 23.5M
    assert sum(p.numel() for p in model.parameters()) == 23_508_032
    assert isinstance(model.layer3[5].bn1.IN, nn.InstanceNorm2d) and isinstance(model.layer4[0].bn1, nn.BatchNorm2d)
    assert backbone.weight_source.startswith("file:") and backbone.family == "cnn"


def test_a_plain_resnet50_state_dict_is_refused_by_name(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(UserError, match=r"do not fit backbone 'resnet50_ibn_a'.*missing \(e\.g\. layer1\.0\.bn1\.IN"):
        create_backbone("resnet50_ibn_a", weights=str(path))


def test_ibn_a_is_a_timm_model_with_the_release_url_and_a_checked_last_stride():
    assert "resnet50_ibn_a" in timm.list_models("*ibn*")
    model = timm.create_model("resnet50_ibn_a", num_classes=0)
    assert model.pretrained_cfg["url"].endswith("resnet50_ibn_a-d9d0bb7b.pth")
    with pytest.raises(TypeError, match="last_stride"):
        timm.create_model("resnet50_ibn_a", last_stride=3)


# ----------------------------------------------------------------------------- precision


def test_amp_choices_resolve_and_old_booleans_keep_their_meaning():
    assert resolve(overrides={"optim.amp": False}).optim.amp == "off"  # --set optim.amp=off (YAML: false)
    assert resolve(overrides={"optim.amp": True}).optim.amp == "bf16"  # configs from before
    assert resolve(overrides={"optim.compile": False}).optim.compile == "off"
    with pytest.raises(UserError, match="bad value 'fp32' for 'optim.amp'; valid: bf16, fp16, off"):
        resolve(overrides={"optim.amp": "fp32"})
    with pytest.raises(UserError, match="bad value -0.5 for 'optim.weight_decay_bias'"):
        resolve(overrides={"optim.weight_decay_bias": -0.5})


def test_cpu_runs_compute_in_fp32_whatever_amp_says():
    cpu = torch.device("cpu")
    for mode in ("bf16", "fp16", "off"):
        with precision.autocast_for(cpu, mode)():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert not precision.grad_scaler_for(cpu, mode).is_enabled()  # disabled: a no-op
    assert not precision.grad_scaler_for(torch.device("cuda"), "bf16").is_enabled()


class _Plain:
    """A plain network behind the step protocol of a DMLModel (hooks that do nothing)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def before_step(self, optimizer, labels) -> None:
        pass

    def after_step(self, optimizer) -> None:
        pass

    def training_loss(self, x, y):
        return nn.functional.cross_entropy(self.net(x), y), {}


def _step(net, opt, x, y, clip, scaler) -> None:
    train_step(
        _Plain(net),
        opt,
        x,
        y,
        y.numpy(),
        amp=nullcontext,
        scaler=scaler,
        grad_clip=clip,
        trainable=list(net.parameters()),
    )


def _tiny_problem(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    return net, x, y


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_the_scaled_step_equals_the_plain_step_when_gradients_are_finite(clip):
    """A power-of-two loss scale is exact in fp32: scaled backward + unscale + clip + step gives
    the same parameters as the plain step (the one backward path with a disabled scaler), so fp16
    runs differ only by the fp16 forward."""
    plain, x, y = _tiny_problem()
    scaled = copy.deepcopy(plain)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, scaled)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(5):
        for model, opt, sc in ((plain, opts[0], disabled), (scaled, opts[1], scaler)):
            _step(model, opt, x, y, clip, sc)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert scaler.get_scale() == 2.0**18  # grew twice after 2 + 2 finite steps


def test_an_overflowing_step_is_skipped_and_the_scale_backs_off():
    net, x, y = _tiny_problem()
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    class Overflowing(_Plain):
        def training_loss(self, x, y):
            return nn.functional.cross_entropy(self.net(x), y) * float("inf"), {}

    train_step(
        Overflowing(net),
        opt,
        x,
        y,
        y.numpy(),
        amp=nullcontext,
        scaler=scaler,
        grad_clip=1.0,
        trainable=list(net.parameters()),
    )
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert scaler.get_scale() == 2.0**15


def test_an_fp16_run_trains_through_the_loop_and_resumes_its_scale(tiny_overrides, tracking_uri, monkeypatch):
    """The loop with a scaler (a CPU GradScaler stands in for CUDA's) gives the metrics of the
    plain run (exact scaling); a run cut after epoch 1 checkpoints the scaler's state, and its
    resume continues from that scale: it ends on the uninterrupted run's scale and metrics (a
    scaler started afresh would end 2**steps lower)."""
    import mlflow

    from harness.errors import RunInterrupted
    from harness.training import checkpoint, loop
    from harness.training import setup as preparing

    base = {**tiny_overrides, "optim.epochs": 3, "optim.amp": "fp16", "method": "bitfit"}
    plain = loop.train(resolve(overrides=base))
    made = []

    def cpu_scaler(device, amp):
        made.append(torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1))
        return made[-1] if amp == "fp16" else torch.amp.GradScaler("cpu", enabled=False)

    monkeypatch.setattr(preparing, "grad_scaler_for", cpu_scaler)
    scaled = loop.train(resolve(overrides=base))
    full_scale = made[-1].get_scale()
    assert full_scale > 2.0**10  # it stepped through the scaler
    for key in ("test/recall_at_1", "test/map_at_r"):
        assert scaled.metrics[key] == pytest.approx(plain.metrics[key], abs=1e-6)

    def stop_after_1(epoch: int, row: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted):
        loop.train(resolve(overrides=base), on_epoch=stop_after_1)
    cut_scale = made[-1].get_scale()
    killed = next(
        r for r in mlflow.search_runs(search_all_experiments=True, output_format="list") if r.info.status == "KILLED"
    )
    state = checkpoint.load(
        checkpoint.locate(killed.data.tags["dmlbench.checkpoint"], tracking_uri), killed.info.run_id
    )
    assert 2.0**10 < state["scaler"]["scale"] == cut_scale < full_scale
    resumed = loop.train(resolve(overrides=base), resume=killed.info.run_id)
    assert resumed.run_id == killed.info.run_id
    assert made[-1].get_scale() == full_scale
    for key in ("test/recall_at_1", "test/map_at_r"):
        assert resumed.metrics[key] == scaled.metrics[key]


# ----------------------------------------------------------------------------- bias weight decay


def test_bias_weight_decay_gets_its_own_groups_and_covers_every_parameter_once(tiny_overrides):
    cfg = resolve(
        overrides={**tiny_overrides, "method": "bitfit", "optim.weight_decay": 5e-4, "optim.weight_decay_bias": 0.0}
    )
    model = build_model(cfg, 4)
    opt = make_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for g in opt.param_groups:
        is_bias = g["name"].endswith(".bias")
        assert all(names[id(p)].endswith(".bias") == is_bias for p in g["params"])
        assert g["weight_decay"] == (0.0 if is_bias else 5e-4)
    assert {g["name"] for g in opt.param_groups} >= {"backbone.bias", "head", "head.bias"}
    default = resolve(overrides={**tiny_overrides, "method": "bitfit"})
    assert not any(g["name"].endswith(".bias") for g in make_optimizer(build_model(default, 4), default).param_groups)


# ----------------------------------------------------------------------------- the FRPT code recipe


def test_the_frpt_code_recipe_is_fast_reids_backbone_precision_and_decay():
    cfg = resolve(method="frpt", preset="code")
    assert (cfg.backbone, cfg.model.backbone_kwargs) == ("resnet50_ibn_a", {"last_stride": 1})
    assert (cfg.optim.amp, cfg.optim.weight_decay_bias, cfg.optim.weight_decay) == ("fp16", 0.0, 5e-4)
    other = resolve(method="frpt", preset="code", backbone="resnet50")  # the user's backbone wins, kwargs go
    assert (other.backbone, other.model.backbone_kwargs) == ("resnet50", {})
    for method in ("vptsp_g", "bitfit"):
        assert resolve(method=method, preset="cub").optim.amp == "fp16"  # the VPTSP-G code's GradScaler


def test_frpt_code_variant_trains_on_ibn_a_with_last_stride_1(tiny_overrides):
    cfg = resolve(
        method="frpt",
        preset="code",
        overrides={
            **{k: v for k, v in tiny_overrides.items() if not k.startswith(("model.", "method"))},
            "model.pretrained": False,
            "data.image_size": 64,
            "data.resize_size": 64,
            "data.batch_size": 8,
            "data.samples_per_class": 2,
        },
    )
    model = build_model(cfg, 4)
    assert model.backbone.layer4[0].conv2.stride == (1, 1)
    loss, _ = model.training_loss(torch.randn(8, 3, 64, 64), torch.arange(4).repeat(2))
    loss.backward()
    assert torch.isfinite(loss)
    trained = {n.split(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert "backbone" not in trained and {"dpp_prompt", "cah_head"} <= trained
