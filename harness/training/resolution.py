"""Resolve a run config: dataset defaults < method defaults < preset < file < ``--set`` < flags.

Then :func:`validate` applies the range checks that types cannot express. Unknown keys and bad
values raise a :class:`UserError` before anything is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.config import RunConfig, flatten, load_yaml, set_key
from harness.config.rules import check_ranges
from harness.data.specs import get_spec
from harness.errors import UserError
from harness.models.backbones import auto_embed_dim, describe
from harness.retrieval import transfer
from methods import get_method, method_names

#: devices besides "cuda:N"
DEVICES = ("", "cpu", "cuda", "mps")


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
    recipe = check_preset(method, preset)
    dataset = get_spec(pick("dataset", recipe.get("dataset", RunConfig.dataset)))
    if "dataset" in recipe and dataset.name != recipe["dataset"]:
        raise UserError(
            f"preset '{preset}' of method '{method.name}' is the recipe for dataset "
            f"'{recipe['dataset']}', not '{dataset.name}'; drop --dataset or pick its preset"
        )
    cfg = RunConfig(method=method.name, dataset=dataset.name)
    cfg.method_args = method.config_cls()

    base_layers: list[dict[str, Any]] = [flatten(dataset.defaults), flatten(method.defaults)]
    if preset:
        recipe = {k: v for k, v in flatten(recipe).items() if k != "dataset"}
        if "backbone" in recipe and pick("backbone", recipe["backbone"]) != recipe["backbone"]:
            # the recipe's backbone options belong to its backbone, not to the one the user chose
            recipe = {k: v for k, v in recipe.items() if not k.startswith("model.backbone_kwargs")}
        base_layers.append({**recipe, "recipe": f"{method.name}:{preset}"})
    for layer in base_layers + layers:
        for key, value in layer.items():
            set_key(cfg, key, value)
    if cfg.method != method.name or cfg.dataset != dataset.name:  # pragma: no cover - defensive
        raise UserError("method/dataset changed while resolving the config")
    if cfg.protocol == "paper":  # both papers: all training classes, test every epoch, pick on test
        cfg.data.val_fraction = 0.0
        cfg.eval.test = cfg.eval.test_every_epoch = True
        cfg.eval.every = 1
    family, width, fixed_size = describe(cfg.backbone, cfg.model.backbone_kwargs)
    if cfg.model.embed_dim == -1:
        cfg.model.embed_dim = auto_embed_dim(width)
    size = (cfg.data.image_size, cfg.data.image_size)
    if family == "vit" and fixed_size and fixed_size != size:
        if "img_size" in cfg.model.backbone_kwargs:
            raise UserError(
                f"model.backbone_kwargs.img_size={cfg.model.backbone_kwargs['img_size']} does not match "
                f"data.image_size={cfg.data.image_size}; set one of them to the other"
            )
        # a ViT is built for one input size: build it for the run's (timm resamples the
        # pretrained position embedding) instead of failing inside the first forward pass
        cfg.model.backbone_kwargs = {**cfg.model.backbone_kwargs, "img_size": cfg.data.image_size}
    validate(cfg)
    return cfg


def check_preset(method: Any, preset: str | None) -> dict[str, Any]:
    """The preset's overrides ({} for none); an unknown one names the valid presets."""
    if not preset:
        return {}
    if preset not in method.presets:
        covered = sorted(m for m in method_names() if preset in get_method(m).presets)
        hint = f" (preset '{preset}' exists for: {', '.join(covered)})" if covered else ""
        raise UserError(
            f"unknown preset '{preset}' of method '{method.name}'; valid: "
            f"{', '.join(sorted(method.presets)) or 'none'}{hint}"
        )
    return dict(method.presets[preset])


def validate(cfg: RunConfig) -> None:
    """What a resolved config must satisfy before anything runs: every field's range and the
    rules between fields (written beside the fields, :mod:`harness.config.rules`), the method's
    options' ranges, then what depends on this machine and the dataset specs."""
    check_ranges(cfg)  # method_args included: a dataclass field of the config
    if cfg.device not in DEVICES and not cfg.device.startswith("cuda:"):
        raise UserError(f"bad value {cfg.device!r} for 'device'; valid: '' (auto), cpu, cuda, cuda:N, mps")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"bad value {cfg.device!r} for 'device': this machine has no CUDA device; valid: '' (auto), cpu"
        )
    transfer.parse(list(cfg.eval.transfer), cfg.dataset)  # names checked before anything loads
