"""Typed run configuration: dataclasses loaded from YAML plus ``key=value`` overrides.

Precedence (later wins): dataclass defaults < dataset spec defaults < method defaults <
method preset < ``--config`` YAML < ``--set`` overrides < explicit CLI flags. Unknown keys raise a
:class:`UserError` naming the closest valid key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import UserError, closest


@dataclass
class DataConfig:
    #: dataset folder; empty = the dataset spec's default location
    root: str = ""
    #: training crop size (RandomResizedCrop) and test centre-crop size
    image_size: int = 224
    #: test-time resize before the centre crop (SPECS: 256 for 224)
    resize_size: int = 256
    #: images per batch
    batch_size: int = 64
    #: images per class in a batch (class-balanced sampler); 0 = plain shuffling
    samples_per_class: int = 2
    #: fraction of training classes held out for validation (class-disjoint, seeded)
    val_fraction: float = 0.2
    #: keep only K seeded images per training class (few-shot; 0 = all)
    shots: int = 0
    #: crop every image to its annotated bounding box before the transforms (FRPT Table 5)
    crop_to_box: bool = False
    #: cap images per class in every split (quick runs and demos; 0 = all)
    max_per_class: int = 0
    #: keep N seeded classes of each split (quick runs; 0 = all)
    max_classes: int = 0
    #: train augmentation: "standard" (RandomResizedCrop + flip), "frpt" (256 resize, crop,
    #: flip, colour jitter 0.25) or "none" (test transform)
    augment: str = "standard"
    #: decode every image once before the run starts (a corrupt file fails up front, by name)
    verify_images: bool = True
    #: decode and resize every image once and keep it in memory as uint8
    cache_images: bool = False
    #: DataLoader worker processes (-1 = min(8, CPU cores): JPEG decoding feeds a GPU only with
    #: several workers)
    num_workers: int = -1


@dataclass
class ModelConfig:
    #: load pretrained weights (embedded package, local file or hub)
    pretrained: bool = True
    #: local weights file (.safetensors / .pth / .bin); overrides the hub
    weights: str = ""
    #: embedding dimension of the shared head (0 = backbone feature dim)
    embed_dim: int = 512
    #: extra keyword arguments for timm.create_model (e.g. depth, img_size for tiny test ViTs)
    backbone_kwargs: dict = field(default_factory=dict)


@dataclass
class LossConfig:
    #: proxy_anchor | norm_softmax | cross_entropy (method may override)
    name: str = "proxy_anchor"
    #: Proxy Anchor scale alpha and margin delta
    alpha: float = 32.0
    margin: float = 0.1
    #: Proxy Anchor positive term: "with_positives" (original: divide by proxies with positives
    #: in the batch) or "all" (VPTSP-G's code: divide by all C proxies)
    positive_average: str = "with_positives"
    #: normalised-softmax temperature
    temperature: float = 0.05
    #: label smoothing for cross-entropy losses
    label_smoothing: float = 0.0
    #: learning-rate multiplier for loss parameters (proxies, class weights)
    lr_mult: float = 100.0


@dataclass
class OptimConfig:
    #: adamw | sgd
    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    epochs: int = 30
    #: cosine schedule period in epochs (0 = epochs); VPTSP-G CUB uses 50 with 15 epochs
    cosine_epochs: int = 0
    warmup_epochs: float = 1.0
    #: schedule: cosine | step (multiply by step_gamma every step_epochs) | constant
    schedule: str = "cosine"
    step_epochs: int = 50
    step_gamma: float = 0.9
    #: learning-rate multiplier for the embedding head
    head_lr_mult: float = 1.0
    #: max gradient norm (0 = off)
    grad_clip: float = 1.0
    #: automatic mixed precision: bf16 on CUDA, off on CPU unless forced
    amp: bool = True


@dataclass
class EvalConfig:
    #: Recall@K values (empty = the dataset spec's)
    ks: list = field(default_factory=list)
    batch_size: int = 256
    #: evaluate the test split at all (study tuning trials turn it off: they select on
    #: validation only, so tuning never looks at test classes and costs less)
    test: bool = True
    #: evaluate the test split every epoch too (needed for the test-selected figure)
    test_every_epoch: bool = True
    #: evaluate every N epochs
    every: int = 1
    #: validation metric that selects the checkpoint: recall@1 | map@r
    select: str = "recall@1"


@dataclass
class TrackingConfig:
    #: MLflow tracking URI ('' = $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db)
    uri: str = ""
    #: experiment name ('' = dataset name)
    experiment: str = ""
    run_name: str = ""
    #: log the curves PNG and the trainable weights
    log_artifacts: bool = True


@dataclass
class RunConfig:
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
    #: method-specific options (the method's config dataclass, resolved by name)
    method_args: Any = None


# ---------------------------------------------------------------------------- helpers


def _type_of(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def parse_scalar(text: str) -> Any:
    """Parse a ``--set`` value with YAML rules (numbers, booleans, lists)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"cannot parse value {text!r}: {exc.problem}") from None
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``typ``."""
    origin = typing.get_origin(typ)
    if typ is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(typ):
            if arg is type(None) and value is None:
                return None
        for arg in typing.get_args(typ):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise UserError(f"bad value {value!r} for '{key}': expected {typ}")
    if origin is typing.Literal:
        if value not in typing.get_args(typ):
            raise UserError(
                f"bad value {value!r} for '{key}'; valid: {', '.join(map(str, typing.get_args(typ)))}"
            )
        return value
    base = origin or typ
    if base is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"bad value {value!r} for '{key}': expected true or false")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"bad value {value!r} for '{key}': expected an integer")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise UserError(f"bad value {value!r} for '{key}': expected a number")
        return float(value)
    if base is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"bad value {value!r} for '{key}': expected a string")
        return "" if value is None else str(value)
    if base in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        return list(value)
    if base is dict:
        if not isinstance(value, dict):
            raise UserError(f"bad value {value!r} for '{key}': expected a mapping")
        return dict(value)
    return value


def _valid_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        val = getattr(obj, f.name)
        if dataclasses.is_dataclass(val):
            keys.extend(_valid_keys(val, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def set_key(cfg: RunConfig, dotted: str, value: Any) -> None:
    """Set ``cfg.<dotted>`` with type checking; unknown keys raise with a suggestion."""
    parts = dotted.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
        if part not in names:
            raise UserError(
                f"unknown config key '{dotted}'{closest(dotted, _valid_keys(cfg))}"
                + ("" if cfg.method_args is not None else " (method options live under method_args.)")
            )
        if i == len(parts) - 1:
            current = getattr(obj, part)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise UserError(f"bad value {value!r} for '{dotted}': expected a mapping")
                for k, v in value.items():
                    set_key(cfg, f"{dotted}.{k}", v)
                return
            setattr(obj, part, _coerce(value, _type_of(type(obj), part), dotted))
            return
        obj = getattr(obj, part)
        if not dataclasses.is_dataclass(obj):
            raise UserError(f"unknown config key '{dotted}': '{part}' has no sub-keys")


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


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"cannot parse config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", ...] -> {"optim.lr": 0.001}``."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"bad override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        out[key.strip()] = parse_scalar(text)
    return out


def resolve(
    *,
    overrides: dict[str, Any] | None = None,
    config_file: str | Path | None = None,
    preset: str | None = None,
    **top: Any,
) -> RunConfig:
    """Build a validated :class:`RunConfig`.

    ``top`` holds explicit top-level choices (method, dataset, backbone) from CLI flags; they may
    also come from the YAML file or overrides. Method and dataset defaults are applied first.
    """
    from harness import data as ds_registry
    from harness.registry import get_method

    layers: list[dict[str, Any]] = []
    if config_file:
        layers.append(flatten(load_yaml(config_file)))
    layers.append(dict(overrides or {}))
    layers.append({k: v for k, v in top.items() if v is not None})

    def pick(key: str, default: str) -> str:
        value = default
        for layer in layers:
            if key in layer:
                value = layer[key]
        return str(value)

    method = get_method(pick("method", RunConfig.method))
    dataset = ds_registry.get_spec(pick("dataset", RunConfig.dataset))
    cfg = RunConfig(method=method.name, dataset=dataset.name)
    cfg.method_args = method.config_cls()

    base_layers: list[dict[str, Any]] = [flatten(dataset.defaults), flatten(method.defaults)]
    if preset:
        if preset not in method.presets:
            from harness.errors import unknown

            raise unknown(f"preset of method '{method.name}'", preset, method.presets)
        base_layers.append(flatten(method.presets[preset]))
    for layer in base_layers + layers:
        for key, value in layer.items():
            set_key(cfg, key, value)
    if cfg.method != method.name or cfg.dataset != dataset.name:  # pragma: no cover - defensive
        raise UserError("method/dataset changed while resolving the config")
    validate(cfg)
    return cfg


_CHOICES = {
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("cosine", "step", "constant"),
    "loss.name": ("proxy_anchor", "norm_softmax", "cross_entropy"),
    "loss.positive_average": ("with_positives", "all"),
    "data.augment": ("standard", "frpt", "none"),
    "device": ("", "cpu", "cuda", "mps"),
    "eval.select": ("recall@1", "map@r"),
}


def validate(cfg: RunConfig) -> None:
    """Range and choice checks that types alone cannot express."""
    flat = to_dict(cfg)
    for key, choices in _CHOICES.items():
        value = flat_get(flat, key)
        if value not in choices and not (key == "device" and str(value).startswith("cuda:")):
            shown = ", ".join(c or "''" for c in choices)
            raise UserError(f"bad value {value!r} for '{key}'; valid: {shown}")
    positive = ["data.image_size", "data.batch_size", "eval.batch_size", "eval.every"]
    if cfg.optim.epochs < 0:
        raise UserError(f"bad value {cfg.optim.epochs!r} for 'optim.epochs': must be >= 0 (0 = evaluate only)")
    for key in positive:
        if flat_get(flat, key) <= 0:
            raise UserError(f"bad value {flat_get(flat, key)!r} for '{key}': must be > 0")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise UserError(f"bad value {cfg.data.val_fraction!r} for 'data.val_fraction': must be in [0, 1)")
    if cfg.data.num_workers < -1:
        raise UserError(f"bad value {cfg.data.num_workers!r} for 'data.num_workers': must be >= 0, or -1 for auto")
    if cfg.optim.lr <= 0:
        raise UserError(f"bad value {cfg.optim.lr!r} for 'optim.lr': must be > 0")
    m = cfg.data.samples_per_class
    if m < 0 or (m and cfg.data.batch_size % m):
        raise UserError(
            f"bad value {m!r} for 'data.samples_per_class': must divide data.batch_size={cfg.data.batch_size}"
        )


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_get(flat: dict, dotted: str) -> Any:
    obj: Any = flat
    for part in dotted.split("."):
        obj = obj[part]
    return obj


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
