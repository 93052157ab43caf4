"""The config of a run to resume, read back from the run's own ``config.yaml`` artifact, and the
options given with ``--resume``: those that contradict the recorded run are refused, the few that
a continued run can take (more epochs, loader workers, what is logged) are applied and said."""

from __future__ import annotations

import copy
from typing import Any

from harness.errors import UserError

#: keys a resumed run may change: they do not change what the finished epochs computed
CHANGEABLE = (
    "optim.epochs",
    "data.num_workers",
    "eval.batch_size",
    "tracking.keep_checkpoints",
    "tracking.system_metrics",
    "tracking.system_metrics_interval_s",
    "tracking.log_artifacts",
)


def reconcile(
    cfg: Any, run_id: str, choices: dict[str, str | None], overrides: dict[str, Any], completed: int | None = None
) -> list[str]:
    """Apply the changeable ``overrides`` to the recorded ``cfg``; refuse every option that differs
    from it. Returns what was changed, as ``key old -> new`` lines."""
    from harness.config import flat_get, flatten, set_key, to_dict

    recorded = flatten(to_dict(cfg))
    recorded["recipe"] = cfg.recipe
    for flag, value in choices.items():
        if value is not None and str(value) != str(recorded.get(flag)):
            raise UserError(
                f"--{flag} {value} contradicts run {run_id} (recorded {flag}: {recorded.get(flag)}): "
                "a resumed run keeps its config; drop the option"
            )
    changed = []
    for key, value in overrides.items():
        if key == "tracking.uri":
            continue
        trial = copy.deepcopy(cfg)
        set_key(trial, key, value)  # parsed and typed as the recorded config's own (unknown keys refused)
        before, new = flat_get(to_dict(cfg), key), flat_get(to_dict(trial), key)
        if new == before:
            continue
        if key not in CHANGEABLE:
            raise UserError(
                f"--set {key}={value} contradicts run {run_id} (recorded {key}: {before}): a resumed run "
                f"keeps its config; it may change only {', '.join(CHANGEABLE)}"
            )
        if key == "optim.epochs" and completed is not None and new <= completed:
            raise UserError(
                f"--set optim.epochs={value}: run {run_id} has completed {completed} epochs already; "
                "give more epochs than that"
            )
        set_key(cfg, key, value)
        changed.append(f"{key} {before} -> {new}")
    return changed


def resumable_config(run_id: str, tracking_uri: str) -> Any:
    """The resolved config of a killed or failed run, from its own ``config.yaml`` artifact."""
    import tempfile

    import mlflow

    from harness.tracking.store import check_writable, resolve_uri
    from harness.training.resolution import resolve

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
