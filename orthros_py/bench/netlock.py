"""Network lock methods compared around a real CRIU dump and restore (seed 003's Table 2).

Workload: Debian's nginx (master and one worker, as root) in this network namespace on one end
of a veth pair; ApacheBench inside a private client namespace at the other end, keeping C
keep-alive connections busy. One run: a fresh nginx, C established connections, a dump with
``tcp_established`` (the tree is killed), a restore (the root becomes our child), about a second
more of traffic, then ab is stopped with SIGINT and its report read. Methods: CRIU's
``iptables`` and ``nftables``, orthros's ``xdp`` (BPF map writes), and ``none`` (nobody locks:
the floor). Each phase is split into CRIU's own part and the lock: for iptables/nftables the
time CRIU spent in its lock calls, read from its own log at level 4 (``criu.log``); for xdp the
map writes orthros timed itself.

Interfaces: pyroute2 (network namespace, veth, addresses), nsenter (ab inside the namespace, no
mount namespace of its own), CRIU through ``orthros_py.checkpoint``, iptables-save/nft to find
what a failed CRIU left behind, the XDP lock's pinned map. Needs root. Nothing here prints:
progress goes to a callback, results to files in the output directory.

The pure half (ab's report, the run plan, phase splitting, medians, ratios, the markdown table)
needs no privileges and is unit-tested.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import ipaddress
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from orthros_py.bench.stats import fmt_ms, median
from orthros_py.errors import (
    CommandError,
    CriuError,
    MissingFeatureError,
    NotRootError,
    OrthrosError,
)
from orthros_py.net.conn import Conn
from orthros_py.netlock.method import NetworkLock
from orthros_py.proc.tree import alive, kill_tree, reap
from orthros_py.run import run

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
    # The longest single request: the longest gap any client saw (ms, ab's resolution).
    longest_ms: float | None = None
    aborted: str | None = None  # ab gave up before it was stopped: its last words
    exit_code: int | None = None

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
_AB_TOTAL = re.compile(r"^Total:\s+\d+\s+\d+\s+[\d.]+\s+\d+\s+(\d+)\s*$", re.MULTILINE)
_AB_DONE = re.compile(r"^Total of (\d+) requests completed", re.MULTILINE)


def parse_ab(stdout: str, stderr: str = "", exit_code: int | None = None) -> AbReport:
    """Read ab's report. Stopped by SIGINT, ab prints its full report and exits 1; when it gives
    up by itself (``Test aborted after 10 failures``, ``apr_socket_recv: ...``) it prints only
    ``Total of N requests completed`` and says why on stderr."""
    rep = AbReport(exit_code=exit_code)
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
    m = _AB_LONGEST.search(stdout) or _AB_TOTAL.search(stdout)
    rep.longest_ms = float(m.group(1)) if m else None
    if not re.search(_AB_INT["complete"], stdout, re.MULTILINE):
        done = _AB_DONE.search(stdout)
        rep.complete = int(done.group(1)) if done else 0
        words = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        rep.aborted = "; ".join(words[-2:]) if words else "ab printed no report"
    return rep


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
class RunRecord:
    concurrency: int
    method: str
    rep: int
    seq: int
    ok: bool = False  # dump and restore both succeeded
    stage: str | None = None  # where it failed
    error: str | None = None
    conns: int = 0  # established on nginx's worker when the dump began
    dump: Phase | None = None
    restore: Phase | None = None
    ab: AbReport | None = None
    leftovers: list[str] = field(default_factory=list)  # rules a failed CRIU left, removed
    wall_s: float = 0.0

    @property
    def sum_ms(self) -> float | None:
        if self.dump is None or self.restore is None:
            return None
        return self.dump.total_ms + self.restore.total_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency, "method": self.method, "rep": self.rep,
            "seq": self.seq, "ok": self.ok, "stage": self.stage, "error": self.error,
            "conns": self.conns,
            "dump": self.dump.to_dict() if self.dump else None,
            "restore": self.restore.to_dict() if self.restore else None,
            "dump_restore_ms": self.sum_ms,
            "ab": self.ab.to_dict() if self.ab else None,
            "leftovers": self.leftovers, "wall_s": round(self.wall_s, 3),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        return cls(
            concurrency=int(d["concurrency"]), method=str(d["method"]), rep=int(d["rep"]),
            seq=int(d.get("seq", 0)), ok=bool(d.get("ok")), stage=d.get("stage"),
            error=d.get("error"), conns=int(d.get("conns", 0)),
            dump=Phase.from_dict(d["dump"]) if d.get("dump") else None,
            restore=Phase.from_dict(d["restore"]) if d.get("restore") else None,
            ab=AbReport.from_dict(d["ab"]) if d.get("ab") else None,
            leftovers=list(d.get("leftovers", [])), wall_s=float(d.get("wall_s", 0.0)))


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
    """The medians of one (concurrency, method) over its successful runs."""

    concurrency: int
    method: str
    runs: int
    ok: int
    errors: list[str] = field(default_factory=list)  # distinct failure reasons
    dump_total_ms: float | None = None
    dump_criu_ms: float | None = None
    dump_lock_ms: float | None = None
    restore_total_ms: float | None = None
    restore_criu_ms: float | None = None
    restore_lock_ms: float | None = None
    sum_ms: float | None = None  # median over runs of dump + restore (not a sum of medians)
    frozen_ms: float | None = None
    conns: float | None = None
    ab_failed: int = 0  # over all runs
    ab_non_2xx: int = 0
    ab_aborted: int = 0  # runs in which ab gave up by itself
    ab_longest_ms: float | None = None  # median of the runs' longest request

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
        errors = list(dict.fromkeys(f"{r.stage}: {r.error}" for r in rs if not r.ok))
        dumps = [r.dump for r in good if r.dump]
        rests = [r.restore for r in good if r.restore]
        abs_ = [r.ab for r in good if r.ab]
        cells.append(Cell(
            concurrency=conc, method=method, runs=len(rs), ok=len(good), errors=errors,
            dump_total_ms=median([p.total_ms for p in dumps]),
            dump_criu_ms=median([p.criu_ms for p in dumps]),
            dump_lock_ms=median([p.lock_ms for p in dumps]),
            restore_total_ms=median([p.total_ms for p in rests]),
            restore_criu_ms=median([p.criu_ms for p in rests]),
            restore_lock_ms=median([p.lock_ms for p in rests]),
            sum_ms=median([r.sum_ms for r in good]),
            frozen_ms=median([p.frozen_ms for p in dumps]),
            conns=median([float(r.conns) for r in good]),
            ab_failed=sum(a.failed for a in abs_),
            ab_non_2xx=sum(a.non_2xx for a in abs_),
            ab_aborted=sum(1 for a in abs_ if a.aborted),
            ab_longest_ms=median([a.longest_ms for a in abs_]),
        ))
    return cells


@dataclass
class Ratio:
    """dump + restore of xdp against iptables and against none, at one concurrency."""

    concurrency: int
    xdp_ms: float | None
    iptables_ms: float | None
    none_ms: float | None

    @property
    def xdp_iptables(self) -> float | None:
        return _div(self.xdp_ms, self.iptables_ms)

    @property
    def xdp_none(self) -> float | None:
        return _div(self.xdp_ms, self.none_ms)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "xdp_iptables": self.xdp_iptables,
                "xdp_none": self.xdp_none}


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(cells: Sequence[Cell]) -> list[Ratio]:
    by = {(c.concurrency, c.method): c.sum_ms for c in cells}
    out = []
    for conc in sorted({c.concurrency for c in cells}):
        out.append(Ratio(conc, by.get((conc, "xdp")), by.get((conc, "iptables")),
                         by.get((conc, "none"))))
    return out


# --- results, files -------------------------------------------------------------------------------


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


def load_results(path: Path) -> BenchResults:
    return BenchResults.from_dict(json.loads(path.read_text()))


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "—"
    return f"{r:.3f} (1 : {1 / r:,.1f})" if r < 1 else f"{r:.3f}"


def markdown(res: BenchResults) -> str:
    """results.md: the table like the paper's, the paper's figures beside ours, the ratios."""
    cells = res.cells
    lines = ["# Network lock methods: dump and restore of nginx under ApacheBench", ""]
    env = res.env
    if env:
        lines.append(
            f"Host: {env.get('kernel', '?')}, {env.get('cpus', '?')} CPUs; CRIU "
            f"{env.get('criu', '?')}; {env.get('nginx', '?')}; {env.get('iptables', '?')}; "
            f"{env.get('nft', '?')}. Started {res.started}"
            + (f", finished {res.finished}" if res.finished else "")
            + (" (interrupted: partial results)" if res.interrupted else "") + ".")
        lines.append("")
    lines += [
        "Medians in ms over the successful runs. *total* is the wall time of orthros's "
        "`dump_tree`/`restore_tree` call; *criu* is CRIU's RPC minus the lock; *lock* is the "
        "time in CRIU's iptables/nft calls (from its log, level 4 for every method) or in "
        "orthros's XDP map writes. `none` = nobody locks (CRIU `skip`): the floor. *ab failed* "
        "sums ab's failed requests over the runs; *longest* is the median of ab's longest "
        "request: the longest gap a client saw, among the requests that completed before ab "
        "was stopped (settle time after the restore: "
        f"{res.config.settle_s:g} s; a request still waiting then is not counted). "
        "Paper rows: seed 003's Table 2 (iptables method), lock = iptables + sh.",
        "",
        "| conns | method | runs ok | dump total | dump criu | dump lock | restore total "
        "| restore criu | restore lock | dump+restore | ab failed | longest |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for conc in sorted({c.concurrency for c in cells}):
        for c in (c for c in cells if c.concurrency == conc):
            okcol = f"{c.ok}/{c.runs}" + (" ✗" if c.ok < c.runs else "")
            aborted = f" ({c.ab_aborted} aborted)" if c.ab_aborted else ""
            lines.append(
                f"| {conc:,} | {c.method} | {okcol} | {fmt_ms(c.dump_total_ms)} | "
                f"{fmt_ms(c.dump_criu_ms)} | {fmt_ms(c.dump_lock_ms)} | "
                f"{fmt_ms(c.restore_total_ms)} | {fmt_ms(c.restore_criu_ms)} | "
                f"{fmt_ms(c.restore_lock_ms)} | {fmt_ms(c.sum_ms)} | "
                f"{c.ab_failed if c.ok else '—'}{aborted} | {fmt_ms(c.ab_longest_ms)} |")
        p = PAPER.get(conc)
        if p is not None:
            lines.append(
                f"| {conc:,} | *paper: iptables* | | *{fmt_ms(p.dump_total)}* | "
                f"*{fmt_ms(p.dump_criu)}* | *{fmt_ms(p.dump_lock)}* | "
                f"*{fmt_ms(p.restore_total)}* | *{fmt_ms(p.restore_criu)}* | "
                f"*{fmt_ms(p.restore_lock)}* | *{fmt_ms(p.total)}* | | |")
    lines += ["", "## xdp against iptables and none (dump + restore, medians)", "",
              "| conns | xdp | iptables | none | xdp : iptables | xdp : none |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in res.ratios:
        lines.append(f"| {r.concurrency:,} | {fmt_ms(r.xdp_ms)} | {fmt_ms(r.iptables_ms)} | "
                     f"{fmt_ms(r.none_ms)} | {fmt_ratio(r.xdp_iptables)} | "
                     f"{fmt_ratio(r.xdp_none)} |")
    if res.micro:
        m = res.micro
        lines += ["", "## XDP map alone", "",
                  f"Lock of {m.conns:,} synthetic connections ({2 * m.conns:,} map entries, one "
                  f"batch syscall): median {m.lock_ms:.3f} ms; unlock {m.unlock_ms:.3f} ms "
                  f"(median of {m.reps}); lock + unlock, best of {m.reps}: "
                  f"{m.round_best_ms:.3f} ms."]
    failed = [c for c in cells if c.errors]
    if failed or res.notes:
        lines += ["", "## Failures and notes", ""]
        for c in failed:
            for e in c.errors:
                lines.append(f"- {c.concurrency:,} connections, {c.method}: {e}")
        lines += [f"- {n}" for n in res.notes]
    return "\n".join(lines) + "\n"


def plot(res: BenchResults, out: Path) -> list[Path]:
    """PNG plots: dump, restore, and dump + restore against connections, one line per method
    (median, with the range of the runs), the paper's iptables figures dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(method: str, get: Callable[[RunRecord], float | None]
               ) -> tuple[list[int], list[float], list[float], list[float]]:
        xs, ys, lo, hi = [], [], [], []
        for conc in sorted({r.concurrency for r in res.runs}):
            vals = [v for r in res.runs if r.method == method and r.concurrency == conc and r.ok
                    for v in [get(r)] if v is not None]
            if vals:
                mid = statistics.median(vals)
                xs.append(conc)
                ys.append(mid)
                lo.append(mid - min(vals))
                hi.append(max(vals) - mid)
        return xs, ys, lo, hi

    figures: list[tuple[str, str, Callable[[RunRecord], float | None], Callable[[PaperRow],
                                                                                  float]]] = [
        ("dump.png", "dump", lambda r: r.dump.total_ms if r.dump else None,
         lambda p: p.dump_total),
        ("restore.png", "restore", lambda r: r.restore.total_ms if r.restore else None,
         lambda p: p.restore_total),
        ("total.png", "dump + restore", lambda r: r.sum_ms, lambda p: p.total),
    ]
    made: list[Path] = []
    methods = [m.value for m in METHODS if any(r.method == m.value for r in res.runs)]
    for name, title, get, paper in figures:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in methods:
            xs, ys, lo, hi = series(method, get)
            failed = sorted({r.concurrency for r in res.runs
                             if r.method == method and not r.ok})
            label = method + (f" (failed at {', '.join(map(str, failed))})" if failed else "")
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        px = sorted(PAPER)
        ax.plot(px, [paper(PAPER[c]) for c in px], "k--", marker="x", alpha=0.6,
                label="paper: iptables")
        ax.set_yscale("log")
        ax.set_xlabel("established connections")
        ax.set_ylabel("time (ms, log scale)")
        ax.set_title(f"{title} of nginx: network lock methods")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    return made


def notes_for(runs: Sequence[RunRecord]) -> list[str]:
    """What a reader of the table needs to know about these runs."""
    notes = []
    if any(r.method == Method.NFTABLES and not r.ok for r in runs):
        notes.append(
            "nftables: CRIU 4.2.1 with bookworm's libnftables aborts (SIGABRT, `*** bit out "
            "of range 0 - FD_SETSIZE on fd_set ***`, seen on its stderr when run by hand): "
            "libnftables uses select() and CRIU's descriptors are past 1,024 by then. The "
            "failed runs say at which lock call it died.")
    if any(r.method == Method.NFTABLES and r.ok for r in runs):
        notes.append("nftables restore lock: CRIU unlocks with one `delete table`, which its "
                     "log does not time; the column shows 0.")
    left = [x for r in runs for x in r.leftovers]
    if left:
        kinds = sorted({x.split(":", 1)[0] for x in left})
        notes.append(f"{len(left)} leftovers ({', '.join(kinds)}) were found after runs and "
                     "removed; results.json lists them per run.")
    return notes


def write_outputs(res: BenchResults, out: Path, *, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res.to_dict(), indent=2) + "\n")
    (out / "results.md").write_text(markdown(res))
    made = [out / "results.json", out / "results.md"]
    if plots and res.runs:
        made += plot(res, out)
    return made


# --- the host side: namespace, nginx, ab, cleanup ------------------------------------------------

NS_PREFIX = "orthros-bench-"
IF_PREFIX = "obn"
SOCCR_MARK = "0xc114"  # the mark CRIU's own packets carry; its iptables lock rules name it
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def _tool(name: str) -> str:
    exe = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if exe is None:
        raise MissingFeatureError(f"{name} is not installed (the benchmark needs it)",
                                  hint="run scripts/setup.sh")
    return exe


def pick_subnet(taken: Sequence[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A 10.99.x.0/24 that overlaps nothing in ``taken``."""
    for x in range(200, 256):
        net = ipaddress.IPv4Network(f"10.99.{x}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise OrthrosError("no free 10.99.x.0/24 for the benchmark's veth pair",
                       hint="give one with --subnet")


def _host_networks() -> list[ipaddress.IPv4Network]:
    from orthros_py.net.addr import iproute

    with iproute(None) as ipr:
        return [ipaddress.IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}").network
                for a in ipr.get_addr(family=socket.AF_INET)]


class ClientNet:
    """A client network namespace joined to this one by a veth pair on a private /24: the
    server's address on this side, the client's inside. ``close`` removes both (the peer goes
    with the link); a namespace left by a benchmark whose process died is removed on start."""

    def __init__(self, subnet: ipaddress.IPv4Network | None = None) -> None:
        tag = str(os.getpid())
        self.name = NS_PREFIX + tag
        self.host_if = (IF_PREFIX + tag)[:15]
        self.subnet = subnet
        self.server_ip = ""
        self.client_ip = ""
        self.made = False

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def __enter__(self) -> ClientNet:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        from orthros_py.net.addr import in_netns
        from orthros_py.net.links import add_veth, create_netns, link_up, loopback_up

        remove_stale_namespaces()
        if self.subnet is None:
            self.subnet = pick_subnet(_host_networks())
        elif any(self.subnet.overlaps(n) for n in _host_networks()):
            raise OrthrosError(f"{self.subnet} overlaps an address of this host",
                               hint="choose another --subnet")
        hosts = list(self.subnet.hosts())
        self.server_ip, self.client_ip = str(hosts[0]), str(hosts[1])
        prefix = self.subnet.prefixlen
        create_netns(self.name)
        self.made = True
        add_veth(None, self.host_if, peer="eth0", peer_netns=self.name)
        link_up(None, self.host_if, address=ipaddress.IPv4Interface(f"{self.server_ip}/{prefix}"),
                alias=f"orthros bench {self.name}")
        loopback_up(self.name)
        link_up(self.name, "eth0", address=ipaddress.IPv4Interface(f"{self.client_ip}/{prefix}"))
        # Many runs of many connections from one client: a wide port range, so that the
        # TIME_WAITs of earlier runs never run it dry. This namespace's own setting.
        with in_netns(self.name), open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
            f.write("10000 65000\n")

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace: network only (``ip netns exec`` would also
        remount /sys in a mount namespace of its own)."""
        return [_tool("nsenter"), f"--net={self.path}", *argv]

    def close(self) -> None:
        _remove_net(self.name, self.host_if)


def _remove_net(name: str, host_if: str) -> None:
    from pyroute2 import NetlinkError

    from orthros_py.net.links import delete_link, remove_netns

    with contextlib.suppress(NetlinkError, OSError, OrthrosError):
        delete_link(None, host_if)
    remove_netns(name)


def remove_stale_namespaces() -> list[str]:
    """Namespaces (and veths) of earlier benchmarks whose process is gone."""
    removed = []
    base = Path("/run/netns")
    for p in base.glob(NS_PREFIX + "*") if base.is_dir() else []:
        tag = p.name[len(NS_PREFIX):]
        if tag.isdigit() and not psutil.pid_exists(int(tag)):
            _remove_net(p.name, (IF_PREFIX + tag)[:15])
            removed.append(p.name)
    return removed


NGINX_CONF = """\
user root;
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    keepalive_timeout 600s;
    keepalive_requests 1000000000;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen {ip}:{port} backlog=4096;
        location / {{
            root {dir}/www;
        }}
    }}
}}
"""


class Nginx:
    """One nginx (master + one worker, as root: CRIU here cannot read the rlimits of another
    uid), its files in ``workdir``, started as a session leader like a daemon."""

    def __init__(self, workdir: Path, ip: str, port: int) -> None:
        self.dir = workdir
        self.ip, self.port = ip, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        (self.dir / "www").mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        (self.dir / "www" / "index.html").write_text("orthros netlock benchmark\n")
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, ip=self.ip, port=self.port))
        self.proc = subprocess.Popen(
            [_tool("nginx"), "-p", f"{self.dir}/", "-c", str(conf), "-e",
             str(self.dir / "error.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
        deadline = time.monotonic() + timeout
        while not self.listening():
            if self.proc.poll() is not None:
                raise OrthrosError(f"nginx exited with {self.proc.returncode}: "
                                   f"{self.log_tail() or 'no message'}", stage="nginx")
            if time.monotonic() > deadline:
                raise OrthrosError(f"nginx did not listen on {self.ip}:{self.port} within "
                                   f"{timeout:g} s: {self.log_tail()}", stage="nginx")
            time.sleep(0.02)

    @property
    def master(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def workers(self) -> list[psutil.Process]:
        try:
            return list(psutil.Process(self.master).children())
        except psutil.NoSuchProcess:
            return []

    def pids(self) -> list[int]:
        return [self.master, *(p.pid for p in self.workers())]

    def _sockets(self) -> list[Any]:
        out: list[Any] = []
        for w in self.workers():
            with contextlib.suppress(psutil.Error):
                out += [c for c in w.net_connections(kind="tcp4")
                        if c.laddr and c.laddr.port == self.port]
        return out

    def listening(self) -> bool:
        return any(c.status == psutil.CONN_LISTEN for c in self._sockets())

    def established(self) -> int:
        return sum(1 for c in self._sockets() if c.status == psutil.CONN_ESTABLISHED)

    def masters(self) -> list[int]:
        """Every live master of this nginx, started or restored: its title names our files."""
        mark = f"{self.dir}/"
        found = []
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(mark in arg for arg in p.info["cmdline"] or []):
                    found.append(p.pid)
        return found

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = (self.dir / "error.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(ln.strip() for ln in text[-lines:])


def wait_gone(pids: Sequence[int], timeout: float = 10.0) -> None:
    """Until ``pids`` are free: as the subreaper we collect the orphaned worker ourselves
    instead of waiting for PID 1 (which took ~1.2 s here)."""
    deadline = time.monotonic() + timeout
    while True:
        reap(pids)
        left = [p for p in pids if alive(p)]
        if not left:
            return
        if time.monotonic() > deadline:
            raise OrthrosError(f"the dumped processes {left} are still there after "
                               f"{timeout:g} s", stage="restore")
        time.sleep(0.005)


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Be the child subreaper while the benchmark runs: the dumped (and the restored) nginx
    worker is orphaned when its master dies, and comes to us to be reaped at once."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(before), 0, 0, 0)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, before.value, 0, 0, 0)


def criu_iptables_rules(addresses: Sequence[str]) -> list[str]:
    """CRIU's per-connection lock rules (they accept its own mark, drop the rest) that name
    one of ``addresses``, as iptables-save prints them."""
    out = run([_tool("iptables-save"), "-t", "filter"], timeout=120).stdout
    wanted = [f"{a}/32" for a in addresses]
    return [ln for ln in out.splitlines()
            if ln.startswith("-A ") and SOCCR_MARK in ln.lower()
            and any(w in ln for w in wanted)]


def remove_iptables_rules(rules: Sequence[str]) -> list[str]:
    removed = []
    ipt = _tool("iptables")
    for rule in rules:
        spec = shlex.split(rule)  # iptables-save's own quoting; never run through a shell
        res = run([ipt, "-w", "-t", "filter", "-D", *spec[1:]], timeout=60, check=False)
        if res.returncode == 0:
            removed.append(f"iptables: {rule}")
    return removed


def criu_nft_tables() -> set[str]:
    """CRIU's nftables lock tables (``inet CRIU-<run id>``)."""
    out = run([_tool("nft"), "list", "tables"], timeout=60).stdout
    return {ln.split(None, 1)[1].strip() for ln in out.splitlines()
            if ln.startswith("table ") and " CRIU-" in ln}


def remove_nft_tables(tables: Sequence[str]) -> list[str]:
    removed = []
    for t in tables:
        family, name = t.split(None, 1)
        res = run([_tool("nft"), "delete", "table", family, name], timeout=60, check=False)
        if res.returncode == 0:
            removed.append(f"nft: table {t}")
    return removed


def xdp_release(net: ClientNet) -> list[str]:
    """Our part of the shared XDP lock, gone: the benchmark's connections unlocked and the
    programs off our veth. A restore leaves the programs attached while anyone else (a lab, a
    test) has connections locked; this takes off only ours."""
    from orthros_py.netlock.xdp import XdpNetLock

    done: list[str] = []
    ours = {net.server_ip, net.client_ip}
    lock = XdpNetLock()
    try:
        stuck = [lc.conn for lc in lock.locked()
                 if lc.conn.local_ip in ours or lc.conn.remote_ip in ours]
        if stuck:
            lock.unlock(stuck)
            done.append(f"xdp: unlocked {len(stuck)} connections")
        res = lock.detach([net.host_if], netns=None)
        done += [f"xdp: detached from {a.iface} (kept attached while others held locks)"
                 for a in res.detached]
    except OrthrosError as err:
        done.append(f"xdp: could not check the lock: {err.msg}")
    finally:
        lock.close()
    return done


def synthetic_conns(n: int) -> list[Conn]:
    """``n`` distinct connections in documentation address space (RFC 5737): no packet on any
    network matches them."""
    return [Conn(socket.AF_INET, "203.0.113.1", 80, f"198.51.100.{1 + i // 50000}",
                 1024 + i % 50000) for i in range(n)]


def micro_xdp(conns: int = 1000, reps: int = 7) -> MicroResult:
    """Lock and unlock ``conns`` synthetic connections in the pinned map, ``reps`` times."""
    from orthros_py.netlock.xdp import XdpNetLock

    lock = XdpNetLock()
    try:
        info = lock.prepare()  # a compile, if any, happens here and is not timed
        todo = synthetic_conns(conns)
        locks, unlocks = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            lock.lock(todo)
            t1 = time.perf_counter()
            lock.unlock(todo)
            t2 = time.perf_counter()
            locks.append((t1 - t0) * 1000)
            unlocks.append((t2 - t1) * 1000)
    finally:
        with contextlib.suppress(OrthrosError):
            lock.release()
        lock.unload()
    return MicroResult(conns, reps, statistics.median(locks), statistics.median(unlocks),
                       locks, unlocks, info.get("compile_seconds"))


def environment() -> dict[str, Any]:
    def first(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            return "?"
        text = (p.stdout + p.stderr).strip().splitlines()
        return text[0].strip() if text else "?"

    from orthros_py.criu.binary import find_criu

    return {
        "kernel": f"Linux {platform.release()}",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "criu": find_criu().version_str,
        "nginx": first([_tool("nginx"), "-v"]).replace("nginx version: ", ""),
        "ab": first([_tool("ab"), "-V"]),
        "iptables": first([_tool("iptables"), "-V"]),
        "nft": first([_tool("nft"), "-v"]),
    }


# --- the benchmark ------------------------------------------------------------------------------

Progress = Callable[[str], None]


def _reason(err: BaseException, log: Path | None = None) -> str:
    """One line for the table: the error, and for CRIU, when the error itself says little
    (a CRIU that aborts leaves only "exited in the middle"), where its log stops."""
    from orthros_py.criu.log import lock_spans, main_reason, read_lines

    if not isinstance(err, OrthrosError):
        return f"{type(err).__name__}: {err}"
    text = err.msg
    if not isinstance(err, CriuError) or main_reason(err.log_tail) or log is None:
        return text
    lines = read_lines(log)
    last = [ln.strip() for ln in lines if ln.startswith("(")][-1:]
    spans = lock_spans(lines)
    if spans.calls and last and "Running " in last[0]:
        return (f"{text}: CRIU died inside its {spans.calls}th {spans.tool} lock call "
                f"({last[0].split('[', 1)[-1].rstrip(']')[:100]})")
    return f"{text} (its log ends: {last[0][:160]})" if last else text


class NetlockBench:
    """Runs the plan; ``run()`` returns the results and has written them to ``config.out``."""

    def __init__(self, config: BenchConfig, *, progress: Progress | None = None,
                 on_run: Callable[[RunRecord, int, int], None] | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda _msg: None)
        self.on_run = on_run or (lambda _rec, _i, _n: None)
        self.net: ClientNet | None = None
        self.tmp: Path | None = None
        self.results = BenchResults(config)

    # -- checks and setup ---------------------------------------------------------------------

    def preflight(self) -> None:
        if os.geteuid() != 0:
            raise NotRootError("the benchmark needs root (CRIU, namespaces, BPF, iptables)",
                               hint="run it with sudo")
        for name in ("nginx", "ab", "nsenter"):
            _tool(name)
        if Method.IPTABLES in self.config.methods:
            _tool("iptables")
            _tool("iptables-save")
        if Method.NFTABLES in self.config.methods:
            _tool("nft")
        if any(c < 0 for c in self.config.concurrency):
            raise OrthrosError("concurrency cannot be negative")
        for c in self.config.concurrency:
            # The client holds C sockets, nginx C + its own: RLIMIT_NOFILE is fixed here.
            soft = _nofile()
            if c + 64 > soft:
                raise OrthrosError(f"{c} connections need more than RLIMIT_NOFILE={soft} "
                                   "descriptors", hint="lower --concurrency")

    def run(self) -> BenchResults:
        self.preflight()
        cfg = self.config
        res = self.results
        res.started = _now()
        res.env = environment()
        cfg.out.mkdir(parents=True, exist_ok=True)
        runs = plan(cfg)
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(subreaper())
                if Method.XDP in cfg.methods:
                    stack.enter_context(self._xdp_pins())
                self.tmp = Path(stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="orthros-bench-")))
                self.progress("creating the client namespace and veth pair")
                self.net = stack.enter_context(ClientNet(
                    ipaddress.IPv4Network(cfg.subnet) if cfg.subnet else None))
                res.env["subnet"] = str(self.net.subnet)
                if Method.XDP in cfg.methods and cfg.micro_conns > 0:
                    self.progress(f"XDP map microbenchmark: {cfg.micro_conns} connections")
                    res.micro = micro_xdp(cfg.micro_conns, cfg.micro_reps)
                for i, item in enumerate(runs, 1):
                    rec = self.run_one(item, i)
                    res.runs.append(rec)
                    self.on_run(rec, i, len(runs))
                    write_outputs(res, cfg.out, plots=False)  # a long run keeps what it has
        except BaseException:
            res.interrupted = True
            res.finished = _now()
            res.notes = notes_for(res.runs)
            with contextlib.suppress(Exception):
                write_outputs(res, cfg.out)
            raise
        res.finished = _now()
        res.notes = notes_for(res.runs)
        write_outputs(res, cfg.out)
        return res

    @contextlib.contextmanager
    def _xdp_pins(self) -> Iterator[None]:
        """Compile (or open) the XDP lock before any timing; take the pins away again at the
        end if this benchmark made them and nothing else uses them."""
        from orthros_py.netlock.xdp import PIN_DIR, PINS, XdpNetLock

        existed = (PIN_DIR / PINS["conns"]).exists()
        lock = XdpNetLock()
        try:
            self.progress("loading the XDP lock (compiles once, ~10 s, if not pinned)")
            info = lock.prepare()
            if info.get("compiled"):
                self.results.env["xdp_compile_s"] = info.get("compile_seconds")
        finally:
            lock.unload()
        try:
            yield
        finally:
            lock = XdpNetLock()
            try:
                if not existed:
                    lock.flush_if_unused()
            finally:
                lock.close()

    # -- one run ------------------------------------------------------------------------------

    def run_one(self, item: PlannedRun, seq: int) -> RunRecord:
        from orthros_py.checkpoint import dump_tree, restore_tree
        from orthros_py.criu.log import lock_spans_in
        from orthros_py.criu.request import DumpOptions, RestoreOptions

        assert self.net is not None and self.tmp is not None
        cfg, net, method, conc = self.config, self.net, item.method, item.concurrency
        rec = RunRecord(conc, method.value, item.rep, seq)
        name = f"{seq:03d}-c{conc}-{method.value}-r{item.rep}"
        rundir = cfg.out / "runs" / name
        rundir.mkdir(parents=True, exist_ok=True)
        images = rundir / "images"
        nginx = Nginx(self.tmp / name, net.server_ip, cfg.port)
        ab: subprocess.Popen[bytes] | None = None
        restored: int | None = None
        tables_before = criu_nft_tables() if method is Method.NFTABLES else set()
        started = time.monotonic()
        stage = "nginx"
        self.progress(f"[{seq}] {conc} connections, {method.value}, rep {item.rep + 1}")
        try:
            nginx.start()
            if conc > 0:
                stage = "clients"
                ab = self._start_ab(conc, rundir)
                self._wait_established(nginx, ab, conc)
            rec.conns = nginx.established()
            pids = nginx.pids()
            stage = "dump"
            dopts = DumpOptions(tcp_established=True, leave_running=False,
                                log_level=cfg.log_level, network_lock=method.lock.criu)
            t0 = time.perf_counter()
            d = dump_tree(nginx.master, images, dopts, network_lock=method.lock)
            t1 = time.perf_counter()
            spans = lock_spans_in(images / "dump.log")
            rec.dump = split_phase(method, "dump", (t1 - t0) * 1000, d.elapsed_ms,
                                   spans_ms=spans.total_ms, spans_calls=spans.calls,
                                   lock_report=d.extra.get("lock"),
                                   stats=d.stats.to_dict() if d.stats else None)
            stage = "restore"
            assert nginx.proc is not None
            nginx.proc.wait(timeout=30)  # CRIU killed it: collect it, and the orphaned worker
            wait_gone(pids)
            ropts = RestoreOptions(tcp_established=True, log_level=cfg.log_level,
                                   network_lock=method.lock.criu)
            t2 = time.perf_counter()
            r = restore_tree(images, ropts, network_lock=method.lock)
            t3 = time.perf_counter()
            restored = r.pid
            spans = lock_spans_in(images / "restore.log")
            rec.restore = split_phase(method, "restore", (t3 - t2) * 1000, r.elapsed_ms,
                                      spans_ms=spans.total_ms, spans_calls=spans.calls,
                                      lock_report=r.extra.get("lock"),
                                      stats=r.stats.to_dict() if r.stats else None)
            rec.ok = True
            if ab is not None:
                stage = "clients after restore"
                time.sleep(cfg.settle_s)  # traffic on the restored server, as the brief says
        except (OrthrosError, OSError, subprocess.SubprocessError) as err:
            log = images / ("dump.log" if stage == "dump" else "restore.log")
            rec.stage, rec.error = stage, _reason(err, log)
        finally:
            self._teardown(rec, nginx, ab, restored, rundir, method, tables_before)
            rec.wall_s = time.monotonic() - started
        return rec

    def _start_ab(self, conc: int, rundir: Path) -> subprocess.Popen[bytes]:
        assert self.net is not None
        url = f"http://{self.net.server_ip}:{self.config.port}/"
        argv = self.net.argv([_tool("ab"), "-k", "-r", "-s", "600", "-c", str(conc), "-t", "900",
                              "-n", "100000000", url])
        with open(rundir / "ab.out", "wb") as out, open(rundir / "ab.err", "wb") as err:
            # Its own session: a Ctrl-C reaches only us, and we stop it in order.
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)

    def _wait_established(self, nginx: Nginx, ab: subprocess.Popen[bytes], conc: int) -> None:
        timeout = self.config.connect_timeout_s
        deadline = time.monotonic() + timeout
        have = 0
        while True:
            have = nginx.established()
            if have >= conc:
                return
            if ab.poll() is not None:
                raise OrthrosError(f"ab exited with {ab.returncode} before opening {conc} "
                                   f"connections ({have} established)", stage="clients")
            if time.monotonic() > deadline:
                raise OrthrosError(f"only {have} of {conc} connections established after "
                                   f"{timeout:g} s", stage="clients")
            time.sleep(0.05)

    def _stop_ab(self, ab: subprocess.Popen[bytes], rundir: Path) -> AbReport:
        if ab.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(ab.pid, signal.SIGINT)  # ab prints its report on SIGINT
            try:
                ab.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(ab.pid, signal.SIGKILL)
                ab.wait(timeout=10)
        out = (rundir / "ab.out").read_text(errors="replace")
        err = (rundir / "ab.err").read_text(errors="replace")
        return parse_ab(out, err, ab.returncode)

    def _teardown(self, rec: RunRecord, nginx: Nginx, ab: subprocess.Popen[bytes] | None,
                  restored: int | None, rundir: Path, method: Method,
                  tables_before: set[str]) -> None:
        """Everything of the run goes, on every path: ab, nginx (original or restored), the
        lock rules a failed CRIU may have left, the bulky images."""
        assert self.net is not None
        if ab is not None:
            try:
                rec.ab = self._stop_ab(ab, rundir)
            except (OSError, subprocess.SubprocessError) as err:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(ab.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.SubprocessError):
                    ab.wait(timeout=10)
                rec.error = rec.error or f"stopping ab: {err}"
        if restored is not None:
            kill_tree(restored)
        if nginx.proc is not None:
            pids = nginx.pids()
            if nginx.proc.poll() is None:
                kill_tree(nginx.master)
            with contextlib.suppress(subprocess.SubprocessError):
                nginx.proc.wait(timeout=10)
            reap(pids)
        # A restore interrupted on our side may still have been finished by CRIU: that tree
        # came back under the old PIDs without our knowing its root. Found by its files.
        for pid in nginx.masters():
            kill_tree(pid)
        if method is Method.XDP:
            rec.leftovers += xdp_release(self.net)
        try:
            if method is Method.IPTABLES:
                rules = criu_iptables_rules([self.net.server_ip, self.net.client_ip])
                rec.leftovers += remove_iptables_rules(rules)
            elif method is Method.NFTABLES:
                rec.leftovers += remove_nft_tables(sorted(criu_nft_tables() - tables_before))
        except CommandError as err:
            rec.leftovers.append(f"could not check for CRIU's rules: {err.msg}")
        if not self.config.keep_images and images_dir_of(rundir).is_dir():
            for p in images_dir_of(rundir).iterdir():
                if p.suffix == ".img" and not p.name.startswith("stats-"):
                    p.unlink()


def images_dir_of(rundir: Path) -> Path:
    return rundir / "images"


def _nofile() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _now() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


def default_out() -> Path:
    return Path("results") / f"netlock-{datetime.now():%Y%m%d-%H%M%S}"


def parse_concurrency(text: str) -> tuple[int, ...]:
    """``0,500,1000`` -> (0, 500, 1000); ValueError naming what is wrong."""
    out = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if not part:
            continue
        if not part.isdigit():
            raise ValueError(f"{part!r} is not a number of connections")
        out.append(int(part))
    if not out:
        raise ValueError("no concurrency given")
    return tuple(dict.fromkeys(out))


def parse_methods(text: str) -> tuple[Method, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(Method(part))
        except ValueError as err:
            raise ValueError(f"unknown method {part!r} (one of "
                             f"{', '.join(m.value for m in METHODS)})") from err
    if not out:
        raise ValueError("no method given")
    return tuple(dict.fromkeys(out))
