"""Range rules beside the fields (harness/config/rules.py): every ranged field of the run config
and of every method's options refuses a value just outside its range in one line naming the key,
and takes its own default; the rules between fields are refused with the same form."""

from __future__ import annotations

import dataclasses
import re

import pytest

from harness.config import RunConfig, check_ranges
from harness.config.rules import Range
from harness.errors import UserError
from harness.training.resolution import resolve
from methods import get_method, method_names


def ranged_fields(obj, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from ranged_fields(value, f"{prefix}{f.name}.")
        elif "range" in f.metadata:
            yield f"{prefix}{f.name}", f.metadata["range"], value


def outside(rule: Range, default):
    """A value just outside the rule's range, of the field's type."""
    step = 1 if isinstance(default, int) else 1e-3
    if m := re.match(r"^(>=|<=|>|<)\s*(-?[\d.e+-]+)$", rule.spec):
        bound = float(m.group(2))
        value = {">": bound, ">=": bound - step, "<": bound, "<=": bound + step}[m.group(1)]
    else:
        _, _, hi, hi_open = re.match(r"^([\[(])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([\])])$", rule.spec).groups()
        value = float(hi) if hi_open == ")" else float(hi) + step
    return int(value) if isinstance(default, int) else value


CONFIG_FIELDS = list(ranged_fields(RunConfig()))
METHOD_FIELDS = [
    (m, key, rule, value)
    for m in method_names()
    if dataclasses.is_dataclass(get_method(m).config_cls)
    for key, rule, value in ranged_fields(get_method(m).config_cls(), "method_args.")
]


def test_every_rule_is_exercised():
    assert len(CONFIG_FIELDS) >= 30 and len(METHOD_FIELDS) >= 15


@pytest.mark.parametrize("key, rule, default", CONFIG_FIELDS, ids=[k for k, _, _ in CONFIG_FIELDS])
def test_a_config_value_outside_its_range_is_one_line(key, rule, default):
    assert rule.holds(default) or key == "model.embed_dim"
    bad = outside(rule, default)
    overrides = {key: bad}
    if key == "data.image_size":
        overrides["data.resize_size"] = 256
    with pytest.raises(UserError) as err:
        resolve(overrides=overrides)
    assert str(err.value) == f"bad value {bad!r} for '{key}': {rule.text()}"


@pytest.mark.parametrize("method, key, rule, default", METHOD_FIELDS, ids=[f"{m}-{k}" for m, k, _, _ in METHOD_FIELDS])
def test_a_method_option_outside_its_range_is_one_line(method, key, rule, default):
    assert rule.holds(default)
    bad = outside(rule, default)
    with pytest.raises(UserError) as err:
        resolve(
            method=method,
            backbone="vit_small_patch16_224" if method.startswith("vptsp") else None,
            overrides={key: bad},
        )
    assert str(err.value) == f"bad value {bad!r} for '{key}': {rule.text()}"


def test_rules_between_fields_keep_their_form():
    cases = [
        (
            {"data.resize_size": 100, "data.image_size": 128},
            "bad value 100 for 'data.resize_size': must be >= "
            "data.image_size=128 (the test centre crop is taken from it)",
        ),
        (
            {"data.batch_size": 10, "data.samples_per_class": 3},
            "bad value 3 for 'data.samples_per_class': must divide data.batch_size=10",
        ),
        (
            {"optim.lr": 1e-3, "optim.min_lr": 1e-3},
            "bad value 0.001 for 'optim.min_lr': must be in [0, optim.lr=0.001)",
        ),
        (
            {"optim.weight_decay_bias": -0.5},
            "bad value -0.5 for 'optim.weight_decay_bias': must be >= 0, or -1 for optim.weight_decay",
        ),
        ({"eval.ks": [1, 0]}, "bad value 0 in 'eval.ks': Recall@K needs positive integers"),
        ({"optim.lr": float("inf")}, "bad value inf for 'optim.lr': must be a finite number > 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError) as err:
            resolve(overrides=overrides)
        assert str(err.value) == message


def test_a_builder_called_directly_checks_its_options_too():
    from harness.models import BuildContext, create_backbone

    spec = get_method("lora")
    cfg = resolve(method="lora", backbone="vit_small_patch16_224")
    cfg.method_args.rank = 0  # set past the resolver
    with pytest.raises(UserError, match="bad value 0 for 'method_args.rank': must be > 0"):
        spec.builder(
            BuildContext(
                create_backbone("vit_small_patch16_224", pretrained=False, kwargs={"img_size": 32, "depth": 1}), 4, cfg
            ),
            cfg.method_args,
        )
    check_ranges(resolve())  # the defaults hold
