"""What a run records in MLflow: starting (parameters, tags, description, config, dataset inputs,
counts) and finishing (constants, final metrics, artifacts, the FINISHED state)."""

from __future__ import annotations

import logging

import torch

from harness.config import RunConfig, flatten, to_dict, to_yaml
from harness.retrieval import PerQuery
from harness.tracking import store as tracking
from harness.tracking.artifacts import log_artifacts, log_per_query
from harness.tracking.inputs import log_dataset_inputs
from harness.training.state import Run


def describe_run(cfg: RunConfig, weights: str, tags: dict[str, str]) -> str:
    """The run's description in the MLflow UI (Markdown)."""
    role = tags.get("dmlbench.role", "single run")
    study = f" of study `{tags['dmlbench.study']}`" if "dmlbench.study" in tags else ""
    recipe = f"`{cfg.recipe}` ({cfg.recipe_source})" if cfg.recipe else "none (harness defaults and overrides)"
    return (
        f"**{cfg.method}** on **{cfg.dataset}** with `{cfg.backbone}` ({weights}): {role}{study}, seed "
        f"{cfg.seed}.\n\n- recipe: {recipe}\n- protocol: `{cfg.protocol}` ("
        + (
            "all training classes, the best test epoch reported"
            if cfg.protocol == "paper"
            else "validation classes held out, checkpoint selected on validation"
        )
        + ")\n"
        f"- optimiser: {cfg.optim.name}, lr {cfg.optim.lr:g}, {cfg.optim.epochs} epochs, batch {cfg.data.batch_size}"
    )


def log_start(run: Run, tags: dict[str, str] | None) -> None:
    """Parameters, tags (environment, weight source, device), the resolved config, dataset inputs
    and counts of a prepared run when its MLflow run starts, and where its checkpoint is."""
    import mlflow

    from harness.training.checkpoint import tag_value

    cfg, device = run.cfg, run.device
    mlflow.log_params({k: str(v)[:500] for k, v in flatten(to_dict(cfg)).items()})
    mlflow.set_tags(
        {
            **tracking.environment_tags(),
            "dmlbench.method": cfg.method,
            "dmlbench.dataset": cfg.dataset,
            "dmlbench.backbone": cfg.backbone,
            "dmlbench.weight_source": run.backbone.weight_source,
            "dmlbench.device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "dmlbench.status": "running",
            "dmlbench.protocol": cfg.protocol,
            "dmlbench.selection": "best test R@1 epoch (paper protocol)"
            if cfg.protocol == "paper"
            else f"best validation {cfg.eval.select} epoch",
            **({"dmlbench.recipe": cfg.recipe, "dmlbench.recipe_source": cfg.recipe_source} if cfg.recipe else {}),
            "mlflow.note.content": describe_run(cfg, run.backbone.weight_source, tags or {}),
            **(tags or {}),
        }
    )
    mlflow.log_text(to_yaml(cfg), "config.yaml")
    log_dataset_inputs(run.splits, cfg.dataset, cfg.data.root or "default")
    mlflow.log_metrics({k: float(v) for k, v in run.counts.items()})
    mlflow.log_params(run.facts)
    mlflow.set_tag("dmlbench.checkpoint", tag_value(run.checkpoint, mlflow.get_tracking_uri()))


def start(cfg: RunConfig, tags: dict[str, str] | None, nested: bool, resume: str | None) -> str:
    """Start the MLflow run (or continue ``resume``), with MLflow's system metrics when asked;
    its id. The identifying tags go in with the run itself: a kill right after start_run leaves a
    run that study recovery can still find by its tags."""
    import mlflow

    if cfg.tracking.system_metrics:  # CPU/GPU utilisation and memory under system/ in the UI
        mlflow.set_system_metrics_sampling_interval(cfg.tracking.system_metrics_interval_s)
        # ERROR: no start/stop lines, and no sampler warning racing the one-line message when the
        # server dies (the run's own writes report that failure, tests/test_server_faults.py)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    system = {"log_system_metrics": cfg.tracking.system_metrics}
    if resume:
        return mlflow.start_run(run_id=resume, nested=nested, **system).info.run_id
    name = cfg.tracking.run_name or f"{cfg.method}-{cfg.backbone}-s{cfg.seed}"
    return mlflow.start_run(
        run_name=name, nested=nested, tags={**(tags or {}), "dmlbench.status": "running"}, **system
    ).info.run_id


def log_resumed(run_id: str, epoch: int) -> None:
    """A resumed run: the error of the attempt that failed belongs to that attempt, not to this run;
    the epoch it continues from (its checkpoint's) is a tag, so a reader, and a test, can tell a
    resumed run from one trained again from scratch in the same run."""
    import mlflow

    tracking.retried(
        lambda: (
            mlflow.MlflowClient().delete_tag(run_id, "dmlbench.error")
            if "dmlbench.error" in mlflow.get_run(run_id).data.tags
            else None
        )
    )
    mlflow.set_tags({"dmlbench.status": "running", "dmlbench.resumed_from_epoch": str(int(epoch))})


def log_finish(run: Run, final: dict[str, float], queries: dict[str, PerQuery] | None = None) -> None:
    """The run's constants, final metrics and artifacts (with the per-query results of its test
    and transfer evaluations); the run ends FINISHED, its checkpoint goes (unless
    ``tracking.keep_checkpoints``) and its claim is released."""
    import mlflow

    cfg = run.cfg
    mlflow.log_params({k: v for k, v in run.facts.items() if k.startswith(("data/decoder/", "model/"))})
    mlflow.log_metrics(final)
    if cfg.tracking.log_artifacts:
        title = f"{mlflow.active_run().info.run_name}: {cfg.method} on {cfg.dataset} ({cfg.backbone})"
        log_artifacts(run.best.state or {}, run.history, weights=cfg.tracking.log_weights, title=title)
    # the reports' evidence (intervals, paired tests, galleries): small, so always kept
    log_per_query({name: scored.frame() for name, scored in (queries or {}).items()})
    mlflow.set_tag("dmlbench.status", "finished")
    mlflow.end_run("FINISHED")
    if run.checkpoint is not None and not cfg.tracking.keep_checkpoints:
        run.checkpoint.unlink(missing_ok=True)
    run.claim.release(remove=True)
