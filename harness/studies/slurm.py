"""``dmlbench study launch SPEC --slurm``: a study's workers as one Slurm job array, via submitit.

Each array task runs what ``dmlbench study run`` runs, on the study's shared Optuna storage and
MLflow store, so everything that holds for several ``study run`` processes holds for the array:
trials are asked and told through the storage (the budget is split exactly), each reproduction
seed is handed to one process, and a task that Slurm kills (pre-emption, time limit) leaves its
trial RUNNING only until another worker or the next launch sees its heartbeat go stale and runs
it again. The storage must therefore be a database server (PostgreSQL, MySQL) and the MLflow store
reachable from every node (a tracking server, or a database URI); both are checked, with the spec,
data, weights and stores (``study run``'s preflight), before anything is submitted.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from harness.errors import StudyIncomplete, UserError

SHARED_STORAGES = ("postgresql", "mysql")
SHARED_STORES = ("http://", "https://", "postgresql", "mysql", "databricks")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``study launch`` (on the ``study`` sub-command's parser)."""
    g = parser.add_argument_group("launch (Slurm)")
    g.add_argument("--slurm", action="store_true", help="launch: submit the workers as a Slurm job array")
    g.add_argument("--array", type=int, default=2, help="launch: array tasks (workers)")
    g.add_argument("--partition", default="", help="launch: Slurm partition")
    g.add_argument("--gpus-per-task", type=int, default=0, help="launch: GPUs per task")
    g.add_argument("--cpus-per-task", type=int, default=0, help="launch: CPUs per task (0 = Slurm's default)")
    g.add_argument("--mem-gb", type=float, default=0, help="launch: memory per task in GB (0 = Slurm's default)")
    g.add_argument("--time", type=int, default=24 * 60, help="launch: time limit per task in minutes")
    g.add_argument("--logs", default="", help="launch: submitit's folder (default: ./slurm/<study>)")
    g.add_argument("--wait", action="store_true", help="launch: wait for the array and report how it ended")


def worker(spec_path: str, storage: str, tracking_uri: str) -> str:
    """One array task: ``study run`` on the shared storage and store (runs on the node)."""
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from harness.studies.runner import run_study

    run_study(spec_path, storage=storage)
    return f"task {os.environ.get('SLURM_ARRAY_TASK_ID', '?')} finished"


def check_shared(storage: str, tracking_uri: str) -> None:
    """Workers on other nodes share the storage and the store: files on one machine will not do."""
    if not storage.startswith(SHARED_STORAGES):
        raise UserError(
            f"bad Optuna storage {storage!r} for --slurm: workers on other nodes share it through a "
            "database server; valid: postgresql+psycopg://USER@HOST/DB, mysql://... (--storage)"
        )
    if not tracking_uri.startswith(SHARED_STORES):
        raise UserError(
            f"bad MLflow store {tracking_uri!r} for --slurm: every node must reach it; valid: "
            "http(s)://HOST:PORT (mlflow server) or a database URI (--tracking-uri)"
        )


def launch(spec_path: str, args: argparse.Namespace) -> int:
    """Check everything, submit ``--array`` workers, print the job and how to follow it."""
    if not args.slurm:
        raise UserError("study launch needs a scheduler; valid: --slurm")
    if args.array < 1:
        raise UserError(f"bad value {args.array!r} for --array: must be >= 1")
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: --slurm submits from a machine with the Slurm client (slurm-client)")
    from harness.studies.loading import load_spec
    from harness.studies.preflight import preflight
    from harness.studies.storage import storage_url

    spec = load_spec(spec_path)
    url = storage_url(spec, args.storage)
    tracking = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or spec.tracking_uri
    check_shared(url, tracking)
    preflight(spec, url)  # the spec, data, weights, stores: before anything is submitted
    try:
        import submitit
    except ImportError:
        raise UserError("study launch --slurm needs submitit: pip install 'dmlbench[slurm]'") from None

    folder = Path(args.logs or Path("slurm") / spec.name).resolve()
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params: dict[str, Any] = {
        "name": f"dmlbench-{spec.name}",
        "timeout_min": args.time,
        "slurm_array_parallelism": args.array,
    }
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.gpus_per_task:
        params["slurm_gpus_per_task"] = args.gpus_per_task
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    executor.update_parameters(**params)
    jobs = executor.map_array(worker, [str(spec.path)] * args.array, [url] * args.array, [tracking] * args.array)
    array_id = jobs[0].job_id.split("_")[0]
    print(
        f"submitted study {spec.name} as Slurm array {array_id} ({args.array} workers); logs in {folder}\n"
        f"follow it: squeue -j {array_id}; dmlbench study status {spec.path} --storage {url}"
    )
    if not args.wait:
        return 0
    failed = []
    for job in jobs:
        try:
            job.result()
        except Exception as exc:  # noqa: BLE001 - a task's failure is reported, the others still waited for
            failed.append(
                f"{job.job_id}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
            )
    if failed:
        raise StudyIncomplete(
            f"{len(failed)} of {args.array} Slurm tasks of study {spec.name} failed ({'; '.join(failed)}); "
            f"logs in {folder}; launch again to retry what is left"
        )
    print(f"all {args.array} Slurm tasks of study {spec.name} finished")
    return 0
