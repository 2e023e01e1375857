"""The network lock benchmark's pure half: the methods, the paper's figures (seed 003's Table
2), ApacheBench's report and what it says the clients saw, one run's record and its lock window,
the plan, medians, ratios and the results record.

Wraps no interface and needs no privileges: nothing here starts a process or touches the host,
so all of it is unit-tested.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthros_py.bench.stats import median, ratio, spread
from orthros_py.netlock.method import NetworkLock

# --- methods and the paper's figures ------------------------------------------------------------


class Method(enum.StrEnum):
    """One arm of the benchmark: a ``NetworkLock`` under the name the figures give it ("none"
    for skip, the floor)."""

    IPTABLES = "iptables"  # CRIU: two forks of sh + iptables per connection, lock and unlock
    NFTABLES = "nftables"  # CRIU: libnftables, one set element per direction
    XDP = "xdp"  # orthros: 2 BPF map writes per connection, CRIU told "skip"
    NONE = "none"  # nobody locks (CRIU "skip", orthros nothing): the floor

    @property
    def lock(self) -> NetworkLock:
        return NetworkLock.SKIP if self is Method.NONE else NetworkLock(self.value)

    @property
    def criu_locks(self) -> bool:
        return self.lock.criu_locks


METHODS: tuple[Method, ...] = tuple(Method)
DEFAULT_CONCURRENCY = (0, 500, 1000, 1500)


@dataclass(frozen=True)
class PaperRow:
    """One row of seed 003's Table 2 (ms): CRIU's own time, and what iptables and sh took."""

    dump_criu: float
    dump_iptables: float | None
    dump_sh: float | None
    restore_criu: float
    restore_iptables: float | None
    restore_sh: float | None

    @property
    def dump_lock(self) -> float | None:
        return _sum(self.dump_iptables, self.dump_sh)

    @property
    def restore_lock(self) -> float | None:
        return _sum(self.restore_iptables, self.restore_sh)

    @property
    def dump_total(self) -> float:
        return self.dump_criu + (self.dump_lock or 0.0)

    @property
    def restore_total(self) -> float:
        return self.restore_criu + (self.restore_lock or 0.0)

    @property
    def total(self) -> float:
        return self.dump_total + self.restore_total


def _sum(*parts: float | None) -> float | None:
    """The sum of the parts the paper gives; None where it gives none ("—")."""
    got = [p for p in parts if p is not None]
    return sum(got) if got else None


# nginx under ApacheBench, iptables method, 2 vCPU VM (SEEDS.md, seed 003).
PAPER: dict[int, PaperRow] = {
    0: PaperRow(121.63, 13.51, None, 34.02, None, None),
    500: PaperRow(1173.07, 1260.40, 533.51, 189.60, 1162.94, 385.31),
    1000: PaperRow(3806.45, 3325.54, 844.81, 249.94, 2738.57, 1154.48),
    1500: PaperRow(5938.31, 5297.09, 974.66, 847.63, 4846.71, 1050.25),
}


# --- ApacheBench's report ---------------------------------------------------------------------


@dataclass
class AbReport:
    """What ab printed when it was stopped (or why it stopped by itself)."""

    complete: int = 0
    failed: int = 0
    failed_kinds: dict[str, int] = field(default_factory=dict)  # Connect, Receive, Length, ...
    non_2xx: int = 0
    write_errors: int = 0
    rps: float | None = None
    seconds: float | None = None
    # The longest single request (ab's "100% ... (longest request)", ms, ab's resolution): the
    # longest any client waited. None: ab printed no percentile table (fewer than 2 requests
    # completed, or no report at all).
    longest_ms: float | None = None
    aborted: str | None = None  # ab gave up before it was stopped: its last words
    exit_code: int | None = None
    # Whether ab was still running when we stopped it (None: not recorded, older results).
    stopped: bool | None = None
    # What ab printed on stderr besides its progress lines: its errors (the first few).
    stderr_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AbReport:
        return cls(**{k: d[k] for k in d if k in _AB_FIELDS})


_AB_FIELDS = {f.name for f in dataclasses.fields(AbReport)}
_AB_INT = {
    "complete": r"^Complete requests:\s+(\d+)",
    "failed": r"^Failed requests:\s+(\d+)",
    "non_2xx": r"^Non-2xx responses:\s+(\d+)",
    "write_errors": r"^Write errors:\s+(\d+)",
}
_AB_KINDS = re.compile(r"\(Connect: (\d+), Receive: (\d+), Length: (\d+), Exceptions: (\d+)\)")
_AB_LONGEST = re.compile(r"^\s*100%\s+(\d+)\s+\(longest request\)", re.MULTILINE)
_AB_DONE = re.compile(r"^Total of (\d+) requests completed", re.MULTILINE)
# ab's progress lines on stderr ("Completed 10000 requests"): not errors.
_AB_PROGRESS = re.compile(r"^(Completed|Finished) \d+ requests$")
_AB_STDERR_KEEP = 10
NO_REPORT = "ab printed no report"


def parse_ab(stdout: str, stderr: str = "", exit_code: int | None = None,
             stopped: bool | None = None) -> AbReport:
    """Read ab's report. Stopped by SIGINT, ab prints its full report and exits 1; when it gives
    up by itself (``Test aborted after 10 failures``, ``apr_socket_recv: ...``) it prints only
    ``Total of N requests completed`` and says why on stderr. ``stopped``: whether ab still ran
    when we stopped it (an exit status of its own before that is a failure)."""
    rep = AbReport(exit_code=exit_code, stopped=stopped)
    for name, pattern in _AB_INT.items():
        m = re.search(pattern, stdout, re.MULTILINE)
        if m:
            setattr(rep, name, int(m.group(1)))
    m = _AB_KINDS.search(stdout)
    if m:
        rep.failed_kinds = dict(zip(("connect", "receive", "length", "exceptions"),
                                    map(int, m.groups()), strict=True))
    m = re.search(r"^Requests per second:\s+([\d.]+)", stdout, re.MULTILINE)
    rep.rps = float(m.group(1)) if m else None
    m = re.search(r"^Time taken for tests:\s+([\d.]+) seconds", stdout, re.MULTILINE)
    rep.seconds = float(m.group(1)) if m else None
    # Only the percentile table's own line: "Connection Times" gives a max too, but the brief
    # figure is the one ab labels "longest request"; without it the run says it has none.
    m = _AB_LONGEST.search(stdout)
    rep.longest_ms = float(m.group(1)) if m else None
    words = [ln.strip() for ln in stderr.splitlines()
             if ln.strip() and not _AB_PROGRESS.match(ln.strip())]
    rep.stderr_errors = words[:_AB_STDERR_KEEP]
    if not re.search(_AB_INT["complete"], stdout, re.MULTILINE):
        done = _AB_DONE.search(stdout)
        rep.complete = int(done.group(1)) if done else 0
        rep.aborted = "; ".join(words[-2:]) if words else NO_REPORT
    return rep


def client_failures(ab: AbReport) -> list[str]:
    """What went wrong for the clients, one phrase each; empty when nothing did. Any of it makes
    the run a failure: a lock that loses requests must not pass for a fast one."""
    out = []
    if ab.failed:
        kinds = ", ".join(f"{k} {n}" for k, n in ab.failed_kinds.items() if n)
        out.append(f"{ab.failed} failed requests" + (f" ({kinds})" if kinds else ""))
    if ab.non_2xx:
        out.append(f"{ab.non_2xx} non-2xx responses")
    if ab.write_errors:
        out.append(f"{ab.write_errors} write errors")
    if ab.stopped is False and ab.exit_code not in (None, 0):
        out.append(f"ab exited with {ab.exit_code} before it was stopped")
    if ab.aborted:
        out.append(ab.aborted if ab.aborted == NO_REPORT else f"ab gave up: {ab.aborted}")
    elif ab.stderr_errors:
        more = len(ab.stderr_errors) - 1
        out.append(f"ab on stderr: {ab.stderr_errors[0]}" + (f" (+{more} more)" if more else ""))
    return out


# --- one run -------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One dump or restore. ``total_ms`` is the wall time of orthros's call (discovery,
    attaching, reading stats included); ``criu_ms`` is CRIU's RPC minus the lock; ``lock_ms``
    the lock: CRIU's iptables/nft calls (from its log) or orthros's map writes."""

    total_ms: float
    criu_ms: float
    lock_ms: float
    elapsed_ms: float  # orthros's timer around CRIU's RPC (and the xdp map writes)
    lock_calls: int = 0  # iptables/nft calls CRIU made, or connections in the xdp map
    frozen_ms: float | None = None  # dump: how long CRIU kept the tree frozen
    stats: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Phase:
        return cls(**{k: d[k] for k in d if k in _PHASE_FIELDS})


_PHASE_FIELDS = {f.name for f in dataclasses.fields(Phase)}


def split_phase(method: Method, kind: str, total_ms: float, elapsed_ms: float, *,
                spans_ms: float = 0.0, spans_calls: int = 0,
                lock_report: dict[str, Any] | None = None,
                stats: dict[str, Any] | None = None) -> Phase:
    """Split one phase (``kind`` "dump" or "restore") into CRIU's part and the lock's.

    iptables/nftables: the spans CRIU's log shows for its lock calls (taken inside its RPC);
    xdp: the map writes (``lock_ms`` on dump, ``unlock_ms`` on restore), also inside orthros's
    timer; none: no lock at all.
    """
    lock, calls = 0.0, 0
    if method.criu_locks:
        lock, calls = spans_ms, spans_calls
    elif method is Method.XDP and lock_report:
        key = "lock_ms" if kind == "dump" else "unlock_ms"
        lock = float(lock_report.get(key) or 0.0)
        calls = int(lock_report.get("conns") or 0)
    frozen = stats.get("frozen_ms") if stats else None
    return Phase(total_ms=total_ms, criu_ms=max(0.0, elapsed_ms - lock), lock_ms=lock,
                 elapsed_ms=elapsed_ms, lock_calls=calls,
                 frozen_ms=float(frozen) if frozen is not None else None, stats=stats)


@dataclass
class LockWindow:
    """One run on one clock (perf_counter, ms): the dump call began, ``before_ms`` later the
    lock engaged and CRIU's dump was called; ``window_ms`` later the connections flowed again
    (the restore unlocked them, or CRIU's restore returned for the methods CRIU locks and
    none); ``after_ms`` later the restore call returned (xdp: the programs detached). The
    window is what clients wait through; ``wall_ms`` = before + window + after is what the
    operator waits. ``between_ms``, inside the window: from the dump's return to the restore's
    call (the benchmark collects the killed tree; a migration would carry the images)."""

    window_ms: float
    before_ms: float
    after_ms: float
    between_ms: float
    wall_ms: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LockWindow:
        return cls(**{k: float(d[k]) for k in d if k in _WINDOW_FIELDS})


_WINDOW_FIELDS = {f.name for f in dataclasses.fields(LockWindow)}


def lock_window(dump_start: float, engaged_at: float | None, dump_end: float,
                restore_start: float, unlocked_at: float | None,
                restore_end: float) -> LockWindow | None:
    """The window from six instants in seconds (``time.perf_counter``); None when
    ``dump_tree`` or ``restore_tree`` did not say when the lock engaged or came off."""
    if engaged_at is None or unlocked_at is None:
        return None
    return LockWindow(window_ms=(unlocked_at - engaged_at) * 1000,
                      before_ms=(engaged_at - dump_start) * 1000,
                      after_ms=(restore_end - unlocked_at) * 1000,
                      between_ms=(restore_start - dump_end) * 1000,
                      wall_ms=(restore_end - dump_start) * 1000)


@dataclass
class RunRecord:
    concurrency: int
    method: str
    rep: int
    seq: int
    # The run counts: dump and restore succeeded and the clients saw no failure. A failed run
    # keeps its figures but stays out of the medians and ratios.
    ok: bool = False
    stage: str | None = None  # where it failed ("clients": what ab saw)
    error: str | None = None
    conns: int = 0  # established on nginx's worker when the dump began
    dump: Phase | None = None
    restore: Phase | None = None
    window: LockWindow | None = None
    ab: AbReport | None = None
    client_failures: list[str] = field(default_factory=list)  # client_failures(ab)
    leftovers: list[str] = field(default_factory=list)  # rules a failed CRIU left, removed
    wall_s: float = 0.0

    @property
    def sum_ms(self) -> float | None:
        if self.dump is None or self.restore is None:
            return None
        return self.dump.total_ms + self.restore.total_ms

    def judge_clients(self) -> None:
        """Fold what ab saw into the verdict: a run whose clients saw failures failed, whatever
        CRIU said (its first reason stays where CRIU failed)."""
        self.client_failures = client_failures(self.ab) if self.ab else []
        if self.ok and self.concurrency > 0 and self.ab is None:
            self.client_failures = ["ab left no report"]
        if self.ok and self.client_failures:
            self.ok = False
            # An error noted on the way (stopping ab) stays beside what the clients saw.
            self.stage = "clients"
            self.error = "; ".join([*self.client_failures, *([self.error] if self.error else [])])

    def to_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency, "method": self.method, "rep": self.rep,
            "seq": self.seq, "ok": self.ok, "stage": self.stage, "error": self.error,
            "conns": self.conns,
            "dump": self.dump.to_dict() if self.dump else None,
            "restore": self.restore.to_dict() if self.restore else None,
            "dump_restore_ms": self.sum_ms,
            "window": self.window.to_dict() if self.window else None,
            "ab": self.ab.to_dict() if self.ab else None,
            "client_failures": self.client_failures,
            "leftovers": self.leftovers, "wall_s": round(self.wall_s, 3),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        rec = cls(
            concurrency=int(d["concurrency"]), method=str(d["method"]), rep=int(d["rep"]),
            seq=int(d.get("seq", 0)), ok=bool(d.get("ok")), stage=d.get("stage"),
            error=d.get("error"), conns=int(d.get("conns", 0)),
            dump=Phase.from_dict(d["dump"]) if d.get("dump") else None,
            restore=Phase.from_dict(d["restore"]) if d.get("restore") else None,
            window=LockWindow.from_dict(d["window"]) if d.get("window") else None,
            ab=AbReport.from_dict(d["ab"]) if d.get("ab") else None,
            client_failures=list(d.get("client_failures") or []),
            leftovers=list(d.get("leftovers", [])), wall_s=float(d.get("wall_s", 0.0)))
        if "client_failures" not in d:
            # Results from before clients' failures failed a run: judged by today's rule.
            rec.judge_clients()
        return rec


# --- plan, aggregation, ratios ----------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    reps: int = 3
    # iptables at slow_from connections and above runs only this many repetitions (minutes each).
    reps_slow: int | None = None
    slow_from: int = 1000
    methods: tuple[Method, ...] = METHODS
    out: Path = Path("results")
    port: int = 8080
    subnet: str | None = None  # a /24 for the veth pair; None: a free 10.99.x.0/24
    settle_s: float = 1.0  # how long ab keeps running after the restore
    connect_timeout_s: float = 120.0
    seed: int | None = None
    keep_images: bool = False
    micro_conns: int = 1000
    micro_reps: int = 7
    log_level: int = 4  # every method at the same level, so that CRIU's logging costs the same

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["methods"] = [m.value for m in self.methods]
        d["concurrency"] = list(self.concurrency)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["out"] = Path(kw.get("out", "results"))
        kw["methods"] = tuple(Method(m) for m in kw.get("methods", [m.value for m in METHODS]))
        kw["concurrency"] = tuple(int(c) for c in kw.get("concurrency", DEFAULT_CONCURRENCY))
        return cls(**kw)


@dataclass(frozen=True)
class PlannedRun:
    concurrency: int
    rep: int
    method: Method


def plan(config: BenchConfig) -> list[PlannedRun]:
    """Every run in order: per concurrency and repetition, the methods in an order shuffled
    anew each round, so that drift (a warming cache, a busy neighbour) hits every method alike.
    iptables at ``slow_from`` connections and above stops after ``reps_slow`` rounds."""
    rng = random.Random(config.seed)
    out: list[PlannedRun] = []
    slow = config.reps if config.reps_slow is None else config.reps_slow
    for conc in config.concurrency:
        for rep in range(config.reps):
            order = list(config.methods)
            rng.shuffle(order)
            for m in order:
                if m is Method.IPTABLES and conc >= config.slow_from and rep >= slow:
                    continue
                out.append(PlannedRun(conc, rep, m))
    return out


@dataclass
class Cell:
    """The medians of one (concurrency, method) over its successful runs (``ok``; a run whose
    clients saw failures is not one), with the range (min, max) where a figure has one."""

    concurrency: int
    method: str
    runs: int
    ok: int
    errors: list[str] = field(default_factory=list)  # distinct failure reasons
    failures: list[str] = field(default_factory=list)  # one line per failed run
    client_failed: int = 0  # failed runs whose clients saw failures
    dump_total_ms: float | None = None
    dump_criu_ms: float | None = None
    dump_lock_ms: float | None = None
    restore_total_ms: float | None = None
    restore_criu_ms: float | None = None
    restore_lock_ms: float | None = None
    sum_ms: float | None = None  # median over runs of dump + restore (not a sum of medians)
    frozen_ms: float | None = None
    conns: float | None = None
    ab_failed: int = 0  # over all runs, failed ones included
    ab_non_2xx: int = 0
    ab_aborted: int = 0  # runs in which ab gave up by itself
    ab_longest_ms: float | None = None  # median of the runs' longest request
    ab_longest_min_ms: float | None = None
    ab_longest_max_ms: float | None = None
    ab_longest_missing: int = 0  # ok runs with clients whose ab printed no longest request
    # The lock window (LockWindow): medians, and the window's and wall's ranges.
    window_ms: float | None = None
    window_min_ms: float | None = None
    window_max_ms: float | None = None
    before_ms: float | None = None
    after_ms: float | None = None
    between_ms: float | None = None
    wall_ms: float | None = None  # dump call start to restore call end
    wall_min_ms: float | None = None
    wall_max_ms: float | None = None
    window_missing: int = 0  # ok runs without a window (older results)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def summarize(runs: Sequence[RunRecord]) -> list[Cell]:
    groups: dict[tuple[int, str], list[RunRecord]] = {}
    for r in runs:
        groups.setdefault((r.concurrency, r.method), []).append(r)
    order = {m.value: i for i, m in enumerate(METHODS)}
    cells: list[Cell] = []
    for (conc, method), rs in sorted(groups.items(),
                                     key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        good = [r for r in rs if r.ok and r.dump and r.restore]
        bad = [r for r in rs if not (r.ok and r.dump and r.restore)]
        errors = list(dict.fromkeys(f"{r.stage}: {r.error}" for r in bad))
        dumps = [r.dump for r in good if r.dump]
        rests = [r.restore for r in good if r.restore]
        abs_ = [r.ab for r in good if r.ab]
        wins = [r.window for r in good if r.window]
        longest = [a.longest_ms for a in abs_]
        win_range = spread([w.window_ms for w in wins])
        wall_range = spread([w.wall_ms for w in wins])
        longest_range = spread(longest)
        cells.append(Cell(
            concurrency=conc, method=method, runs=len(rs), ok=len(good), errors=errors,
            failures=[f"rep {r.rep + 1}: {r.stage}: {r.error}" for r in bad],
            client_failed=sum(1 for r in bad if r.client_failures),
            dump_total_ms=median([p.total_ms for p in dumps]),
            dump_criu_ms=median([p.criu_ms for p in dumps]),
            dump_lock_ms=median([p.lock_ms for p in dumps]),
            restore_total_ms=median([p.total_ms for p in rests]),
            restore_criu_ms=median([p.criu_ms for p in rests]),
            restore_lock_ms=median([p.lock_ms for p in rests]),
            sum_ms=median([r.sum_ms for r in good]),
            frozen_ms=median([p.frozen_ms for p in dumps]),
            conns=median([float(r.conns) for r in good]),
            ab_failed=sum(r.ab.failed for r in rs if r.ab),
            ab_non_2xx=sum(r.ab.non_2xx for r in rs if r.ab),
            ab_aborted=sum(1 for r in rs if r.ab and r.ab.aborted),
            ab_longest_ms=median(longest),
            ab_longest_min_ms=longest_range[0] if longest_range else None,
            ab_longest_max_ms=longest_range[1] if longest_range else None,
            ab_longest_missing=sum(1 for v in longest if v is None),
            window_ms=median([w.window_ms for w in wins]),
            window_min_ms=win_range[0] if win_range else None,
            window_max_ms=win_range[1] if win_range else None,
            before_ms=median([w.before_ms for w in wins]),
            after_ms=median([w.after_ms for w in wins]),
            between_ms=median([w.between_ms for w in wins]),
            wall_ms=median([w.wall_ms for w in wins]),
            wall_min_ms=wall_range[0] if wall_range else None,
            wall_max_ms=wall_range[1] if wall_range else None,
            window_missing=len(good) - len(wins),
        ))
    return cells


@dataclass
class Ratio:
    """At one concurrency, of the medians over ok runs: dump + restore of xdp against
    iptables and against none; the lock window and the longest client wait of xdp against
    none (raw medians, none's own window included: what xdp adds on top of no lock at all)."""

    concurrency: int
    xdp_ms: float | None
    iptables_ms: float | None
    none_ms: float | None
    xdp_window_ms: float | None = None
    none_window_ms: float | None = None
    xdp_longest_ms: float | None = None
    none_longest_ms: float | None = None

    @property
    def xdp_iptables(self) -> float | None:
        return ratio(self.xdp_ms, self.iptables_ms)

    @property
    def xdp_none(self) -> float | None:
        return ratio(self.xdp_ms, self.none_ms)

    @property
    def window_xdp_none(self) -> float | None:
        return ratio(self.xdp_window_ms, self.none_window_ms)

    @property
    def longest_xdp_none(self) -> float | None:
        return ratio(self.xdp_longest_ms, self.none_longest_ms)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "xdp_iptables": self.xdp_iptables,
                "xdp_none": self.xdp_none, "window_xdp_none": self.window_xdp_none,
                "longest_xdp_none": self.longest_xdp_none}


def ratios(cells: Sequence[Cell]) -> list[Ratio]:
    by = {(c.concurrency, c.method): c for c in cells}

    def get(conc: int, method: str, name: str) -> float | None:
        c = by.get((conc, method))
        return getattr(c, name) if c is not None else None

    out = []
    for conc in sorted({c.concurrency for c in cells}):
        out.append(Ratio(conc, get(conc, "xdp", "sum_ms"), get(conc, "iptables", "sum_ms"),
                         get(conc, "none", "sum_ms"),
                         xdp_window_ms=get(conc, "xdp", "window_ms"),
                         none_window_ms=get(conc, "none", "window_ms"),
                         xdp_longest_ms=get(conc, "xdp", "ab_longest_ms"),
                         none_longest_ms=get(conc, "none", "ab_longest_ms")))
    return out


# --- the results record -----------------------------------------------------------------------


@dataclass
class MicroResult:
    """Lock and unlock of ``conns`` synthetic connections in the pinned XDP map."""

    conns: int
    reps: int
    lock_ms: float
    unlock_ms: float
    lock_samples: list[float]
    unlock_samples: list[float]
    compiled_s: float | None = None  # this run compiled the program (never inside a timing)

    @property
    def round_best_ms(self) -> float:
        """The best lock + unlock of all ``conns`` in one repetition: what a migration pays
        for the lock itself, once on each side (the figure the tests used to assert)."""
        return min((a + b for a, b in zip(self.lock_samples, self.unlock_samples, strict=True)),
                   default=self.lock_ms + self.unlock_ms)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "round_best_ms": self.round_best_ms}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MicroResult:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class BenchResults:
    config: BenchConfig
    env: dict[str, Any] = field(default_factory=dict)
    runs: list[RunRecord] = field(default_factory=list)
    micro: MicroResult | None = None
    started: str = ""
    finished: str | None = None
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def cells(self) -> list[Cell]:
        return summarize(self.runs)

    @property
    def ratios(self) -> list[Ratio]:
        return ratios(self.cells)

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "netlock",
            "config": self.config.to_dict(), "env": self.env,
            "started": self.started, "finished": self.finished,
            "interrupted": self.interrupted, "notes": self.notes,
            "medians": [c.to_dict() for c in self.cells],
            "ratios": [r.to_dict() for r in self.ratios],
            "micro": self.micro.to_dict() if self.micro else None,
            "paper": {str(k): dataclasses.asdict(v) for k, v in PAPER.items()},
            "runs": [r.to_dict() for r in self.runs],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResults:
        return cls(config=BenchConfig.from_dict(d.get("config", {})), env=d.get("env", {}),
                   runs=[RunRecord.from_dict(r) for r in d.get("runs", [])],
                   micro=MicroResult.from_dict(d["micro"]) if d.get("micro") else None,
                   started=d.get("started", ""), finished=d.get("finished"),
                   interrupted=bool(d.get("interrupted")), notes=list(d.get("notes", [])))
