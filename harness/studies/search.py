"""How a study searches: its Optuna sampler and pruner. The samplers are seeded so that a
trial's parameters do not depend on which worker asks for it or when.

A seeded TPE sampler in one process draws its random start-up points from one stream, so with
several workers (or after a resume) the point a trial gets depends on which process asked first.
:class:`NumberedStartSampler` draws a start-up trial's value of each parameter from its own
stream, seeded by (study seed, trial number, parameter name): trial *k* gets the same start-up
point with 1 worker or 8, interrupted or not. After the start-up trials TPE models the finished
ones, and which are finished when a worker asks is timing: that part of a parallel study is not
reproducible, as Optuna documents.
"""

from __future__ import annotations

import zlib
from typing import Any

import optuna

from harness.studies.spec import Entry, StudySpec, grid_size

#: Optuna's TPE default: the first trials are random points
TPE_STARTUP_TRIALS = 10


class NumberedStartSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler: trials numbered below ``startup`` get random points drawn from a stream
    of their own; later trials, and relative sampling, go to the wrapped sampler."""

    def __init__(self, inner: Any, seed: int, startup: int | None) -> None:
        self.inner, self.seed, self.startup = inner, seed, startup

    def _numbered(self, number: int) -> bool:
        return self.startup is None or number < self.startup

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict:
        return {} if self._numbered(trial.number) else self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: dict) -> dict:
        return {} if self._numbered(trial.number) else self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        if not self._numbered(trial.number):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)
        stream = zlib.crc32(f"{self.seed}/{trial.number}/{param_name}".encode())
        return optuna.samplers.RandomSampler(seed=stream).sample_independent(
            study, trial, param_name, param_distribution
        )

    def before_trial(self, study: Any, trial: Any) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def make_sampler(spec: StudySpec, entry: Entry, offset: int = 0) -> Any:
    """The spec's seeded sampler. ``offset`` shifts the seed of what is still drawn from one
    stream (TPE after its start-up trials), so workers and resumed runs do not repeat each other."""
    base = int(spec.sampler.get("seed", 0))
    name, seed = spec.sampler["name"], base + offset
    if name == "tpe":
        startup = int(spec.sampler.get("n_startup_trials", TPE_STARTUP_TRIALS))
        inner = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        return NumberedStartSampler(inner, base, startup)
    if name == "random":
        return NumberedStartSampler(optuna.samplers.RandomSampler(seed=seed), base, None)
    if name == "bruteforce":
        return optuna.samplers.BruteForceSampler(seed=seed)
    grid = {}
    for key, d in entry.search_space.items():
        if d["type"] == "categorical":
            grid[key] = list(d["choices"])
        else:
            n = grid_size({key: d}) or 1
            grid[key] = [d["low"] + i * d["step"] for i in range(n)]
    return optuna.samplers.GridSampler(grid, seed=seed)


def make_pruner(spec: StudySpec) -> Any:
    """The spec's pruner (median, Hyperband on per-epoch reports, threshold), or none."""

    p = spec.pruner
    if p["name"] == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(p.get("n_startup_trials", 1)), n_warmup_steps=int(p.get("n_warmup_steps", 0))
        )
    if p["name"] == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=int(p.get("min_resource", 1)),
            max_resource=spec.budget.epochs,
            reduction_factor=int(p.get("reduction_factor", 3)),
        )
    if p["name"] == "threshold":
        return optuna.pruners.ThresholdPruner(
            lower=p.get("lower"), upper=p.get("upper"), n_warmup_steps=int(p.get("n_warmup_steps", 0))
        )
    return optuna.pruners.NopPruner()
