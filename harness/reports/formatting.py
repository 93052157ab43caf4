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
    """Parameter counts as papers write them: ``0.80M``, ``21.30M``, ``1.20G``; below 10K exact."""
    if n is None or not math.isfinite(n):
        return DASH
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f}G"
    if abs(n) >= 1e4:
        return f"{n / 1e6:.2f}M"
    return f"{int(round(n)):,}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    DASH: "--",
    "Δ": r"$\Delta$",
}


def tex_escape(text: Any) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def tex_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    caption: str,
    bold: Sequence[tuple[int, int]] = (),
    label: str = "",
    wide: bool | None = None,
) -> str:
    """A booktabs LaTeX table via pandas' ``Styler``: ``bold`` cells (row, column) in bold, and
    ``table*`` (both columns of a two-column paper) when ``wide`` (default: more than 6 columns)."""
    import pandas as pd

    df = pd.DataFrame([list(r) for r in rows], columns=[f"c{i}" for i in range(len(headers))])
    marks = pd.DataFrame("", index=df.index, columns=df.columns)
    for r, c in bold:
        marks.iloc[r, c] = "textbf:--rwrap;"
    styler = df.style.hide(axis="index").format(tex_escape).apply(lambda _: marks, axis=None)
    styler = styler.relabel_index([tex_escape(h) for h in headers], axis=1)
    wide = len(headers) > 6 if wide is None else wide
    return styler.to_latex(
        environment="table*" if wide else "table",
        position="t",
        position_float="centering",
        hrules=True,
        column_format="l" * min(2, len(headers)) + "r" * max(0, len(headers) - 2),
        caption=tex_escape(caption),
        label=label or None,
    )


def best_rows(values: Sequence[float]) -> list[int]:
    """Indices of the largest finite value (all of them on a tie), for bolding."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return []
    top = max(finite)
    return [i for i, v in enumerate(values) if v is not None and math.isfinite(v) and round(v, 1) == round(top, 1)]


def metric_label(metric: str) -> str:
    m = re.match(r"recall_at_(\d+)$", metric)
    if m:
        return f"R@{m.group(1)}"
    return {
        "map_at_r": "MAP@R",
        "r_precision": "R-Prec",
        "params_trainable": "Params trained",
        "params_trainable_pct": "Params trained (%)",
    }.get(metric, metric)
