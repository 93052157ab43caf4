"""Run config: YAML + overrides, typed values, one-line errors with the closest key."""

from __future__ import annotations

import pytest

from harness.config import RunConfig, parse_overrides, set_key
from harness.errors import UserError
from harness.training.resolution import resolve


def test_defaults_layering(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: bitfit\noptim:\n  lr: 0.01\n  epochs: 3\n")
    cfg = resolve(config_file=path, overrides={"optim.epochs": 5})
    assert cfg.method == "bitfit"
    assert cfg.optim.lr == 0.01  # from the file
    assert cfg.optim.epochs == 5  # override beats the file
    assert cfg.data.image_size == 64  # fashion_mnist spec default beats the dataclass default


def test_cli_flags_beat_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: bitfit\n")
    assert resolve(config_file=path, method="linear_probe").method == "linear_probe"


@pytest.mark.parametrize(
    "key, suggestion",
    [("optim.lrr", "optim.lr"), ("data.batchsize", "data.batch_size"), ("eval.kss", "eval.ks")],
)
def test_unknown_key_suggests_closest(key, suggestion):
    with pytest.raises(UserError, match=f"unknown config key '{key}'.*did you mean '{suggestion}'"):
        resolve(overrides={key: 1})


def test_bad_values_are_refused():
    with pytest.raises(UserError, match="optim.lr"):
        resolve(overrides={"optim.lr": "fast"})
    with pytest.raises(UserError, match="optim.name.*adamw, sgd"):
        resolve(overrides={"optim.name": "adam"})
    with pytest.raises(UserError, match="samples_per_class"):
        resolve(overrides={"data.batch_size": 10, "data.samples_per_class": 3})
    with pytest.raises(UserError, match="true or false"):
        resolve(overrides={"model.pretrained": "maybe"})


def test_unknown_method_and_dataset():
    with pytest.raises(UserError, match="unknown method 'bitfitt'.*did you mean 'bitfit'"):
        resolve(method="bitfitt")
    with pytest.raises(UserError, match="unknown dataset 'cub'.*valid:.*cub200"):
        resolve(dataset="cub")


def test_method_args_are_typed():
    cfg = resolve(method="linear_probe", overrides={"method_args.cache_features": True})
    assert cfg.method_args.cache_features is True
    with pytest.raises(UserError, match="method_args.cache_feature"):
        resolve(method="linear_probe", overrides={"method_args.cache_feature": True})


def test_parse_overrides():
    assert parse_overrides(["optim.lr=1e-3", "eval.ks=[1,10]", "data.augment=none"]) == {
        "optim.lr": 1e-3,
        "eval.ks": [1, 10],
        "data.augment": "none",
    }
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_set_key_mapping_section():
    cfg = RunConfig()
    set_key(cfg, "optim", {"lr": 0.5, "epochs": 2})
    assert (cfg.optim.lr, cfg.optim.epochs) == (0.5, 2)
