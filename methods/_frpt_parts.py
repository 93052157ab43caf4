"""Building blocks of FRPT (SPECS 5): content parser, zoom sampler, CAH, CAM crop, pooling.

Kept apart from ``methods/frpt.py`` (which only wires and registers them) so each part can be
tested on its own: the sampler is pure geometry, the CAH a few lines of algebra. The leading
underscore keeps :func:`harness.registry.discover` from importing this file as a method.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from harness.models import UserError


def gaussian_kernel(size: int, fwhm: float) -> torch.Tensor:
    """``size x size`` isotropic Gaussian given by its full width at half maximum (peak 1).

    The Learning-to-Zoom sampler only uses ratios of kernel sums, so the scale is irrelevant.
    """
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    d2 = r[:, None] ** 2 + r[None, :] ** 2
    return torch.exp(-4 * math.log(2) * d2 / fwhm**2).float()


class SaliencySampler(nn.Module):
    """Inhomogeneous sampling grid from a saliency map (Recasens et al. 2018, SPECS 5.2).

    Each output coordinate is the mean of the source coordinates weighted by ``A * D``
    (saliency times a fixed Gaussian centred on the output position), so salient regions attract
    sampling points and are magnified in the warped image. The coordinate basis extends linearly
    into the replication padding, which makes a uniform map give exactly the identity grid.
    No trainable parameters: the Gaussian is a fixed buffer.
    """

    def __init__(self, gaussian_size: int = 61, fwhm: float = 13.0, upsample_align_corners: bool = True) -> None:
        super().__init__()
        #: the coarse grid's upsampling to the image size: corners aligned (paper variant) or not
        #: (the released code's ``nn.Upsample(mode='bilinear')``, align_corners=False)
        self.upsample_align_corners = upsample_align_corners
        if gaussian_size < 1 or gaussian_size % 2 == 0:
            raise ValueError(f"gaussian_size must be odd and positive, got {gaussian_size}")
        self.pad = gaussian_size // 2
        kernel = gaussian_kernel(gaussian_size, fwhm)[None, None]
        self.register_buffer("kernel", kernel.expand(3, 1, -1, -1).contiguous(), persistent=False)

    def grid(self, saliency: torch.Tensor) -> torch.Tensor:
        """``(B, 1, h, w)`` map summing to 1 -> ``(B, h, w, 2)`` (x, y) source coordinates in [-1, 1]."""
        h, w = saliency.shape[-2:]
        if h < 2 or w < 2:
            raise UserError(
                f"the DPP saliency grid is {h}x{w} at this image size; it needs at least 2x2: raise "
                "data.image_size, pick an earlier method_args.parse_stage or set method_args.grid_size"
            )
        with torch.autocast(saliency.device.type, enabled=False):
            s = F.pad(saliency.float(), (self.pad,) * 4, mode="replicate")
            p = self.pad
            bx = (torch.arange(-p, w + p, device=s.device, dtype=s.dtype) / (w - 1)).view(1, 1, 1, -1)
            by = (torch.arange(-p, h + p, device=s.device, dtype=s.dtype) / (h - 1)).view(1, 1, -1, 1)
            weighted = torch.cat([s, s * bx, s * by], dim=1)
            sums = F.conv2d(weighted, self.kernel.to(s.dtype), groups=3)
            xy = sums[:, 1:] / sums[:, :1]
            return (xy * 2 - 1).clamp(-1, 1).permute(0, 2, 3, 1)

    def resample(self, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Upsample the coarse grid to the image size and resample bilinearly (grid_sample with
        corners aligned, as the code)."""
        full = F.interpolate(
            grid.permute(0, 3, 1, 2), size=images.shape[-2:], mode="bilinear", align_corners=self.upsample_align_corners
        )
        full = full.permute(0, 2, 3, 1).to(images.dtype)
        return F.grid_sample(images, full, mode="bilinear", padding_mode="border", align_corners=True)


def saliency_peak(saliency: torch.Tensor) -> torch.Tensor:
    """How concentrated ``(B, 1, h, w)`` saliency maps are: the largest cell over the uniform
    map's, batch mean (1 = uniform, the identity warp; h*w = all mass on one cell, the collapse
    that large DPP steps cause)."""
    flat = saliency.detach().float().flatten(1)
    return (flat.amax(dim=1) * flat.shape[1]).mean()


class ContentParser(nn.Module):
    """Projects a frozen feature map to a spatial softmax map A (sums to 1 over positions).

    ``kernel`` > 1 is the paper's sigma x sigma convolution; ``kernel == 1`` with ``relu`` is the
    released code's ReLU + 1x1 convolution. No bias: adding a constant to every position does
    not change a spatial softmax, so a bias would be a parameter without gradient.
    ``grid_size`` > 0 resizes the logits (bilinear, corners aligned) before the softmax, as the
    code does (31x31); 0 keeps the feature map's own resolution. ``zero_init`` starts from a
    uniform map, i.e. the identity warp, so training starts from the frozen model's own features
    (as zero-initialised adapters do); the gradient at a uniform map is not zero. With PyTorch's
    default init (the released code) the large fan-in (31*31*C) makes the first updates swing
    the map, which shows as a noisy loss on small or AdamW-trained models.
    """

    def __init__(self, in_channels: int, kernel: int, relu: bool, grid_size: int = 0, zero_init: bool = True) -> None:
        super().__init__()
        self.relu = relu
        self.grid_size = grid_size
        self.proj = nn.Conv2d(in_channels, 1, kernel, padding=kernel // 2, bias=False)
        if zero_init:
            nn.init.zeros_(self.proj.weight)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = F.relu(feature_map) if self.relu else feature_map
        logits = self.proj(x.to(self.proj.weight.dtype))
        if self.grid_size:
            logits = F.interpolate(logits, size=(self.grid_size, self.grid_size), mode="bilinear", align_corners=True)
        b, _, h, w = logits.shape
        return torch.softmax(logits.float().flatten(1), dim=1).view(b, 1, h, w)


class DiscriminativePerturbationPrompt(nn.Module):
    """DPP: saliency from a frozen early feature map, then a zoom-warp of the input image."""

    def __init__(self, parser: ContentParser, sampler: SaliencySampler) -> None:
        super().__init__()
        self.parser = parser
        self.sampler = sampler

    def forward(
        self, images: torch.Tensor, feature_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(warped images, saliency map A, coarse sampling grid)``."""
        saliency = self.parser(feature_map)
        grid = self.sampler.grid(saliency)
        return self.sampler.resample(images, grid), saliency, grid


def instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Parameter-free instance normalisation over the spatial positions of each channel.

    Written out rather than ``F.instance_norm`` so a 1x1 map (tiny test images) gives the
    well-defined 0 instead of an error; computed in float32.
    """
    x = x.float()  # bf16 statistics would be too coarse under autocast
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + eps)


class CategoryAwareHead(nn.Module):
    """CAH: channel attention mixing the feature map with its instance-normalised version.

    ``W_C = sigmoid(W_L ReLU(W_F GAP(M_P)))`` (bias-free, reduction ``r``),
    ``M_R = W_C * M_P + (1 - W_C) * IN(M_P)``; without IN (Table 1 ablation) ``M_R = W_C * M_P``.
    IN removes instance-specific style (contrast, illumination) from the channels the attention
    deems less category-relevant. ``conv_block`` adds the released code's 1x1 C->C/2 and 3x3
    C/2->C convolutions (each + BatchNorm with momentum 0.01 + ReLU) after the mixing.
    """

    def __init__(self, channels: int, reduction: int, use_in: bool = True, conv_block: bool = False) -> None:
        super().__init__()
        if reduction < 1 or channels // reduction < 1:
            raise ValueError(f"CAH reduction {reduction} does not fit {channels} channels")
        self.use_in = use_in
        self.squeeze = nn.Linear(channels, channels // reduction, bias=False)  # W_F
        self.excite = nn.Linear(channels // reduction, channels, bias=False)  # W_L
        self.block = (
            nn.Sequential(
                nn.Conv2d(channels, channels // 2, 1, bias=False),
                nn.BatchNorm2d(channels // 2, momentum=0.01),  # the code's BasicConv
                nn.ReLU(),
                nn.Conv2d(channels // 2, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels, momentum=0.01),
                nn.ReLU(),
            )
            if conv_block
            else nn.Identity()
        )

    def attention(self, m: torch.Tensor) -> torch.Tensor:
        """Channel weights ``W_C`` in (0, 1), shape ``(B, C, 1, 1)``."""
        w = torch.sigmoid(self.excite(F.relu(self.squeeze(m.mean(dim=(2, 3))))))
        return w[:, :, None, None]

    def mix(self, m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``M_R`` for given weights (exposed so the ablation algebra can be tested directly)."""
        return w * m + (1 - w) * instance_norm(m) if self.use_in else w * m

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.block(self.mix(m, self.attention(m)))


def gem_pool(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling with fixed ``p`` (fast-reid's GeneralizedMeanPooling, no parameter)."""
    return x.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def cam_boxes(feature_map: torch.Tensor, image_size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Boxes ``(B, 4)`` (x0, y0, x1, y1 pixels) around the thresholded class-agnostic activation map.

    A frozen backbone without a trained classifier has no class-specific CAM, so the map is the
    channel mean of the last feature map's magnitudes (for post-ReLU CNN maps the plain channel
    mean, as in SCDA; for LayerNorm'd ViT tokens, whose channel mean is ~constant, a norm), shifted
    to be non-negative and upsampled to the image; the box encloses every pixel at or above
    ``threshold`` times the map's maximum.
    """
    cam = feature_map.float().abs().mean(dim=1, keepdim=True)
    cam = F.interpolate(cam, size=image_size, mode="bilinear", align_corners=False)[:, 0]
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    mask = cam >= threshold * cam.amax(dim=(1, 2), keepdim=True)
    # first and last rows/columns holding a masked pixel, found with argmax (the first maximum):
    # no data-dependent shapes, so no host-device sync
    rows, cols = mask.any(dim=2).to(torch.uint8), mask.any(dim=1).to(torch.uint8)
    y0, x0 = rows.argmax(dim=1), cols.argmax(dim=1)
    y1, x1 = rows.shape[1] - rows.flip(1).argmax(dim=1), cols.shape[1] - cols.flip(1).argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crop each image to its box and resize it back to the image size (bilinear roi_align)."""
    from torchvision.ops import roi_align

    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], dim=1)
    return roi_align(images, rois.to(images.dtype), output_size=images.shape[-2:], sampling_ratio=2, aligned=True)
