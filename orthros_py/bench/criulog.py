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


# --- the parts of a container checkpoint (the Orthros paper's table) ----------------------------

# "(00.123456)      1: cg: ..." -> task "1", message "cg: ...": restore logs name the task.
_LINE = re.compile(r"^\((\d+\.\d+)\)\s*(?:(\d+): )?(.*)$")
# Which of CRIU's log lines belong to which part. The time between two consecutive lines of one
# task that both belong to a part is that part's; a part's time is the union of those stretches
# over all tasks (tasks run in parallel). The gap after a part's last line is not counted: the
# next line may belong to other work, so this is a lower bound.
PARTS: dict[str, re.Pattern[str]] = {
    "cgroup": re.compile(r"^(cg|cg-prop):"),
    "namespaces": re.compile(
        r"^(Add \w+ ns |Will take \w+ namespace|Restoring namespaces|Restoring IPC|No ipcns|"
        r"Collected SysV|kernel/hostname|uts|ipc|pidns)"),  # not the main process's waits
    "mounts": re.compile(r"^(mnt|mnt-v2):"),
    "unix": re.compile(r"^(unix|skqueue|sockets):"),
}


def _intervals(lines: list[str], pattern: re.Pattern[str]) -> list[tuple[float, float]]:
    last: dict[str, tuple[float, bool]] = {}  # task -> (its last line's time, was it ours)
    out: list[tuple[float, float]] = []
    for line in lines:
        m = _LINE.match(line)
        if not m:
            continue
        ts, task, msg = float(m.group(1)), m.group(2) or "", m.group(3).strip()
        ours = bool(pattern.search(msg))
        prev = last.get(task)
        if prev is not None and prev[1] and ours:
            out.append((prev[0], ts))
        last[task] = (ts, ours)
    return out


def _union_ms(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total * 1000


def part_times(lines: list[str], parts: dict[str, re.Pattern[str]] | None = None
               ) -> dict[str, float]:
    """{part: ms of CRIU's wall time spent on its lines} for one CRIU log (level 4)."""
    return {name: _union_ms(_intervals(lines, pat)) for name, pat in (parts or PARTS).items()}


def part_times_in(path: Path) -> dict[str, float]:
    try:
        return part_times(path.read_text(errors="replace").splitlines())
    except OSError:
        return {name: 0.0 for name in PARTS}
