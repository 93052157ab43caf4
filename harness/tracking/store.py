"""MLflow plumbing: where the store lives, what every run records about its environment."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from harness.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` where the user stands (``$DMLBENCH_HOME`` or
    the current directory)."""
    from harness.config import home

    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def resolve_uri(uri: str = "") -> str:
    return uri or default_tracking_uri()


def check_writable(uri: str) -> None:
    """Fail before any run starts when a local store cannot be written."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
            return
        path = Path(uri.removeprefix("sqlite:///"))  # four slashes = absolute path
        # SQLite writes its journal beside the file: the folder must be writable too
        for target in ([path] if path.exists() else []) + [path.parent]:
            if not target.exists() or not os.access(target, os.W_OK):
                raise UserError(f"cannot write MLflow store {uri}: {target} is not writable (use --tracking-uri)")
        if path.exists():
            try:
                sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute("select 1").close()
            except sqlite3.Error as exc:
                raise UserError(f"cannot open MLflow store {uri}: {exc}") from None
    elif parsed.scheme in ("", "file"):
        raise UserError(
            f"MLflow tracking URI {uri!r} is a file store, which MLflow 3 no longer writes; valid: "
            "sqlite:///PATH/mlflow.db, http(s)://HOST:PORT of an 'mlflow server', or a database URL"
        )
    elif parsed.scheme in ("http", "https"):
        check_server(uri)
    elif parsed.scheme.split("+")[0] not in DATABASE_SCHEMES:
        raise UserError(
            f"bad MLflow tracking URI {uri!r}; valid: sqlite:///PATH/mlflow.db, http(s)://HOST:PORT, "
            f"or a database URL ({', '.join(DATABASE_SCHEMES)})"
        )


#: SQLAlchemy database schemes MLflow's tracking store accepts (besides sqlite)
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """An MLflow tracking server must answer its ``/health`` endpoint within ``timeout_s``
    (MLflow's own client retries for minutes before giving up)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as reply:
            if reply.status != 200:
                raise UserError(f"MLflow server {uri} answered {reply.status} on /health; is it an MLflow server?")
    except urllib.error.HTTPError as exc:
        raise UserError(f"MLflow server {uri} answered {exc.code} on /health; is it an MLflow server?") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"MLflow server {uri} does not answer within {timeout_s:.0f} s ({reason}); "
            "start it ('mlflow server --host 127.0.0.1 --port 5000') or pick another --tracking-uri"
        ) from None


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

    from harness.tracking.links import KIND, KIND_TAG

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        if found.tags.get(KIND_TAG) != KIND:  # made before this tag: its pages would open in GenAI mode
            retried(lambda: mlflow.MlflowClient().set_experiment_tag(found.experiment_id, KIND_TAG, KIND))
        return found.experiment_id
    root = artifact_root(mlflow.get_tracking_uri())
    try:
        return mlflow.create_experiment(name, artifact_location=root and f"{root}/{name}", tags={KIND_TAG: KIND})
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
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("-dirty" if dirty and head else "")


def environment_tags() -> dict[str, str]:
    """Versions of everything that changes numbers, plus the code revision."""
    commit = git_commit()
    tags = {
        "git_commit": commit,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "mlflow.source.git.commit": commit.removesuffix("-dirty"),
    }  # shown by the MLflow UI
    for pkg in ("dmlbench", "torch", "torchvision", "timm", "mlflow", "optuna", "numpy", "faiss-cpu"):
        try:
            tags[f"version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return tags


def end_failed_run(exc: BaseException) -> None:
    """End the active MLflow run KILLED (pruned trial, Ctrl-C) or FAILED (with the error as a tag).

    Retried: after Ctrl-C every worker of a study ends its run at the same moment, and a busy
    store (SQLite's lock) must not leave a run RUNNING."""
    import mlflow
    from mlflow.exceptions import MlflowException

    pruned = type(exc).__name__ == "TrialPruned"
    interrupted = isinstance(exc, KeyboardInterrupt)
    run_id = mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    tags = {"dmlbench.status": "pruned" if pruned else ("interrupted" if interrupted else "failed")}
    if not pruned:
        tags["dmlbench.error"] = f"{type(exc).__name__}: {exc}"[:500]

    def end() -> None:
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, "KILLED" if pruned or interrupted else "FAILED")

    retried(end)
    with contextlib.suppress(MlflowException):  # already ended above
        mlflow.end_run("KILLED" if pruned or interrupted else "FAILED")


def retried(write: Callable[[], None], attempts: int = 6) -> None:
    """Run an MLflow write, retried with backoff. Concurrent writers collide in ways MLflow does
    not absorb: SQLite's "database is locked", and its look-up-then-insert of a dataset or of a
    metric's latest value (two `study run` processes rolling up one parent, or logging the same
    split, hit the unique key: an IntegrityError on the server). The retry takes the update path."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            write()
            return
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)


def abandon_active_run() -> None:
    """Drop the active run locally when its server is gone: ``end_run`` pops it before it tries
    (once, not with minutes of retries) to tell the server."""
    import mlflow

    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


def tracking_server_gone(uri: str, exc: BaseException) -> Exception | None:
    """When ``exc`` says the MLflow server at ``uri`` stopped answering (not a run failing): the
    StoreUnavailable error a study stops on, with the active runs dropped locally; else None."""
    from harness.errors import StoreUnavailable, server_unreachable

    if not uri.startswith("http") or (reason := server_unreachable(exc)) is None:
        return None
    abandon_active_run()  # the parent run, entered around the trial
    return StoreUnavailable(
        f"the MLflow server {uri} stopped answering ({reason}); the study stopped: once it is "
        "back, the same `study run` continues it (interrupted runs resume from their checkpoints)"
    )
