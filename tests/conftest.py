"""Shared fixtures: tiny, fast runs on the real Fashion-MNIST and random-init backbones."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# tiny shapes and `pytest -n 2` on 2 cores: one thread per process avoids oversubscription, which
# made small convolutions several times slower. Set before torch loads, and in the environment so
# every subprocess a test starts (dmlbench commands, servers, the GPU-window script) inherits it:
# two workers each running a 2-thread subprocess spun OpenMP threads against each other (the
# toy GPU-window test took 173 s in the suite and 34 s alone).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# every `mlflow server` a test starts (dmlbench ui leaves it off too): MLflow's job runner is seven
# huey processes for its GenAI jobs, 30 s of CPU per start on 2 cores, and no test submits a job
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow sqlite store (creating one costs seconds; copying is free)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_template(_mlflow_template) -> Path:
    """The migrated empty store, for a test that starts its own `mlflow server` on a sqlite file."""
    return _mlflow_template


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch, _mlflow_template) -> str:
    """A private MLflow store per test, so tests never touch the user's mlflow.db."""
    import mlflow

    path = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_template, path)
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # an earlier test's set_tracking_uri would win over the variable
    yield uri
    mlflow.set_tracking_uri(None)


def all_runs(uri: str) -> list:
    """Every run of the MLflow store at ``uri`` (a sqlite file or a server), in every experiment."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def rerun_in_process(cmd: list[str], env: dict, monkeypatch) -> int:
    """``cmd`` (a ``dmlbench`` command line) run again in this process with ``env``: the rerun
    needs no interpreter of its own, the fault (an outage, a kill) was met by the first process
    (saves a command's 5 s of imports)."""
    for key, value in env.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    assert cmd[:3] == [sys.executable, "-m", "harness.cli"]
    from harness.cli import main

    return main(cmd[3:])


TINY = {
    "dataset": "fashion_mnist",
    "data.image_size": 32,
    "data.resize_size": 32,
    "data.max_per_class": 32,
    "data.batch_size": 48,
    "data.samples_per_class": 16,
    "data.num_workers": 0,
    "model.pretrained": False,
    "model.embed_dim": 32,
    "optim.epochs": 2,
    "optim.warmup_epochs": 0,
    "optim.lr": 1e-3,
    "eval.batch_size": 128,
    "tracking.log_artifacts": True,
    "tracking.system_metrics": False,  # one test turns them on; a sampler thread per run is noise here
}

TINY_VIT = {"model.backbone_kwargs": {"img_size": 32, "depth": 2}}


@pytest.fixture
def tiny_overrides(tracking_uri) -> dict:
    """Run-config overrides for a run of a few seconds (CNN backbone: resnet18-sized or smaller)."""
    return {**TINY, "tracking.uri": tracking_uri}


@pytest.fixture
def tiny_vit_overrides(tracking_uri) -> dict:
    """Same for a 2-block ViT-S at 32 px (6 heads, qkv bias): use backbone vit_small_patch16_224."""
    return {**TINY, **TINY_VIT, "tracking.uri": tracking_uri}


# ----------------------------------------------------------------------------- PostgreSQL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def as_postgres(args: list[str]) -> list[str]:
    """The server refuses to run as root: run its tools as the 'postgres' user when we are root."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


class PostgresCluster:
    """One real PostgreSQL server on loopback for the whole session (per pytest worker): initdb
    and start cost ~13 s, a database ~0.3 s. Tests that stop or restart it (the outage tests) start
    it again; :meth:`database` checks it is up before handing out a fresh database."""

    def __init__(self, bindir: Path) -> None:
        self.bindir, self.port = bindir, free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="dmlbench-pg-", dir="/tmp"))
        os.chmod(self.folder, 0o777)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
        self.data = self.folder / "data"
        self.options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        self._names = itertools.count()
        self._tool(["initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres"])
        self.ctl("start")

    def _tool(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(as_postgres([str(self.bindir / args[0]), *args[1:]]), check=check, capture_output=True)

    def ctl(self, action: str) -> None:
        """``pg_ctl start|stop|restart``, waiting for it (fast shutdown: sessions are cut)."""
        log = str(self.folder / "log")
        self._tool(["pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "-l", log, "-o", self.options, action])

    def up(self) -> bool:
        return self._tool(["pg_ctl", "-D", str(self.data), "status"], check=False).returncode == 0

    def database(self, name: str) -> str:
        """A new, empty database; its SQLAlchemy URL."""
        if not self.up():
            self.ctl("start")
        self._tool(["createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name])
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def fresh_name(self) -> int:
        return next(self._names)

    def close(self) -> None:
        self._tool(["pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"], check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL server (skips visibly where it is not installed)."""
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server not installed (Debian: apt-get install postgresql; .ci/run installs it)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as the postgres user")
    cluster = PostgresCluster(bindir)
    yield cluster
    cluster.close()


@pytest.fixture
def postgres_url(postgres) -> str:
    """A fresh Optuna database on the session's server (``dmlbench_N``), with an MLflow database
    beside it (``mlflow_N``, see :func:`mlflow_database`)."""
    n = postgres.fresh_name()
    postgres.database(f"mlflow_{n}")
    return postgres.database(f"dmlbench_{n}")


def mlflow_database(postgres_url: str) -> str:
    """The MLflow server's database that goes with an Optuna database of :func:`postgres_url`."""
    return postgres_url.replace("/dmlbench_", "/mlflow_")
