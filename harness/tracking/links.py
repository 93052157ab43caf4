"""Where to look: URLs of the MLflow UI's runs view and run pages, and waiting for a server."""
from __future__ import annotations

from typing import Any


def wait_for(url: str, proc: Any, timeout_s: float) -> bool:
    """Poll ``url`` until it answers 200 (True), the process exits or time runs out (False)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def runs_view(uri: str) -> str:
    """The runs table of the most recently updated experiment (the UI otherwise opens elsewhere)."""
    import mlflow

    try:
        experiments = mlflow.MlflowClient(uri).search_experiments()
    except Exception:  # noqa: BLE001 - an empty or foreign store: the UI's home page
        return ""
    if not experiments:
        return ""
    latest = max(experiments, key=lambda e: (e.last_update_time or 0, e.experiment_id))
    return f"#/experiments/{latest.experiment_id}/runs?workflowType=machine_learning"


def run_url(run_id: str) -> str:
    """The run's page: on the tracking server, or via 'dmlbench ui' for a local store."""
    import mlflow

    run = mlflow.get_run(run_id)
    uri = mlflow.get_tracking_uri()
    page = f"#/experiments/{run.info.experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"start 'dmlbench ui', then http://127.0.0.1:5000/{page}"
