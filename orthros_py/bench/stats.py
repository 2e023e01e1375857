"""Small figures helpers the benchmarks share: medians and spreads over runs that may lack a
value, the ratio of two figures that may be missing, and how times and ratios read in their
tables."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values present (a failed run has none); None if there are none."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def spread(values: Sequence[float | None]) -> tuple[float, float] | None:
    """(min, max) of the values present; None if there are none."""
    got = [v for v in values if v is not None]
    return (min(got), max(got)) if got else None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; None when either is missing or ``b`` is zero."""
    return a / b if a is not None and b else None


def fmt_ms(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def fmt_pct(r: float | None, digits: int = 1) -> str:
    """A share or a ratio as a percentage: 0.8123 -> "81.2%"."""
    return "—" if r is None else f"{r:.{digits}%}"


def fmt_ratio(r: float | None) -> str:
    """A ratio, and for one below 1 the "1 : N" it stands for."""
    if r is None:
        return "—"
    return f"{r:.3f} (1 : {1 / r:,.1f})" if r < 1 else f"{r:.3f}"
