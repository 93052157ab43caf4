"""Reading a study spec file and checking every key, so a typo, an unknown method, dataset or
backbone, or an empty search space is refused in one line before anything runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness.errors import UserError, closest
from harness.studies.spec import (
    _BUDGET_KEYS,
    _ENTRY_KEYS,
    _PRUNER_KEYS,
    _SAMPLER_KEYS,
    _SPACE_KEYS,
    _TOP_KEYS,
    OBJECTIVES,
    REPO_ROOT,
    Budget,
    Entry,
    StudySpec,
    grid_size,
)


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
    from harness.tracking.store import resolve_uri
    from methods import get_method, method_names

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
        budget = Budget(
            int(budget_raw["n_trials"]),
            int(budget_raw["epochs"]),
            None if budget_raw.get("timeout_s") is None else float(budget_raw["timeout_s"]),
        )
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
        entries_raw = [{"method": m} for m in method_names() if get_method(m).applies_to(family) and m not in exclude]
    else:
        if exclude:
            raise UserError(f"'exclude' of {where} only works with 'methods: all'")
        entries_raw = [
            _parse_entry(r, f"method entry {i + 1} of {where}")
            for i, r in enumerate(_as_list(methods_raw, f"'methods' of {where}"))
        ]
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
            raise UserError(
                f"tracking keys in {ewhere}: set them in the study's overrides (one experiment per dataset)"
            )
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
        entries.append(
            Entry(
                name=entry_name,
                method=spec.name,
                label=str(
                    raw_entry.get("label")
                    or (  # as papers write it
                        spec.display if entry_name == spec.name else entry_name
                    )
                ),
                backbone=str(raw_entry.get("backbone") or backbone),
                overrides=entry_overrides,
                search_space=space,
                fixed=fixed,
                published_as=str(raw_entry.get("published_as") or spec.name),
                preset=None if raw_entry.get("preset") is None else str(raw_entry["preset"]),
            )
        )
    if not entries:
        raise UserError(f"{where} selects no method")
    if sampler["name"] in ("bruteforce", "grid"):
        for e in entries:
            if not e.fixed and grid_size(e.search_space) is None:
                raise UserError(
                    f"{sampler['name']} sampler needs a discrete search space (choices or step) for entry '{e.name}'"
                )

    spec = StudySpec(
        name=name,
        path=path,
        description=str(raw.get("description") or "").strip(),
        backbone=backbone,
        datasets=datasets,
        entries=entries,
        overrides=overrides,
        objective=objective,
        budget=budget,
        sampler=sampler,
        pruner=pruner,
        seeds=seeds,
        storage=str(raw.get("storage") or ""),
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
