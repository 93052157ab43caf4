"""The shared training loop: MLflow record, reproducibility, selection, failure states."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from harness.training.loop import train
from harness.training.resolution import resolve
from harness.training.setup import build_model, make_optimizer, make_scheduler


def run(overrides: dict, method: str = "linear_probe", **kw):
    cfg = resolve(method=method, backbone=overrides.pop("backbone", "tf_efficientnet_lite0"), overrides=overrides)
    return train(cfg, **kw), cfg


def test_run_is_fully_tracked(tiny_overrides, tmp_path):
    result, cfg = run(dict(tiny_overrides))
    client = mlflow.MlflowClient(tiny_overrides["tracking.uri"])
    r = client.get_run(result.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["method"] == "linear_probe" and r.data.params["optim.lr"] == "0.001"
    for key in (
        "test/recall_at_1",
        "test/recall_at_8",
        "test/map_at_r",
        "test/r_precision",
        "best/val_map_at_r",
        "params/trainable",
        "params/trainable_inference",
        "params/total",
        "cost/peak_memory_gb",
        "cost/throughput_img_s",
        "cost/wall_time_s",
        "cost/eval_time_s",
        "cost/eval_share",
    ):
        assert key in r.data.metrics, key
    # the fair protocol tests the selected checkpoint once: no per-epoch test, no test-selected figure
    assert "test/selected_recall_at_1" not in r.data.metrics
    assert not client.get_metric_history(result.run_id, "epoch_test/recall_at_1")
    assert 0 < r.data.metrics["cost/eval_share"] < 1
    assert r.data.params["data.pipeline"] == "cpu"  # auto resolves to what the run used
    history = client.get_metric_history(result.run_id, "val/recall_at_1")
    assert [m.step for m in history] == [1, 2]
    assert len(client.get_metric_history(result.run_id, "train/loss")) == 2
    tags = r.data.tags
    assert tags["dmlbench.weight_source"] == "random-init" and tags["git_commit"]
    assert tags["version.torch"] == torch.__version__.split("+")[0] or tags["version.torch"]
    assert tags["dmlbench.status"] == "finished"
    arts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "trainable.safetensors", "curves.png"} <= arts
    weights = load_file(client.download_artifacts(result.run_id, "trainable.safetensors", str(tmp_path)))
    # trainable weights only: the head (and the loss's proxies), never the frozen backbone
    assert weights and all(k.startswith(("head.", "criterion.")) for k in weights)
    assert sum(v.numel() for v in weights.values()) == r.data.metrics["params/trainable"]
    assert 0.0 <= r.data.metrics["test/recall_at_1"] <= 1.0
    assert r.data.metrics["params/trainable_inference"] < r.data.metrics["params/trainable"]


def test_run_follows_mlflow_conventions(tiny_overrides):
    """Namespaced metric names (the UI makes a chart section per prefix), constants as params,
    one dataset input per split with its size and digest, and system metrics when asked."""
    result, cfg = run(
        {
            **tiny_overrides,
            "tracking.system_metrics": True,
            "tracking.system_metrics_interval_s": 0.2,
            "optim.epochs": 3,
        }
    )
    r = mlflow.MlflowClient(tiny_overrides["tracking.uri"]).get_run(result.run_id)
    sections = {k.split("/", 1)[0] for k in r.data.metrics}
    assert {"train", "val", "test", "best", "params", "cost", "system"} <= sections, sections
    assert all("/" in k for k in r.data.metrics), [k for k in r.data.metrics if "/" not in k]
    assert r.data.params["data/classes_below_samples_per_class"] == "0" and "data/cache_gb" in r.data.params
    assert "mlflow.source.git.commit" in r.data.tags and r.data.tags["mlflow.note.content"]

    def by_context(run_inputs):
        return {
            {t.key: t.value for t in i.tags}["mlflow.data.context"]: (i.dataset, {t.key: t.value for t in i.tags})
            for i in run_inputs.dataset_inputs
        }

    inputs = by_context(r.inputs)
    assert set(inputs) == {"train", "val", "test"}
    train, tags = inputs["train"]
    assert train.name == "fashion_mnist/train" and int(tags["images"]) > 0 and int(tags["classes"]) > 1
    assert f'"num_rows": {tags["images"]}' in train.profile
    again, _ = run({**tiny_overrides, "optim.epochs": 1})
    other = by_context(mlflow.MlflowClient(tiny_overrides["tracking.uri"]).get_run(again.run_id).inputs)
    for split, (dataset, _) in other.items():  # the same seed sees exactly the same images
        assert dataset.digest == inputs[split][0].digest
    assert len({d.digest for d, _ in inputs.values()}) == 3


def test_same_seed_same_numbers_other_seed_differs(tiny_overrides):
    a, _ = run(dict(tiny_overrides))
    b, _ = run(dict(tiny_overrides))
    c, _ = run({**tiny_overrides, "seed": 1})
    keys = ["test/recall_at_1", "test/map_at_r", "best/val_map_at_r"]
    assert [a.metrics[k] for k in keys] == [b.metrics[k] for k in keys]
    assert [h["train/loss"] for h in a.history] == [h["train/loss"] for h in b.history]
    assert [h["train/loss"] for h in a.history] != [h["train/loss"] for h in c.history]


def test_best_validation_checkpoint_gives_test_metrics(tiny_overrides):
    result, _ = run({**tiny_overrides, "optim.epochs": 3, "eval.test_every_epoch": True})
    best = int(result.metrics["best/epoch"])
    row = next(h for h in result.history if h["epoch"] == best)
    assert row["val/recall_at_1"] == max(h["val/recall_at_1"] for h in result.history)
    assert result.metrics["test/recall_at_1"] == row["epoch_test/recall_at_1"]
    assert result.metrics["test/selected_recall_at_1"] == max(h["epoch_test/recall_at_1"] for h in result.history)


def test_test_metrics_without_per_epoch_test(tiny_overrides):
    """With test_every_epoch off (the fair protocol's default) the best checkpoint is reloaded and
    evaluated once, with the metrics the per-epoch test gave that epoch."""
    a, _ = run({**tiny_overrides, "optim.epochs": 3, "eval.test_every_epoch": True})
    b, _ = run({**tiny_overrides, "optim.epochs": 3})
    assert b.metrics["test/recall_at_1"] == pytest.approx(a.metrics["test/recall_at_1"], abs=1e-6)
    assert "test/selected_recall_at_1" not in b.metrics


def test_test_split_can_be_left_alone(tiny_overrides):
    result, _ = run({**tiny_overrides, "eval.test": False})
    assert not any(k.startswith(("test/", "epoch_test/")) for k in result.metrics)
    assert not any(k.startswith("epoch_test/") for h in result.history for k in h)
    assert "best/val_map_at_r" in result.metrics


def test_evaluate_only_with_zero_epochs(tiny_overrides):
    result, _ = run({**tiny_overrides, "optim.epochs": 0, "model.embed_dim": 0})
    assert result.metrics["params/trainable"] == 0
    assert result.metrics["best/epoch"] == 0 and "test/recall_at_1" in result.metrics


def test_cached_features_linear_probe(tiny_overrides):
    result, _ = run({**tiny_overrides, "method_args.cache_features": True})
    assert result.history[-1]["train/loss"] > 0 and math.isfinite(result.metrics["test/map_at_r"])


def test_failed_and_pruned_runs_are_marked(tiny_overrides):
    class TrialPruned(Exception):
        pass

    def prune(epoch, metrics):
        raise TrialPruned()

    def crash(epoch, metrics):
        raise RuntimeError("boom")

    with pytest.raises(TrialPruned):
        run(dict(tiny_overrides), on_epoch=prune)
    with pytest.raises(RuntimeError):
        run(dict(tiny_overrides), on_epoch=crash)
    client = mlflow.MlflowClient(tiny_overrides["tracking.uri"])
    runs = mlflow.search_runs(experiment_names=["fashion_mnist"], output_format="list")
    status = sorted((r.info.status, r.data.tags["dmlbench.status"]) for r in runs)
    assert status == [("FAILED", "failed"), ("KILLED", "pruned")]
    assert client is not None


def test_scheduler_warmup_then_cosine(tiny_overrides):
    cfg = resolve(method="full_finetune", overrides={**tiny_overrides, "optim.warmup_epochs": 1, "optim.epochs": 4})
    model = build_model(cfg, 3)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(cfg.optim.lr / 10)
    assert lrs[9] == pytest.approx(cfg.optim.lr)
    assert lrs[10] > lrs[25] > lrs[39] > 0
    assert all(b <= a + 1e-12 for a, b in zip(lrs[9:], lrs[10:]))


def test_param_groups_follow_multipliers(tiny_overrides):
    cfg = resolve(method="bitfit", overrides={**tiny_overrides, "optim.head_lr_mult": 10, "loss.lr_mult": 100})
    groups = {g["name"]: g for g in make_optimizer(build_model(cfg, 3), cfg).param_groups}
    assert groups["head"]["lr"] == pytest.approx(10 * cfg.optim.lr)
    assert groups["criterion"]["lr"] == pytest.approx(100 * cfg.optim.lr)
    assert groups["backbone"]["lr"] == pytest.approx(cfg.optim.lr)


def test_a_dataset_input_that_collides_with_another_runs_insert_is_retried(tiny_overrides, monkeypatch):
    """Two runs of one experiment logging the same split at once collide on MLflow's unique key
    (seen with two `study run` processes on an MLflow server): the input is retried, not lost."""
    from mlflow.exceptions import MlflowException

    real, calls = mlflow.log_input, []

    def collide_once(*args, **kwargs):
        calls.append(kwargs.get("context"))
        if len(calls) == 1:
            raise MlflowException("(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", collide_once)
    result, _ = run(dict(tiny_overrides))
    r = mlflow.MlflowClient(tiny_overrides["tracking.uri"]).get_run(result.run_id)
    assert calls[:2] == ["train", "train"] and len(r.inputs.dataset_inputs) == 3
