"""MLflow plumbing: where the store lives, what every run records about its environment."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sqlite3
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from harness.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or ``sqlite:///<repo>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def resolve_uri(uri: str = "") -> str:
    return uri or default_tracking_uri()


def check_writable(uri: str) -> None:
    """Fail before any run starts when a local store cannot be written."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
            return
        path = Path(uri.removeprefix("sqlite:///"))  # four slashes = absolute path
        target = path if path.exists() else path.parent
        if not target.exists() or not os.access(target, os.W_OK):
            raise UserError(f"cannot write MLflow store {uri}: {target} is not writable (use --tracking-uri)")
        if path.exists():
            try:
                sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute("select 1").close()
            except sqlite3.Error as exc:
                raise UserError(f"cannot open MLflow store {uri}: {exc}") from None
    elif parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri)
        probe = path
        while not probe.exists():
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            raise UserError(f"cannot write MLflow store {uri}: {probe} is not writable (use --tracking-uri)")


def configure(uri: str, experiment: str) -> str:
    """Point MLflow at ``uri`` and select (or create) ``experiment``; returns the URI."""
    import mlflow

    uri = resolve_uri(uri)
    check_writable(uri)
    mlflow.set_tracking_uri(uri)
    ensure_experiment(experiment)
    mlflow.set_experiment(experiment)
    return uri


def ensure_experiment(name: str) -> str:
    """Id of experiment ``name`` in the current store, created with :func:`artifact_root`."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = artifact_root(mlflow.get_tracking_uri())
    try:
        return mlflow.create_experiment(name, artifact_location=root and f"{root}/{name}")
    except mlflow.exceptions.MlflowException:  # created meanwhile by another worker
        return mlflow.get_experiment_by_name(name).experiment_id


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside it (``mlartifacts/``), not in the current
    directory, so runs launched from anywhere keep their files together."""
    if uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def git_commit() -> str:
    """The repository's HEAD commit, with ``-dirty`` when the work tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("-dirty" if dirty and head else "")


def environment_tags() -> dict[str, str]:
    """Versions of everything that changes numbers, plus the code revision."""
    tags = {"git_commit": git_commit(), "python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("dmlbench", "torch", "torchvision", "timm", "mlflow", "optuna", "numpy", "faiss-cpu"):
        try:
            tags[f"version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return tags
