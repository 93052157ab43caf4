"""One look for every figure of a report: matplotlib settings, and a colour per method that stays
the same across figures (spec order), distinguishable for 20 methods; untrained reference rows
are grey everywhere."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

#: the report's matplotlib settings (applied with ``rc_context``, so nothing leaks out)
RC: dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.4,
    "lines.markersize": 3.5,
    "legend.frameon": False,
    "axes.titlelocation": "left",
    "pdf.fonttype": 42,
}

REFERENCE_COLOUR = "0.55"


def palette(n: int) -> list[Any]:
    """``n`` distinct colours: Tableau 10, then the light partners of tab20, then tab20b's, all
    without the greys (grey means an untrained reference row)."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors
    tab20b = matplotlib.colormaps["tab20b"].colors
    grey = (tab20[14], tab20[15])
    base = [c for c in list(tab20[0::2]) + list(tab20[1::2]) if c not in grey]
    base += list(tab20b[0::4]) + list(tab20b[2::4])
    return [base[i % len(base)] for i in range(n)]


#: line styles that tell reference rows apart (all grey)
REFERENCE_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1)))


def method_colours(names: Sequence[str], references: Sequence[str] = ()) -> dict[str, Any]:
    """A colour per entry name in ``names`` order (the spec's), grey for reference rows."""
    trained = [n for n in names if n not in set(references)]
    colours = dict(zip(trained, palette(len(trained))))
    colours.update({n: REFERENCE_COLOUR for n in references})
    return colours


@contextmanager
def report_style() -> Iterator[Any]:
    """``with report_style() as plt:`` the pyplot module under the report's settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"), matplotlib.rc_context(RC):
        yield plt
