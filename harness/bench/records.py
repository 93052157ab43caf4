"""The GPU window's records: one JSON object per line, appended the moment a measurement exists.

A stage killed at its cap, or a command killed at its limit, loses nothing it had measured: every
record is on disk (flushed and fsynced) before the next measurement starts, and the Markdown
summary is rebuilt from the file alone (:func:`summary`), after every stage and on interrupt.
Every record has ``stage``, ``method`` (None for a stage's own record), ``status`` (``ok``,
``failed``, ``timeout``, ``skipped``, ``interrupted``) and, unless ok, ``error``: one line.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RECORDS = "records.jsonl"
SUMMARY = "summary.md"
STATUSES = ("ok", "failed", "timeout", "skipped", "interrupted")


def one_line(exc: BaseException | str) -> str:
    """An error as one line: its type and the first line of its message, at most 300 characters."""
    if isinstance(exc, str):
        text = exc
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return " ".join(text.split())[:300]


class Recorder:
    """Appends records of one stage to ``OUT/records.jsonl``."""

    def __init__(self, out: Path, stage: str) -> None:
        self.path, self.stage = Path(out) / RECORDS, stage

    def add(
        self, method: str | None = None, status: str = "ok", error: str | BaseException | None = None, **fields: Any
    ) -> dict[str, Any]:
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        record: dict[str, Any] = {"stage": self.stage, "method": method, "status": status}
        if error is not None:
            record["error"] = one_line(error)
        record.update({k: _plain(v) for k, v in fields.items()})
        record["at"] = time.strftime("%H:%M:%S")
        append(self.path, record)
        return record


def append(path: Path, record: dict[str, Any]) -> None:
    """One line, written and synced before returning (a kill right after keeps it)."""
    line = json.dumps(record, sort_keys=False, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read(out: Path) -> list[dict[str, Any]]:
    """Every complete record; a last line cut by a kill is left out."""
    path = Path(out) / RECORDS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


#: columns of each stage's table in the summary, when the records have them
COLUMNS = {
    "smoke": ["method", "status", "family", "params/trainable", "syncs", "decoder", "error"],
    "step": [
        "method",
        "status",
        "img_s",
        "baseline_img_s",
        "step_vs_baseline",
        "pct_bf16_peak",
        "peak_gb",
        "train_gflops_per_img",
        "error",
    ],
    "e2e": [
        "method",
        "pipeline",
        "status",
        "data_img_s",
        "pipeline_img_s",
        "eval_share",
        "syncs_per_step",
        "decoder",
        "e2e_wall_s",
        "seconds",
        "error",
    ],
    "sop": [
        "method",
        "pipeline",
        "status",
        "data_img_s",
        "decoder",
        "decoded_batches",
        "e2e_wall_s",
        "seconds",
        "error",
    ],
    "concurrency": ["k", "status", "trials", "budget", "wall_s", "trained_img_s", "trials_per_min", "error"],
    "decode": [
        "status",
        "decoder",
        "decode_device_img_s",
        "decode_cpu_img_s",
        "decode_max_abs_diff",
        "decode_mean_abs_diff",
        "test_transform_max_abs_diff",
        "error",
    ],
    "mapr": ["status", "eval_n", "eval_dim", "eval_s", "eval_peak_gb", "error"],
}


def summary(records: Iterable[dict[str, Any]]) -> str:
    """Markdown: the environment, each stage's own line (status, seconds), then its measurements."""
    records = list(records)
    lines = ["# GPU window", ""]
    env = next((r for r in records if r.get("kind") == "env"), None)
    if env:
        lines += [
            "- "
            + ", ".join(
                f"{k} {env[k]}" for k in ("device", "torch", "torchvision", "timm", "peft", "python") if env.get(k)
            ),
            "",
        ]
    stages = list(dict.fromkeys(r["stage"] for r in records if r.get("stage")))
    for stage in stages:
        own = [r for r in records if r.get("stage") == stage and r.get("kind") == "stage"]
        rows = [r for r in records if r.get("stage") == stage and r.get("kind") not in ("stage", "env")]
        head = own[-1] if own else {"status": "running"}
        line = f"## {stage}: {head['status']}"
        if head.get("seconds") is not None:
            line += f" in {head['seconds']:.0f} s (cap {head.get('cap_s', '?')} s)"
        lines += [line, ""]
        if head.get("error"):
            lines += [f"{head['error']}", ""]
        if rows:
            cols = [c for c in COLUMNS.get(stage, []) if any(r.get(c) is not None for r in rows)]
            cols = cols or sorted({k for r in rows for k in r} - {"stage", "at"})
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
            lines.append("")
        staged = {r.get("pipeline", r["method"]): r["stages"] for r in rows if isinstance(r.get("stages"), dict)}
        if staged:  # the data path stage by stage, per pipeline
            names = list(dict.fromkeys(n for s in staged.values() for n in s))
            lines += ["| data path, host ms per image | " + " | ".join(staged) + " |", "|---|" + "---|" * len(staged)]
            lines += [f"| {n} | " + " | ".join(_cell(s.get(n)) for s in staged.values()) + " |" for n in names]
            lines += [
                "| total | "
                + " | ".join(_cell(sum(v for v in s.values() if v is not None)) for s in staged.values())
                + " |",
                "",
            ]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 10 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "/")


def write_summary(out: Path) -> str:
    text = summary(read(out))
    tmp = Path(out) / (SUMMARY + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, Path(out) / SUMMARY)
    return text
