"""Hugging Face peft's tuners as methods: one table, one builder, one model class.

Each tuner is injected into the frozen timm backbone by ``peft.inject_adapter_in_model`` with the
peft config the method's options describe, so the tuner computes exactly what peft computes
(``tests/test_peft_tuners.py`` checks parameter counts against peft's own
``get_nb_trainable_parameters`` and merged outputs against unmerged ones). peft names every
parameter it adds with the tuner's prefix (``lora_A``, ``hada_w1_a``, ``oft_R``, ...), which is
what the harness's ownership rule needs: counting, saving, resuming and parameter groups follow.

Targets. ViT: the linear layers ``method_args.targets`` of the blocks ``method_args.blocks`` (all by
default; ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, as our ``lora``), matched by full
path so the patch embedding's ``proj`` is never caught. CNN (tuners with Conv2d support): every
pointwise convolution, as our ``lora``. (IA)^3 scales the outputs of ``attn.qkv`` (timm fuses
q, k and v, so q is scaled too) and the input of ``mlp.fc2`` (the feed-forward activation).

Options are peft's own field names (``r``, ``lora_alpha``, ``oft_block_size`` ...), defaults are
peft's, and ``method_args.peft_config`` passes any other field of the tuner's config. The method
``peft`` takes a whole peft config as a mapping (``--set 'method_args.peft_config={"peft_type":
"LORA", "r": 4}'``) for a tuner not named here.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harness.models import BuildContext, DMLModel, UserError, block_targets, freeze, register_method
from methods.lora import pointwise_convs

VIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


@dataclass(frozen=True)
class Tuner:
    """One peft tuner: its config class name in peft, our defaults, what it is."""

    peft_config: str  # the class name in peft ("LoraConfig")
    display: str
    paper: str
    prefixes: tuple[str, ...]
    knobs: dict[str, Any]  # peft field -> default (peft's own), typed by the default
    fixed: dict[str, Any] = field(default_factory=dict)  # peft fields the method sets
    families: tuple[str, ...] = ("vit", "cnn")
    targets: tuple[str, ...] = tuple(VIT_TARGETS)
    search_space: dict[str, dict[str, Any]] = field(default_factory=dict)


RANK = {"type": "categorical", "choices": [4, 8, 16, 32]}
TUNERS: dict[str, Tuner] = {
    "peft_lora": Tuner(
        "LoraConfig",
        "LoRA (peft)",
        "Hu et al., ICLR 2022",
        ("lora_",),
        {"r": 8, "lora_alpha": 8.0, "lora_dropout": 0.0},
        search_space={"method_args.r": RANK},
    ),
    "dora": Tuner(
        "LoraConfig",
        "DoRA",
        "Liu et al., ICML 2024",
        ("lora_",),
        {"r": 8, "lora_alpha": 8.0, "lora_dropout": 0.0},
        fixed={"use_dora": True},
        search_space={"method_args.r": RANK},
    ),
    "loha": Tuner(
        "LoHaConfig",
        "LoHa",
        "Hyeon-Woo et al. (FedPara), ICLR 2022",
        ("hada_",),
        {"r": 8, "alpha": 8.0, "rank_dropout": 0.0, "module_dropout": 0.0},
        search_space={"method_args.r": RANK},
    ),
    "lokr": Tuner(
        "LoKrConfig",
        "LoKr",
        "Yeh et al. (LyCORIS), ICLR 2024",
        ("lokr_",),
        {"r": 8, "alpha": 8.0, "rank_dropout": 0.0, "module_dropout": 0.0, "decompose_factor": -1},
        search_space={"method_args.r": RANK},
    ),
    "oft": Tuner(
        "OFTConfig",
        "OFT",
        "Qiu et al., NeurIPS 2023",
        ("oft_",),
        {"oft_block_size": 32, "module_dropout": 0.0, "coft": False},
        fixed={"r": 0},
        search_space={"method_args.oft_block_size": {"type": "categorical", "choices": [16, 32]}},
    ),
    "boft": Tuner(
        "BOFTConfig",
        "BOFT",
        "Liu et al., ICLR 2024",
        ("boft_",),
        {"boft_block_size": 4, "boft_n_butterfly_factor": 1, "boft_dropout": 0.0},
        # 4 and 8 divide every width of ViTs and of EfficientNet/ResNet 1x1 convs (24, 40, 112...)
        search_space={"method_args.boft_block_size": {"type": "categorical", "choices": [4, 8]}},
    ),
    "ia3": Tuner("IA3Config", "(IA)³", "Liu et al., NeurIPS 2022", ("ia3_",), {}, targets=("attn.qkv", "mlp.fc2")),
    "vera": Tuner(
        "VeraConfig",
        "VeRA",
        "Kopiczko et al., ICLR 2024",
        ("vera_",),
        {"r": 256, "vera_dropout": 0.0, "d_initial": 0.1},
        families=("vit",),
        search_space={"method_args.r": {"type": "categorical", "choices": [64, 256, 1024]}},
    ),
    "fourierft": Tuner(
        "FourierFTConfig",
        "FourierFT",
        "Gao et al., ICML 2024",
        ("fourierft_",),
        {"n_frequency": 1000, "scaling": 150.0},
        families=("vit",),
        search_space={"method_args.n_frequency": {"type": "categorical", "choices": [500, 1000, 3000]}},
    ),
}
#: what the generic ``peft`` method owns: the prefixes of the tuners above and of HRA (Householder
#: reflections), a tuner not named here; peft types whose prefix is not listed are refused by name
ALL_PREFIXES = tuple(sorted({p for t in TUNERS.values() for p in t.prefixes} | {"hra_"}))


def options_class(name: str, tuner: Tuner | None) -> type:
    """The ``method_args`` dataclass of a tuner: its knobs, then the fields every tuner shares."""
    knobs = [(k, type(v), field(default=v)) for k, v in (tuner.knobs if tuner else {}).items()]
    targets = list(tuner.targets if tuner else VIT_TARGETS)
    shared = [
        ("targets", list, field(default_factory=lambda: list(targets))),
        ("blocks", list, field(default_factory=list)),
        ("merge", bool, field(default=False)),
        # the generic method defaults to peft's LoRA defaults
        ("peft_config", dict, field(default_factory=dict if tuner else lambda: {"peft_type": "LORA"})),
    ]
    camel = "".join(part.title() for part in name.split("_"))
    cls = dataclasses.make_dataclass(f"{camel}Options", knobs + shared)
    cls.__doc__ = (
        f"{tuner.display} ({tuner.paper}) through peft's {tuner.peft_config}: the knobs are peft's fields. "
        if tuner
        else "Any peft tuner: method_args.peft_config is its whole config (peft_type + fields). "
    ) + (
        "targets: ViT linear layers of each block; blocks: the adapted blocks (empty = all); merge: test with "
        "the tuner merged into the weights; peft_config: further fields of the peft config."
    )
    return cls


class PeftTunedModel(DMLModel):
    """A frozen backbone with peft tuner layers inside it."""

    def train(self, mode: bool = True) -> PeftTunedModel:
        super().train(mode)
        if mode:  # a tuner layer (the wrapper around a frozen layer) applies LyCORIS's module and
            # rank dropouts itself; only then does it train (its draw is a CPU op, not a device sync)
            for module in self.backbone.modules():
                if _is_tuner_layer(module) and any(
                    p > 0 for key in ("module_dropout", "rank_dropout") for p in getattr(module, key, {}).values()
                ):
                    module.training = True
        return self

    def merge_(self) -> bool:
        """peft's own merge of every tuner layer into the weight it wraps."""
        layers = [m for m in self.backbone.modules() if _is_tuner_layer(m) and not m.merged]
        with torch.no_grad():
            for layer in layers:
                layer.merge()
        return bool(layers)


def _is_tuner_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def target_paths(ctx: BuildContext, targets: list, blocks: list) -> list[str]:
    """Paths of the adapted layers in the backbone."""
    backbone = ctx.backbone.model
    if ctx.backbone.family == "vit":
        return list(
            block_targets(
                backbone,
                blocks,
                targets,
                key_blocks="method_args.blocks",
                key_names="method_args.targets",
                types=(nn.Linear,),
            )
        )
    paths = list(pointwise_convs(backbone))
    if not paths:
        raise UserError(f"no 1x1 convolutions to tune in {type(backbone).__name__}; valid: timm ViTs and CNNs")
    return paths


def full_match(paths: list[str]) -> str:
    """A regex of exactly these paths (peft matches a string pattern with ``re.fullmatch``)."""
    return "|".join(re.escape(p) for p in paths)


def peft_config_for(ctx: BuildContext, name: str, options: Any) -> Any:
    """The peft config object a method's options describe (a one-line UserError when peft refuses)."""
    import peft

    tuner = TUNERS.get(name)
    extra = dict(options.peft_config)
    paths = target_paths(ctx, options.targets, options.blocks)
    try:
        if tuner is None:
            valid = layer_tuners(ALL_PREFIXES)
            extra["peft_type"] = str(extra.get("peft_type", "")).upper()
            if extra["peft_type"] not in valid:
                raise UserError(
                    f"bad peft_type {extra.get('peft_type')!r} in method_args.peft_config of method 'peft'; "
                    f"valid: {', '.join(valid)}"
                )
            return peft.get_peft_config({"target_modules": full_match(paths), **extra})
        values = {k: getattr(options, k) for k in tuner.knobs}
        if name == "ia3":  # feed-forward layers: their input is scaled, not their output
            values["feedforward_modules"] = [p for p in paths if p.endswith("mlp.fc2")]
        return getattr(peft, tuner.peft_config)(target_modules=full_match(paths), **{**values, **tuner.fixed, **extra})
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"peft refuses the {name} config: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def layer_tuners(prefixes: tuple[str, ...]) -> list[str]:
    """peft types that inject layers and name their parameters with one of ``prefixes``."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return sorted(
        str(t.value)
        for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items()  # AdaLoRA needs a per-step
        if p.startswith(prefixes) and t in PEFT_TYPE_TO_TUNER_MAPPING and t.value != "ADALORA"
    )  # hook


def build_tuned(ctx: BuildContext, name: str, options: Any) -> DMLModel:
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    backbone = ctx.backbone.model
    freeze(backbone)
    config = peft_config_for(ctx, name, options)
    tuner_cls, prefix = (
        PEFT_TYPE_TO_TUNER_MAPPING.get(config.peft_type),
        PEFT_TYPE_TO_PREFIX_MAPPING.get(config.peft_type),
    )
    owned = TUNERS[name].prefixes if name in TUNERS else ALL_PREFIXES
    if tuner_cls is None or not (prefix or "").startswith(owned):
        raise UserError(
            f"bad peft_type '{config.peft_type.value}' for method '{name}'; valid: " + ", ".join(layer_tuners(owned))
        )
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)  # BOFT tries to build a CUDA extension and says so, twice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the tuner injects its layers into the backbone in place (VeRA's shared
            # projections are buffers of every layer that uses them)
            tuner_cls(backbone, config, adapter_name="default")
        except (TypeError, ValueError, RuntimeError) as exc:
            on_meta = any(p.is_meta for p in backbone.parameters())
            if not (on_meta and "meta" in str(exc)):  # a study's preflight builds on the meta device,
                # where BOFT's init cannot read values: its options were checked above, the rest at run time
                raise UserError(f"peft cannot apply {name} to '{ctx.backbone.name}': {exc}".splitlines()[0]) from None
        finally:
            ext_log.setLevel(level)
    model = ctx.model(frozen_backbone=True, cls=PeftTunedModel)
    model.peft_config = config
    model.merges_on_test = bool(getattr(options, "merge", False))
    return model


def _register(name: str, tuner: Tuner | None) -> None:
    options = options_class(name, tuner)

    def builder(ctx: BuildContext, cfg: Any) -> DMLModel:
        return build_tuned(ctx, name, cfg)

    builder.__doc__ = (
        f"{tuner.display} ({tuner.paper}) from Hugging Face peft on the frozen backbone"
        if tuner
        else "any Hugging Face peft tuner, given as method_args.peft_config"
    )
    register_method(
        name,
        display=tuner.display if tuner else "peft",
        config=options,
        prefixes=tuner.prefixes if tuner else ALL_PREFIXES,
        families=tuner.families if tuner else ("vit", "cnn"),
        search_space=tuner.search_space if tuner else None,
    )(builder)


for _name, _tuner in TUNERS.items():
    _register(_name, _tuner)
_register("peft", None)
