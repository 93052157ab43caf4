"""Study specs: the YAML format of ``studies/*.yaml``, parsed and checked.

See :mod:`harness.studies.runner` for the format and for running a study. Every key is checked here, so a
typo, an unknown method or dataset, or an empty search space is refused before anything runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import UserError, closest

REPO_ROOT = Path(__file__).resolve().parents[2]

_TOP_KEYS = (
    "name", "description", "backbone", "datasets", "methods", "exclude", "references", "overrides", "objective",
    "budget", "sampler", "pruner", "reproduce", "storage", "protocol",
)
_ENTRY_KEYS = ("method", "name", "label", "backbone", "preset", "overrides", "search_space", "fixed", "published_as")
_BUDGET_KEYS = ("n_trials", "epochs", "timeout_s")
_SAMPLER_KEYS = {"tpe": ("name", "seed", "n_startup_trials"), "random": ("name", "seed"),
                 "bruteforce": ("name", "seed"), "grid": ("name", "seed")}
_PRUNER_KEYS = {"median": ("name", "n_startup_trials", "n_warmup_steps"),
                "hyperband": ("name", "min_resource", "reduction_factor"),
                "threshold": ("name", "lower", "upper", "n_warmup_steps"), "none": ("name",)}
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

    def run_overrides(self, dataset: str, entry: Entry, params: dict[str, Any] | None = None,
                      seed: int | None = None) -> dict[str, Any]:
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

    def resolve(self, dataset: str, entry: Entry, params: dict[str, Any] | None = None,
                seed: int | None = None) -> Any:
        from harness.training.resolution import resolve

        return resolve(method=entry.method, dataset=dataset, backbone=entry.backbone, preset=entry.preset,
                       overrides=self.run_overrides(dataset, entry, params, seed))


def _check_keys(mapping: Any, allowed: tuple[str, ...], where: str) -> dict:
    if not isinstance(mapping, dict):
        raise UserError(f"{where} must be a mapping; valid keys: {', '.join(allowed)}")
    for key in mapping:
        if key not in allowed:
            raise UserError(f"unknown key '{key}' in {where}{closest(str(key), allowed)}; valid: {', '.join(allowed)}")
    return mapping


def _as_list(value: Any, where: str) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where} must be a non-empty list")
    return value


def _check_space(space: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(space, dict):
        raise UserError(f"{where} must be a mapping of run-config keys to distributions, got {space!r}")
    for key, dist in space.items():
        if not isinstance(dist, dict):
            raise UserError(f"{where} '{key}' must be a mapping like {{type: float, low: 1e-4, high: 1e-2, log: true}}")
        _check_keys(dist, _SPACE_KEYS, f"{where} '{key}'")
        kind = dist.get("type")
        if kind not in ("float", "int", "categorical"):
            raise UserError(f"bad type {kind!r} for {where} '{key}'; valid: float, int, categorical")
        if kind == "categorical":
            if not isinstance(dist.get("choices"), list) or not dist["choices"]:
                raise UserError(f"{where} '{key}' needs a non-empty 'choices' list")
            continue
        low, high = dist.get("low"), dist.get("high")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
        if not numbers or not low <= high:
            raise UserError(f"{where} '{key}' needs finite numbers low <= high, got low={low!r} high={high!r}")
        if dist.get("log") and low <= 0:
            raise UserError(f"{where} '{key}': a log scale needs low > 0, got low={low!r}")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise UserError(f"{where} '{key}': an int distribution needs integer bounds, got {low!r}, {high!r}")
    return space


def _check_mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping of run-config keys to distributions, got {value!r}")
    return value


def distributions(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Optuna distributions of a search space (dotted config key -> distribution)."""
    import optuna.distributions as od

    out: dict[str, Any] = {}
    for key, d in sorted(space.items()):
        if d["type"] == "float":
            out[key] = od.FloatDistribution(float(d["low"]), float(d["high"]), log=bool(d.get("log", False)),
                                            step=None if d.get("step") is None else float(d["step"]))
        elif d["type"] == "int":
            out[key] = od.IntDistribution(int(d["low"]), int(d["high"]), log=bool(d.get("log", False)),
                                          step=int(d.get("step") or 1))
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


def _backbone_family(name: str, kwargs: dict) -> str:
    """Family of a timm backbone without allocating its weights (meta device)."""
    import timm
    import torch

    from harness.models.backbones import check_name, family_of

    check_name(name)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return family_of(model)


def _parse_entry(raw: Any, where: str) -> dict[str, Any]:
    if isinstance(raw, str):
        raw = {"method": raw}
    _check_keys(raw, _ENTRY_KEYS, where)
    if "method" not in raw:
        raise UserError(f"{where} needs a 'method' key")
    return raw


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec; every mistake is a one-line :class:`UserError`."""
    from harness import data
    from harness.config import load_yaml, set_key
    from methods import get_method, method_names
    from harness.tracking.store import resolve_uri

    path = _find_spec(path)
    raw = load_yaml(path)
    where = f"study spec {path.name}"
    _check_keys(raw, _TOP_KEYS, where)
    for key in ("name", "datasets", "methods", "budget"):
        if key not in raw:
            raise UserError(f"{where} needs a '{key}' key")
    name = str(raw["name"])
    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise UserError(f"bad study name {name!r} in {where}: use letters, digits, '-' and '_'")
    datasets = [str(d) for d in _as_list(raw["datasets"], f"'datasets' of {where}")]
    for d in datasets:
        data.get_spec(d)
    backbone = str(raw.get("backbone") or "tf_efficientnet_lite0")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"'overrides' of {where} must be a mapping of run-config keys")
    overrides = dict(overrides)
    if "optim.epochs" in overrides:
        raise UserError(f"'optim.epochs' in the overrides of {where}: budget.epochs sets it for every method")

    objective = str(raw.get("objective", "val_map_at_r")).removeprefix("best_")
    if objective not in OBJECTIVES:
        from harness.errors import unknown

        raise unknown("objective", objective, OBJECTIVES)
    budget_raw = _check_keys(raw["budget"], _BUDGET_KEYS, f"'budget' of {where}")
    try:
        budget = Budget(int(budget_raw["n_trials"]), int(budget_raw["epochs"]),
                        None if budget_raw.get("timeout_s") is None else float(budget_raw["timeout_s"]))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"'budget' of {where} needs integers n_trials and epochs (and optional timeout_s)") from None
    if budget.n_trials < 1 or budget.epochs < 1:
        raise UserError(f"'budget' of {where}: n_trials and epochs must be >= 1")

    sampler = dict(raw.get("sampler") or {"name": "tpe"})
    sampler.setdefault("name", "tpe")
    if sampler["name"] not in _SAMPLER_KEYS:
        from harness.errors import unknown

        raise unknown("sampler", sampler["name"], _SAMPLER_KEYS)
    _check_keys(sampler, _SAMPLER_KEYS[sampler["name"]], f"'sampler' of {where}")
    sampler.setdefault("seed", 0)
    pruner = dict(raw.get("pruner") or {"name": "none"})
    pruner.setdefault("name", "none")
    if pruner["name"] not in _PRUNER_KEYS:
        from harness.errors import unknown

        raise unknown("pruner", pruner["name"], _PRUNER_KEYS)
    _check_keys(pruner, _PRUNER_KEYS[pruner["name"]], f"'pruner' of {where}")
    if pruner["name"] == "threshold" and pruner.get("lower") is None and pruner.get("upper") is None:
        raise UserError(f"threshold pruner of {where} needs 'lower' or 'upper'")
    reproduce = _check_keys(raw.get("reproduce") or {"seeds": [0]}, ("seeds",), f"'reproduce' of {where}")
    seeds_raw = reproduce.get("seeds", [0])
    if not isinstance(seeds_raw, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds_raw):
        raise UserError(f"'reproduce.seeds' of {where} must be a list of integers, e.g. [0, 1, 2]")
    seeds = list(dict.fromkeys(seeds_raw))

    # -- method entries
    methods_raw = raw["methods"]
    exclude = [str(m) for m in (raw.get("exclude") or [])]
    for m in exclude:
        get_method(m)
    if methods_raw == "all":
        family = _backbone_family(backbone, dict(overrides.get("model.backbone_kwargs") or {}))
        entries_raw = [{"method": m} for m in method_names()
                       if get_method(m).applies_to(family) and m not in exclude]
    else:
        if exclude:
            raise UserError(f"'exclude' of {where} only works with 'methods: all'")
        entries_raw = [_parse_entry(r, f"method entry {i + 1} of {where}")
                       for i, r in enumerate(_as_list(methods_raw, f"'methods' of {where}"))]
    references = raw.get("references") or []
    if not isinstance(references, list):
        raise UserError(f"'references' of {where} must be a list of method entries")
    for i, r in enumerate(references):
        entry_raw = _parse_entry(r, f"reference {i + 1} of {where}")
        entries_raw.append({**entry_raw, "fixed": True})
    entries: list[Entry] = []
    for raw_entry in entries_raw:
        spec = get_method(str(raw_entry["method"]))
        entry_name = str(raw_entry.get("name") or spec.name)
        if entry_name in {e.name for e in entries}:
            raise UserError(f"method entry name '{entry_name}' appears twice in {where}: give each a distinct 'name'")
        ewhere = f"entry '{entry_name}' of {where}"
        fixed = bool(raw_entry.get("fixed", False))
        if not isinstance(raw_entry.get("overrides") or {}, dict):
            raise UserError(f"'overrides' of {ewhere} must be a mapping")
        entry_overrides = dict(raw_entry.get("overrides") or {})
        if any(k.startswith("tracking.") for k in entry_overrides):
            raise UserError(f"tracking keys in {ewhere}: set them in the study's overrides (one experiment per dataset)")
        if "optim.epochs" in entry_overrides and not fixed:
            raise UserError(f"'optim.epochs' in {ewhere}: budget.epochs sets it for every tuned method")
        space = {k: dict(v) for k, v in spec.search_space.items()}
        for key, dist in _check_mapping(raw_entry.get("search_space") or {}, f"search space of {ewhere}").items():
            if dist is None:
                space.pop(key, None)
            else:
                space[key] = dict(dist) if isinstance(dist, dict) else dist
        _check_space(space, f"search space of {ewhere}")
        if not fixed and not space:
            raise UserError(f"empty search space for {ewhere}: give a search_space or set 'fixed: true'")
        space = {} if fixed else space
        entries.append(Entry(
            name=entry_name, method=spec.name, label=str(raw_entry.get("label") or (  # as papers write it
                spec.display if entry_name == spec.name else entry_name)),
            backbone=str(raw_entry.get("backbone") or backbone), overrides=entry_overrides,
            search_space=space, fixed=fixed, published_as=str(raw_entry.get("published_as") or spec.name),
            preset=None if raw_entry.get("preset") is None else str(raw_entry["preset"]),
        ))
    if not entries:
        raise UserError(f"{where} selects no method")
    if sampler["name"] in ("bruteforce", "grid"):
        for e in entries:
            if not e.fixed and grid_size(e.search_space) is None:
                raise UserError(f"{sampler['name']} sampler needs a discrete search space (choices or step) for entry '{e.name}'")

    spec = StudySpec(
        name=name, path=path, description=str(raw.get("description") or "").strip(), backbone=backbone,
        datasets=datasets, entries=entries, overrides=overrides, objective=objective, budget=budget,
        sampler=sampler, pruner=pruner, seeds=seeds, storage=str(raw.get("storage") or ""),
        protocol=_protocol(raw.get("protocol", "fair"), where),
    )
    # -- every run config must resolve; every search-space key must be a config key
    for dataset, entry in spec.units():
        cfg = spec.resolve(dataset, entry)
        for key, dist in entry.search_space.items():  # every value a trial can draw is a valid value
            for value in dist["choices"] if dist["type"] == "categorical" else (dist["low"], dist["high"]):
                try:
                    set_key(cfg, key, value)
                except UserError as exc:
                    raise UserError(f"search space of entry '{entry.name}' in {path}: {exc}") from None
        spec.experiments[dataset] = cfg.tracking.experiment or cfg.dataset
        spec.tracking_uri = resolve_uri(cfg.tracking.uri)
    return spec


def _protocol(value: Any, where: str) -> str:
    if value not in ("fair", "paper"):
        raise UserError(f"bad value {value!r} for 'protocol' of {where}; valid: fair, paper")
    return str(value)


def _find_spec(path: str | Path) -> Path:
    """A spec path as given, else relative to the repository (``studies/demo.yaml``)."""
    p = Path(path)
    for candidate in (p, REPO_ROOT / p, REPO_ROOT / "studies" / p, REPO_ROOT / "studies" / f"{p}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(f"study spec not found: {path}")


def dump_spec(spec: StudySpec) -> str:
    """The resolved spec as YAML (logged beside reports so a table can be traced to its inputs)."""
    entries = [{"name": e.name, "method": e.method, "label": e.label, "backbone": e.backbone, "preset": e.preset,
                "fixed": e.fixed,
                "overrides": e.overrides, "search_space": e.search_space, "published_as": e.published_as}
               for e in spec.entries]
    return yaml.safe_dump({
        "name": spec.name, "description": spec.description, "backbone": spec.backbone, "datasets": spec.datasets,
        "objective": spec.objective, "budget": {"n_trials": spec.budget.n_trials, "epochs": spec.budget.epochs,
                                                "timeout_s": spec.budget.timeout_s},
        "sampler": spec.sampler, "pruner": spec.pruner, "reproduce": {"seeds": spec.seeds},
        "overrides": spec.overrides, "methods": entries,
    }, sort_keys=False)
