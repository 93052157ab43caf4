"""Uncertainty from per-query results: intervals over seeds and queries, paired tests, Holm.

A method's reported metric is the mean over seeds of the mean over test queries. Its two sources
of noise are the training seed (a handful of runs) and the finite query set, so the interval is a
two-level bootstrap (Field & Welsh 2007; Davison & Hinkley 1997, sec. 3.8): resample the seeds
with replacement, then the queries of each drawn seed with replacement, and take percentiles of
the mean. With one seed it is the ordinary percentile bootstrap over queries, which
``tests/test_stats.py`` checks against ``scipy.stats.bootstrap``.

Two methods are compared on the same queries of the same seeds: the per-query differences,
pooled over seeds, go through a paired sign-flip permutation test (each pair's difference keeps
or flips its sign under the null that the two methods are exchangeable), the test
``scipy.stats.permutation_test(permutation_type="samples")`` runs, vectorised here. Several
comparisons in one table are Holm-corrected (Holm 1979). Every draw comes from a fixed seed, so a
report rebuilt from the same runs has the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: resamples of intervals and permutation tests: Monte Carlo error of a 95% bound or of p = 0.05
#: about 0.005 (binomial standard error at 2,000 draws)
RESAMPLES = 2000
SEED = 0


def two_level_interval(
    per_seed: Sequence[np.ndarray], level: float = 0.95, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """Percentile interval of the mean over seeds of the mean over queries; ``per_seed``: one
    array of per-query values per seed (their lengths may differ)."""
    seeds = [np.asarray(v, dtype=np.float64) for v in per_seed if len(v)]
    if not seeds:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    n_seeds = len(seeds)
    picks = rng.integers(0, n_seeds, (resamples, n_seeds))  # level 1: which seeds
    means = np.empty((resamples, n_seeds))
    for s, values in enumerate(seeds):  # level 2: the queries of every drawn copy of seed s
        rows, cols = np.nonzero(picks == s)
        means[rows, cols] = _resampled_means(values, len(rows), rng)
    stats = means.mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def _resampled_means(values: np.ndarray, count: int, rng: np.random.Generator, block: int = 2**24) -> np.ndarray:
    """``count`` means of bootstrap resamples of ``values``, in blocks that bound memory (SOP: 60k queries)."""
    out = np.empty(count)
    per_block = max(1, block // max(len(values), 1))
    for start in range(0, count, per_block):
        stop = min(start + per_block, count)
        idx = rng.integers(0, len(values), (stop - start, len(values)))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def paired_p_value(differences: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED, block: int = 2**24) -> float:
    """Two-sided p-value of a paired sign-flip permutation test that the mean difference is 0;
    ``differences``: per pair (query and seed), method A's value minus method B's."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if not len(d) or not np.any(d):
        return 1.0
    rng = np.random.default_rng(seed)
    observed = abs(d.mean())
    at_least = 0
    per_block = max(1, block // len(d))
    for start in range(0, resamples, per_block):
        n = min(per_block, resamples - start)
        signs = rng.integers(0, 2, (n, len(d)), dtype=np.int8) * 2 - 1
        flipped = np.abs((signs * d).mean(axis=1))
        at_least += int(np.count_nonzero(flipped >= observed * (1 - 1e-12)))  # ties count against
    return (at_least + 1) / (resamples + 1)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error controlled), in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out.tolist()


def paired_differences(a, b, column: str) -> np.ndarray:
    """A's minus B's ``column`` for every (seed, query) both tables have (pandas frames with
    ``seed``, ``query`` and the column): the pairs of :func:`paired_p_value`."""
    both = a[["seed", "query", column]].merge(b[["seed", "query", column]], on=["seed", "query"])
    return both[f"{column}_x"].to_numpy(np.float64) - both[f"{column}_y"].to_numpy(np.float64)
