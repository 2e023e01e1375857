"""Small figures helpers the benchmarks share: medians over runs that may lack a value, and
how a time reads in their tables."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values present (a failed run has none); None if there are none."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def fmt_ms(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"
