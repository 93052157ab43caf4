"""Retrieval galleries and the hardest classes, from a run's per-query table
(``per_query/test.parquet``) and its own config: no model is rebuilt, the neighbours are the ones
the run's test evaluation found.

``dmlbench visualize retrieval --run RUN_ID`` draws n test queries (drawn by a fixed seed from the
scored queries) with their top-k gallery images, framed green when of the query's class and red
when not; the report draws the same queries for several methods side by side, so a reader sees
where they differ. PNG and PDF at paper width (6.9 in, a two-column paper's ``figure*``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from harness.errors import UserError

PAPER_WIDTH_IN = 6.9
RIGHT, WRONG = "#1a9850", "#d73027"
#: the gap between two methods' groups of a row, in image widths
GAP = 0.25
DRAW_SEED = 0


def run_queries(client: Any, run_id: str) -> tuple[Any, pd.DataFrame]:
    """A run's resolved config and its per-query test table (one line naming what is missing)."""
    from harness.reports.visualize import _download
    from harness.training.resolution import resolve

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve(config_file=_download(client, run_id, "config.yaml", tmp))
        table = pd.read_parquet(_download(client, run_id, "per_query/test.parquet", tmp))
    return cfg, table


def draw_queries(table: pd.DataFrame, n: int, seed: int = DRAW_SEED) -> np.ndarray:
    """``n`` query indices drawn by ``seed`` from the scored queries, sorted (the same for every
    method of a study: they share the test split)."""
    scored = np.sort(table["query"].to_numpy())
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(scored, size=min(n, len(scored)), replace=False))


class SplitImages:
    """Displayable test images of a run's dataset (query and gallery splits for In-Shop)."""

    #: the test transform normalises and :func:`displayable` undoes it with the same constants,
    #: so no backbone needs building (nor its weights downloading) to show its inputs
    NORM = SimpleNamespace(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

    def __init__(self, cfg: Any) -> None:
        from harness.training.setup import splits_for

        cfg.data.num_workers = 0
        self.cfg, self.splits, self.backbone = cfg, splits_for(cfg), self.NORM
        self._batches: dict[str, Any] = {}

    def names(self) -> tuple[str, str]:
        return ("query", "gallery") if self.splits.query is not None else ("test", "test")

    def labels(self, split: str) -> np.ndarray:
        return getattr(self.splits, split).labels

    def class_names(self) -> list[str]:
        return list(getattr(self.splits, self.names()[0]).class_names)

    def images(self, split: str, index: list[int]) -> np.ndarray:
        import torch

        from harness import data
        from harness.reports.visualize import displayable

        if split not in self._batches:
            self._batches[split] = data.split_batches(
                getattr(self.splits, split), self.cfg.data, self.cfg.seed, self.cfg.eval.batch_size,
                self.backbone.mean, self.backbone.std, torch.device("cpu"), "cpu", train=False, split=split,
            )  # fmt: skip
        return displayable(self._batches[split].images_at(index), self.backbone)


def draw_gallery(
    panels: list[tuple[str, pd.DataFrame]], images: SplitImages, queries: np.ndarray, k: int, path: Path, title: str
) -> Path:
    """One row per query: the query, then for each panel (a method) its top ``k``, framed by
    correctness. ``panels``: (label, per-query table) in display order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qsplit, gsplit = images.names()
    qlabels, glabels = images.labels(qsplit), images.labels(gsplit)
    # the query, then per panel a narrow gap (so the methods' groups read apart) and its k images
    ratios = [1.3] + ([GAP] + [1] * k) * len(panels)
    cell = PAPER_WIDTH_IN / (sum(ratios) + 0.3 * len(panels))
    fig, axes = plt.subplots(
        len(queries), len(ratios), figsize=(PAPER_WIDTH_IN, cell * len(queries) + 0.5), squeeze=False,
        gridspec_kw={"width_ratios": ratios, "wspace": 0.06, "hspace": 0.08},
    )  # fmt: skip

    def column(panel: int, j: int) -> int:
        return 1 + panel * (k + 1) + 1 + j

    for r in range(len(queries)):
        for c in range(len(panels)):
            axes[r, column(c, -1)].axis("off")
    shown = images.images(qsplit, [int(q) for q in queries])
    for r, q in enumerate(queries):
        axes[r, 0].imshow(shown[r], cmap="gray")
        for c, (_, table) in enumerate(panels):
            row = table.loc[table["query"] == q]
            nn = row[[f"nn_{i + 1}" for i in range(k)]].to_numpy()[0] if len(row) else np.array([], int)
            pictures = images.images(gsplit, [int(i) for i in nn]) if len(nn) else []
            for j in range(k):
                ax = axes[r, column(c, j)]
                if j < len(nn):
                    ax.imshow(pictures[j], cmap="gray")
                    colour = RIGHT if glabels[nn[j]] == qlabels[q] else WRONG
                    for side in ax.spines.values():
                        side.set_edgecolor(colour)
                        side.set_linewidth(2.5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("query", fontsize=7)
    for c, (label, _) in enumerate(panels):
        axes[0, column(c, k // 2)].set_title(f"{label}: top {k}", fontsize=7)
    fig.suptitle(title + " (green: same class as the query, red: another class)", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=200, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight", metadata={"CreationDate": None, "Producer": None})
    plt.close(fig)
    return path


def hardest_classes(table: pd.DataFrame, names: list[str], n: int = 5) -> pd.DataFrame:
    """The ``n`` classes with the lowest R@1, each with its queries and the class its misses
    retrieve most often at rank 1 (ties: the lower class index)."""
    rows = []
    for cls, part in table.groupby("class", sort=True):
        wrong = part.loc[~part["hit_at_1"].astype(bool), "nn1_class"]
        instead = int(wrong.value_counts().sort_index().idxmax()) if len(wrong) else None
        rows.append(
            {
                "class": names[cls] if cls < len(names) else str(cls),
                "queries": len(part),
                "R@1": 100 * part["hit_at_1"].astype(float).mean(),
                "most retrieved instead": ""
                if instead is None
                else (names[instead] if instead < len(names) else str(instead)),
            }
        )
    out = pd.DataFrame(rows).sort_values(["R@1", "class"], kind="stable")
    return out.head(n).reset_index(drop=True)


def visualize_retrieval(
    run_id: str, n: int = 6, k: int = 5, out_dir: Path | None = None, tracking_uri: str | None = None
) -> Path:
    """Draw ``n`` test queries of MLflow run ``run_id`` with their top ``k``; log and return the PNG."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from harness.tracking.store import resolve_uri

    if n < 1:
        raise UserError(f"bad value {n!r} for --n: must be >= 1")
    if not 1 <= k <= 5:
        raise UserError(f"bad value {k!r} for --k: must be between 1 and 5 (the neighbours a run keeps)")
    client = MlflowClient(tracking_uri=resolve_uri(tracking_uri or ""))
    try:
        client.get_run(run_id)
    except MlflowException:
        raise UserError(f"unknown MLflow run '{run_id}' in {resolve_uri(tracking_uri or '')}") from None
    cfg, table = run_queries(client, run_id)
    images = SplitImages(cfg)
    queries = draw_queries(table, n)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="dmlbench-gallery-"))
    path = draw_gallery(
        [(cfg.method, table)],
        images,
        queries,
        k,
        out / "retrieval.png",
        f"{cfg.method} on {cfg.dataset}, run {run_id[:8]}",
    )
    client.log_artifact(run_id, str(path), "figures")
    client.log_artifact(run_id, str(path.with_suffix(".pdf")), "figures")
    return path


def report_galleries(spec: Any, runs: pd.DataFrame, tables: dict, out: Path, n: int = 4, k: int = 5) -> list:
    """Per dataset, the report's gallery figure (the method picked on validation beside the
    untrained backbone, first seed, the same queries) and their hardest classes as Markdown.
    Returns ``[(caption, path, markdown)]``."""
    from mlflow import MlflowClient

    from harness.reports.formatting import md_table
    from harness.reports.runs import reproductions
    from harness.reports.significance import pick_on_validation, reference_entries

    client, seed, made = MlflowClient(), spec.seeds[0], []
    for dataset in spec.datasets:
        picked = pick_on_validation(spec, runs, dataset, tables)
        shown = ([picked[1]] if picked else []) + [e for e in reference_entries(spec) if (dataset, e.name) in tables][
            :1
        ]
        if not shown:
            continue
        first = reproductions(runs, spec, dataset, shown[0])
        first = first[first["tags.dmlbench.seed"].astype(int) == seed]
        if first.empty:
            continue
        cfg, _ = run_queries(client, first["run_id"].iloc[0])
        images = SplitImages(cfg)
        panels = [(e.label, (t := tables[(dataset, e.name)])[t["seed"] == seed]) for e in shown]
        queries = draw_queries(panels[0][1], n)
        path = out / "figures" / f"gallery_{dataset}.png"
        title = f"{spec.name} on {dataset}, seed {seed}"
        draw_gallery(panels, images, queries, k, path, title)
        names = images.class_names()
        md = []
        for label, table in panels:
            hard = hardest_classes(table, names)
            hard["R@1"] = hard["R@1"].map(lambda v: f"{v:.1f}")
            md.append(f"{label} (seed {seed}):\n\n" + md_table(list(hard.columns), hard.astype(str).values.tolist()))
        made.append((f"{dataset}: test queries and their top {k}, " + " vs ".join(e.label for e in shown), path, md))
    return made
