"""The run's data as MLflow dataset inputs: one per split, with its size and a digest of exactly
which images (files and labels) it holds, so two runs can be checked to have seen the same data."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pandas as pd

from harness.data.table import ImageTable, Splits
from harness.tracking.store import retried


def digest(table: ImageTable) -> str:
    """SHA-256 (first 16 hex digits) of the split's files, or image bytes, with their labels."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(table.labels, dtype=np.int64).tobytes())
    if table.paths is not None:
        h.update("\n".join(table.paths).encode())
    elif table.array is not None:
        h.update(np.ascontiguousarray(table.array).tobytes())
    return h.hexdigest()[:16]


def split_frame(table: ImageTable) -> pd.DataFrame:
    """The split's image list as MLflow shows it (file or row index, class name)."""
    image = table.paths if table.paths is not None else np.arange(len(table))
    names = np.asarray(table.class_names, dtype=object)[table.labels]
    return pd.DataFrame({"image": image, "label": table.labels, "class": names})


def log_dataset_inputs(splits: Splits, dataset: str, root: str) -> None:
    """``mlflow.log_input`` for every split of the active run (context = the split's name)."""
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource

    source = CodeDatasetSource({"dataset": dataset, "root": root, "reader": "dmlbench datasets/" + dataset + ".yaml"})
    parts = {"train": splits.train, **splits.eval_splits()}
    for split, table in parts.items():
        with warnings.catch_warnings():  # MLflow's hint about integer columns is for model schemas
            warnings.simplefilter("ignore", UserWarning)
            data = mlflow.data.from_pandas(
                split_frame(table), source=source, name=f"{dataset}/{split}", digest=digest(table)
            )
            tags = {"images": str(len(table)), "classes": str(table.num_classes)}
            # MLflow looks a dataset up, then inserts it: two runs logging one split at once collide
            retried(lambda: mlflow.log_input(data, context=split, tags=tags))
