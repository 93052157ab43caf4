"""K concurrent trials per device: a shrunk study run with ``--devices D --workers-per-device K``.

Small PEFT models leave most of a GPU idle, so several trials at once finish a study sooner. For
each K a fresh study (same methods, trials and epochs; its own MLflow store and Optuna journal in
the work folder, tuning only) runs through :func:`harness.studies.runner.run_study` exactly as
``dmlbench study run`` does; the record gives its wall time, the images its trials trained per
second together, and the check that the budget was used exactly once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml


def study_spec(
    path: Path,
    k: int,
    *,
    dataset: str,
    root: Path,
    backbone: str,
    methods: list[str],
    trials: int,
    epochs: int,
    overrides: dict[str, Any],
) -> Path:
    """A tuning-only study spec for one K, written to ``path``."""
    spec = {
        "name": f"concurrency_k{k}",
        "description": f"{k} concurrent trials per device (dmlbench benchmark)",
        "backbone": backbone,
        "datasets": [dataset],
        "methods": methods,
        "overrides": {
            "data.root": str(root),
            "data.check_published": False,
            "model.pretrained": False,
            "tracking.system_metrics": False,
            "tracking.log_artifacts": False,
            "data.verify_images": False,
            "tracking.uri": f"sqlite:///{path.parent / f'k{k}.db'}",
            **overrides,
        },
        "objective": "val_map_at_r",
        "budget": {"n_trials": trials, "epochs": epochs},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "reproduce": {"seeds": []},
        "storage": str(path.parent / f"k{k}.optuna.journal"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def concurrent_trial(k: int, device: str, workdir: Path, **spec_args: Any) -> dict[str, Any]:
    """One K: wall seconds, trained images/s over all trials, trials done (of the budget)."""
    import optuna

    from harness.studies.loading import load_spec
    from harness.studies.runner import run_study
    from harness.studies.storage import open_storage, open_study, storage_url

    path = study_spec(workdir / f"k{k}" / "study.yaml", k, **spec_args)
    started = time.perf_counter()
    run_study(path, devices=device, workers_per_device=k)
    wall = time.perf_counter() - started
    spec = load_spec(path)
    store = open_storage(storage_url(spec, None))
    done = images = 0
    for dataset, entry in spec.units():
        for t in open_study(spec, dataset, entry, store).get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.COMPLETE:
                done += 1
                images += int(t.user_attrs.get("dmlbench.train_images", 0))
    budget = spec.budget.n_trials * len(spec.units())
    return {
        "kind": "concurrency",
        "k": k,
        "device": device,
        "trials": done,
        "budget": budget,
        "wall_s": round(wall, 1),
        "trained_img_s": round(images / wall, 1) if images else None,
        "trials_per_min": round(60 * done / wall, 2),
    }


def concurrent_trials(ks: list[int], device: str, workdir: Path, **spec_args: Any) -> list[dict[str, Any]]:
    """One record per K (see :func:`concurrent_trial`)."""
    return [concurrent_trial(k, device, workdir, **spec_args) for k in ks]
