"""The ``dmlbench study`` sub-command: run, launch (Slurm), status, plan and repair a study (imports
stay light until a command needs them)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from harness.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("study", help="run or inspect an Optuna study")
    s.add_argument("action", choices=["run", "launch", "status", "plan", "repair"])
    s.add_argument("spec")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--devices", default=None, help="run: devices to fill, e.g. 0,1 (GPU indices) or cpu")
    s.add_argument("--workers-per-device", type=int, default=1, help="run: concurrent trials per device")
    s.add_argument("--img-s", type=float, default=None, help="plan: training images/s to assume")
    s.add_argument("--benchmark", default=None, help="plan: a benchmark.json whose data_img_s (else img_s) to use")
    s.add_argument(
        "--rebuild-from-mlflow",
        action="store_true",
        help="run: add finished trials that MLflow has and the Optuna storage lost back to Optuna",
    )
    s.add_argument("--storage", default=None, help="Optuna storage URL (default: journal file)")
    s.add_argument("--json", action="store_true", help="status as JSON records")
    s.add_argument("--tracking-uri", default="")
    from harness.studies.slurm import add_options as add_launch_options

    add_launch_options(s)
    s.set_defaults(func=run)
    return s


def run(args: argparse.Namespace) -> int:
    from harness.studies.runner import run_study
    from harness.studies.status import study_status

    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    if args.action == "repair":
        from harness.studies.journal import repair_journal
        from harness.studies.loading import load_spec
        from harness.studies.storage import storage_url

        url = storage_url(load_spec(args.spec), args.storage)
        if "://" in url and not url.startswith("journal:"):
            raise UserError(f"study repair mends journal files; {url} is a database")
        print(repair_journal(Path(url.removeprefix("journal:")).expanduser()))
        return 0
    if args.action == "plan":
        from harness.studies.plan import print_plan

        return print_plan(args.spec, img_s=args.img_s, benchmark=args.benchmark, as_json=args.json)
    if args.action == "launch":
        from harness.studies.slurm import launch

        return launch(args.spec, args)
    if args.action == "run":
        run_study(
            args.spec,
            workers=args.workers,
            storage=args.storage,
            devices=args.devices,
            workers_per_device=args.workers_per_device,
            rebuild_from_mlflow=args.rebuild_from_mlflow,
        )
    status = study_status(args.spec, storage=args.storage)
    if args.json:
        print(status.to_json(orient="records", indent=2))
    else:
        print(status.to_string(index=False))
    return 0
