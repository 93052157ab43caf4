"""Where outputs go: where the user stands, or ``$DMLBENCH_HOME`` (never the package's folder)."""

from __future__ import annotations

import os
from pathlib import Path

from harness.errors import UserError


def home() -> Path:
    """Where outputs go by default: ``$DMLBENCH_HOME``, else the current directory (never the
    package's own folder): ``mlflow.db``, study journals, ``checkpoints/``, ``reports/``,
    ``data/`` for downloads. A ``$DMLBENCH_HOME`` that does not exist yet is created, as the
    user named it on purpose."""
    chosen = os.environ.get("DMLBENCH_HOME")
    if not chosen:
        return Path.cwd().resolve()
    path = Path(chosen).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"DMLBENCH_HOME={chosen!r} cannot be created: {exc.strerror}") from None
    return path
