"""Study specs: what a parsed ``studies/*.yaml`` holds (:class:`StudySpec`, its entries and
budget), the search-space helpers and writing a spec back out. Reading and checking a file is
:mod:`harness.studies.loading`; the format is documented in :mod:`harness.studies`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]

_TOP_KEYS = (
    "name",
    "description",
    "backbone",
    "datasets",
    "methods",
    "exclude",
    "references",
    "overrides",
    "objective",
    "budget",
    "sampler",
    "pruner",
    "reproduce",
    "storage",
    "protocol",
)
_ENTRY_KEYS = ("method", "name", "label", "backbone", "preset", "overrides", "search_space", "fixed", "published_as")
_BUDGET_KEYS = ("n_trials", "epochs", "timeout_s")
_SAMPLER_KEYS = {
    "tpe": ("name", "seed", "n_startup_trials"),
    "random": ("name", "seed"),
    "bruteforce": ("name", "seed"),
    "grid": ("name", "seed"),
}
_PRUNER_KEYS = {
    "median": ("name", "n_startup_trials", "n_warmup_steps"),
    "hyperband": ("name", "min_resource", "reduction_factor"),
    "threshold": ("name", "lower", "upper", "n_warmup_steps"),
    "none": ("name",),
}
_SPACE_KEYS = ("type", "low", "high", "log", "step", "choices")
#: objective name -> (final metric of the run, per-epoch metric, eval.select value)
OBJECTIVES = {
    "val_map_at_r": ("best/val_map_at_r", "val/map_at_r", "map@r"),
    "val_recall_at_1": ("best/val_recall_at_1", "val/recall_at_1", "recall@1"),
}


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class Entry:
    """One row of the study: a method with its own overrides and search space."""

    name: str
    method: str
    label: str
    backbone: str
    overrides: dict[str, Any]
    search_space: dict[str, dict[str, Any]]
    fixed: bool
    published_as: str
    preset: str | None = None


@dataclass(frozen=True)
class Budget:
    n_trials: int
    epochs: int
    timeout_s: float | None = None


@dataclass
class StudySpec:
    """A parsed, validated study spec (see the module docstring for the YAML format)."""

    name: str
    path: Path
    description: str
    backbone: str
    datasets: list[str]
    entries: list[Entry]
    overrides: dict[str, Any]
    objective: str
    budget: Budget
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    seeds: list[int]
    storage: str = ""
    #: protocol of the reproductions (tuning trials always select on validation classes)
    protocol: str = "fair"
    #: tracking URI / experiment per dataset, from the resolved configs
    experiments: dict[str, str] = field(default_factory=dict)
    tracking_uri: str = ""

    @property
    def metric(self) -> str:
        """Final run metric the study maximises (e.g. ``best/val_map_at_r``)."""
        return OBJECTIVES[self.objective][0]

    @property
    def epoch_metric(self) -> str:
        return OBJECTIVES[self.objective][1]

    def entry(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def units(self) -> list[tuple[str, Entry]]:
        """Every (dataset, entry) pair in spec order."""
        return [(d, e) for d in self.datasets for e in self.entries]

    def study_name(self, dataset: str, entry: Entry) -> str:
        return f"{self.name}/{dataset}/{entry.name}"

    def run_overrides(
        self, dataset: str, entry: Entry, params: dict[str, Any] | None = None, seed: int | None = None
    ) -> dict[str, Any]:
        """Config overrides of one run: spec < entry < budget and objective < trial params < seed."""
        out = {**self.overrides, **entry.overrides}
        if not entry.fixed or "optim.epochs" not in entry.overrides:
            out["optim.epochs"] = self.budget.epochs
        out["eval.select"] = OBJECTIVES[self.objective][2]
        out.update(params or {})
        if seed is not None:  # a reproduction: the study's protocol (trials stay on validation)
            out["seed"] = seed
            out["protocol"] = self.protocol
        return out

    def resolve(self, dataset: str, entry: Entry, params: dict[str, Any] | None = None, seed: int | None = None) -> Any:
        from harness.training.resolution import resolve

        return resolve(
            method=entry.method,
            dataset=dataset,
            backbone=entry.backbone,
            preset=entry.preset,
            overrides=self.run_overrides(dataset, entry, params, seed),
        )


def distributions(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Optuna distributions of a search space (dotted config key -> distribution)."""
    import optuna.distributions as od

    out: dict[str, Any] = {}
    for key, d in sorted(space.items()):
        if d["type"] == "float":
            out[key] = od.FloatDistribution(
                float(d["low"]),
                float(d["high"]),
                log=bool(d.get("log", False)),
                step=None if d.get("step") is None else float(d["step"]),
            )
        elif d["type"] == "int":
            out[key] = od.IntDistribution(
                int(d["low"]), int(d["high"]), log=bool(d.get("log", False)), step=int(d.get("step") or 1)
            )
        else:
            out[key] = od.CategoricalDistribution(list(d["choices"]))
    return out


def grid_size(space: dict[str, dict[str, Any]]) -> int | None:
    """Number of points of a discrete space, or None if a dimension is continuous."""
    size = 1
    for d in space.values():
        if d["type"] == "categorical":
            size *= len(d["choices"])
        elif d.get("step") and not d.get("log"):
            size *= int(math.floor((d["high"] - d["low"]) / d["step"] + 1e-9)) + 1
        else:
            return None
    return size


def dump_spec(spec: StudySpec) -> str:
    """The resolved spec as YAML (logged beside reports so a table can be traced to its inputs)."""
    entries = [
        {
            "name": e.name,
            "method": e.method,
            "label": e.label,
            "backbone": e.backbone,
            "preset": e.preset,
            "fixed": e.fixed,
            "overrides": e.overrides,
            "search_space": e.search_space,
            "published_as": e.published_as,
        }
        for e in spec.entries
    ]
    return yaml.safe_dump(
        {
            "name": spec.name,
            "description": spec.description,
            "backbone": spec.backbone,
            "datasets": spec.datasets,
            "objective": spec.objective,
            "budget": {
                "n_trials": spec.budget.n_trials,
                "epochs": spec.budget.epochs,
                "timeout_s": spec.budget.timeout_s,
            },
            "sampler": spec.sampler,
            "pruner": spec.pruner,
            "reproduce": {"seeds": spec.seeds},
            "overrides": spec.overrides,
            "methods": entries,
        },
        sort_keys=False,
    )
