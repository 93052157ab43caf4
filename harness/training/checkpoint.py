"""Per-epoch checkpoints, so a killed or failed run continues in the same MLflow run.

A checkpoint holds everything the next epoch depends on: the trainable state (parameters and
saved buffers), the optimiser and schedule, every random generator (Python, NumPy, torch CPU and
CUDA, the train loader's generator), the best-so-far epoch and state, the per-epoch history and
the throughput counters. With the same seed on CPU a resumed run equals an uninterrupted one bit
for bit. The file lives beside the store (``<dir of mlflow.db>/checkpoints/<run id>.pt``, or
``~/.cache/dmlbench/checkpoints`` for a server store; ``tracking.checkpoint_dir`` moves it), its
path is the run's ``dmlbench.checkpoint`` tag, and it is deleted when the run finishes unless
``tracking.keep_checkpoints`` is set.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import UserError


def checkpoint_dir(tracking_uri: str, configured: str = "") -> Path:
    if configured:
        return Path(configured).expanduser()
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.endswith(":memory:"):
        return Path(tracking_uri.removeprefix("sqlite:///")).parent / "checkpoints"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dmlbench" / "checkpoints"


def rng_state(loader_generator: torch.Generator | None) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }


def _numpy_state() -> tuple:
    """NumPy's legacy generator state with its key array as a tensor (loadable with weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and state["loader"] is not None:
        loader_generator.set_state(state["loader"])


def save(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a kill during the write leaves the previous checkpoint intact, and a
    failed write (a full disk) leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            raise_if_full(path.parent, exc)
        raise


def raise_if_full(folder: Path, exc: Exception) -> None:
    """torch's writer reports a full disk as an internal error ("unexpected pos"): when a small
    probe write fails too, say what it is, as an ENOSPC OSError."""
    import errno

    probe = folder / f".space-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 65536)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as probe_exc:
        if probe_exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(errno.ENOSPC, f"No space left on device writing a checkpoint in {folder}") from exc
    finally:
        probe.unlink(missing_ok=True)


def load(path: Path, run_id: str) -> dict[str, Any]:
    """The checkpoint's state; a missing, empty or cut file is a one-line UserError (the run is
    left as it was)."""
    if not path.is_file():
        raise UserError(
            f"run {run_id} has no checkpoint at {path}; it finished, or it was started "
            "before checkpoints existed, or the file was removed"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(
            f"checkpoint {path} of run {run_id} is damaged ({path.stat().st_size:,} bytes: {reason}); "
            "it cannot be resumed: the run is left as it was"
        ) from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise UserError(f"checkpoint {path} of run {run_id} is not a dmlbench checkpoint; it cannot be resumed")
    return state


def tag_value(path: Path, tracking_uri: str) -> str:
    """What the run's ``dmlbench.checkpoint`` tag records: the path relative to the store's
    folder when the checkpoint lives under it (the folder can then move with its checkpoints)."""
    base = store_folder(tracking_uri)
    if base is not None:
        try:
            return str(path.resolve().relative_to(base))
        except ValueError:
            pass
    return str(path)


def locate(tag: str, tracking_uri: str) -> Path:
    """The checkpoint a ``dmlbench.checkpoint`` tag names: relative tags from the store's folder;
    an absolute path that no longer exists (the folder moved) is looked for there too."""
    path, base = Path(tag), store_folder(tracking_uri)
    if not path.is_absolute():
        return (base / path) if base is not None else path
    if not path.exists() and base is not None and (base / "checkpoints" / path.name).exists():
        return base / "checkpoints" / path.name
    return path


def store_folder(tracking_uri: str) -> Path | None:
    """The folder of a local sqlite store, or None for servers and databases."""
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.endswith(":memory:"):
        return Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent
    return None


def ensure_writable(folder: Path) -> None:
    """Checked before a run exists: checkpoints must be writable there (created if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserError(
            f"cannot write checkpoints to {folder} ({exc.strerror or type(exc).__name__}); "
            "set tracking.checkpoint_dir to a writable folder"
        ) from None


def claim_new(folder: Path, run_id: str) -> tuple[Path, Claim]:
    """The checkpoint file of a new run, claimed by this process."""
    path = folder / f"{run_id}.pt"
    return path, Claim(path, run_id)


def claim_and_load(run_id: str) -> tuple[Path, Claim, dict[str, Any]]:
    """A killed or failed run's checkpoint (found by its ``dmlbench.checkpoint`` tag), claimed
    before it is read: two resumes of one run never both train it."""
    import mlflow

    path = locate(mlflow.get_run(run_id).data.tags.get("dmlbench.checkpoint", ""), mlflow.get_tracking_uri())
    claim = Claim(path, run_id)
    try:
        return path, claim, load(path, run_id)
    except UserError:
        claim.release()
        raise


class Claim:
    """An exclusive claim on a run while a process trains it: an ``flock`` on ``<checkpoint>.lock``,
    released by the kernel when the process ends however it ends (no stale claims). A second
    ``train --resume`` of the same run, or a study retry racing a live worker, is refused."""

    def __init__(self, path: Path, run_id: str) -> None:
        import fcntl

        self.path = path.with_suffix(".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 200).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise RunClaimed(
                f"run {run_id} is being trained by {holder}; it is not trained twice: wait "
                "for it, or stop that process first"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())

    def release(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing drops the flock
        self.fd = None


class RunClaimed(UserError):
    """The run is being trained by another live process."""
