"""The config of a run to resume, read back from the run's own ``config.yaml`` artifact."""
from __future__ import annotations

from typing import Any

from harness.errors import UserError


def resumable_config(run_id: str, tracking_uri: str) -> Any:
    """The resolved config of a killed or failed run, from its own ``config.yaml`` artifact."""
    import tempfile

    import mlflow

    from harness.core.resolve import resolve
    from harness.tracking.store import check_writable, resolve_uri

    uri = resolve_uri(tracking_uri)
    check_writable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"no run {run_id!r} in the MLflow store {uri}") from None
    if run.info.status == "FINISHED":
        raise UserError(f"run {run_id} already finished; nothing to resume")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml", dst_path=tmp)
        except Exception:  # noqa: BLE001 - any store error means the config is not there
            raise UserError(f"run {run_id} has no config.yaml artifact; it cannot be resumed") from None
        return resolve(config_file=path, overrides={"tracking.uri": uri})
