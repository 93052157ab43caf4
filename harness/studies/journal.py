"""Optuna journal files checked before they are opened, and repaired on request.

A journal is one JSON record per line. A crash or a full disk can leave the last record cut
short; Optuna skips it when reading, but its next append lands on the same line, and from then on
every read fails. So a journal is checked before it is opened: a record without its line end, or
a line that is not JSON, stops everything in one line naming the file and the line, and nothing
is appended after it. ``dmlbench study repair SPEC`` keeps the complete records before the first
bad line and moves the rest, byte for byte, to ``<journal>.damaged-<time>`` (a cut last record
loses nothing that was ever readable).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness.errors import UserError


def first_bad_line(path: Path) -> tuple[int, int, str] | None:
    """``(line number, byte offset, what is wrong)`` of the first damaged record, or None."""
    offset = 0
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.endswith(b"\n"):
                return number, offset, "a record cut short (no line end: a crash or a full disk while writing)"
            try:
                json.loads(line)
            except ValueError as exc:
                return number, offset, f"not a JSON record ({exc.msg})"
            offset += len(line)
    return None


def check_journal(path: Path, spec_path: str | Path = "SPEC") -> None:
    """Refuse a damaged journal before Optuna opens (and appends to) it."""
    if not path.is_file():
        return
    for _ in range(4):  # a record another process is appending right now completes within moments
        size, bad = path.stat().st_size, first_bad_line(path)
        if bad is None or not bad[2].startswith("a record cut short"):
            break
        time.sleep(0.5)
        if path.stat().st_size != size:
            continue
        bad = first_bad_line(path)
        break
    if bad is not None:
        number, _, what = bad
        raise UserError(
            f"Optuna journal {path} is damaged at line {number}: {what}; nothing was written to it. "
            f"Repair it with: dmlbench study repair {spec_path} (keeps the {number - 1} complete "
            f"records before that line, moves the rest aside)"
        )


def repair_journal(path: Path) -> str:
    """Cut the journal at its first damaged line, keeping what follows in a side file."""
    if not path.is_file():
        raise UserError(f"no Optuna journal at {path}")
    bad = first_bad_line(path)
    if bad is None:
        return f"{path}: every record is complete; nothing to repair"
    number, offset, what = bad
    data = path.read_bytes()
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.write_bytes(data[offset:])
    tmp = path.with_suffix(path.suffix + ".repairing")
    tmp.write_bytes(data[:offset])
    tmp.replace(path)
    return (
        f"{path}: kept the {number - 1} complete records before line {number} ({what}); the rest "
        f"({len(data) - offset:,} bytes) is in {aside}"
    )
