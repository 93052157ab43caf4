"""Number and table formatting shared by every report file: percentages, counts, Markdown and LaTeX."""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

#: retrieval metrics are fractions in MLflow and percentages in tables
RETRIEVAL = re.compile(r"^(recall_at_\d+|map_at_r|r_precision)$")
DASH = "—"



# ----------------------------------------------------------------------------- formatting


def fmt_pm(mean: float, std: float, digits: int = 1) -> str:
    """``"73.1 ± 0.4"``; a single seed (std NaN) gives ``"73.1"``; a missing value a dash."""
    if mean is None or not math.isfinite(mean):
        return DASH
    if std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_count(n: float) -> str:
    if n is None or not math.isfinite(n):
        return DASH
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}"
    return f"{int(round(n))}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", DASH: "--", "Δ": r"$\Delta$"}


def tex_escape(text: Any) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def tex_table(headers: Sequence[str], rows: Sequence[Sequence[str]], caption: str) -> str:
    """A booktabs table; no pandas/jinja2 needed."""
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{tex_escape(caption)}}}",
             r"\begin{tabular}{" + "l" * min(2, len(headers)) + "r" * max(0, len(headers) - 2) + "}", r"\toprule",
             " & ".join(tex_escape(h) for h in headers) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape(v) for v in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def metric_label(metric: str) -> str:
    m = re.match(r"recall_at_(\d+)$", metric)
    if m:
        return f"R@{m.group(1)}"
    return {"map_at_r": "MAP@R", "r_precision": "R-Prec", "params_trainable": "Params trained",
            "params_trainable_pct": "Params trained (%)"}.get(metric, metric)



