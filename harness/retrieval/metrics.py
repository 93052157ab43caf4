"""Retrieval metrics: Recall@K, MAP@R and R-precision (Musgrave et al., "A Metric Learning Reality Check").

Definitions follow pytorch-metric-learning's ``AccuracyCalculator`` exactly, so numbers are
comparable with papers that use it:

* Similarity is cosine: embeddings are L2-normalised here, whatever the caller did.
* A query's relevant set is every reference item of its class; in self-retrieval (no reference set
  given) the query itself is excluded *by index*, so identical duplicates still count as neighbours.
* ``R`` = number of relevant items. MAP@R = (1/R) sum_{i<=R} P@i * rel(i); R-precision = hits in the
  first R / R. Recall@K = fraction of queries with at least one relevant item among the K nearest.
* Queries with ``R == 0`` ("lone" queries: a singleton class in self-retrieval, or a class missing
  from the reference set) are skipped by every metric, as AccuracyCalculator skips them for
  precision_at_1 / MAP@R / R-precision. If every query is lone, all metrics are NaN (as in pml).

Tie-breaking rule: neighbours are ranked by decreasing similarity, and equal similarities (bitwise
equal float32 values) by increasing reference index. Backends (faiss, torch.topk) do not guarantee
any order among ties, so the k nearest are re-sorted stably, and a query whose tie straddles the
k-th position is recomputed exactly (see :func:`_stable_topk`). This makes results deterministic
and backend independent.

Memory stays bounded: the kNN search runs over chunks of ``chunk_size`` queries and keeps only the
top ``k = max(max(ks), largest R)`` neighbours per query, never an N x N matrix (SOP has 60k images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

try:  # optional: exact CPU search that is faster than torch for large reference sets
    import faiss
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None


def recall_keys(ks: Sequence[int]) -> list[str]:
    """Metric names for Recall@K, in the order of ``ks`` (used by loggers and reports)."""
    return [f"recall@{int(k)}" for k in ks]


def _as_tensor(x, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach() if dtype is None else t.detach().to(dtype)


def _stable_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row ranked by (similarity desc, column index asc).

    ``torch.topk`` picks an arbitrary subset when equal values straddle the k-th place, so rows
    where the (k+1)-th value equals the k-th are redone exactly: everything strictly greater, then
    the lowest-indexed ties. Rows are finally sorted stably so ties inside the top-k follow index.
    """
    n_cols = sims.shape[1]
    width = min(k + 1, n_cols)
    vals, idx = torch.topk(sims, width, dim=1, largest=True, sorted=True)
    if width > k:
        tied = torch.nonzero(vals[:, k - 1] == vals[:, k]).flatten()
        for r in tied.tolist():
            row, kth = sims[r], vals[r, k - 1]
            above = torch.nonzero(row > kth).flatten()
            equal = torch.nonzero(row == kth).flatten()[: k - above.numel()]
            idx[r, :k] = torch.cat([above, equal])
            vals[r, :k] = row[idx[r, :k]]
        vals, idx = vals[:, :k], idx[:, :k]
    return _sort_ties_by_index(vals, idx)


def _sort_ties_by_index(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row by similarity desc, then index asc (two stable sorts)."""
    order = torch.sort(idx, dim=1, stable=True).indices
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), idx.gather(1, order)


def _knn_torch(
    q: torch.Tensor, ref: torch.Tensor, k: int, self_offset: int | None, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices of the k nearest references for one chunk of queries (torch matmul on q's device).

    ``buffer`` (at least len(q) x len(ref)) is reused across chunks: allocating a fresh ~1 GB
    similarity block per chunk costs more in page faults than the matmul itself on CPU.
    """
    sims = torch.matmul(q, ref.T, out=None if buffer is None else buffer[: len(q)])
    if self_offset is not None:  # exclude self by index, not by distance
        rows = torch.arange(len(q), device=q.device)
        sims[rows, rows + self_offset] = -math.inf
    return _stable_topk(sims, k)[1]


def _knn_faiss(index, q: torch.Tensor, ref: torch.Tensor, k: int, self_offset: int | None) -> torch.Tensor:
    """Like :func:`_knn_torch` but searched with a faiss IndexFlatIP (exact, CPU)."""
    n_ref = ref.shape[0]
    extra = 2 if self_offset is not None else 1  # one for self, one to detect boundary ties
    width = min(k + extra, n_ref)
    d, i = index.search(np.ascontiguousarray(q.numpy()), width)
    vals, idx = torch.from_numpy(d), torch.from_numpy(i).long()
    if self_offset is not None:
        is_self = idx == (torch.arange(len(q)) + self_offset)[:, None]
        is_self[~is_self.any(1), -1] = True  # self ranked beyond the window: drop the last instead
        vals = vals[~is_self].view(len(q), width - 1)
        idx = idx[~is_self].view(len(q), width - 1)
    if vals.shape[1] > k:
        tied = torch.nonzero(vals[:, k - 1] == vals[:, k]).flatten()
        if tied.numel():  # redo straddling ties exactly so the index rule holds
            vals[tied, :k], idx[tied, :k] = _knn_torch_rows(q, ref, tied, k, self_offset)
        vals, idx = vals[:, :k], idx[:, :k]
    return _sort_ties_by_index(vals, idx)[1]


def _knn_torch_rows(
    q: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor, k: int, self_offset: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact stable top-k (values, indices) for selected query rows, to settle faiss's ties."""
    sims = q[rows] @ ref.T
    if self_offset is not None:
        sims[torch.arange(len(rows)), rows + self_offset] = -math.inf
    return _stable_topk(sims, k)


#: neighbours kept per query in a :class:`PerQuery` table (enough for a gallery of the top 5)
NEIGHBOURS = 5


@dataclass(frozen=True)
class PerQuery:
    """What each scored query got: the evidence behind the means, for intervals, paired tests,
    per-class tables and galleries (lone queries, ``R == 0``, are left out as every metric skips them).

    ``values[:, j]`` is query ``j``'s summand of each metric in :attr:`keys` (hit@K for Recall@K,
    AP@R for MAP@R, its R-precision); :meth:`means` is what is logged, so the table's column means
    equal the logged metrics exactly. ``neighbours`` are reference indices in rank order.
    """

    ks: tuple[int, ...]
    query: np.ndarray  # int64 (n,): position of the query in its split
    label: np.ndarray  # int64 (n,)
    values: np.ndarray  # float64 (n, len(ks) + 2)
    neighbours: np.ndarray  # int64 (n, m), m <= NEIGHBOURS
    neighbour_labels: np.ndarray  # int64 (n, m); (n, 1) when read back from a table (nn1_class)

    @property
    def keys(self) -> list[str]:
        return recall_keys(self.ks) + ["map@r", "r_precision"]

    def means(self) -> dict[str, float]:
        """The metrics: column means in float64 (torch's reduction, as before per-query tables
        existed, so logged numbers did not move; pandas' ``.mean()`` agrees to ~1e-16); NaN
        without any query."""
        if not len(self.query):
            return {key: float("nan") for key in self.keys}
        means = torch.from_numpy(self.values).mean(0).tolist()
        return {key: float(v) for key, v in zip(self.keys, means)}

    @classmethod
    def from_frame(cls, frame) -> PerQuery:
        """The table :meth:`frame` wrote, read back (a run's ``per_query/*.parquet``)."""
        ks = tuple(int(c.removeprefix("hit_at_")) for c in frame.columns if c.startswith("hit_at_"))
        hits = [frame[f"hit_at_{k}"].to_numpy(np.float64) for k in ks]
        values = np.stack(hits + [frame["ap_at_r"].to_numpy(np.float64), frame["r_precision"].to_numpy(np.float64)], 1)
        nn = [c for c in frame.columns if c.startswith("nn_") and c[3:].isdigit()]
        neighbours = frame[nn].to_numpy(np.int64).reshape(len(frame), len(nn))
        first = frame["nn1_class"].to_numpy(np.int64)[:, None]
        return cls(ks, frame["query"].to_numpy(np.int64), frame["class"].to_numpy(np.int64), values, neighbours, first)

    def frame(self):
        """One row per query: ``query``, ``class``, ``hit_at_K``..., ``ap_at_r``, ``r_precision``,
        ``nn_1``... (reference index of each neighbour) and ``nn1_class``."""
        import pandas as pd

        cols: dict[str, np.ndarray] = {"query": self.query.astype(np.int32), "class": self.label.astype(np.int32)}
        for j, k in enumerate(self.ks):
            cols[f"hit_at_{k}"] = self.values[:, j].astype(bool)
        cols["ap_at_r"] = self.values[:, len(self.ks)]
        cols["r_precision"] = self.values[:, len(self.ks) + 1]
        for i in range(self.neighbours.shape[1]):
            cols[f"nn_{i + 1}"] = self.neighbours[:, i].astype(np.int32)
        cols["nn1_class"] = self.neighbour_labels[:, 0].astype(np.int32) if self.neighbours.shape[1] else -1
        return pd.DataFrame(cols)


def evaluate_retrieval(
    query_embeddings,
    query_labels,
    reference_embeddings=None,
    reference_labels=None,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int = 4096,
    use_faiss: bool | None = None,
) -> dict[str, float]:
    """Recall@K for each K in ``ks``, ``map@r`` and ``r_precision`` (see the module docstring).

    Without a reference set, each query retrieves from all queries except itself. ``use_faiss``:
    None picks faiss when it is installed and the embeddings are on the CPU (CUDA tensors stay on
    their GPU with the torch path); True requires faiss; False forces the torch path.
    """
    return per_query_retrieval(
        query_embeddings,
        query_labels,
        reference_embeddings,
        reference_labels,
        ks,
        chunk_size=chunk_size,
        use_faiss=use_faiss,
    ).means()


def per_query_retrieval(
    query_embeddings,
    query_labels,
    reference_embeddings=None,
    reference_labels=None,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int = 4096,
    use_faiss: bool | None = None,
    neighbours: int = NEIGHBOURS,
) -> PerQuery:
    """:func:`evaluate_retrieval`'s per-query values (and each query's nearest ``neighbours``)."""
    q = _as_tensor(query_embeddings)
    device = q.device
    q = F.normalize(q.to(device, torch.float32), dim=1)
    ql = _as_tensor(query_labels).to(device).reshape(-1).long()
    self_retrieval = reference_embeddings is None
    if self_retrieval:
        ref, rl = q, ql
    else:
        if reference_labels is None:
            raise ValueError("reference_labels is required with reference_embeddings")
        ref = F.normalize(_as_tensor(reference_embeddings).to(device, torch.float32), dim=1)
        rl = _as_tensor(reference_labels).to(device).reshape(-1).long()
    if len(q) != len(ql) or len(ref) != len(rl):
        raise ValueError("embeddings and labels must have the same length")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")

    # R per query: reference items sharing its label (minus itself in self-retrieval).
    uniq, inv = torch.unique(torch.cat([rl, ql]), return_inverse=True)
    ref_counts = torch.bincount(inv[: len(rl)], minlength=len(uniq))
    r_per_query = ref_counts[inv[len(rl) :]] - int(self_retrieval)
    n_avail = len(ref) - int(self_retrieval)
    k = min(max(max(ks), int(r_per_query.max()) if len(q) else 0), n_avail)
    valid = r_per_query > 0
    m = max(0, min(neighbours, k))
    empty = PerQuery(
        ks,
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
        np.zeros((0, len(ks) + 2)),
        np.zeros((0, m), np.int64),
        np.zeros((0, m), np.int64),
    )
    if k <= 0 or not bool(valid.any()):
        return empty

    if use_faiss is None:
        use_faiss = faiss is not None and device.type == "cpu"
    if use_faiss and faiss is None:
        raise RuntimeError("use_faiss=True but faiss is not installed")
    index = None
    if use_faiss:
        ref = ref.cpu()
        index = faiss.IndexFlatIP(ref.shape[1])
        index.add(np.ascontiguousarray(ref.numpy()))

    # Per-query values, reduced once at the end: the result does not depend on chunk_size.
    n_valid = int(valid.sum())
    per_query = torch.zeros(n_valid, len(ks) + 2, dtype=torch.float64, device=device)
    nearest = torch.zeros(n_valid, m, dtype=torch.long, device=device)
    filled = 0
    buffer = None
    if not use_faiss:
        buffer = torch.empty(min(chunk_size, len(q)), len(ref), dtype=torch.float32, device=device)
    for start in range(0, len(q), chunk_size):
        stop = min(start + chunk_size, len(q))
        keep = valid[start:stop]
        if not bool(keep.any()):
            continue
        offset = start if self_retrieval else None
        chunk = q[start:stop]
        if use_faiss:
            nn_idx = _knn_faiss(index, chunk.cpu(), ref, k, offset).to(device)
        else:
            nn_idx = _knn_torch(chunk, ref, k, offset, buffer)
        hits = (rl[nn_idx] == ql[start:stop, None])[keep]
        values = _per_query_metrics(hits, r_per_query[start:stop][keep], ks)
        per_query[filled : filled + len(values)] = values
        nearest[filled : filled + len(values)] = nn_idx[keep][:, :m]
        filled += len(values)
    nearest = nearest.cpu()  # host arrays: identical numbers on every device
    return PerQuery(
        ks,
        query=torch.nonzero(valid).flatten().cpu().numpy(),
        label=ql[valid].cpu().numpy(),
        values=per_query.cpu().numpy(),
        neighbours=nearest.numpy(),
        neighbour_labels=rl.cpu()[nearest].numpy(),
    )


def _per_query_metrics(hits: torch.Tensor, r: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """(b, len(ks)+2) float64: recall@K..., AP@R, R-precision; ``hits`` (b, k) bool in rank order."""
    b, k = hits.shape
    ranks = torch.arange(1, k + 1, device=hits.device)
    rel = hits & (ranks[None, :] <= r[:, None])
    cum = torch.cumsum(rel, dim=1).double()
    ap = (cum * rel / ranks.double()).sum(1) / r.double()
    rprec = rel.sum(1).double() / r.double()
    recalls = [hits[:, : min(kk, k)].any(1).double() for kk in ks]
    return torch.stack(recalls + [ap, rprec], dim=1)
