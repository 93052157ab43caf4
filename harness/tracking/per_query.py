"""The per-query table every test and transfer evaluation logs (``per_query/<name>.parquet``):
which of its columns holds the summands of each metric. Torch-free, so the reports read the
tables without loading the training stack."""

from __future__ import annotations


def column_of(metric: str) -> str:
    """The column whose mean over queries is ``metric``: ``hit_at_K`` for Recall@K, ``ap_at_r``
    for MAP@R, ``r_precision``. Takes logged keys (``test/map_at_r``) and bare ones (``recall@1``)."""
    key = metric.rsplit("/", 1)[-1].replace("_at_", "@")
    if key.startswith("recall@") and key.removeprefix("recall@").isdigit():
        return "hit_at_" + key.removeprefix("recall@")
    columns = {"map@r": "ap_at_r", "r_precision": "r_precision"}
    if key not in columns:
        raise KeyError(f"no per-query column for metric {metric!r}; valid: recall@K, map@r, r_precision")
    return columns[key]


def has_column(metric: str) -> bool:
    try:
        column_of(metric)
    except KeyError:
        return False
    return True
