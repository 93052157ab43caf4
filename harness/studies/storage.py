"""Optuna storage, samplers, pruners and the per-(study, dataset, entry) Optuna study."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.studies.spec import Entry, StudySpec, grid_size


def storage_url(spec: StudySpec, storage: str | None = None) -> str:
    """The Optuna storage to use: argument, spec, else a journal file beside the MLflow store
    (``<dir of mlflow.db>/<study>.optuna.journal``; ``$DMLBENCH_HOME`` or the current directory
    for a server store)."""
    from harness.config import home

    if storage or spec.storage:
        return storage or spec.storage
    uri = spec.tracking_uri
    folder = Path(uri.removeprefix("sqlite:///")).resolve().parent if uri.startswith("sqlite:///") else home()
    return str(folder / f"{spec.name}.optuna.journal")


def open_storage(url: str, spec_path: str | Path = "SPEC") -> Any:
    """SQLAlchemy URLs -> RDBStorage; anything else is a journal file path (``journal:`` optional),
    checked first: a damaged journal is refused before anything is appended to it."""
    import optuna

    if "://" in url and not url.startswith("journal:"):
        return open_rdb(url)
    from optuna.storages.journal import JournalFileBackend

    from harness.studies.journal import check_journal

    path = Path(url.removeprefix("journal:")).expanduser()
    check_journal(path, spec_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


#: how long a database storage may stay unreachable (a PostgreSQL restart) before a study gives up
#: (``DMLBENCH_STORAGE_OUTAGE_S`` changes it)
STORAGE_OUTAGE_S = float(os.environ.get("DMLBENCH_STORAGE_OUTAGE_S", "120"))


def retrying_storage(inner: Any, url: str, outage_s: float = STORAGE_OUTAGE_S) -> Any:
    """``inner`` (an RDBStorage) with every call retried while the database is unreachable, for up
    to ``outage_s``: a database restart during a trial's per-epoch report, a heartbeat or a tell
    is waited out (SQLAlchemy's pre-ping reconnects); past that, one StoreUnavailable line. Once a
    call has waited out the whole outage the storage counts as down: the calls the study makes on
    its way out (ending the trial, the heartbeat thread's) give up at once with the same line
    instead of waiting ``outage_s`` each (with the default 120 s, a dead database took minutes)."""
    import optuna
    import sqlalchemy.exc as sa

    from harness.errors import StoreUnavailable

    transient = (optuna.exceptions.StorageInternalError, sa.OperationalError, sa.InterfaceError)

    def forward(name: str) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            deadline, delay = time.monotonic() + outage_s, 0.5
            while True:
                try:
                    return getattr(self._inner, name)(*args, **kwargs)
                except transient as exc:
                    left = deadline - time.monotonic()
                    if self._down is None and left > 0:
                        time.sleep(min(delay, left))
                        delay = min(2 * delay, 5.0)
                        continue
                    if self._down is None:
                        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__]
                        self._down = (
                            f"the Optuna storage {_safe(url)} did not answer for {outage_s:g} s "
                            f"({reason[0][:160]}); the study stopped and a rerun continues it"
                        )
                    raise StoreUnavailable(self._down) from None

        return call

    class RetryingStorage(optuna.storages.BaseStorage):
        def __init__(self) -> None:
            self._inner = inner
            self._down: str | None = None  # the one line, once a call has waited out the outage

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

    for name in optuna.storages.BaseStorage.__abstractmethods__:
        setattr(RetryingStorage, name, forward(name))
    RetryingStorage.__abstractmethods__ = frozenset()
    return RetryingStorage()


def _safe(url: str) -> str:
    """A storage URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL
        return url


def open_rdb(url: str, attempts: int = 10) -> Any:
    """An Optuna RDBStorage; bad URLs, missing drivers and unreachable servers are one-line errors.

    Several processes starting on a fresh database race to create Optuna's tables and enum types
    (PostgreSQL answers the loser with a duplicate-object error): retry until the schema exists.
    """
    import optuna
    import sqlalchemy.exc as sa

    for attempt in range(attempts):
        try:
            return retrying_storage(optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}), url)
        except (ImportError, ModuleNotFoundError) as exc:
            raise UserError(
                f"bad --storage {url!r}: its database driver is missing ({exc}); for PostgreSQL "
                "install the extra: pip install 'dmlbench[postgres]'"
            ) from None
        except (sa.ArgumentError, ValueError) as exc:
            raise UserError(
                f"bad --storage {url!r}: {exc}; valid: a SQLAlchemy URL "
                "(postgresql+psycopg://USER@HOST:PORT/DB, sqlite:///PATH) or a journal file path"
            ) from None
        except sa.OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
            raise UserError(f"cannot open Optuna storage {url!r}: {reason}") from None
        except sa.DBAPIError:  # another process is creating the schema right now
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def budget_of(spec: StudySpec, entry: Entry) -> int:
    """Trials to finish for ``entry``: n_trials, capped by the grid size for grid samplers."""
    if entry.fixed:
        return 0
    if spec.sampler["name"] in ("bruteforce", "grid"):
        return min(spec.budget.n_trials, grid_size(entry.search_space) or spec.budget.n_trials)
    return spec.budget.n_trials


def open_existing_storage(url: str, spec_path: str | Path = "SPEC") -> Any | None:
    """The storage at ``url`` for reading, or None where a journal file does not exist (it is
    not created just to find it empty)."""
    if "://" not in url and not Path(url.removeprefix("journal:")).expanduser().exists():
        return None
    return open_storage(url, spec_path)


def open_study(spec: StudySpec, dataset: str, entry: Entry, storage: Any, offset: int = 0) -> Any:
    import optuna

    from harness.studies.search import make_pruner, make_sampler  # imports optuna: not on the CLI's fast paths

    study = optuna.create_study(
        study_name=spec.study_name(dataset, entry),
        storage=storage,
        direction="maximize",
        sampler=make_sampler(spec, entry, offset),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    if study.metric_names is None:  # optuna-dashboard then says what is maximised, once per study
        label_study(study, spec, dataset, entry, spec.metric)
    return study


def label_study(study: Any, spec: StudySpec, dataset: str, entry: Entry, metric: str) -> None:
    """Name the study's value (optuna-dashboard otherwise says "Objective 0") and record what it
    is as user attributes: dataset, method, recipe, protocol, budget, MLflow experiment."""
    import optuna

    with warnings.catch_warnings():  # experimental in Optuna 4-5, and stable enough for a label
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric])
    labels = {
        "dataset": dataset,
        "method": entry.method,
        "entry": entry.name,
        "backbone": entry.backbone,
        "recipe": entry.preset or "default (harness defaults)",
        "protocol": spec.protocol,
        "objective": metric,
        "budget": f"{budget_of(spec, entry)} trials x {spec.budget.epochs} epochs",
        "mlflow_experiment": spec.experiments.get(dataset, dataset),
    }
    for key, value in labels.items():
        study.set_user_attr(key, value)
