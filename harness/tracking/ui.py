"""``dmlbench ui``: the MLflow UI on the run store, its address once it answers, and a clean stop.

MLflow's UI is several processes (the server and uvicorn). It runs in its own process group, and
Ctrl-C or ``kill`` of dmlbench stops the whole group, so nothing is left serving (or holding the
port) afterwards. MLflow's job runner (huey consumers for its GenAI jobs: scorers, prompt
optimisation, which dmlbench never submits) is off unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION``
is set: its seven processes took 30 s of CPU and made the UI answer 7 s later on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.errors import UserError
from harness.tracking.links import runs_view, wait_for

#: MLflow's switch for its job runner; dmlbench's UI leaves it off unless the user sets it
JOB_EXECUTION = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def serve_ui(uri: str, host: str, port: int, timeout: float, verbose: bool = False) -> int:
    """Serve ``uri`` until interrupted; prints the runs view of the latest experiment. MLflow's
    own output (deprecation notices, one access-log line per request) goes to a log file unless
    ``verbose``; its end is shown if the server does not come up."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    log = None if verbose else tempfile.NamedTemporaryFile("w+", prefix="dmlbench-ui-", suffix=".log", delete=False)
    env = {JOB_EXECUTION: "false", **os.environ, **({"PYTHONWARNINGS": "ignore"} if log else {})}
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT if log else None, env=env)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as Ctrl-C does
    try:
        if not wait_for(base + "/health", proc, timeout_s=timeout):
            tail = ""
            if log is not None:
                log.flush()
                lines = [ln for ln in Path(log.name).read_text().splitlines() if ln.strip()]
                tail = f"; its last line: {lines[-1][:200]}" if lines else ""
            raise UserError(
                f"the MLflow UI did not answer on {base} within {timeout:.0f} s (port {port} in use? try --port){tail}"
            )
        print(
            f"MLflow UI for {uri}: {base}/{runs_view(uri)}" + ("" if verbose else f"  (server log: {log.name})"),
            flush=True,
        )
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to the server's whole process group, SIGKILL to whatever is left after ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the server itself, or it stays in the group as a zombie
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
