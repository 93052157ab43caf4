"""What a run records in MLflow when it starts: parameters, tags, description, config, inputs."""
from __future__ import annotations

from typing import Any

import torch

from harness.config import RunConfig, flatten, to_dict, to_yaml
from harness.tracking import store as tracking
from harness.tracking.inputs import log_dataset_inputs


def describe_run(cfg: RunConfig, weights: str, tags: dict[str, str]) -> str:
    """The run's description in the MLflow UI (Markdown)."""
    role = tags.get("dmlbench.role", "single run")
    study = f" of study `{tags['dmlbench.study']}`" if "dmlbench.study" in tags else ""
    recipe = f"`{cfg.recipe}` ({cfg.recipe_source})" if cfg.recipe else "none (harness defaults and overrides)"
    return (f"**{cfg.method}** on **{cfg.dataset}** with `{cfg.backbone}` ({weights}): {role}{study}, seed "
            f"{cfg.seed}.\n\n- recipe: {recipe}\n- protocol: `{cfg.protocol}` (" + (
                "all training classes, the best test epoch reported" if cfg.protocol == "paper"
                else "validation classes held out, checkpoint selected on validation") + ")\n"
            f"- optimiser: {cfg.optim.name}, lr {cfg.optim.lr:g}, {cfg.optim.epochs} epochs, batch {cfg.data.batch_size}")


def log_run_start(run: Any, tags: dict[str, str] | None) -> None:
    """Parameters, tags (environment, weight source, device), the resolved config and counts of a
    prepared :class:`harness.training.loop.Run`, when its MLflow run starts."""
    import mlflow

    cfg, device = run.cfg, run.device
    mlflow.log_params({k: str(v)[:500] for k, v in flatten(to_dict(cfg)).items()})
    mlflow.set_tags({
        **tracking.environment_tags(),
        "dmlbench.method": cfg.method,
        "dmlbench.dataset": cfg.dataset,
        "dmlbench.backbone": cfg.backbone,
        "dmlbench.weight_source": run.backbone.weight_source,
        "dmlbench.device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "dmlbench.status": "running",
        "dmlbench.protocol": cfg.protocol,
        "dmlbench.selection": "best test R@1 epoch (paper protocol)" if cfg.protocol == "paper"
        else f"best validation {cfg.eval.select} epoch",
        **({"dmlbench.recipe": cfg.recipe, "dmlbench.recipe_source": cfg.recipe_source} if cfg.recipe else {}),
        "mlflow.note.content": describe_run(cfg, run.backbone.weight_source, tags or {}),
        **(tags or {}),
    })
    mlflow.log_text(to_yaml(cfg), "config.yaml")
    log_dataset_inputs(run.splits, cfg.dataset, cfg.data.root or "default")
    mlflow.log_metrics({k: float(v) for k, v in run.counts.items()})
    mlflow.log_params(run.facts)
