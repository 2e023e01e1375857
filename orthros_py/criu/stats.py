"""CRIU's per-run statistics (``stats-dump`` and ``stats-restore`` images), from their entries
(``criu/images.py`` reads the files).

CRIU records its phases in microseconds; these classes give milliseconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DumpStats:
    freezing_ms: float
    frozen_ms: float
    memdump_ms: float
    memwrite_ms: float
    pages_scanned: int
    pages_written: int
    pages_skipped_parent: int
    pages_lazy: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RestoreStats:
    forking_ms: float
    restore_ms: float
    pages_compared: int
    pages_restored: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dump_stats_from(entry: dict[str, Any]) -> DumpStats:
    d = entry.get("dump", {})
    return DumpStats(
        freezing_ms=d.get("freezing_time", 0) / 1000,
        frozen_ms=d.get("frozen_time", 0) / 1000,
        memdump_ms=d.get("memdump_time", 0) / 1000,
        memwrite_ms=d.get("memwrite_time", 0) / 1000,
        pages_scanned=int(d.get("pages_scanned", 0)),
        pages_written=int(d.get("pages_written", 0)),
        pages_skipped_parent=int(d.get("pages_skipped_parent", 0)),
        pages_lazy=int(d.get("pages_lazy", 0)),
    )


def restore_stats_from(entry: dict[str, Any]) -> RestoreStats:
    r = entry.get("restore", {})
    return RestoreStats(
        forking_ms=r.get("forking_time", 0) / 1000,
        restore_ms=r.get("restore_time", 0) / 1000,
        pages_compared=int(r.get("pages_compared", 0)),
        pages_restored=int(r.get("pages_restored", 0)),
    )
