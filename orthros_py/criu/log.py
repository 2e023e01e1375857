"""CRIU's own log: why a request failed (its tail and first error), and, at log level 4 with
timestamps, where the time went (lock commands, the parts of a container checkpoint).

CRIU logs ``Running iptables [...]`` (or ``nftables``) just before it forks the lock command for
one connection, and its next line comes when that command has returned: the sum of those gaps is
the share of a dump or restore that went to locking, measured rather than estimated.

Pure text processing over a file; no privileges beyond reading it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


def read_lines(path: Path) -> list[str]:
    """The lines of a CRIU log; none if it cannot be read (CRIU may not have written it)."""
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


# Error lines that say nothing about why a request failed.
_NOISE = (
    # CRIU tries to raise its own RLIMIT_NOFILE; without CAP_SYS_RESOURCE that fails harmlessly.
    "Can't setup RLIMIT_NOFILE for self",
    "Dumping FAILED",
    "Restoring FAILED",
    "Pre-dumping FAILED",
)
_PREFIX = re.compile(
    r"^\s*(?:\(?[\d.]+\)?\s*)?(?:\d+: )?(?:pie: \d+: )?(?:Error|Warn) \([^)]*\):\s*")


def log_tail(path: Path, lines: int = 8) -> list[str]:
    """The last lines of a CRIU log, errors first: what a user needs to see of a refusal."""
    text = read_lines(path)
    errors = [ln for ln in text if "Error (" in ln]
    tail = errors[-lines:] if errors else text[-lines:]
    return [ln.rstrip() for ln in tail]


def main_reason(tail: list[str]) -> str:
    """The first error line of a CRIU log (the cause; later ones are its echoes), unadorned."""
    for line in tail:
        if "Error (" in line and not any(n in line for n in _NOISE):
            return _PREFIX.sub("", line.strip()).rstrip(".")
    return ""


# CRIU reasons that have a plain cause and remedy on orthros's side.
ADVICE = (
    (re.compile(r"Unix socket \S+ without peer"),
     "a UNIX socket of the tree is connected to a process outside it: allow such external "
     "sockets with --ext-unix-sk"),
    (re.compile(r"Some file locks are hold by dumping tasks"),
     "the tree holds file locks (flock, POSIX or OFD): pass --file-locks to dump and restore "
     "them"),
    (re.compile(r"Can't dump ghost file .* size, increase limit"),
     "the tree holds open a deleted file larger than CRIU's ghost limit (1 MiB unless "
     "raised): raise --ghost-limit above its size"),
    (re.compile(r"Can't create link remap for"),
     "the tree holds open, or watches with inotify, a file unlinked from the path it was "
     "opened by but linked elsewhere: pass --link-remap to let CRIU link it back"),
    (re.compile(r"The root process \d+ is not a session leader"),
     "the tree's root does not lead a session of its own: start it with setsid, or pass "
     "--shell-job"),
    (re.compile(r"A session leader of .* is outside of its pid namespace"),
     "the tree's session leader is outside the tree's PID namespace: start the namespace's "
     "init with setsid (unshare --pid --fork setsid CMD), or a tree without its own "
     "namespace from a session orthros's PID namespace can see (setsid CMD)"),
    (re.compile(r"In-flight connection \(l\)"),
     "a listening socket of the tree holds connections not yet accepted: pass "
     "--skip-in-flight to drop them (their clients connect again)"),
    (re.compile(r"Unaccessible path opened"),
     "a file the tree holds open is no longer what its path names (a device node hidden by a "
     "remount?): for the same device under that path, pass --evasive-devices"),
    (re.compile(r"Connected TCP socket, consider using"),
     "the tree has established TCP connections: pass --tcp-established to carry them"),
)


def advice(reason: str) -> str | None:
    """What orthros can tell the user to do about a reason CRIU gave, if anything."""
    return next((a for pattern, a in ADVICE if reason and pattern.search(reason)), None)


# --- timings (log level 4) ----------------------------------------------------------------------

# "(00.123456) " or, past 100 s, "(123.45678) "; restore logs put the task ("1: ") after it:
# "(00.123456)      1: cg: ..." -> time, task "1", message "cg: ...".
_LINE = re.compile(r"^\((\d+\.\d+)\)\s*(?:(\d+): )?(.*)$")
_RUN = re.compile(r"Running (iptables|nftables) \[")


@dataclass(frozen=True)
class LockSpans:
    tool: str | None
    calls: int
    total_ms: float


def _ts(line: str) -> float | None:
    m = _LINE.match(line)
    return float(m.group(1)) if m else None


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
    return lock_spans(read_lines(path))


# --- the parts of a container checkpoint (the Orthros paper's table) ----------------------------

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
    return part_times(read_lines(path))
