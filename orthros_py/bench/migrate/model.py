"""The migrate benchmark's pure half: the arms (orthros migrate, CRIU alone) and workloads (the
echo service under its clients, nginx under wrk), the plan of interleaved repetitions, one
run's record read from migrate's result, from the baseline's JSON and from what the clients
saw (ClientPool's figures, wrk's report), the judgement of a run, the summaries (medians and
min-max spreads, the per-repetition ratio of orthros's downtime to CRIU's own dump plus
restore), the issue's targets and the results record.

A run's figures, in ms:

- *downtime*: orthros: migrate's own ``timings_ms["downtime"]`` (the lock taken to the lock
  released: the window in which the clients' packets are held); CRIU alone: the dump's start
  to the restore's end.
- *CRIU*: CRIU's frozen time (the dump's ``frozen_time`` from its stats) plus its restore
  (orthros: ``timings_ms["criu restore"]``; CRIU alone: the restore call).
- *share*: downtime minus CRIU; for orthros its own overhead, for CRIU alone what CRIU spends
  outside the frozen time (its start, the freezing).
- *longest wait*: the longest a client request waited (echo: ClientPool's longest round;
  nginx: wrk's Max latency).

Wraps no interface and needs no privileges, so all of it is unit-tested.
"""

from __future__ import annotations

import dataclasses
import random
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthros_py.bench.pair.model import Figure, Target
from orthros_py.bench.stats import median, ratio

ORTHROS, CRIU = "orthros", "criu"
ARMS: tuple[str, ...] = (ORTHROS, CRIU)
ARM_LABELS = {ORTHROS: "orthros migrate", CRIU: "criu alone"}
ECHO, NGINX = "echo", "nginx"
WORKLOADS: tuple[str, ...] = (ECHO, NGINX)

# The targets, for the 200-client echo service: reported, never asserted.
TARGET_CLIENTS = 200
TARGET_RATIO = 1.5  # orthros downtime / CRIU alone's dump + restore
TARGET_DOWNTIME_MS = 150.0
TARGET_WAIT_MS = 200.0

# Per-run figures, in table order: (key, label). All in ms but the ratio.
METRICS: tuple[tuple[str, str], ...] = (
    ("downtime_ms", "downtime"),
    ("criu_ms", "CRIU (frozen + restore)"),
    ("share_ms", "share (downtime - CRIU)"),
    ("longest_wait_ms", "longest client wait"),
    ("wait_ratio", "longest wait / downtime"),
    ("frozen_ms", "CRIU frozen"),
    ("restore_ms", "CRIU restore"),
    ("dump_restore_ms", "CRIU dump + restore calls"),
)
CLIENT_METRICS = ("longest_wait_ms", "wait_ratio")  # left out where the clients failed


def _parse_list(text: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        if p not in known:
            raise ValueError(f"unknown {what} {p!r} (one of {', '.join(known)})")
        out.append(p)
    if not out:
        raise ValueError(f"no {what} given")
    return tuple(dict.fromkeys(out))


def parse_workloads(text: str) -> tuple[str, ...]:
    """``echo,nginx`` -> ("echo", "nginx"); ValueError naming what is wrong."""
    return _parse_list(text, WORKLOADS, "workload")


def parse_arms(text: str) -> tuple[str, ...]:
    """``orthros,criu`` -> ("orthros", "criu")."""
    return _parse_list(text, ARMS, "arm")


@dataclass(frozen=True)
class BenchConfig:
    reps: int = 7
    workloads: tuple[str, ...] = WORKLOADS
    arms: tuple[str, ...] = ARMS
    echo_clients: int = TARGET_CLIENTS
    echo_interval_s: float = 0.005  # a client's pause between two rounds (the demo's)
    echo_ballast_mb: int = 0
    echo_port: int = 7000
    nginx_conns: int = 1500
    nginx_port: int = 8080
    wrk_threads: int = 2
    wrk_timeout_s: float = 10.0
    client_timeout_s: float = 10.0  # an echo reply later than this is a client failure
    warm_s: float = 1.0  # clients run this long before the migration
    settle_s: float = 1.0  # and this long after it
    criu_log_level: int = 2
    warmup: bool = True  # one unrecorded run of each arm first (the XDP lock built once)
    seed: int | None = None
    out: Path = Path("results")

    def __post_init__(self) -> None:
        if self.reps < 1:
            raise ValueError("reps must be at least 1")
        if self.echo_clients < 1 or self.nginx_conns < 1:
            raise ValueError("the workloads need at least one client connection")
        if not 1 <= self.wrk_threads <= self.nginx_conns:
            raise ValueError("wrk needs 1 to --connections threads")
        parse_workloads(",".join(self.workloads))
        parse_arms(",".join(self.arms))

    def clients_of(self, workload: str) -> int:
        return self.echo_clients if workload == ECHO else self.nginx_conns

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["workloads"], d["arms"] = list(self.workloads), list(self.arms)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["out"] = Path(kw.get("out", "results"))
        for k in ("workloads", "arms"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


@dataclass(frozen=True)
class PlannedRun:
    workload: str
    rep: int
    arm: str


def plan(config: BenchConfig, seed: int) -> list[PlannedRun]:
    """Every run in order: per workload, ``reps`` repetitions, each with every arm once in an
    order shuffled anew (by ``seed``), so that drift hits both arms alike."""
    rng = random.Random(seed)
    out: list[PlannedRun] = []
    for w in config.workloads:
        for rep in range(config.reps):
            order = list(config.arms)
            rng.shuffle(order)
            out += [PlannedRun(w, rep, a) for a in order]
    return out


# --- wrk and /proc/net/tcp ---------------------------------------------------------------------

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME = re.compile(r"^([\d.]+)(us|ms|s|m|h)$")


def wrk_time_ms(text: str) -> float | None:
    """A time as wrk prints it (``631.96us``, ``1.20s``, ``1.00m``) in ms; None if it is not
    one (``nan``)."""
    m = _TIME.match(text.strip())
    return float(m[1]) * _UNITS_MS[m[2]] if m else None


@dataclass
class WrkReport:
    """What wrk printed when it stopped. Socket errors and non-2xx/3xx answers are client
    failures; ``max_ms`` (its Max latency) is the longest any request waited."""

    requests: int | None = None
    seconds: float | None = None
    rps: float | None = None
    avg_ms: float | None = None
    max_ms: float | None = None
    percentiles_ms: dict[str, float] = field(default_factory=dict)
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0
    non2xx: int = 0

    @property
    def complete(self) -> bool:
        return self.requests is not None and self.max_ms is not None

    @property
    def errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout + self.non2xx

    def failures(self) -> list[str]:
        parts = [f"{n} {what}" for what, n in (
            ("connect errors", self.connect), ("read errors", self.read),
            ("write errors", self.write), ("timeouts", self.timeout),
            ("non-2xx/3xx answers", self.non2xx)) if n]
        return [", ".join(parts)] if parts else []

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "errors": self.errors}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WrkReport:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def parse_wrk(text: str) -> WrkReport:
    """wrk's report (run with ``--latency``); fields it did not print stay None or 0."""
    r = WrkReport()
    m = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)\s", text, re.MULTILINE)
    if m:
        r.avg_ms, r.max_ms = wrk_time_ms(m[1]), wrk_time_ms(m[3])
    for pm in re.finditer(r"^\s*(\d+(?:\.\d+)?)%\s+(\S+)\s*$", text, re.MULTILINE):
        v = wrk_time_ms(pm[2])
        if v is not None:
            r.percentiles_ms[f"p{pm[1].removesuffix('.0')}"] = v
    m = re.search(r"^\s*(\d+) requests in (\S+?),", text, re.MULTILINE)
    if m:
        r.requests = int(m[1])
        d = wrk_time_ms(m[2])
        r.seconds = None if d is None else d / 1000
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r.connect, r.read, r.write, r.timeout = (int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        r.non2xx = int(m[1])
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r.rps = float(m[1])
    return r


def _proc_addr(ip: str, port: int) -> str:
    """``ip:port`` as /proc/net/tcp writes it (the address in host byte order, hex)."""
    return f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"


def count_established(proc_net_tcp: str, ip: str, port: int) -> int:
    """Connections to ``ip:port`` established, from /proc/net/tcp of the client's side."""
    want = _proc_addr(ip, port)
    n = 0
    for line in proc_net_tcp.splitlines()[1:]:
        f = line.split()
        if len(f) > 3 and f[2] == want and f[3] == "01":
            n += 1
    return n


def accept_queue(proc_net_tcp: str, ip: str, port: int) -> int | None:
    """Connections waiting in the accept queue of the listener on ``ip:port`` (a listener's
    rx_queue in /proc/net/tcp of the server's side); None if nothing listens there. CRIU
    refuses to dump a listener holding any."""
    want = _proc_addr(ip, port)
    for line in proc_net_tcp.splitlines()[1:]:
        f = line.split()
        if len(f) > 4 and f[1] == want and f[3] == "0A":
            return int(f[4].split(":")[1], 16)
    return None


# --- one run -----------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass
class RunRecord:
    """One migration (orthros) or one dump and restore (CRIU alone) of a fresh tree under its
    clients; times in ms."""

    workload: str
    arm: str
    rep: int
    seq: int = 0
    source: str = ""
    dest: str = ""
    clients: int = 0  # connections asked for
    connected: int | None = None  # connections established when it began
    ok: bool = False
    error: str | None = None
    stage: str | None = None
    # The migration's (or CRIU's) figures.
    downtime_ms: float | None = None
    lock_window_ms: float | None = None  # orthros: the lock's window (= its downtime)
    frozen_ms: float | None = None
    restore_ms: float | None = None
    dump_ms: float | None = None
    pid_wait_ms: float | None = None  # CRIU alone: the dumped PIDs reaped before the restore
    pages: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    criu_stats: dict[str, Any] = field(default_factory=dict)
    # What the clients saw.
    longest_wait_ms: float | None = None
    client_requests: int | None = None
    client_errors: int = 0
    client_error_samples: list[str] = field(default_factory=list)
    # The echo connection that held the longest round up (its TCP_INFO at the end).
    slowest_client: dict[str, Any] | None = None
    wrk: dict[str, Any] | None = None
    answered_after: bool | None = None  # a fresh connection was served after it
    wall_s: float | None = None
    leftovers: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return ARM_LABELS.get(self.arm, self.arm)

    @property
    def criu_ms(self) -> float | None:
        if self.frozen_ms is None or self.restore_ms is None:
            return None
        return self.frozen_ms + self.restore_ms

    @property
    def share_ms(self) -> float | None:
        c = self.criu_ms
        return None if c is None or self.downtime_ms is None else self.downtime_ms - c

    @property
    def dump_restore_ms(self) -> float | None:
        """CRIU alone: its dump call plus its restore call (the pid wait between them left
        out: a restore on another host has none). What orthros's downtime is compared with."""
        if self.arm != CRIU or self.dump_ms is None or self.restore_ms is None:
            return None
        return self.dump_ms + self.restore_ms

    @property
    def wait_ratio(self) -> float | None:
        return ratio(self.longest_wait_ms, self.downtime_ms)

    @property
    def clients_failed(self) -> bool:
        return self.client_errors > 0

    def value(self, metric: str) -> float | None:
        """``metric`` as the medians take it: None for a failed run, and for the clients'
        figures of a run whose clients failed."""
        if not self.ok or (metric in CLIENT_METRICS and self.clients_failed):
            return None
        v = getattr(self, metric)
        return None if v is None else float(v)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("criu_ms", "share_ms", "dump_restore_ms", "wait_ratio"):
            d[k] = getattr(self, k)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def read_migration(rec: RunRecord, result: Mapping[str, Any]) -> None:
    """Fills ``rec`` from migrate's result (``MigrationResult.to_dict()``)."""
    timings = {k: float(v) for k, v in (result.get("timings_ms") or {}).items()}
    rec.timings_ms = timings
    rec.source = str(result.get("source", rec.source))
    rec.dest = str(result.get("dest", rec.dest))
    rec.downtime_ms = timings.get("downtime")
    rec.lock_window_ms = rec.downtime_ms
    rec.frozen_ms = _num(result.get("criu_frozen_ms"))
    rec.restore_ms = timings.get("criu restore")
    rec.dump_ms = timings.get("dump")
    pages = (result.get("counts") or {}).get("pages")
    rec.pages = None if pages is None else int(pages)


def read_criu_alone(rec: RunRecord, d: Mapping[str, Any]) -> None:
    """Fills ``rec`` from ``criu_alone``'s JSON; its error, if it printed one."""
    if d.get("error"):
        rec.error = f"CRIU alone, {d.get('stage', '?')}: {d['error']}"
        tail = [ln for ln in d.get("log_tail") or [] if ln.strip()]
        if tail:
            rec.error += f" ({tail[-1].strip()})"
        return
    ds, rs = d.get("dump_stats") or {}, d.get("restore_stats") or {}
    rec.criu_stats = {"dump": ds, "restore": rs}
    rec.dump_ms = _num(d.get("dump_ms"))
    rec.pid_wait_ms = _num(d.get("pid_wait_ms"))
    rec.restore_ms = _num(d.get("restore_ms"))
    rec.downtime_ms = _num(d.get("downtime_ms"))
    rec.frozen_ms = _num(ds.get("frozen_ms"))
    rec.pages = None if ds.get("pages_written") is None else int(ds["pages_written"])


def read_echo(rec: RunRecord, *, requests: int, errors: int, max_gap_s: float,
              samples: Sequence[str]) -> None:
    """The echo clients' figures (ClientPool's stats since the run's mark)."""
    rec.client_requests = requests
    rec.client_errors = errors
    rec.client_error_samples = list(samples)[:5]
    rec.longest_wait_ms = max_gap_s * 1000 if requests else None


def read_wrk(rec: RunRecord, report: WrkReport) -> None:
    rec.wrk = report.to_dict()
    rec.client_requests = report.requests
    rec.client_errors = report.errors
    rec.client_error_samples = report.failures()
    rec.longest_wait_ms = report.max_ms


def judge(rec: RunRecord) -> None:
    """``ok`` unless the migration or CRIU failed, the service did not answer afterwards, a
    figure is missing, or (orthros) its clients saw a failure: the lock promises they see
    none, so such a run is failed, never hidden. CRIU alone runs without a lock, and its
    clients may fail; that is its honest result, recorded, and only its clients' figures are
    left out of the medians."""
    problems = []
    if rec.error is not None:
        rec.ok = False
        return
    if rec.answered_after is False:
        problems.append("the service did not answer a fresh connection afterwards")
    if rec.downtime_ms is None:
        problems.append("no downtime was measured")
    if rec.longest_wait_ms is None and not rec.clients_failed:
        problems.append("the clients reported no longest wait")
    if rec.arm == ORTHROS and rec.clients_failed:
        first = rec.client_error_samples[0] if rec.client_error_samples else "?"
        problems.append(f"the clients saw {rec.client_errors} failure(s): {first}")
    rec.ok = not problems
    rec.error = "; ".join(problems) or None


def run_line(r: RunRecord) -> str:
    """One run in a line (progress, and the failures list)."""
    where = f"{r.source}->{r.dest}" if r.arm == ORTHROS else f"on {r.source}"
    head = f"{r.workload} rep {r.rep + 1} {r.label} {where}:"
    if not r.ok:
        return f"{head} FAILED" + (f" at {r.stage}" if r.stage else "") + f": {r.error}"
    text = (f"{head} downtime {_ms(r.downtime_ms)} ms (CRIU {_ms(r.criu_ms)}, rest "
            f"{_ms(r.share_ms)}), longest wait {_ms(r.longest_wait_ms, 0)} ms, "
            f"{r.client_requests or 0:,} requests")
    if r.clients_failed:
        text += (f"; CLIENTS FAILED ({r.client_errors}: "
                 f"{r.client_error_samples[0] if r.client_error_samples else '?'})")
    return text


def _ms(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


# --- summaries ---------------------------------------------------------------------------------


@dataclass
class CellSummary:
    """One workload, one arm, over the repetitions."""

    workload: str
    arm: str
    runs: int
    ok: int
    clients_failed: int  # runs (counted or not) whose clients saw failures
    figures: dict[str, Figure]
    errors: list[str]

    @property
    def label(self) -> str:
        return ARM_LABELS.get(self.arm, self.arm)

    def to_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, "arm": self.arm, "runs": self.runs, "ok": self.ok,
                "clients_failed": self.clients_failed,
                "figures": {k: v.to_dict() for k, v in self.figures.items()},
                "errors": self.errors}


def summarize(runs: Sequence[RunRecord]) -> list[CellSummary]:
    out = []
    for w in [x for x in WORKLOADS if any(r.workload == x for r in runs)]:
        for a in [x for x in ARMS if any(r.workload == w and r.arm == x for r in runs)]:
            rs = [r for r in runs if r.workload == w and r.arm == a]
            out.append(CellSummary(
                w, a, len(rs), sum(r.ok for r in rs), sum(r.clients_failed for r in rs),
                {k: Figure.of([r.value(k) for r in rs]) for k, _ in METRICS},
                [run_line(r) for r in rs if not r.ok]))
    return out


@dataclass
class Comparison:
    """One workload: orthros's downtime over CRIU alone's dump + restore, per repetition
    (both runs of it counted), and the medians they come from."""

    workload: str
    ratio: Figure
    orthros_ms: float | None
    criu_ms: float | None

    @property
    def ratio_of_medians(self) -> float | None:
        return ratio(self.orthros_ms, self.criu_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, "ratio": self.ratio.to_dict(),
                "orthros_downtime_ms": self.orthros_ms, "criu_dump_restore_ms": self.criu_ms,
                "ratio_of_medians": self.ratio_of_medians}


def compare(runs: Sequence[RunRecord]) -> list[Comparison]:
    out = []
    for w in [x for x in WORKLOADS if any(r.workload == x for r in runs)]:
        mig = {r.rep: r.value("downtime_ms") for r in runs
               if r.workload == w and r.arm == ORTHROS}
        base = {r.rep: r.value("dump_restore_ms") for r in runs
                if r.workload == w and r.arm == CRIU}
        per_rep = [ratio(mig.get(rep), base.get(rep)) for rep in sorted(mig)]
        out.append(Comparison(w, Figure.of(per_rep), median(list(mig.values())),
                              median(list(base.values()))))
    return out


# --- targets -------------------------------------------------------------------------------------


def _fig_ms(f: Figure) -> str:
    if f.median is None:
        return "—"
    rng = f" [{f.low:,.0f}-{f.high:,.0f}]" if f.n > 1 and f.low is not None \
        and f.high is not None else ""
    return f"{f.median:,.1f} ms{rng}"


def targets(config: BenchConfig, runs: Sequence[RunRecord]) -> list[Target]:
    """The issue's three, for the echo service of 200 clients, from the medians of this run:
    orthros's downtime at most 1.5 x CRIU alone's dump + restore (per repetition) and under
    150 ms, its clients' longest wait under 200 ms."""
    cells = {(c.workload, c.arm): c for c in summarize(runs)}
    comp = next((c for c in compare(runs) if c.workload == ECHO), None)
    mig = cells.get((ECHO, ORTHROS))
    what = f"echo, {TARGET_CLIENTS} clients"
    wrong_size = (f"the target is for {TARGET_CLIENTS} clients, this run had "
                  f"{config.echo_clients}" if config.echo_clients != TARGET_CLIENTS else "")
    failed = f"{mig.runs - mig.ok} of {mig.runs} runs failed" if mig and mig.ok < mig.runs \
        else ""

    def judged(name: str, goal: str, f: Figure | None, limit: float, fmt: str,
               inclusive: bool = False) -> Target:
        if f is None or f.median is None:
            return Target(name, goal, "—", None, "not measured")
        met = f.median <= limit if inclusive else f.median < limit
        detail = [x for x in (wrong_size, failed) if x]
        if f.high is not None and f.n > 1:
            detail.append(f"worst {f.high:,.2f}" if fmt == "x" else f"worst {f.high:,.0f} ms")
        value = (f"x{f.median:.2f}" + (f" [{f.low:.2f}-{f.high:.2f}]"
                                         if f.n > 1 and f.low is not None
                                         and f.high is not None else "")
                 if fmt == "x" else _fig_ms(f))
        return Target(name, goal, value, None if wrong_size else met, "; ".join(detail))

    return [
        judged(f"{what}: downtime / CRIU alone's dump + restore",
               f"<= {TARGET_RATIO:g} (median of per-repetition ratios)",
               comp.ratio if comp else None, TARGET_RATIO, "x", inclusive=True),
        judged(f"{what}: downtime", f"< {TARGET_DOWNTIME_MS:g} ms (median)",
               mig.figures["downtime_ms"] if mig else None, TARGET_DOWNTIME_MS, "ms"),
        judged(f"{what}: longest client wait", f"< {TARGET_WAIT_MS:g} ms (median)",
               mig.figures["longest_wait_ms"] if mig else None, TARGET_WAIT_MS, "ms"),
    ]


# --- the results record --------------------------------------------------------------------------


@dataclass
class BenchResults:
    config: BenchConfig
    seed: int = 0
    env: dict[str, Any] = field(default_factory=dict)
    runs: list[RunRecord] = field(default_factory=list)
    warmup: list[RunRecord] = field(default_factory=list)  # not in any figure
    started: str = ""
    finished: str | None = None
    wall_s: float | None = None
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    @property
    def cells(self) -> list[CellSummary]:
        return summarize(self.runs)

    @property
    def comparisons(self) -> list[Comparison]:
        return compare(self.runs)

    @property
    def targets(self) -> list[Target]:
        return targets(self.config, self.runs)

    @property
    def ok(self) -> bool:
        """Every run counted (CRIU alone's clients may fail: see ``judge``)."""
        return bool(self.runs) and all(r.ok for r in self.runs) and not self.interrupted

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "migrate", "config": self.config.to_dict(), "seed": self.seed,
            "env": self.env, "started": self.started, "finished": self.finished,
            "wall_s": self.wall_s, "interrupted": self.interrupted, "notes": self.notes,
            "leftovers": self.leftovers,
            "targets": [t.to_dict() for t in self.targets],
            "cells": [c.to_dict() for c in self.cells],
            "comparisons": [c.to_dict() for c in self.comparisons],
            "runs": [r.to_dict() for r in self.runs],
            "warmup": [r.to_dict() for r in self.warmup],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchResults:
        return cls(config=BenchConfig.from_dict(d.get("config") or {}),
                   seed=int(d.get("seed") or 0), env=dict(d.get("env") or {}),
                   runs=[RunRecord.from_dict(r) for r in d.get("runs") or []],
                   warmup=[RunRecord.from_dict(r) for r in d.get("warmup") or []],
                   started=str(d.get("started", "")), finished=d.get("finished"),
                   wall_s=d.get("wall_s"), interrupted=bool(d.get("interrupted")),
                   notes=list(d.get("notes") or []), leftovers=list(d.get("leftovers") or []))
