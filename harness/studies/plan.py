"""``dmlbench study plan``: what a study's budget costs before a GPU is spent on it.

Per dataset and entry: the images its tuning trials and reproductions train (trials x epochs x
training images, seeds x epochs x training images) and evaluate (the validation split every
epoch, the test split once per reproduction, or every epoch under the paper protocol), and the
estimated GPU-hours at a training rate: ``--img-s``, or a benchmark record's end-to-end
``data_img_s`` for the entry's method (else its model-step ``img_s``). Evaluating an image is
taken to cost a third of training one (forward only: one of a step's three passes).

Split sizes come from the data when it is on disk (the run's own carving: validation classes,
``data.max_per_class`` ...), else from the dataset spec's published sizes with the validation
fraction of the training images taken out. Pruned trials stop early, so tuning is an upper bound.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.errors import UserError

#: evaluating one image costs this fraction of training one (forward vs forward + backward)
EVAL_COST = 1 / 3


def split_sizes(cfg: Any) -> tuple[dict[str, int], str]:
    """``({train, val, test}: images)`` of a resolved run config, and where the counts came from."""
    from harness import data
    from harness.training.setup import splits_for

    spec = data.get_spec(cfg.dataset)
    try:
        splits = splits_for(cfg)
    except UserError:
        splits = None
    if splits is not None:
        sizes = {
            "train": len(splits.train),
            "val": len(splits.val) if splits.val is not None else 0,
            "test": sum(len(t) for t in (splits.test, splits.query, splits.gallery) if t is not None),
        }
        return sizes, "data on disk"
    published = spec.published or {}
    if "train" not in published:
        raise UserError(
            f"dataset {cfg.dataset} is not on disk and its spec has no published sizes; "
            f"set data.root in the study's overrides"
        )
    train = int(published["train"]["images"])
    val = int(round(train * cfg.data.val_fraction))
    test = sum(int(v["images"]) for k, v in published.items() if k != "train")
    if cfg.data.max_per_class:  # a cap: at most that many per class
        classes = int(published["train"]["classes"])
        train = min(train, classes * cfg.data.max_per_class)
    return {"train": train - val, "val": val, "test": test}, "published sizes"


def rate_for(method: str, img_s: float | None, records: list[dict[str, Any]]) -> tuple[float | None, str]:
    """Training images/s for ``method``: the given rate, else its benchmark record."""
    if img_s:
        return float(img_s), "--img-s"
    for key in ("data_img_s", "img_s"):
        for r in records:
            if r.get("method") == method and r.get(key):
                return float(r[key]), f"benchmark {key}"
    return None, "no rate"


def plan(spec_path: str | Path, img_s: float | None = None, benchmark: str | None = None) -> list[dict[str, Any]]:
    from harness.studies.loading import load_spec

    spec = load_spec(spec_path)
    records: list[dict[str, Any]] = []
    if benchmark:
        try:
            records = [r for r in json.loads(Path(benchmark).read_text()) if isinstance(r, dict)]
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read benchmark records {benchmark}: {exc}") from None
    if img_s is not None and img_s <= 0:
        raise UserError(f"bad value {img_s!r} for --img-s: must be > 0")
    rows = []
    seeds = len(spec.seeds)
    for dataset, entry in spec.units():
        cfg = spec.resolve(dataset, entry, {})
        sizes, source = split_sizes(cfg)
        epochs = cfg.optim.epochs
        trials = 0 if entry.fixed else spec.budget.n_trials
        tuning_train = trials * epochs * sizes["train"]
        tuning_eval = trials * epochs * sizes["val"]
        if spec.protocol == "paper":  # all training classes, the test split every epoch
            repro_train = seeds * epochs * (sizes["train"] + sizes["val"])
            repro_eval = seeds * epochs * sizes["test"]
        else:
            repro_train = seeds * epochs * sizes["train"]
            repro_eval = seeds * (epochs * sizes["val"] + sizes["test"])
        rate, rate_source = rate_for(cfg.method, img_s, records)
        trained, evaluated = tuning_train + repro_train, tuning_eval + repro_eval
        hours = (trained + EVAL_COST * evaluated) / rate / 3600 if rate else None
        rows.append(
            {
                "dataset": dataset,
                "entry": entry.name,
                "method": cfg.method,
                "trials": trials,
                "seeds": seeds,
                "epochs": epochs,
                "train_images": sizes["train"],
                "sizes_from": source,
                "trained_images": trained,
                "evaluated_images": evaluated,
                "img_s": rate,
                "rate_from": rate_source,
                "gpu_hours": round(hours, 2) if hours is not None else None,
            }
        )
    return rows


def print_plan(spec_path: str, img_s: float | None = None, benchmark: str | None = None, as_json: bool = False) -> int:
    rows = plan(spec_path, img_s, benchmark)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    import pandas as pd

    table = pd.DataFrame(rows)
    total = table["gpu_hours"].sum(min_count=1)
    for col in ("train_images", "trained_images", "evaluated_images"):
        table[col] = table[col].map("{:,}".format)
    print(table.to_string(index=False))
    if table["gpu_hours"].isna().any():
        print("some entries have no rate: give --img-s N or --benchmark benchmark.json")
    else:
        print(f"total: {total:,.1f} GPU-hours (pruned trials stop early: tuning is an upper bound)")
    return 0
