"""The run configuration: its schema (typed dataclasses whose comments document every key), reading
YAML files and ``--set key=value`` values against it, the range rules beside the fields, and where
outputs go. The bottom of the house: it imports nothing of the project but :mod:`harness.errors`,
and neither torch nor MLflow, so a typo in a key is answered in a fraction of a second."""

from harness.config.overrides import load_yaml, parse_overrides, parse_scalar, precheck, set_key
from harness.config.paths import home
from harness.config.rules import Range, check_ranges, ranged
from harness.config.schema import (
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrackingConfig,
    flat_get,
    flatten,
    to_dict,
    to_yaml,
)

__all__ = [
    "DataConfig",
    "EvalConfig",
    "Range",
    "check_ranges",
    "ranged",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrackingConfig",
    "flat_get",
    "flatten",
    "home",
    "load_yaml",
    "parse_overrides",
    "parse_scalar",
    "precheck",
    "set_key",
    "to_dict",
    "to_yaml",
]
