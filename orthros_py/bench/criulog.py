"""Reading CRIU's own log (log level 4, with timestamps) for the time spent locking.

CRIU logs ``Running iptables [...]`` (or ``nftables``) just before it forks the lock command for
one connection, and its next line comes when that command has returned. The sum of those gaps
is the share of a dump or restore that went to locking, measured rather than estimated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# "(00.123456) " or, past 100 s, "(123.45678)"; restore logs put "  PID: " after it.
_TS = re.compile(r"^\((\d+)\.(\d+)\)")
_RUN = re.compile(r"Running (iptables|nftables) \[")


@dataclass(frozen=True)
class LockSpans:
    tool: str | None
    calls: int
    total_ms: float


def _ts(line: str) -> float | None:
    m = _TS.match(line)
    if not m:
        return None
    sec, frac = m.groups()
    return int(sec) + int(frac) / float(10 ** len(frac))


def lock_spans(lines: list[str]) -> LockSpans:
    """Sum the time between each ``Running iptables/nftables`` line and the next timestamp."""
    total = 0.0
    calls = 0
    tool: str | None = None
    pending: float | None = None
    for line in lines:
        ts = _ts(line)
        if ts is None:
            continue
        if pending is not None:
            total += max(0.0, ts - pending)
            pending = None
        m = _RUN.search(line)
        if m:
            tool = m.group(1)
            calls += 1
            pending = ts
    return LockSpans(tool, calls, total * 1000)


def lock_spans_in(path: Path) -> LockSpans:
    try:
        return lock_spans(path.read_text(errors="replace").splitlines())
    except OSError:
        return LockSpans(None, 0, 0.0)
