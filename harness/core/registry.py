"""Method registry, in the spirit of timm's ``@register_model``.

A method is a builder function ``fn(ctx: BuildContext, cfg: ConfigDataclass) -> DMLModel``
registered with :func:`register_method`. Every module in the ``methods`` package is imported by
:func:`discover`, so harness code never imports a method by name.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.errors import unknown


@dataclass(frozen=True)
class NoOptions:
    """Method without options of its own."""


@dataclass
class MethodSpec:
    """Everything the harness knows about a registered method."""

    name: str
    builder: Callable[..., Any]
    config_cls: type = NoOptions
    description: str = ""
    #: which backbone families the method applies to: subset of {"vit", "cnn"}
    families: tuple[str, ...] = ("vit", "cnn")
    #: default Optuna search space: ``{"optim.lr": {"type": "float", "low": .., "high": .., "log": True}}``
    search_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: run-config overrides applied before the user's (e.g. FRPT's cross-entropy loss)
    defaults: dict[str, Any] = field(default_factory=dict)
    #: named presets: preset name -> run-config overrides (published configurations)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def applies_to(self, family: str) -> bool:
        return family in self.families


_METHODS: dict[str, MethodSpec] = {}
_DISCOVERED = False


def register_method(
    name: str,
    *,
    config: type = NoOptions,
    families: tuple[str, ...] = ("vit", "cnn"),
    search_space: dict[str, dict[str, Any]] | None = None,
    defaults: dict[str, Any] | None = None,
    presets: dict[str, dict[str, Any]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as method ``name``; its docstring's first line becomes the description."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config of method {name!r} must be a dataclass")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _METHODS and _METHODS[name].builder is not fn:
            raise ValueError(f"method {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _METHODS[name] = MethodSpec(
            name=name,
            builder=fn,
            config_cls=config,
            description=doc[0] if doc else "",
            families=tuple(families),
            search_space=dict(search_space or {}),
            defaults=dict(defaults or {}),
            presets=dict(presets or {}),
        )
        return fn

    return decorate


def discover() -> None:
    """Import every module of the ``methods`` package once (they register themselves)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import methods

    for info in sorted(pkgutil.iter_modules(methods.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"methods.{info.name}")
    _DISCOVERED = True


def method_names() -> list[str]:
    discover()
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    discover()
    if name not in _METHODS:
        raise unknown("method", name, _METHODS)
    return _METHODS[name]
