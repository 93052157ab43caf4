"""IBN-a ResNets (Pan et al., ECCV 2018, "Two at Once"), registered with timm.

FRPT's released code runs on fast-reid's IBN-a ResNet-50 with last stride 1, so its ``code``
recipe needs this backbone. IBN-a keeps the ResNet stem and, in every bottleneck of stages 1-3,
replaces the first BatchNorm by an IBN layer: instance norm (affine) on the first half of the
channels, BatchNorm on the rest. Stage 4 keeps plain BatchNorm. Modules are named as the IBN-Net
release names them (``layerN.M.bn1.IN`` / ``.BN``), so its checkpoint
(``resnet50_ibn_a-d9d0bb7b.pth``) loads strictly through ``model.weights`` or from its URL.

``last_stride`` (a model kwarg, ``model.backbone_kwargs.last_stride``) sets the stride of stage 4's
first block: 2 is the ImageNet network, 1 is fast-reid's ``MODEL.BACKBONE.LAST_STRIDE`` (a 14x14
final map at 224 px instead of 7x7; the weights are the same).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

#: the IBN-Net release (XingangPan/IBN-Net v1.0), ImageNet-1k
_RELEASE = "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/"


class IBN(nn.Module):
    """Instance norm on the first ``int(channels * ratio)`` channels, BatchNorm on the others."""

    def __init__(self, channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(channels * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(channels - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, rest = x.split((self.half, x.shape[1] - self.half), dim=1)
        return torch.cat((self.IN(first.contiguous()), self.BN(rest.contiguous())), dim=1)


class BottleneckIBN(Bottleneck):
    """timm's bottleneck with IBN as its first norm in stages 1-3 (widths below 512: stage 4 of a
    ResNet-50/101 has width 512 and keeps BatchNorm, the IBN-Net rule)."""

    def __init__(self, inplanes: int, planes: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(inplanes, planes, *args, **kwargs)
        if planes < 512:
            width = self.bn1.num_features
            self.bn1 = IBN(width)


def _create(variant: str, layers: list[int], pretrained: bool, last_stride: int = 2, **kwargs: Any) -> ResNet:
    if last_stride not in (1, 2):
        raise TypeError(f"last_stride must be 1 or 2, not {last_stride!r}")
    model = build_model_with_cfg(ResNet, variant, pretrained, block=BottleneckIBN, layers=layers, **kwargs)
    if last_stride == 1:  # stride sits on conv2 and on the shortcut of stage 4's first block
        first = model.layer4[0]
        first.conv2.stride = (1, 1)
        if first.downsample is not None:
            first.downsample[0].stride = (1, 1)
        model.feature_info[-1]["reduction"] //= 2
    return model


def _cfg(file: str) -> dict[str, Any]:
    return {
        "url": _RELEASE + file,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "conv1",
        "classifier": "fc",
    }


default_cfgs = generate_default_cfgs(
    {
        "resnet50_ibn_a.in1k": _cfg("resnet50_ibn_a-d9d0bb7b.pth"),
        "resnet101_ibn_a.in1k": _cfg("resnet101_ibn_a-59ea0ac6.pth"),
    }
)


@register_model
def resnet50_ibn_a(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """IBN-a ResNet-50 (fast-reid's FRPT backbone with ``last_stride=1``)."""
    return _create("resnet50_ibn_a", [3, 4, 6, 3], pretrained, **kwargs)


@register_model
def resnet101_ibn_a(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """IBN-a ResNet-101."""
    return _create("resnet101_ibn_a", [3, 4, 23, 3], pretrained, **kwargs)


def register() -> list[str]:
    """The IBN-a names timm now knows (registration happens when this module is imported)."""
    return [name for name in ("resnet50_ibn_a", "resnet101_ibn_a") if name in globals()]
