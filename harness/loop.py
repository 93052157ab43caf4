"""The one training loop every method runs through, top to bottom.

data -> backbone -> method model -> optimiser/schedule -> per epoch: train, evaluate validation
(and test, for the papers' test-selected figure) -> best-validation checkpoint -> MLflow.
Everything that can be wrong with the input is checked before the MLflow run starts.
"""
from __future__ import annotations

import math
import os
import random
import resource
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from harness import data, tracking
from harness.backbones import Backbone, create_backbone
from harness.config import RunConfig, flatten, to_dict, to_yaml
from harness.metrics import evaluate_retrieval
from harness.model import BuildContext, DMLModel
from harness.registry import get_method


@dataclass
class RunResult:
    run_id: str
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    config: RunConfig | None = None


# ----------------------------------------------------------------------------- set-up


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def build_model(cfg: RunConfig, num_classes: int, backbone: Backbone | None = None) -> DMLModel:
    """Backbone with its weights, then the method's builder (seeded, so heads init the same)."""
    if backbone is None:
        backbone = create_backbone(
            cfg.backbone,
            pretrained=cfg.model.pretrained,
            weights=cfg.model.weights,
            kwargs=cfg.model.backbone_kwargs,
        )
    torch.manual_seed(cfg.seed)
    spec = get_method(cfg.method)
    return spec.builder(BuildContext(backbone=backbone, num_classes=num_classes, cfg=cfg), cfg.method_args)


def make_optimizer(model: DMLModel, cfg: RunConfig) -> torch.optim.Optimizer | None:
    groups = [g for g in model.param_groups(cfg.optim, cfg.loss) if g["params"]]
    if not groups:
        return None
    for g in groups:
        g.setdefault("schedule", cfg.optim.schedule)
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multipliers: linear warmup, then each group's schedule (cosine, step or constant)."""
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    period = max(1, (cfg.optim.cosine_epochs or cfg.optim.epochs) * steps_per_epoch - warmup)

    def factor(kind: str) -> Callable[[int], float]:
        def f(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if kind == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / period)))
            if kind == "step":
                return cfg.optim.step_gamma ** ((step // steps_per_epoch) // cfg.optim.step_epochs)
            return 1.0

        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["schedule"]) for g in optimizer.param_groups])


# ----------------------------------------------------------------------------- measurement


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: max allocated tensor memory; CPU: process peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def autocast_for(device: torch.device, enabled: bool) -> Callable[[], Any]:
    """A factory of bf16 autocast contexts on CUDA (when enabled), else of no-op contexts."""
    if enabled and device.type == "cuda":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def embed(model: DMLModel, loader: torch.utils.data.DataLoader, device: torch.device, amp: Any, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    embeddings, labels = [], []
    for images, y, _ in tqdm(loader, desc=desc, leave=False, disable=None):
        with amp:
            embeddings.append(model(images.to(device, non_blocking=True)).float())
        labels.append(y)
    return torch.cat(embeddings), torch.cat(labels).to(device)


def evaluate(model: DMLModel, loaders: dict, device: torch.device, amp: Any, ks: tuple[int, ...], split: str) -> dict[str, float]:
    """Retrieval metrics of ``split``: self-retrieval, or query vs gallery for In-Shop."""
    if split == "test" and "query" in loaders:
        q, ql = embed(model, loaders["query"], device, amp, "query")
        g, gl = embed(model, loaders["gallery"], device, amp, "gallery")
        return evaluate_retrieval(q, ql, g, gl, ks=ks)
    e, el = embed(model, loaders[split], device, amp, split)
    return evaluate_retrieval(e, el, ks=ks)


def metric_name(key: str) -> str:
    """MLflow forbids '@': ``recall@1 -> recall_at_1``."""
    return key.replace("@", "_at_")


# ----------------------------------------------------------------------------- feature cache


class FeatureCache:
    """Frozen features computed once (linear probe): training and evaluation reuse them."""

    def __init__(self, model: DMLModel, splits: data.Splits, cfg: RunConfig, device: torch.device, amp: Any, backbone: Backbone) -> None:
        self.features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        transform = data.make_transform(cfg, backbone.mean, backbone.std, train=False)
        model.eval()
        for name in ("train", "val", "test", "query", "gallery"):
            table = getattr(splits, name)
            if table is None:
                continue
            loader = torch.utils.data.DataLoader(
                data.ImageDataset(table, transform, 0, cfg.data.crop_to_box), batch_size=cfg.eval.batch_size,
                num_workers=data.loader_workers(cfg.data.num_workers), pin_memory=device.type == "cuda",
            )
            feats, labels = [], []
            with torch.inference_mode():
                for images, y, _ in tqdm(loader, desc=f"features {name}", leave=False, disable=None):
                    with amp:
                        feats.append(model.features(images.to(device, non_blocking=True)).float())
                    labels.append(y)
            self.features[name] = (torch.cat(feats), torch.cat(labels).to(device))

    def batches(self, loader: torch.utils.data.DataLoader):
        """The training sampler's batches as (None, labels, indices): no image is decoded."""
        labels = self.features["train"][1]
        for idx in loader.batch_sampler:
            index = torch.as_tensor(idx, device=labels.device)
            yield None, labels[index], index

    def evaluate(self, model: DMLModel, ks: tuple[int, ...], split: str) -> dict[str, float]:
        model.eval()

        def emb(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            feats, labels = self.features[name]
            with torch.inference_mode():
                return torch.nn.functional.normalize(model.head(feats).float(), dim=-1), labels

        if split == "test" and "query" in self.features:
            return evaluate_retrieval(*emb("query"), *emb("gallery"), ks=ks)
        return evaluate_retrieval(*emb(split), ks=ks)


# ----------------------------------------------------------------------------- the loop


def train(
    cfg: RunConfig,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    tags: dict[str, str] | None = None,
    nested: bool = False,
) -> RunResult:
    """Train ``cfg.method`` and log everything to MLflow; returns the run's final metrics."""
    import mlflow  # imported here so the benchmark runs where MLflow is not installed

    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)

    # -- everything that can fail on bad input happens before the MLflow run exists
    splits = data.load_splits(cfg)
    if cfg.data.verify_images:
        data.verify_splits(splits)
    backbone = create_backbone(
        cfg.backbone, pretrained=cfg.model.pretrained, weights=cfg.model.weights, kwargs=cfg.model.backbone_kwargs
    )
    model = build_model(cfg, splits.train.num_classes, backbone).to(device)
    tracking.configure(cfg.tracking.uri, cfg.tracking.experiment or cfg.dataset)
    loaders = data.make_loaders(splits, cfg, backbone.mean, backbone.std, device.type)
    ks = tuple(cfg.eval.ks) or tuple(splits.ks)
    amp = autocast_for(device, cfg.optim.amp)
    if cfg.optim.epochs == 0:  # evaluate only: nothing is trained, so nothing counts as trainable
        for p in model.parameters():
            p.requires_grad_(False)
    counts = model.count_parameters()
    optimizer = make_optimizer(model, cfg)
    epochs = cfg.optim.epochs if optimizer is not None else 0
    steps_per_epoch = len(loaders["train"])
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch) if optimizer else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    cache_features = bool(getattr(cfg.method_args, "cache_features", False)) and model.features_are_frozen

    run_name = cfg.tracking.run_name or f"{cfg.method}-{cfg.backbone}-s{cfg.seed}"
    run = mlflow.start_run(run_name=run_name, nested=nested)
    history: list[dict[str, float]] = []
    try:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(to_dict(cfg)).items()})
        mlflow.set_tags(
            {
                **tracking.environment_tags(),
                "dmlbench.method": cfg.method,
                "dmlbench.dataset": cfg.dataset,
                "dmlbench.backbone": cfg.backbone,
                "dmlbench.weight_source": backbone.weight_source,
                "dmlbench.device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                "dmlbench.status": "running",
                **(tags or {}),
            }
        )
        mlflow.log_text(to_yaml(cfg), "config.yaml")
        mlflow.log_metrics({k: float(v) for k, v in counts.items()})
        reset_peak_memory(device)

        cache = FeatureCache(model, splits, cfg, device, amp(), backbone) if cache_features else None

        def run_eval(split: str) -> dict[str, float]:
            if cache is not None:
                return cache.evaluate(model, ks, split)
            return evaluate(model, loaders, device, amp(), ks, split)

        has_val = splits.val is not None
        has_test = cfg.eval.test and (splits.test is not None or splits.query is not None)
        select_key = cfg.eval.select
        best_score, best_epoch, best_state = -math.inf, 0, None
        train_images, train_seconds = 0, 0.0

        for epoch in range(0 if epochs == 0 else 1, epochs + 1):  # epochs=0: evaluate only
            row: dict[str, float] = {}
            if epoch > 0:
                t_epoch = time.perf_counter()
                model.train()
                data.set_epoch(loaders["train"], epoch)
                loss_sum = torch.zeros((), device=device)
                extra_sums: dict[str, torch.Tensor] = {}
                steps = 0
                batches = cache.batches(loaders["train"]) if cache is not None else loaders["train"]
                for images, labels, index in tqdm(batches, desc=f"epoch {epoch}/{epochs}", leave=False, disable=None):
                    labels = labels.to(device, non_blocking=True)
                    if cache is not None:
                        feats = cache.features["train"][0][index]
                        with amp():
                            loss = model.loss_from_features(feats, labels)
                        extras = {}
                    else:
                        images = images.to(device, non_blocking=True)
                        with amp():
                            loss, extras = model.training_loss(images, labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.optim.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    model.after_step()
                    loss_sum += loss.detach().float()
                    for k, v in extras.items():
                        extra_sums[k] = extra_sums.get(k, 0.0) + v.detach().float()
                    steps += 1
                    train_images += len(labels)
                synchronize(device)
                epoch_seconds = time.perf_counter() - t_epoch
                train_seconds += epoch_seconds
                row["train_loss"] = (loss_sum / max(steps, 1)).item()
                if not math.isfinite(row["train_loss"]):
                    raise FloatingPointError(f"training loss is {row['train_loss']} at epoch {epoch}")
                row.update({k: (v / max(steps, 1)).item() for k, v in extra_sums.items()})
                row["lr"] = optimizer.param_groups[0]["lr"]
                row["epoch_time_s"] = epoch_seconds
            evaluated = epoch % cfg.eval.every == 0 or epoch == epochs
            if evaluated and has_val:
                row.update({f"val_{metric_name(k)}": v for k, v in run_eval("val").items()})
            if evaluated and has_test and (cfg.eval.test_every_epoch or epoch == 0):
                row.update({f"epoch_test_{metric_name(k)}": v for k, v in run_eval("test").items()})
            score = row.get(f"val_{metric_name(select_key)}", float(epoch))  # no val split: last epoch
            if evaluated and score > best_score:
                best_score, best_epoch = score, epoch
                best_state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
            history.append({"epoch": float(epoch), **row})
            mlflow.log_metrics(row, step=epoch)
            if on_epoch is not None and evaluated:
                on_epoch(epoch, row)

        # -- final test metrics of the best-validation checkpoint
        best = next(h for h in history if h["epoch"] == best_epoch)
        final: dict[str, float] = {"best_epoch": float(best_epoch)}
        if has_val:
            final["best_val_recall_at_1"] = best["val_recall_at_1"]
            final["best_val_map_at_r"] = best["val_map_at_r"]
        if has_test:
            if "epoch_test_recall_at_1" in best:
                test = {k.removeprefix("epoch_test_"): v for k, v in best.items() if k.startswith("epoch_test_")}
            else:
                model.load_trainable_state_dict(best_state)
                test = {metric_name(k): v for k, v in run_eval("test").items()}
            final.update({f"test_{k}": v for k, v in test.items()})
            tested = [h for h in history if "epoch_test_recall_at_1" in h]
            if tested:
                top = max(tested, key=lambda h: h["epoch_test_recall_at_1"])
                final["test_selected_recall_at_1"] = top["epoch_test_recall_at_1"]
                final["test_selected_epoch"] = top["epoch"]
        synchronize(device)
        final.update(
            {
                "peak_memory_gb": peak_memory_gb(device),
                "throughput_img_s": train_images / train_seconds if train_seconds else 0.0,
                "wall_time_s": time.perf_counter() - t_start,
                **{k: float(v) for k, v in counts.items()},
            }
        )
        mlflow.log_metrics(final)
        if cfg.tracking.log_artifacts:
            log_artifacts(best_state or {}, history)
        mlflow.set_tag("dmlbench.status", "finished")
        mlflow.end_run("FINISHED")
    except BaseException as exc:
        pruned = type(exc).__name__ == "TrialPruned"
        mlflow.set_tag("dmlbench.status", "pruned" if pruned else "failed")
        if not pruned:
            mlflow.set_tag("dmlbench.error", f"{type(exc).__name__}: {exc}"[:500])
        mlflow.end_run("KILLED" if pruned else "FAILED")
        raise
    return RunResult(run_id=run.info.run_id, metrics=final, history=history, config=cfg)


def log_artifacts(state: dict[str, torch.Tensor], history: list[dict[str, float]]) -> None:
    """Trainable weights only (safetensors) and a curves figure."""
    import mlflow
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "trainable.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(weights))
        mlflow.log_artifact(str(weights))
        curves = Path(tmp) / "curves.png"
        plot_curves(history, curves)
        mlflow.log_artifact(str(curves))


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    epochs = [h["epoch"] for h in history if "train_loss" in h]
    axes[0].plot(epochs, [h["train_loss"] for h in history if "train_loss" in h], marker="o")
    axes[0].set(title="training loss", xlabel="epoch")
    for key, label in (("val_recall_at_1", "val R@1"), ("val_map_at_r", "val MAP@R"), ("epoch_test_recall_at_1", "test R@1")):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=label)
    axes[1].set(title="retrieval", xlabel="epoch")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
