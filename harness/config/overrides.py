"""Reading run-config values: YAML files, ``key=value`` overrides and type-checked assignment.

Every value passes :func:`set_key`, which checks it against the dataclass field's annotation
(``Literal`` choices included), so the CLI's choice checks come from the types alone.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from harness.config.schema import RunConfig
from harness.errors import UserError, closest


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


#: boolean values of keys that became choices: configs written before keep their meaning
_LEGACY = {("optim.amp", True): "bf16"}


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
        if isinstance(value, bool):  # YAML 1.1 reads off/on as booleans; amp was a boolean once
            value = _LEGACY.get((key, value), "on" if value else "off")
        if value not in typing.get_args(typ):
            raise UserError(f"bad value {value!r} for '{key}'; valid: {', '.join(map(str, typing.get_args(typ)))}")
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
                + (
                    ""
                    if cfg.method_args is not None or parts[0] in {f.name for f in dataclasses.fields(cfg)}
                    else " (method options live under method_args.)"
                )
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


def precheck(overrides: dict[str, Any]) -> None:
    """Check every key and value outside ``method_args`` against the schema alone, before torch,
    timm and MLflow are imported: a typo answers in a fraction of a second."""
    for key, value in overrides.items():
        if not key.startswith("method_args"):
            set_key(RunConfig(), key, value)
