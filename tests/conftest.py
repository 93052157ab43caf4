"""Shared fixtures: tiny, fast runs on the real Fashion-MNIST and random-init backbones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# tiny shapes and `pytest -n 2` on 2 cores: one thread per process avoids oversubscription, which
# made small convolutions several times slower. Set before torch loads, and in the environment so
# every subprocess a test starts (dmlbench commands, servers, the GPU-window script) inherits it:
# two workers each running a 2-thread subprocess spun OpenMP threads against each other (the
# toy GPU-window test took 173 s in the suite and 34 s alone).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow sqlite store (creating one costs seconds; copying is free)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch, _mlflow_template) -> str:
    """A private MLflow store per test, so tests never touch the user's mlflow.db."""
    import mlflow

    path = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_template, path)
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # an earlier test's set_tracking_uri would win over the variable
    yield uri
    mlflow.set_tracking_uri(None)


TINY = {
    "dataset": "fashion_mnist",
    "data.image_size": 32,
    "data.resize_size": 32,
    "data.max_per_class": 32,
    "data.batch_size": 48,
    "data.samples_per_class": 16,
    "data.num_workers": 0,
    "model.pretrained": False,
    "model.embed_dim": 32,
    "optim.epochs": 2,
    "optim.warmup_epochs": 0,
    "optim.lr": 1e-3,
    "eval.batch_size": 128,
    "tracking.log_artifacts": True,
    "tracking.system_metrics": False,  # one test turns them on; a sampler thread per run is noise here
}

TINY_VIT = {"model.backbone_kwargs": {"img_size": 32, "depth": 2}}


@pytest.fixture
def tiny_overrides(tracking_uri) -> dict:
    """Run-config overrides for a run of a few seconds (CNN backbone: resnet18-sized or smaller)."""
    return {**TINY, "tracking.uri": tracking_uri}


@pytest.fixture
def tiny_vit_overrides(tracking_uri) -> dict:
    """Same for a 2-block ViT-S at 32 px (6 heads, qkv bias): use backbone vit_small_patch16_224."""
    return {**TINY, **TINY_VIT, "tracking.uri": tracking_uri}
