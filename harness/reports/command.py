"""The ``dmlbench report`` and ``dmlbench visualize`` sub-commands (imports stay light until a
command needs them)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("report", help="tables and figures of a study, from MLflow")
    r.add_argument("spec")
    r.add_argument("--out", default=None)
    r.add_argument("--tracking-uri", default="")
    r.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL of the study, for its history and "
        "importance figures (default: the spec's, else the journal file)",
    )
    r.add_argument(
        "--ci",
        action="store_true",
        help="show 95%% intervals (seeds and queries, bootstrap) in the tables instead of mean ± std",
    )
    r.set_defaults(func=report)

    v = sub.add_parser("visualize", help="figures of a trained run")
    v.add_argument(
        "what",
        choices=["dpp", "cam", "retrieval"],
        help="dpp: DPP warps (FRPT Fig. 3); cam: activation maps (Fig. 4); retrieval: test queries and their top k",
    )
    v.add_argument("--run", required=True, help="MLflow run id (an FRPT run for dpp and cam)")
    v.add_argument("--k", type=int, default=5, help="retrieval: neighbours shown per query (1-5)")
    v.add_argument(
        "--n", type=int, default=None, help="number of test images (default: 8 for dpp, 4 for cam, 6 for retrieval)"
    )
    v.add_argument("--tracking-uri", default="")
    v.set_defaults(func=visualize)


def report(args: argparse.Namespace) -> int:
    from harness.reports.build import build_report

    out = build_report(
        args.spec, out_dir=args.out, tracking_uri=args.tracking_uri or None, storage=args.storage, ci=args.ci
    )
    print(f"report written to {out}")
    return 0


def visualize(args: argparse.Namespace) -> int:
    if args.what == "retrieval":
        from harness.reports.gallery import visualize_retrieval

        path = visualize_retrieval(args.run, n=args.n or 6, k=args.k, tracking_uri=args.tracking_uri or None)
        print(f"retrieval gallery: {path} (also logged to run {args.run})")
        return 0
    if args.what == "cam":
        from harness.reports.cam import visualize_cam as draw
    else:
        from harness.reports.visualize import visualize_dpp as draw
    n = args.n if args.n is not None else (4 if args.what == "cam" else 8)
    path = draw(args.run, n=n, tracking_uri=args.tracking_uri or None)
    what = {"cam": "class activation maps (FRPT Fig. 4)", "dpp": "DPP figure (FRPT Fig. 3)"}[args.what]
    print(f"{what}: {path} (also logged to run {args.run})")
    return 0
