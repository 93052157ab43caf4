"""``dmlbench`` command line. Bad input prints one line and exits with status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from harness.errors import RunFailure, UserError, message_line


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Plain fixed-width table for the terminal."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return f"{int(value):,}"  # counts and epochs logged as MLflow floats
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


# ----------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from harness.config import parse_overrides, precheck

    overrides = parse_overrides(args.set)
    precheck(overrides)  # before the heavy imports below
    from harness.tracking.links import run_url
    from harness.training.loop import train
    from harness.training.progress import epoch_line
    from harness.training.resolution import resolve

    if args.tracking_uri:
        overrides["tracking.uri"] = args.tracking_uri
    if args.resume:
        from harness.training.resume import reconcile, resumable_config

        cfg = resumable_config(args.resume, args.tracking_uri)
        choices = {
            "method": args.method,
            "dataset": args.dataset,
            "backbone": args.backbone,
            "recipe": f"{cfg.method}:{args.preset}" if args.preset else None,
        }
        if args.config:
            raise UserError(f"--config {args.config} contradicts --resume: a resumed run keeps its recorded config")
        import mlflow

        completed = len(mlflow.MlflowClient().get_metric_history(args.resume, "train/loss"))
        for line in reconcile(cfg, args.resume, choices, overrides, completed):
            print(f"resuming run {args.resume} with {line}")
        result = train(cfg, resume=args.resume, progress=True)
        print(f"run {result.run_id} resumed and finished ({cfg.method} on {cfg.dataset})")
        return 0
    cfg = resolve(
        method=args.method,
        dataset=args.dataset,
        backbone=args.backbone,
        overrides=overrides,
        config_file=args.config,
        preset=args.preset,
    )
    if args.print_config:  # the fully resolved config; no data, model or run is touched
        from harness.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    result = train(cfg, on_epoch=epoch_line(cfg.optim.epochs), progress=True)
    print(f"run {result.run_id}  ({cfg.method} on {cfg.dataset} with {cfg.backbone})")
    for key in sorted(result.metrics):
        print(f"  {key:32s} {_fmt(result.metrics[key])}")
    print(f"in the MLflow UI: {run_url(result.run_id, args.tracking_uri)}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from harness.training.counts import describe_methods

    rows = describe_methods(
        args.backbone,
        num_classes=args.num_classes,
        pretrained=not args.no_pretrained,
        backbone_kwargs=json.loads(args.backbone_kwargs) if args.backbone_kwargs else None,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"methods on {args.backbone} ({args.num_classes} training classes)")
        print(
            _table(
                rows,
                ["name", "applies", "params/trainable", "params/trainable_inference", "params/total", "description"],
            )
        )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Runs side by side: headline metrics, then every config key on which they differ."""
    from harness.tracking.compare import compare_rows

    names, rows = compare_rows(args.runs, args.tracking_uri or "")
    print(json.dumps(rows, indent=2) if args.json else _table(rows, ["", *names]))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from methods import get_method, method_names

    rows = [
        {
            "method": m,
            "preset": name,
            "dataset": str(preset.get("dataset", "any")),
            "source": str(preset.get("recipe_source", "")),
        }
        for m in method_names()
        for name, preset in sorted(get_method(m).presets.items())
        if not args.method or m == args.method
    ]
    print(json.dumps(rows, indent=2) if args.json else _table(rows, ["method", "preset", "dataset", "source"]))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from harness import data

    if args.action == "check":
        if not args.name:
            raise UserError("datasets check needs a dataset name; valid: " + ", ".join(data.spec_names()))
        report = data.check_dataset(args.name, args.root or "", verify_images=not args.no_verify)
        if args.json:
            print(json.dumps(report))
        else:
            for split, info in report.items():
                print(f"{split:8s} {info['images']:>8,} images  {info['classes']:>6,} classes")
        return 0
    from harness.data.specs import found_at

    rows = [
        {
            "name": s.name,
            "on disk": str(found_at(s) or "no (--set data.root=DIR)"),
            "Recall@K": ",".join(map(str, s.ks)),
            "description": s.description,
        }
        for s in (data.get_spec(n) for n in data.spec_names())
    ]
    print(json.dumps(rows, indent=2) if args.json else _table(rows, ["name", "on disk", "Recall@K", "description"]))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from harness.tracking.store import resolve_uri
    from harness.tracking.ui import serve_ui

    return serve_ui(resolve_uri(args.tracking_uri or ""), args.host, args.port, args.timeout, verbose=args.verbose)


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo study, then its report. Two worker processes where there are two cores: small
    convolutions do not use two threads well."""
    from harness.reports.build import build_report
    from harness.studies.runner import run_study

    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    run_study(args.spec, workers=min(2, os.cpu_count() or 1))
    report_dir = build_report(args.spec)
    table = report_dir / "results.md"
    if table.exists():
        print("\n" + table.read_text().strip())
    print(f"\nreport: {report_dir}")
    print("browse every run: dmlbench ui   (or: make ui)")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmlbench", description="PEFT benchmark for deep metric learning")
    p.add_argument("--debug", action="store_true", help="show the traceback of a failed run or study")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one method on one dataset (one MLflow run)")
    t.add_argument("--method")
    t.add_argument("--dataset")
    t.add_argument("--backbone")
    t.add_argument("--config", help="YAML run config")
    t.add_argument("--preset", help="a method's named preset (published configuration)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--tracking-uri", default="")
    t.add_argument(
        "--resume",
        metavar="RUN_ID",
        default="",
        help="continue a killed or failed run from its last completed epoch, in the same MLflow run",
    )
    t.add_argument(
        "--print-config",
        action="store_true",
        help="print the fully resolved run config as YAML and exit (no run is created)",
    )
    t.set_defaults(func=cmd_train)

    cp = sub.add_parser("compare", help="runs side by side: metrics and the config keys that differ")
    cp.add_argument("runs", nargs="+", metavar="RUN_ID")
    cp.add_argument("--tracking-uri", default="")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=cmd_compare)

    rc = sub.add_parser("recipes", help="list every method's presets (published recipes) with their sources")
    rc.add_argument("--method", default="")
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(func=cmd_recipes)

    m = sub.add_parser("methods", help="list registered methods with parameter counts")
    m.add_argument("--json", action="store_true")
    m.add_argument("--backbone", default="tf_efficientnet_lite0")
    m.add_argument("--num-classes", type=int, default=100)
    m.add_argument("--no-pretrained", action="store_true", help="count on a random init (no weights needed)")
    m.add_argument("--backbone-kwargs", default="", help="JSON kwargs for timm.create_model")
    m.set_defaults(func=cmd_methods)

    d = sub.add_parser("datasets", help="list datasets, or check one: datasets check NAME --root DIR")
    d.add_argument("action", nargs="?", choices=["list", "check"], default="list")
    d.add_argument("name", nargs="?")
    d.add_argument("--root", default="")
    d.add_argument("--json", action="store_true")
    d.add_argument("--no-verify", action="store_true", help="do not open every image")
    d.set_defaults(func=cmd_datasets)

    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the store")
    u.add_argument("--host", default="127.0.0.1", help="interface to serve on (0.0.0.0: every interface)")
    u.add_argument("--port", type=int, default=5000, help="port to serve on (default: 5000)")
    u.add_argument("--verbose", action="store_true", help="show MLflow's own output (access log, notices)")
    u.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server to answer")
    u.add_argument("--tracking-uri", default="")
    u.set_defaults(func=cmd_ui)

    de = sub.add_parser("demo", help="run the embedded-default study and its report")
    de.add_argument("--spec", default="studies/demo.yaml")
    de.add_argument("--tracking-uri", default="")
    de.set_defaults(func=cmd_demo)

    from harness.bench.command import add_parser as add_benchmark
    from harness.reports.command import add_parsers as add_report_commands
    from harness.studies.command import add_parser as add_study

    add_study(sub)
    add_report_commands(sub)
    add_benchmark(sub)
    for name, parser in sub.choices.items():  # every subcommand's --help ends with an example
        parser.epilog = "example:\n  " + EXAMPLES[name]
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        for action in parser._actions:
            action.help = action.help or OPTION_HELP.get(action.dest, action.help)
    return p


EXAMPLES = {
    "train": "dmlbench train --method vptsp_g --preset cub --set data.root=~/data/CUB_200_2011 --set protocol=paper",
    "recipes": "dmlbench recipes --method adapter",
    "compare": "dmlbench compare RUN_A RUN_B",
    "methods": "dmlbench methods --backbone vit_small_patch16_224 --no-pretrained --num-classes 100",
    "datasets": "dmlbench datasets check cub200 --root ~/data/CUB_200_2011",
    "ui": "dmlbench ui --port 5001",
    "demo": "dmlbench demo",
    "study": "dmlbench study run studies/peft_vit_s.yaml --workers 2 && "
    "dmlbench study status studies/peft_vit_s.yaml --json",
    "report": "dmlbench report studies/demo.yaml --out /tmp/demo-report",
    "visualize": "dmlbench visualize cam --run RUN_ID --n 4",
    "benchmark": "dmlbench benchmark --methods full_finetune,bitfit --backbone vit_small_patch16_224 "
    "--baseline --end-to-end",
}
OPTION_HELP = {
    "method": "registered method (dmlbench methods)",
    "dataset": "dataset name (dmlbench datasets)",
    "backbone": "timm model name",
    "tracking_uri": "MLflow store (default $MLFLOW_TRACKING_URI or ./mlflow.db)",
    "json": "print JSON",
    "spec": "study spec YAML",
    "action": "what to do",
    "workers": "worker processes",
    "out": "output folder",
    "run": "MLflow run id",
    "n": "number of images",
    "what": "figure kind",
    "name": "dataset name",
    "root": "dataset folder",
    "methods": "comma-separated method names",
    "image_size": "input size in pixels",
    "batch_size": "images per step",
    "samples_per_class": "images per class in a batch",
    "steps": "timed steps",
    "warmup": "untimed warm-up steps",
    "device": "cpu | cuda | '' (auto)",
    "no_amp": "disable bf16 autocast",
    "set": "override a config key (repeatable)",
    "num_classes": "training classes",
    "backbone_kwargs": "JSON kwargs for timm.create_model",
    "runs": "MLflow run ids",
}


def main(argv: Sequence[str] | None = None) -> int:
    from harness.runtime import interrupts

    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per error, no bars
    if not args.debug:  # MLflow logs every database error with its traceback; ours is one line
        import logging

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    interrupts.terminate_like_interrupt()  # SIGTERM (kill, Slurm) ends runs as Ctrl-C does
    try:
        return args.func(args)
    except UserError as exc:
        print(f"dmlbench: error: {message_line(exc)}", file=sys.stderr)
        return 2
    except RunFailure as exc:
        if args.debug:
            raise
        print(f"dmlbench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        what = "terminated (SIGTERM)" if interrupts.exit_code(exc) == 143 else "interrupted (Ctrl-C)"
        print(f"dmlbench: {str(exc) or what + ' before a run started; nothing was written'}", file=sys.stderr)
        return interrupts.exit_code(exc)
    finally:
        interrupts.reset()


if __name__ == "__main__":
    sys.exit(main())
