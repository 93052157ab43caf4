"""The one training loop every method runs through, top to bottom.

data -> backbone -> method model -> optimiser/schedule -> per epoch: train, evaluate validation
(and test, for the papers' test-selected figure), keep the best-validation state -> final
metrics -> MLflow. Everything that can be wrong with the input is checked in :func:`prepare`,
before the MLflow run starts. The steps are small functions below :func:`train`; set-up lives in
:mod:`harness.training.setup`, evaluation in :mod:`harness.retrieval.evaluation`.
"""
from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness import data
from harness.training import checkpoint
from harness.runtime import interrupts
from harness.retrieval import transfer
from harness.models.backbones import Backbone, create_backbone
from harness.config import RunConfig
from harness.retrieval.evaluation import FeatureCache, evaluate, metric_name
from harness.runtime import (
    autocast_for,
    grad_scaler_for,
    peak_memory_gb,
    reset_peak_memory,
    synchronize,
    system_sample,
)
from harness.models.model import DMLModel
from harness.training.progress import EpochProgress, plan_line
from harness.training.selection import Best, final_metrics, has_test, selection_key
from harness.training.setup import build_model, make_optimizer, make_scheduler, prepare_for_device, train_step
from harness.runtime import pick_device, seed_everything
from harness.errors import (
    DiskFull,
    RunInterrupted,
    StoreUnavailable,
    TrainingDiverged,
    UserError,
    caused_by_interrupt,
    disk_full,
    interrupt_in,
    server_unreachable,
)
from harness.tracking import store as tracking
from harness.tracking.artifacts import log_artifacts
from harness.training.runlog import log_run_start


@dataclass
class RunResult:
    run_id: str
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    config: RunConfig | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # the run's constants, logged as params


@dataclass
class Run:
    """Everything :func:`prepare` built: the run's data, model and optimisation state."""

    cfg: RunConfig
    device: torch.device
    splits: data.Splits
    backbone: Backbone
    model: DMLModel
    loaders: dict[str, Any]
    ks: tuple[int, ...]
    amp: Callable[[], Any]
    counts: dict[str, float]  # parameter counts: metrics, logged once, so runs sort by them
    facts: dict[str, Any]  # constants of the run's data: params (not charted)
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    epochs: int
    scaler: torch.amp.GradScaler | None = None  # optim.amp=fp16 on CUDA
    transfer: list = field(default_factory=list)  # eval.transfer's datasets (harness.retrieval.transfer)
    checkpoints: Path = Path("checkpoints")  # the folder of the run's per-epoch checkpoint
    cache: FeatureCache | None = None

    progress: bool = False  # progress lines off a terminal (dmlbench train)
    eval_seconds: float = 0.0  # wall time spent embedding and scoring splits (cost/eval_share)
    log_seconds: float = 0.0  # per-epoch MLflow logging and checkpointing

    def evaluate(self, split: str) -> dict[str, float]:
        started = time.perf_counter()
        if self.cache is not None:
            metrics = self.cache.evaluate(self.model, self.ks, split)
        else:
            metrics = evaluate(self.model, self.loaders, self.amp(), self.ks, split)
        self.eval_seconds += time.perf_counter() - started  # the metrics are host floats: synced
        return metrics


def train(
    cfg: RunConfig,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    tags: dict[str, str] | None = None,
    nested: bool = False,
    resume: str | None = None,
    progress: bool = False,
) -> RunResult:
    """Train ``cfg.method`` and log everything to MLflow; returns the run's final metrics.

    ``resume``: the id of a killed or failed run of this config; it continues from its last
    checkpoint (the epoch after the last completed one) in the same MLflow run. ``progress``: say
    what will be trained and how long it should take, and show progress off a terminal too.
    """
    import mlflow  # imported here so the benchmark runs where MLflow is not installed

    t_start = time.perf_counter()
    run = prepare(cfg)  # every input error is raised here, before an MLflow run exists
    run.progress = progress
    if progress and run.epochs:
        print(plan_line(run), flush=True)
    ckpt_path = resumed = claim = None
    if resume:  # claimed before it is read: two resumes of one run never both train it
        ckpt_path = checkpoint.locate(mlflow.get_run(resume).data.tags.get("dmlbench.checkpoint", ""),
                                      mlflow.get_tracking_uri())
        claim = checkpoint.Claim(ckpt_path, resume)
        try:
            resumed = checkpoint.load(ckpt_path, resume)
        except UserError:
            claim.release()
            raise
    # the identifying tags go in with the run itself: a kill right after start_run leaves a run
    # that study recovery can still find by its tags
    if cfg.tracking.system_metrics:  # CPU/GPU utilisation and memory under system/ in the UI
        mlflow.set_system_metrics_sampling_interval(cfg.tracking.system_metrics_interval_s)
        # ERROR: no start/stop lines, and no sampler warning racing the one-line message when the
        # server dies (the run's own writes report that failure, tests/test_server_faults.py)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    system = {"log_system_metrics": cfg.tracking.system_metrics}
    mlflow_run = mlflow.start_run(run_id=resume, nested=nested, **system) if resume else mlflow.start_run(
        run_name=cfg.tracking.run_name or f"{cfg.method}-{cfg.backbone}-s{cfg.seed}", nested=nested,
        tags={**(tags or {}), "dmlbench.status": "running"}, **system)
    history: list[dict[str, float]] = []
    try:
        if resumed is None:
            ckpt_path = run.checkpoints / f"{mlflow_run.info.run_id}.pt"
            claim = checkpoint.Claim(ckpt_path, mlflow_run.info.run_id)
            log_run_start(run, tags)
            mlflow.set_tag("dmlbench.checkpoint", checkpoint.tag_value(ckpt_path, mlflow.get_tracking_uri()))
        else:  # the error of the attempt that failed belongs to that attempt, not to this run
            tracking.retried(lambda: mlflow.MlflowClient().delete_tag(resume, "dmlbench.error")
                             if "dmlbench.error" in mlflow.get_run(resume).data.tags else None)
        mlflow.set_tag("dmlbench.status", "running")
        reset_peak_memory(run.device)
        if getattr(cfg.method_args, "cache_features", False) and run.model.features_are_frozen:
            run.cache = FeatureCache(run.model, run.loaders, cfg, run.device, run.amp(), run.backbone)
        best = Best()
        train_images, train_seconds, first = 0, 0.0, 0 if run.epochs == 0 else 1
        if resumed is not None:
            history, train_images, train_seconds = resumed["history"], resumed["images"], resumed["seconds"]
            best = Best(resumed["best_score"], resumed["best_epoch"], resumed["best_state"] or None)
            restore(run, resumed)
            first = resumed["epoch"] + 1
        for epoch in range(first, run.epochs + 1):  # epochs=0: evaluate only
            row: dict[str, float] = {}
            if epoch > 0:
                images, seconds, row = train_epoch(run, epoch)
                train_images, train_seconds = train_images + images, train_seconds + seconds
            evaluated = epoch % cfg.eval.every == 0 or epoch == run.epochs
            if evaluated:
                row.update(evaluate_epoch(run, epoch))
                best.offer(run.model, epoch, row, selection_key(cfg))
            history.append({"epoch": float(epoch), **row})
            logged = time.perf_counter()
            sample = system_sample(run.device) if cfg.tracking.system_metrics and epoch > 0 else {}
            with interrupts.held():  # a logged epoch has its checkpoint: a signal waits for both
                mlflow.log_metrics({**row, **sample}, step=epoch)
                if epoch > 0:
                    checkpoint.save(ckpt_path, snapshot(run, epoch, history, best, train_images, train_seconds))
            run.log_seconds += time.perf_counter() - logged
            if on_epoch is not None and evaluated:
                on_epoch(epoch, row)
        final = final_metrics(run, history, best)
        final.update(transfer.transfer_metrics(run, best.state, merged=bool(final.get("model/merged"))))
        synchronize(run.device)
        wall = time.perf_counter() - t_start
        final.update({
            "cost/peak_memory_gb": peak_memory_gb(run.device),
            "cost/throughput_img_s": train_images / train_seconds if train_seconds else 0.0,
            "cost/train_images": float(train_images),
            "cost/wall_time_s": wall,
            "cost/eval_time_s": run.eval_seconds,
            "cost/log_time_s": run.log_seconds,
            "cost/eval_share": run.eval_seconds / wall if wall > 0 else 0.0,
        })
        # what actually decoded each split (nvjpeg, cpu, cpu-fallback, in-memory): never silent
        run.facts.update({f"data/decoder/{name}": batches.decoders() for name, batches in run.loaders.items()})
        if "model/merged" in final:  # a constant: a param, not a one-bar chart
            run.facts["model/merged"] = bool(final.pop("model/merged"))
        mlflow.log_params({k: v for k, v in run.facts.items() if k.startswith(("data/decoder/", "model/"))})
        mlflow.log_metrics(final)
        if cfg.tracking.log_artifacts:
            log_artifacts(best.state or {}, history, weights=cfg.tracking.log_weights,
                          title=f"{mlflow_run.info.run_name}: {cfg.method} on {cfg.dataset} ({cfg.backbone})")
        mlflow.set_tag("dmlbench.status", "finished")
        mlflow.end_run("FINISHED")
        if ckpt_path is not None and not cfg.tracking.keep_checkpoints:
            ckpt_path.unlink(missing_ok=True)
        claim.release(remove=True)
    except BaseException as exc:
        if claim is not None:
            claim.release()
        if caused_by_interrupt(exc) and not isinstance(exc, KeyboardInterrupt):
            exc = interrupt_in(exc)  # a clean-up failed under Ctrl-C/SIGTERM: still that interrupt
        where = f"run {mlflow_run.info.run_id} ({cfg.method} on {cfg.dataset})"
        if (gone := server_unreachable(exc)) is not None and mlflow.get_tracking_uri().startswith("http"):
            tracking.abandon_active_run()
            raise StoreUnavailable(
                f"the MLflow server {mlflow.get_tracking_uri()} stopped answering ({gone}) in {where}; the run shows "
                f"RUNNING there and its checkpoint is kept: once the server is back, continue it with: "
                f"{resume_command(mlflow_run.info.run_id, cfg)}") from None
        full = disk_full(exc)
        try:
            tracking.end_failed_run(exc)
        except Exception as end_exc:  # noqa: BLE001 - a full disk can hold the store too
            if full is None and disk_full(end_exc) is None:
                raise
            raise DiskFull(f"no space left on device ({full or disk_full(end_exc)}) in {where}; the store could "
                           f"not record it, so the run shows RUNNING: free space, then continue it with: "
                           f"{resume_command(mlflow_run.info.run_id, cfg)}") from None
        if full is not None:
            raise DiskFull(f"no space left on device ({full}) in {where}; nothing partial was kept and the run is "
                           f"FAILED: free space, then continue it with: {resume_command(mlflow_run.info.run_id, cfg)}"
                           ) from None
        if isinstance(exc, FloatingPointError):
            raise TrainingDiverged(f"training diverged: {exc} in {where}; the run is FAILED in MLflow "
                                   "(tag dmlbench.error); lower optim.lr or set optim.grad_clip") from exc
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted):
            done = max((int(h["epoch"]) for h in history), default=0)
            signal_name = "terminated (SIGTERM)" if interrupts.exit_code(exc) == 143 else "interrupted"
            raise RunInterrupted(
                f"{signal_name} {where} after {done} completed epoch(s); the run is KILLED in MLflow with the "
                f"metrics of those epochs; continue it with: {resume_command(mlflow_run.info.run_id, cfg)}",
                terminated=interrupts.exit_code(exc) == 143) from None
        raise
    metrics = {**{k: float(v) for k, v in run.counts.items()}, **final}
    return RunResult(run_id=mlflow_run.info.run_id, metrics=metrics, history=history, config=cfg, facts=run.facts)


# ----------------------------------------------------------------------------- steps


def prepare(cfg: RunConfig) -> Run:
    """Data, backbone, model, loaders, optimiser and schedule; raises on any bad input."""
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    splits = data.load_splits(cfg)
    if cfg.data.verify_images:
        data.verify_splits(splits)
    backbone = create_backbone(
        cfg.backbone, pretrained=cfg.model.pretrained, weights=cfg.model.weights, kwargs=cfg.model.backbone_kwargs
    )
    transfers = transfer.prepare(cfg, backbone, device)  # copies the backbone before the method changes it
    model = prepare_for_device(build_model(cfg, splits.train.num_classes, backbone).to(device), cfg, device)
    tracking.configure(cfg.tracking.uri, cfg.tracking.experiment or cfg.dataset)
    checkpoints = checkpoint.checkpoint_dir(mlflow_uri(), cfg.tracking.checkpoint_dir)
    checkpoint.ensure_writable(checkpoints)  # not after the first epoch, with a run half-made
    cfg.data.pipeline = data.resolve_pipeline(cfg.data.pipeline, device)  # the run records what it used
    loaders = data.make_loaders(splits, cfg, backbone.mean, backbone.std, device)
    for batches in loaders.values():  # batches arrive in the model's memory layout
        batches.channels_last = model.channels_last
    if cfg.optim.epochs == 0:  # evaluate only: nothing is trained, so nothing counts as trainable
        for p in model.parameters():
            p.requires_grad_(False)
    counts = model.count_parameters()
    m = cfg.data.samples_per_class  # classes smaller than m are sampled with replacement: say so
    small = int((np.bincount(splits.train.labels) < m).sum()) if m else 0
    facts = {"data/classes_below_samples_per_class": small}
    if small:
        warnings.warn(f"{small} training classes have fewer than data.samples_per_class={m} images; "
                      "their images are drawn with replacement (logged as data/classes_below_samples_per_class)")
    backbone_params = sum(p.numel() for p in backbone.model.parameters())
    for key in ("params/trainable", "params/trainable_inference"):  # share of the backbone's size
        counts[f"{key}_share"] = counts[key] / backbone_params
    # what data.cache_images costs: the encoded files held in memory (0 without the cache), and
    # the decoded pixels the device pipeline keeps on the device
    facts["data/cache_gb"] = round(sum(getattr(ld.dataset, "cache_bytes", 0) for ld in loaders.values()) / 1e9, 3)
    facts["data/pixel_cache_gb"] = round(sum(ld.pixels.nbytes for ld in loaders.values() if ld.pixels) / 1e9, 3)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(loaders["train"])) if optimizer else None
    return Run(
        cfg=cfg, device=device, splits=splits, backbone=backbone, model=model, loaders=loaders,
        ks=tuple(cfg.eval.ks) or tuple(splits.ks), amp=autocast_for(device, cfg.optim.amp), counts=counts,
        facts=facts,
        optimizer=optimizer, scheduler=scheduler, epochs=cfg.optim.epochs if optimizer is not None else 0,
        checkpoints=checkpoints, scaler=grad_scaler_for(device, cfg.optim.amp) if optimizer else None,
        transfer=transfers,
    )


def mlflow_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def resume_command(run_id: str, cfg: RunConfig) -> str:
    """The exact command that continues ``run_id`` (with the store when one was given)."""
    uri = cfg.tracking.uri
    return f"dmlbench train --resume {run_id}" + (f" --tracking-uri {uri}" if uri else "")


def snapshot(run: Run, epoch: int, history: list, best: "Best", images: int, seconds: float) -> dict[str, Any]:
    """Everything the next epoch depends on (see :mod:`harness.training.checkpoint`)."""
    return {
        "epoch": epoch, "history": history, "images": images, "seconds": seconds,
        "model": {k: v.detach().cpu() for k, v in run.model.trainable_state_dict().items()},
        "model_extra": run.model.resume_state(),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else {},
        "rng": checkpoint.rng_state(run.loaders["train"].generator),
        "best_score": best.score, "best_epoch": best.epoch,
        "best_state": {k: v.cpu() for k, v in (best.state or {}).items()},
    }


def restore(run: Run, state: dict[str, Any]) -> None:
    """Load a :func:`snapshot` into the freshly prepared run."""
    run.model.load_trainable_state_dict({k: v.to(run.device) for k, v in state["model"].items()})
    run.model.load_resume_state(state.get("model_extra", {}))
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"], run.loaders["train"].generator)


def train_epoch(run: Run, epoch: int) -> tuple[int, float, dict[str, float]]:
    """One pass over the train loader: ``(images seen, seconds, metrics row)``.

    Batches arrive on the device, prepared on a side stream (:class:`harness.data.Batches`). The
    loss stays on the device (summed there, read once per epoch), the interrupt check is a host
    flag, the schedule is host arithmetic: no per-step host-device sync
    (``tests/test_step_syncs.py`` counts them).
    """
    cfg, model, device, optimizer = run.cfg, run.model, run.device, run.optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]
    t_epoch = time.perf_counter()
    model.train()
    data.set_epoch(run.loaders["train"], epoch)
    loss_sum = torch.zeros((), device=device)
    extra_sums: dict[str, torch.Tensor] = {}
    steps = images_seen = 0
    batches = run.cache.batches(run.loaders["train"]) if run.cache is not None else run.loaders["train"]
    shown = EpochProgress(batches, epoch, run.epochs, len(run.loaders["train"]), cfg.data.batch_size, run.progress)
    train_labels = run.splits.train.labels  # host labels of the batch's rows: no device read
    from_features = run.cache is not None
    for images, labels, index in shown:
        loss, extras = train_step(model, optimizer, images, labels, train_labels[index], amp=run.amp,
                                  scaler=run.scaler, grad_clip=cfg.optim.grad_clip, trainable=trainable,
                                  from_features=from_features)
        run.scheduler.step()
        interrupts.check()
        loss_sum += loss.detach().float()
        for k, v in extras.items():
            extra_sums[k] = extra_sums.get(k, 0.0) + v.detach().float()
        steps += 1
        images_seen += len(labels)
    synchronize(device)
    seconds = time.perf_counter() - t_epoch
    row = {"train/loss": (loss_sum / max(steps, 1)).item()}
    if not math.isfinite(row["train/loss"]):
        raise FloatingPointError(f"training loss is {row['train/loss']} at epoch {epoch}")
    row.update({f"train/{k}": (v / max(steps, 1)).item() for k, v in extra_sums.items()})
    row["train/lr"] = optimizer.param_groups[0]["lr"]
    row["train/epoch_time_s"] = seconds
    return images_seen, seconds, row


def evaluate_epoch(run: Run, epoch: int) -> dict[str, float]:
    """Validation metrics, and test metrics when tested every epoch (or before training)."""
    cfg, splits, row = run.cfg, run.splits, {}
    if splits.val is not None:
        row.update({f"val/{metric_name(k)}": v for k, v in run.evaluate("val").items()})
    if has_test(run) and (cfg.eval.test_every_epoch or epoch == 0):
        row.update({f"epoch_test/{metric_name(k)}": v for k, v in run.evaluate("test").items()})
    return row


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
