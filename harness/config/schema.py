"""Typed run configuration: the schema of every key a run takes, with its documentation.

Choices are ``Literal`` types, so :mod:`harness.config.overrides` checks them from the annotation
alone; reading files and ``--set`` values lives there, and resolving defaults, presets and range
checks in :mod:`harness.training.resolution`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from harness.config.rules import ranged
from harness.errors import UserError


@dataclass
class DataConfig:
    #: dataset folder; empty = the dataset spec's default location
    root: str = ""
    #: training crop size (RandomResizedCrop) and test centre-crop size
    image_size: int = ranged(224, "> 0")
    #: test-time resize before the centre crop (SPECS: 256 for 224)
    resize_size: int = ranged(256, "> 0")
    #: images per batch
    batch_size: int = ranged(64, "> 0")
    #: images per class in a batch (class-balanced sampler); 0 = plain shuffling
    samples_per_class: int = ranged(2, ">= 0", "0 = plain shuffling")
    #: fraction of training classes held out for validation (class-disjoint, seeded)
    val_fraction: float = ranged(0.2, "[0, 1)")
    #: keep only K seeded images per training class (few-shot; 0 = all)
    shots: int = ranged(0, ">= 0", "0 = all")
    #: crop every image to its annotated bounding box before the transforms (FRPT Table 5)
    crop_to_box: bool = False
    #: cap images per class in every split (quick runs and demos; 0 = all)
    max_per_class: int = ranged(0, ">= 0", "0 = all")
    #: keep N seeded classes of each split (quick runs; 0 = all)
    max_classes: int = ranged(0, ">= 0", "0 = all")
    #: train augmentation: "standard" (RandomResizedCrop + flip), "frpt" (FRPT paper: 256x256
    #: resize, random crop, flip, colour jitter 0.25), "frpt_code" (FRPT's released fast-reid
    #: config: 256x256 bicubic resize, RandomResizedCrop(scale 0.16-1), flip, colour jitter 0.25
    #: with p=0.5) or "none" (test transform)
    augment: Literal["standard", "frpt", "frpt_code", "none"] = "standard"
    #: probability of torchvision's RandomErasing after normalisation (0 = off)
    random_erasing: float = ranged(0.0, "[0, 1]")
    #: test resize: "short" (shorter side to resize_size, SPECS 1) or "square" (resize_size x
    #: resize_size, FRPT's released code), then the centre crop
    test_resize: Literal["short", "square"] = "short"
    #: decode every image once before the run starts (a corrupt file fails up front, by name)
    verify_images: bool = True
    #: refuse a dataset whose split has other class counts than the published one (a missing or
    #: extra class folder changes the protocol); false for a subset made on purpose
    check_published: bool = True
    #: keep every image's encoded file bytes in memory (read once; decoded per use, so crops come
    #: from the original resolution exactly as without the cache; costs the files' size)
    cache_images: bool = False
    #: DataLoader worker processes (-1 = min(8, CPU cores): JPEG decoding feeds a GPU only with
    #: several workers)
    num_workers: int = ranged(-1, ">= -1", "-1 = auto")
    #: where images are decoded and augmented: "cpu" (loader workers, PIL + torchvision, uint8
    #: batches normalised on the device), "device" (files decoded on the device, nvJPEG on CUDA,
    #: every per-sample augmentation batched there) or "auto" (device on CUDA, else cpu)
    pipeline: Literal["auto", "cpu", "device"] = "auto"
    #: device pipeline: decode JPEGs on the "device" (nvJPEG on CUDA) or on the "cpu"
    decode: Literal["device", "cpu"] = "device"
    #: device pipeline: keep every image decoded on the device (original resolution) when a
    #: split's pixels fit this many GB; -1 = 40% of the GPU's memory (25% of RAM on CPU) divided
    #: among the processes sharing it; 0 = decode every batch
    pixel_cache_gb: float = ranged(-1.0, ">= -1", "-1 = auto, 0 = decode every batch")

    def check(self, prefix: str = "data.") -> None:
        """Rules between fields: the test crop comes out of the resize; the class-balanced
        sampler fills a batch with whole classes."""
        if self.resize_size < self.image_size:
            raise UserError(
                f"bad value {self.resize_size!r} for '{prefix}resize_size': must be >= "
                f"{prefix}image_size={self.image_size} (the test centre crop is taken from it)"
            )
        m = self.samples_per_class
        if m and self.batch_size % m:
            raise UserError(
                f"bad value {m!r} for '{prefix}samples_per_class': must divide {prefix}batch_size={self.batch_size}"
            )


@dataclass
class ModelConfig:
    #: load pretrained weights (embedded package, local file or hub)
    pretrained: bool = True
    #: local weights file (.safetensors / .pth / .bin); overrides the hub
    weights: str = ""
    #: embedding dimension of the shared head: -1 = follow the backbone, min(feature dim, 512)
    #: (ViT-S 384, ViT-B 512, as in the papers); 0 = the backbone features, no projection
    embed_dim: int = ranged(-1, ">= -1", "-1 = the backbone's")
    #: head initialisation: "default" (PyTorch's Linear) or "xavier" (xavier-uniform weight, zero
    #: bias: the VPTSP-G code)
    head_init: Literal["default", "xavier"] = "default"
    #: extra keyword arguments for timm.create_model (e.g. depth, img_size for tiny test ViTs)
    backbone_kwargs: dict = field(default_factory=dict)
    #: NHWC memory layout for the model and its batches: "auto" = CNNs on CUDA and the CPU, "on", "off"
    channels_last: Literal["auto", "on", "off"] = "auto"


@dataclass
class LossConfig:
    #: proxy_anchor | norm_softmax | cross_entropy (method may override)
    name: Literal["proxy_anchor", "norm_softmax", "cross_entropy"] = "proxy_anchor"
    #: Proxy Anchor scale alpha and margin delta
    alpha: float = ranged(32.0, "> 0", finite=True)
    margin: float = 0.1
    #: Proxy Anchor positive term: "with_positives" (original: divide by proxies with positives
    #: in the batch) or "all" (VPTSP-G's code: divide by all C proxies)
    positive_average: Literal["with_positives", "all"] = "with_positives"
    #: normalised-softmax temperature
    temperature: float = ranged(0.05, "> 0", finite=True)
    #: label smoothing for cross-entropy losses
    label_smoothing: float = ranged(0.0, "[0, 1]")
    #: "torch": (1-eps) + eps/C on the true class, eps/C elsewhere; "fastreid": 1-eps and
    #: eps/(C-1) (FRPT's released code)
    smoothing_form: Literal["torch", "fastreid"] = "torch"
    #: learning-rate multiplier for loss parameters (proxies, class weights)
    lr_mult: float = ranged(100.0, ">= 0", finite=True)
    #: Proxy Anchor proxies: "kaiming" (kaiming-normal, the Proxy Anchor code) or "xavier_div8"
    #: (xavier-uniform / 8, the VPTSP-G code)
    proxy_init: Literal["kaiming", "xavier_div8"] = "kaiming"
    #: absolute learning rate of the loss parameters (> 0 replaces lr * lr_mult; the VPTSP-G
    #: code's lr_proxy); they keep their own group and follow the schedule
    proxy_lr: float = ranged(0.0, ">= 0", "0 = lr * loss.lr_mult", finite=True)


@dataclass
class OptimConfig:
    #: adamw | sgd
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = ranged(1e-4, "> 0", finite=True)
    weight_decay: float = ranged(1e-4, ">= 0", finite=True)
    momentum: float = ranged(0.9, "[0, 1]")
    epochs: int = ranged(30, ">= 0", "0 = evaluate only")
    #: cosine schedule period in epochs (0 = epochs); VPTSP-G CUB uses 50 with 15 epochs
    cosine_epochs: int = ranged(0, ">= 0", "0 = optim.epochs")
    warmup_epochs: float = ranged(1.0, ">= 0", finite=True)
    #: warmup length in optimiser steps; > 0 replaces warmup_epochs (fast-reid's WARMUP_ITERS)
    warmup_steps: int = ranged(0, ">= 0", "0 = warmup_epochs")
    #: warmup starts at this fraction of the lr (fast-reid's WARMUP_FACTOR; 0 = from lr/steps)
    warmup_factor: float = ranged(0.0, "[0, 1]")
    #: learning-rate floor of every schedule and parameter group (CosineAnnealingLR's eta_min)
    min_lr: float = ranged(0.0, ">= 0", finite=True)
    #: the schedule moves every optimiser "step", or once per "epoch" (the released codes)
    schedule_unit: Literal["step", "epoch"] = "step"
    #: schedule: cosine | step (multiply by step_gamma every step_epochs) | constant
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_epochs: int = ranged(50, "> 0")
    step_gamma: float = 0.9
    #: learning-rate multiplier for the embedding head
    head_lr_mult: float = ranged(1.0, ">= 0", finite=True)
    #: max gradient norm (0 = off)
    grad_clip: float = ranged(1.0, ">= 0", "0 = off", finite=True)
    #: mixed precision on CUDA: bf16 autocast, fp16 autocast with a dynamic GradScaler (the FRPT
    #: and VPTSP-G codes' choice) or off; CPU runs compute in fp32 whatever this says
    amp: Literal["bf16", "fp16", "off"] = "bf16"
    #: weight decay of bias parameters (-1 = weight_decay; fast-reid's WEIGHT_DECAY_BIAS, 0 in
    #: the FRPT code recipe)
    weight_decay_bias: float = -1.0
    #: fused optimiser kernels on CUDA (one launch updates every parameter); ignored elsewhere
    fused: bool = True
    #: torch.compile the training forward: "off", or a compile mode ("default", "reduce-overhead",
    #: "max-autotune"); the first steps pay the compilation
    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "off"
    #: torch.compile backend ("inductor"; "aot_eager" checks the wiring without code generation)
    compile_backend: str = "inductor"

    def check(self, prefix: str = "optim.") -> None:
        """The schedule's floor lies below the learning rate it is a floor of; the biases' weight
        decay is a value of its own or -1 (none of its own)."""
        if not self.min_lr < self.lr:
            raise UserError(f"bad value {self.min_lr!r} for '{prefix}min_lr': must be in [0, {prefix}lr={self.lr})")
        if not (self.weight_decay_bias == -1 or 0 <= self.weight_decay_bias < math.inf):
            raise UserError(
                f"bad value {self.weight_decay_bias!r} for '{prefix}weight_decay_bias': "
                f"must be >= 0, or -1 for {prefix}weight_decay"
            )


@dataclass
class EvalConfig:
    #: Recall@K values (empty = the dataset spec's)
    ks: list = field(default_factory=list)
    batch_size: int = ranged(256, "> 0")
    #: evaluate the test split at all (study tuning trials turn it off: they select on
    #: validation only, so tuning never looks at test classes and costs less)
    test: bool = True
    #: evaluate the test split every epoch too, for the papers' test-selected figure
    #: (test/selected_recall_at_1); the paper protocol turns it on, the fair protocol tests the
    #: selected checkpoint once
    test_every_epoch: bool = False
    #: evaluate every N epochs
    every: int = ranged(1, "> 0")
    #: validation metric that selects the checkpoint: recall@1 | map@r
    select: Literal["recall@1", "map@r"] = "recall@1"
    #: other datasets ("name" or "name=DIR") whose test splits the selected checkpoint is evaluated
    #: on zero-shot at the end, beside the untrained backbone: transfer/<name>/* (forgetting)
    transfer: list = field(default_factory=list)

    def check(self, prefix: str = "eval.") -> None:
        """Recall@K needs positive integers K."""
        bad = [k for k in self.ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
        if bad:
            raise UserError(f"bad value {bad[0]!r} in '{prefix}ks': Recall@K needs positive integers")


@dataclass
class TrackingConfig:
    #: MLflow tracking URI ('' = $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db, in $DMLBENCH_HOME if set)
    uri: str = ""
    #: experiment name ('' = dataset name)
    experiment: str = ""
    run_name: str = ""
    #: log the curves PNG and the trainable weights (per-query results, per_query/*.parquet, always)
    log_artifacts: bool = True
    #: keep the trainable weights of every study tuning trial (default: the best trial's only,
    #: besides the reproductions; a ViT study would otherwise store GBs of trials)
    trial_weights: bool = False
    #: save this run's trainable weights (set false by studies for tuning trials)
    log_weights: bool = True
    #: where per-epoch checkpoints go ('' = <dir of mlflow.db>/checkpoints, or ~/.cache/dmlbench)
    checkpoint_dir: str = ""
    #: keep the last checkpoint of a finished run (default: deleted when the run finishes)
    keep_checkpoints: bool = False
    #: MLflow system metrics (CPU, memory, GPU utilisation and memory via psutil/pynvml) under
    #: ``system/`` every ``system_metrics_interval_s`` seconds, on a background thread
    system_metrics: bool = True
    system_metrics_interval_s: float = ranged(10.0, "> 0", finite=True)


@dataclass
class RunConfig:
    #: "fair": validation classes held out, checkpoint selected on validation (studies);
    #: "paper": all training classes, every epoch tested, the best test epoch reported (both
    #: papers' protocol; labelled as such wherever it is shown)
    protocol: Literal["fair", "paper"] = "fair"
    method: str = "linear_probe"
    dataset: str = "fashion_mnist"
    backbone: str = "tf_efficientnet_lite0"
    seed: int = 0
    #: cuda | cpu | '' (auto)
    device: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    #: the preset applied ("<method>:<name>", empty if none) and the source it follows
    recipe: str = ""
    recipe_source: str = ""
    #: method-specific options (the method's config dataclass, resolved by name)
    method_args: Any = None


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; leaves dict-valued dataclass-free mappings as dicts."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in ("model.backbone_kwargs",):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_get(flat: dict, dotted: str) -> Any:
    obj: Any = flat
    for part in dotted.split("."):
        obj = obj[part]
    return obj


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
