"""The one training loop every method runs through, top to bottom.

:func:`train` is the run's lifecycle: prepare everything (every input error is raised there,
before an MLflow run exists), start or continue the MLflow run, then per epoch train, evaluate
validation (and test, for the papers' test-selected figure), keep the best-validation state and
write the epoch's metrics with its checkpoint; at the end test the selected checkpoint, log the
costs and end the run. Set-up is :mod:`harness.training.setup`, one optimiser step
:mod:`harness.training.step`, what a failure becomes :mod:`harness.training.failures`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from harness import data
from harness.config import RunConfig
from harness.retrieval import FeatureCache, metric_name, transfer_metrics
from harness.runtime import interrupts, peak_memory_gb, reset_peak_memory, synchronize, system_sample
from harness.training import checkpoint, failures, runlog
from harness.training.progress import EpochProgress, plan_line
from harness.training.selection import has_test, select_and_test, selection_key
from harness.training.setup import prepare
from harness.training.state import Run, RunResult
from harness.training.step import train_step


def train(
    cfg: RunConfig,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    tags: dict[str, str] | None = None,
    nested: bool = False,
    resume: str | None = None,
    progress: bool = False,
    on_start: Callable[[str], None] | None = None,
) -> RunResult:
    """Train ``cfg.method`` and log everything to MLflow; returns the run's final metrics.

    ``resume``: the id of a killed or failed run of this config; it continues from its last
    checkpoint (the epoch after the last completed one) in the same MLflow run. ``progress``: say
    what will be trained and how long it should take, and show progress off a terminal too.
    ``on_start`` is called with the MLflow run's id as soon as it exists (a study records it on
    the trial, so a retry finds the run even when it died before its first epoch).
    """
    started = time.perf_counter()
    run = prepare(cfg)  # every input error is raised here, before an MLflow run exists
    run.progress = progress
    if progress and run.epochs:
        print(plan_line(run), flush=True)
    resumed = None
    if resume:  # claimed before it is read: two resumes of one run never both train it
        run.checkpoint, run.claim, resumed = checkpoint.claim_and_load(resume)
    run.run_id = runlog.start(cfg, tags, nested, resume)
    try:
        if on_start is not None:
            on_start(run.run_id)
        if resumed is None:
            run.checkpoint, run.claim = checkpoint.claim_new(run.checkpoints, run.run_id)
            runlog.log_start(run, tags)
        else:
            runlog.log_resumed(resume, resumed["epoch"])
        reset_peak_memory(run.device)
        if run.model.wants_feature_cache and run.model.features_are_frozen:  # the frozen features, once
            run.cache = FeatureCache(
                run.model, run.loaders, cfg.data, cfg.seed, cfg.eval.batch_size, run.device, run.amp(), run.backbone
            )
        first = run.restore(resumed) if resumed is not None else (0 if run.epochs == 0 else 1)
        for epoch in range(first, run.epochs + 1):  # epochs=0: evaluate only
            row = train_epoch(run, epoch) if epoch > 0 else {}
            evaluated = epoch % cfg.eval.every == 0 or epoch == run.epochs
            if evaluated:
                row.update(evaluate_epoch(run, epoch))
                tested = run.queries.get("test") if "epoch_test/recall_at_1" in row else None
                run.best.offer(run.model, epoch, row, selection_key(cfg), tested)
            log_epoch(run, epoch, row)
            if on_epoch is not None and evaluated:
                on_epoch(epoch, row)
        final = finish(run, started)
    except BaseException as exc:
        if run.claim is not None:
            run.claim.release()
        failures.raise_one_line(exc, run.run_id, cfg, run.completed)
    return RunResult(run.run_id, {**{k: float(v) for k, v in run.counts.items()}, **final}, run.history, cfg, run.facts)


def train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the train loader; its row of metrics (loss, extra loss terms, lr, seconds).

    Batches arrive on the device, prepared on a side stream (:class:`harness.data.Batches`), their
    rows' labels on the host. The loss stays on the device (summed there, read once per epoch),
    the interrupt check is a host flag, the schedule is host arithmetic: no per-step host-device
    sync (``tests/test_step_syncs.py`` counts them).
    """
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]
    started = time.perf_counter()
    model.train()
    data.set_epoch(run.loaders["train"], epoch)
    loss_sum = torch.zeros((), device=run.device)
    extra_sums: dict[str, torch.Tensor] = {}
    steps = images_seen = 0
    batches = run.cache.batches(run.loaders["train"]) if run.cache is not None else run.loaders["train"]
    shown = EpochProgress(batches, epoch, run.epochs, len(run.loaders["train"]), cfg.data.batch_size, run.progress)
    labels_on_host = run.splits.train.labels
    for images, labels, index in shown:
        loss, extras = train_step(
            model,
            optimizer,
            images,
            labels,
            labels_on_host[index],
            amp=run.amp,
            scaler=run.scaler,
            grad_clip=cfg.optim.grad_clip,
            trainable=trainable,
            from_features=run.cache is not None,
        )
        run.scheduler.step()
        interrupts.check()
        loss_sum += loss.detach().float()
        for k, v in extras.items():
            extra_sums[k] = extra_sums.get(k, 0.0) + v.detach().float()
        steps += 1
        images_seen += len(labels)
    synchronize(run.device)
    seconds = time.perf_counter() - started
    run.images, run.seconds = run.images + images_seen, run.seconds + seconds
    row = {"train/loss": (loss_sum / max(steps, 1)).item()}
    if not math.isfinite(row["train/loss"]):
        raise FloatingPointError(f"training loss is {row['train/loss']} at epoch {epoch}")
    row.update({f"train/{k}": (v / max(steps, 1)).item() for k, v in extra_sums.items()})
    row["train/lr"] = optimizer.param_groups[0]["lr"]
    row["train/epoch_time_s"] = seconds
    return row


def evaluate_epoch(run: Run, epoch: int) -> dict[str, float]:
    """Validation metrics, and test metrics when tested every epoch (or before training)."""
    cfg, row = run.cfg, {}
    if run.splits.val is not None:
        row.update({f"val/{metric_name(k)}": v for k, v in run.evaluate("val").items()})
    if has_test(run.cfg, run.splits) and (cfg.eval.test_every_epoch or epoch == 0):
        row.update({f"epoch_test/{metric_name(k)}": v for k, v in run.evaluate("test").items()})
    return row


def log_epoch(run: Run, epoch: int, row: dict[str, float]) -> None:
    """The epoch's metrics and, once trained, its checkpoint: together or not at all."""
    import mlflow

    run.history.append({"epoch": float(epoch), **row})
    started = time.perf_counter()
    sample = system_sample(run.device) if run.cfg.tracking.system_metrics and epoch > 0 else {}
    with interrupts.held():  # a logged epoch has its checkpoint: a signal waits for both
        mlflow.log_metrics({**row, **sample}, step=epoch)
        if epoch > 0:
            checkpoint.save(run.checkpoint, run.snapshot(epoch))
    run.log_seconds += time.perf_counter() - started


def finish(run: Run, started: float) -> dict[str, float]:
    """Test the selected checkpoint (and transfer), log the costs and end the run FINISHED."""
    selected = select_and_test(run)
    final = selected.metrics
    queries = {"test": selected.queries} if selected.queries is not None else {}
    transferred: dict = {}
    final.update(
        transfer_metrics(
            run.model,
            run.transfer,
            selected.state,
            merged=selected.merged,
            amp=run.amp(),
            device=run.device,
            cache_dir=run.checkpoints / "transfer",
            queries=transferred,
        )
    )
    queries.update({f"transfer_{name}": scored for name, scored in transferred.items()})
    synchronize(run.device)
    wall = time.perf_counter() - started
    final.update(
        {
            "cost/peak_memory_gb": peak_memory_gb(run.device),
            "cost/throughput_img_s": run.images / run.seconds if run.seconds else 0.0,
            "cost/train_images": float(run.images),
            "cost/wall_time_s": wall,
            "cost/eval_time_s": run.eval_seconds,
            "cost/log_time_s": run.log_seconds,
            "cost/eval_share": run.eval_seconds / wall if wall > 0 else 0.0,
        }
    )
    # what actually decoded each split (nvjpeg, cpu, cpu-fallback, in-memory): never silent
    run.facts.update({f"data/decoder/{name}": batches.decoders() for name, batches in run.loaders.items()})
    if run.model.merges_on_test and has_test(run.cfg, run.splits):  # a constant: a param, not a chart
        run.facts["model/merged"] = selected.merged
    runlog.log_finish(run, final, queries)
    return final
