"""Range rules written beside the config fields they constrain (peft's ``__post_init__`` checks,
kept in one place per rule).

A field declares its range with :func:`ranged`::

    #: images per batch
    batch_size: int = ranged(64, "> 0")
    #: fraction of training classes held out for validation
    val_fraction: float = ranged(0.2, "[0, 1)")

and :func:`check_ranges` (run on every resolved config, the method's options included) refuses a
value outside it in one line: ``bad value 0 for 'data.batch_size': must be > 0``. A range is a
bound (``> 0``, ``>= -1``) or an interval (``[0, 1)``); ``note`` says what a special value means
(``>= 0`` with note ``0 = all``); ``finite`` also refuses infinities. Rules that relate two fields
(the test crop and the resize, the class-balanced sampler and the batch size) are a dataclass's
``check()`` method.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from dataclasses import dataclass
from typing import Any

from harness.errors import UserError

_BOUND = re.compile(r"^(>=|<=|>|<)\s*(-?[\d.e+-]+)$")
_INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([\])])$")
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass(frozen=True)
class Range:
    """A field's valid range, and the words of the refusal."""

    spec: str
    note: str = ""
    finite: bool = False

    def __post_init__(self) -> None:
        if not (_BOUND.match(self.spec) or _INTERVAL.match(self.spec)):
            raise ValueError(f"range {self.spec!r}: write a bound ('> 0', '>= -1') or an interval ('[0, 1)')")

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and (math.isnan(value) or (self.finite and math.isinf(value))):
            return False
        if m := _BOUND.match(self.spec):
            return _OPS[m.group(1)](value, float(m.group(2)))
        lo_open, lo, hi, hi_open = _INTERVAL.match(self.spec).groups()
        above = value > float(lo) if lo_open == "(" else value >= float(lo)
        below = value < float(hi) if hi_open == ")" else value <= float(hi)
        return above and below

    def text(self) -> str:
        words = ("a finite number " if self.finite else "") + (
            self.spec if _BOUND.match(self.spec) else f"in {self.spec}"
        )
        return f"must be {words}" + (f" ({self.note})" if self.note else "")


def ranged(default: Any, spec: str, note: str = "", finite: bool = False) -> Any:
    """A dataclass field with ``default`` whose values must lie in ``spec`` (see the module)."""
    return dataclasses.field(default=default, metadata={"range": Range(spec, note, finite)})


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Every ranged field of the dataclass ``obj`` and of its dataclass fields, then each one's
    ``check()``; the first value outside its range is a one-line :class:`UserError`."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{prefix}{f.name}.")
        elif (rule := f.metadata.get("range")) is not None and not rule.holds(value):
            raise UserError(f"bad value {value!r} for '{prefix}{f.name}': {rule.text()}")
    if callable(check := getattr(obj, "check", None)):
        check(prefix)
