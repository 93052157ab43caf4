"""Resolve a run config: dataset defaults < method defaults < preset < file < ``--set`` < flags.

Then :func:`validate` applies the range checks that types cannot express. Unknown keys and bad
values raise a :class:`UserError` before anything is created.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.core.config import RunConfig, flat_get, flatten, to_dict
from harness.core.overrides import load_yaml, set_key
from harness.core.registry import get_method
from harness.data.specs import get_spec
from harness.errors import UserError, unknown

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
    dataset = get_spec(pick("dataset", RunConfig.dataset))
    cfg = RunConfig(method=method.name, dataset=dataset.name)
    cfg.method_args = method.config_cls()

    base_layers: list[dict[str, Any]] = [flatten(dataset.defaults), flatten(method.defaults)]
    if preset:
        if preset not in method.presets:
            raise unknown(f"preset of method '{method.name}'", preset, method.presets)
        base_layers.append(flatten(method.presets[preset]))
    for layer in base_layers + layers:
        for key, value in layer.items():
            set_key(cfg, key, value)
    if cfg.method != method.name or cfg.dataset != dataset.name:  # pragma: no cover - defensive
        raise UserError("method/dataset changed while resolving the config")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Range and choice checks that types alone cannot express."""
    flat = to_dict(cfg)
    if cfg.device not in DEVICES and not cfg.device.startswith("cuda:"):
        raise UserError(f"bad value {cfg.device!r} for 'device'; valid: '' (auto), cpu, cuda, cuda:N, mps")
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


