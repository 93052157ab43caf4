"""Method registry, in the spirit of timm's ``@register_model``, with peft-style conventions.

A method is a builder function ``fn(ctx: BuildContext, cfg: OptionsDataclass) -> DMLModel``
registered with :func:`register_method`. ``methods/__init__.py`` imports every method module (as
timm's ``models/__init__.py`` does), so the layers above import the lookups from ``methods`` and
the registry sees every method; harness code never imports a method by name.

The registration declares what the harness needs to treat every method alike:

- ``prefixes``: the attribute-name prefixes of the modules the method adds (``"adapter_"``,
  ``"lora_"``, ...). A parameter or buffer is *owned* by the method when a component of its
  dotted name starts with one of them. Ownership decides parameter-group roles, train/eval mode,
  whether features may be cached, what is saved and what counts at inference.
- ``training_only``: the subset of ``prefixes`` unused at inference (VPTSP-G's proxy path).
- ``backbone``: which backbone parameters train: ``"none"``, ``"biases"`` (BitFit) or ``"all"``.
- ``families``: the backbone families it supports; :func:`check_family` enforces them for every
  method, before anything is built.
- ``config``: the options dataclass (``method_args.*``); ``Literal`` fields give the choices.
- ``search_space``: extends :data:`DEFAULT_SEARCH_SPACE` (a key set to ``None`` drops it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from harness.config.rules import check_ranges
from harness.errors import UserError, unknown

FAMILIES = ("vit", "cnn")

#: the Optuna search space every method starts from (learning rate and weight decay)
DEFAULT_SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "optim.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
}


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
    families: tuple[str, ...] = FAMILIES
    #: attribute-name prefixes of the method's own modules (peft style)
    prefixes: tuple[str, ...] = ()
    #: prefixes whose parameters are used in training only (not counted at inference)
    training_only: tuple[str, ...] = ()
    #: which backbone parameters train
    backbone: Literal["none", "biases", "all"] = "none"
    #: Optuna search space: ``{"optim.lr": {"type": "float", "low": .., "high": .., "log": True}}``
    search_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: run-config overrides applied before the user's (e.g. FRPT's cross-entropy loss)
    defaults: dict[str, Any] = field(default_factory=dict)
    #: named presets: preset name -> run-config overrides (published configurations)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the method's name as papers write it ("VPTSP-G", "full fine-tuning"), for tables and figures
    display: str = ""

    def applies_to(self, family: str) -> bool:
        return family in self.families


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    config: type = NoOptions,
    families: tuple[str, ...] = FAMILIES,
    prefixes: tuple[str, ...] = (),
    training_only: tuple[str, ...] = (),
    backbone: Literal["none", "biases", "all"] = "none",
    search_space: dict[str, dict[str, Any] | None] | None = None,
    defaults: dict[str, Any] | None = None,
    presets: dict[str, dict[str, Any]] | None = None,
    display: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as method ``name``; its docstring's first line becomes the description."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config of method {name!r} must be a dataclass")
    if not families or not set(families) <= set(FAMILIES):
        raise TypeError(f"families of method {name!r} must be a non-empty subset of {FAMILIES}")
    if not set(training_only) <= set(prefixes) or any(not p.endswith("_") for p in prefixes):
        raise TypeError(f"prefixes of method {name!r} must end with '_' and include every training_only prefix")
    if backbone not in ("none", "biases", "all"):
        raise TypeError(f"backbone of method {name!r} must be none, biases or all")
    space = {**DEFAULT_SEARCH_SPACE, **(search_space or {})}

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _METHODS and _METHODS[name].builder.registered is not fn:
            raise ValueError(f"method {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()

        @functools.wraps(fn)
        def build(ctx: Any, cfg: Any) -> Any:
            """Every build passes here: the family check and the options' ranges (declared on the
            options' fields), then the declared prefixes recorded."""
            spec = _METHODS[name]
            check_family(spec, ctx.backbone.name, ctx.backbone.family)
            if dataclasses.is_dataclass(cfg):
                check_ranges(cfg, "method_args.")
            return fn(ctx, cfg).declare(spec.prefixes, spec.training_only)

        build.registered = fn  # the undecorated builder, for re-registration checks
        _METHODS[name] = MethodSpec(
            name=name,
            builder=build,
            config_cls=config,
            description=doc[0] if doc else "",
            families=tuple(families),
            prefixes=tuple(prefixes),
            training_only=tuple(training_only),
            backbone=backbone,
            search_space={k: v for k, v in space.items() if v is not None},
            defaults=dict(defaults or {}),
            presets=dict(presets or {}),
            display=display or name,
        )
        return fn

    return decorate


def method_names() -> list[str]:
    """Every registered method (all of them once ``methods`` is imported)."""
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; an unknown one is a UserError listing the valid names."""
    if name not in _METHODS:
        raise unknown("method", name, _METHODS)
    return _METHODS[name]


def check_family(spec: MethodSpec, backbone_name: str, family: str) -> None:
    """The one family check of the harness: a method on a backbone family it does not support."""
    if not spec.applies_to(family):
        supported = [m for m in method_names() if get_method(m).applies_to(family)]
        raise UserError(
            f"method '{spec.name}' supports {'/'.join(spec.families)} backbones, and '{backbone_name}' is a "
            f"{family}; methods for {family} backbones: {', '.join(supported)}"
        )
