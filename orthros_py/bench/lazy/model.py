"""The lazy benchmark's pure half: the methods (eager, pre-copy, post-copy, both), the plan of
interleaved rounds, one migration's record read from migrate's result (its ``to_dict``) and
from what the PING client saw, summaries (medians, min-max spreads, per-round ratios to eager
of the same size), the targets, the results record (with the paging standby's part, from
``paging``), results.md, results.json and the PNG plots.

The migrate result's contract this reads (the lead's additions to ``MigrationResult``):
``timings_ms["downtime"]`` (frozen to serving) and ``timings_ms["total"]`` (until the source
is free); ``counts["bytes_transferred"]`` (and ``counts["bytes_total"]`` when present: every
byte the migration sent); ``"lazy": {"pages_faulted", "pages_pushed", "last_page_ms",
"downtime_ms"}`` and ``"precopy": {"rounds": [{"pages", "bytes", "ms"}, ...]}``, either absent
or None for a method that did not use them.

Wraps no interface and needs no privileges (matplotlib is imported only to draw), so all of it
is unit-tested.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthros_py.bench.lazy.paging import (
    FailoverRun,
    PagingMemoryRun,
    paging_markdown,
    paging_targets,
    plot_paging,
    summarize_failovers,
    summarize_memory,
)
from orthros_py.bench.pair.model import Figure, Target
from orthros_py.bench.pair.report import fmt_bytes, fmt_fig
from orthros_py.bench.stats import fmt_ms, ratio
from orthros_py.workloads.memhog import PAGE, ClientLog

EAGER, PRECOPY, LAZY, PRECOPY_LAZY = "eager", "precopy", "lazy", "precopy+lazy"
METHODS: tuple[str, ...] = (EAGER, PRECOPY, LAZY, PRECOPY_LAZY)
DEFAULT_SIZES: tuple[int, ...] = (256, 1024, 2048)

# The targets: reported, never asserted.
TARGET_SIZE_MIB = 1024
TARGET_LAZY_RATIO = 0.10  # lazy downtime / eager downtime at 1 GiB
# Lazy downtime "does not grow with memory": largest size over smallest at most this.
FLAT_GROWTH = 1.5

# What each method asks of MigrateConfig.
_CONFIG: dict[str, dict[str, bool]] = {
    EAGER: {"lazy": False, "precopy": False},
    PRECOPY: {"lazy": False, "precopy": True},
    LAZY: {"lazy": True, "precopy": False},
    PRECOPY_LAZY: {"lazy": True, "precopy": True},
}

# Per-migration figures, in table order: (key, label, unit). Unit "ms", "bytes" or "n".
METRICS: tuple[tuple[str, str, str], ...] = (
    ("downtime_ms", "downtime", "ms"),
    ("ttfr_ms", "time to first response", "ms"),
    ("client_gap_ms", "longest gap between replies", "ms"),
    ("total_ms", "total (source free)", "ms"),
    ("last_page_ms", "last page arrived", "ms"),
    ("bytes_total", "bytes sent", "bytes"),
    ("pages_faulted", "pages faulted", "n"),
    ("pages_pushed", "pages pushed", "n"),
    ("precopy_rounds", "pre-copy rounds", "n"),
)
RATIO_METRICS = ("downtime_ms", "ttfr_ms", "total_ms", "bytes_total")


def config_for(method: str) -> dict[str, bool]:
    """The MigrateConfig fields of ``method`` (``lazy``, ``precopy``)."""
    try:
        return dict(_CONFIG[method])
    except KeyError:
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})") from None


def parse_sizes(text: str) -> tuple[int, ...]:
    """``256,1024,2g`` -> (256, 1024, 2048) MiB; ValueError naming what is wrong."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        if not part:
            continue
        mult = 1
        if part.endswith(("g", "gib")):
            mult, part = 1024, part.rstrip("gib")
        elif part.endswith(("m", "mib")):
            part = part.rstrip("mib")
        if not part.isdigit() or int(part) * mult < 1:
            raise ValueError(f"{part!r} is not a size in MiB (give 256,1024,2048)")
        out.append(int(part) * mult)
    if not out:
        raise ValueError("no size given")
    return tuple(sorted(dict.fromkeys(out)))


def parse_methods(text: str) -> tuple[str, ...]:
    out = []
    for part in text.split(","):
        m = part.strip().lower().replace(" ", "")
        if not m:
            continue
        config_for(m)
        out.append(m)
    if not out:
        raise ValueError("no method given")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class BenchConfig:
    sizes: tuple[int, ...] = DEFAULT_SIZES  # MiB of the workload's region
    reps: int = 3  # rounds per size: every method once per round
    methods: tuple[str, ...] = METHODS
    hot_fraction: float = 0.3
    hot_layout: str = "first"
    rate: float = 2000.0  # hot pages the workload visits a second
    read_only_hot: bool = False
    ping_rate: float = 100.0  # the client's PINGs a second
    settle_s: float = 1.0  # the client keeps measuring this long after migrate returns
    seed: int | None = None
    out: Path = Path("results")
    port: int = 7070
    warmup: bool = True  # one unrecorded migration first (builds the XDP lock)
    # Which parts run.
    migrations: bool = True
    paging: bool = True
    # The paging standby (``paging``): memory against the hot fraction at ``paging_sizes``...
    paging_sizes: tuple[int, ...] = (1024,)
    hot_fractions: tuple[float, ...] = (0.1, 0.3, 0.6)
    # ... and failovers, paging against eager, at ``failover_sizes``, ``paging_reps`` each.
    failover_sizes: tuple[int, ...] = (2048,)
    failover_hot: float = 0.3
    paging_reps: int = 3
    read_only_check: bool = True  # one more paging failover whose worker only reads
    hot_window_s: float = 20.0
    paging_interval_s: float = 1.0
    paging_rate: float = 20000.0  # the worker's hot pages a second: the window sees the set
    paging_samples: int = 5  # pair status samples per memory run

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        for k in _TUPLES:
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["out"] = Path(kw.get("out", "results"))
        for k, conv in _TUPLES.items():
            if k in kw:
                kw[k] = tuple(conv(x) for x in kw[k])
        return cls(**kw)


_TUPLES: dict[str, Any] = {"sizes": int, "methods": str, "paging_sizes": int,
                           "hot_fractions": float, "failover_sizes": int}


@dataclass(frozen=True)
class PlannedRun:
    size_mib: int
    round: int
    method: str


def plan(config: BenchConfig, seed: int) -> list[PlannedRun]:
    """Every migration in order: per size (one workload each, smallest first), ``reps``
    rounds, each with every method once in an order shuffled anew (by ``seed``), so that drift
    hits every method alike."""
    rng = random.Random(seed)
    out: list[PlannedRun] = []
    for size in config.sizes:
        for rnd in range(config.reps):
            order = list(config.methods)
            rng.shuffle(order)
            out += [PlannedRun(size, rnd, m) for m in order]
    return out


# --- one migration -------------------------------------------------------------------------------


@dataclass
class MigrationRun:
    """One migration of the workload of ``size_mib`` with ``method``; times in ms."""

    size_mib: int
    round: int
    method: str
    source: str = ""
    dest: str = ""
    ok: bool = False
    error: str | None = None
    # From migrate's result.
    downtime_ms: float | None = None
    total_ms: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    bytes_total: float | None = None
    bytes_transferred: float | None = None  # counts.bytes_transferred as migrate gave it
    bytes_summed: bool = False  # bytes_total added up here (migrate gave no bytes_total)
    pages_faulted: float | None = None
    pages_pushed: float | None = None
    last_page_ms: float | None = None
    precopy: list[dict[str, float]] = field(default_factory=list)  # rounds: pages, bytes, ms
    # From the client (PINGs on a connection that migrates with the workload).
    ttfr_ms: float | None = None  # locked (else migrate start) to the first PONG of a PING
    ttfr_from: str = ""  # sent after it; which instant it was measured from
    client_gap_ms: float | None = None
    client_max_latency_ms: float | None = None
    client_replies: int = 0
    client_errors: list[str] = field(default_factory=list)
    # The workload's own check.
    verify: str | None = None  # VERIFY's answer after the migration
    verify_ms: float | None = None
    mismatches: int | None = None  # hot pages the worker found wrong during the migration

    @property
    def precopy_rounds(self) -> float | None:
        return float(len(self.precopy)) if self.precopy else None

    def value(self, metric: str) -> float | None:
        v = getattr(self, metric)
        return None if v is None else float(v)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["precopy_rounds"] = self.precopy_rounds
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MigrationRun:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


def read_result(run: MigrationRun, result: dict[str, Any]) -> None:
    """Fills ``run`` from migrate's result (``MigrationResult.to_dict()``, as ``orthros migrate
    --json`` prints it). Absent keys stay None: an eager migration has no lazy part."""
    timings = {k: float(v) for k, v in (result.get("timings_ms") or {}).items()}
    counts = result.get("counts") or {}
    lazy = result.get("lazy") or {}
    pre = result.get("precopy") or {}
    run.source = str(result.get("source", run.source))
    run.dest = str(result.get("dest", run.dest))
    run.timings_ms = timings
    run.downtime_ms = timings.get("downtime", _num(lazy.get("downtime_ms")))
    run.total_ms = timings.get("total")
    run.bytes_transferred = _num(counts.get("bytes_transferred"))
    run.pages_faulted = _num(lazy.get("pages_faulted"))
    run.pages_pushed = _num(lazy.get("pages_pushed"))
    run.last_page_ms = _num(lazy.get("last_page_ms"))
    run.precopy = [{k: float(r.get(k) or 0.0) for k in ("pages", "bytes", "ms")}
                   for r in pre.get("rounds") or []]
    if counts.get("bytes_total") is not None:
        run.bytes_total = float(counts["bytes_total"])
        run.bytes_summed = False
    else:
        # Without migrate's own sum: the frozen dump's bytes, the pre-copy rounds' and the
        # pages sent lazily (faulted or pushed).
        # counts.pages are the frozen dump's pages, which go through the page server and
        # are not in bytes_transferred (the image files).
        lazy_pages = (run.pages_faulted or 0.0) + (run.pages_pushed or 0.0)
        dumped = float(counts.get("pages") or 0) * PAGE
        parts = [run.bytes_transferred, dumped or None,
                 sum(r["bytes"] for r in run.precopy) or None, lazy_pages * PAGE or None]
        got = [p for p in parts if p is not None]
        run.bytes_total = sum(got) if got else None
        run.bytes_summed = True


def read_client(run: MigrationRun, log: ClientLog, *, start: float, end: float,
                locked_at: float | None) -> None:
    """The client's figures for the migration that ran from ``start`` to ``end`` (the client's
    clock, ``end`` including the settle time); ``locked_at`` when the lock took hold (the
    lock stage ended): from then on a PING is dropped until the restored tree is unlocked.
    Before it the tree still answers, so the lock stage's start would count PINGs answered
    in the old place."""
    t0 = locked_at if locked_at is not None else start
    run.ttfr_from = "locked" if locked_at is not None else "migrate start"
    ttfr = log.time_to_first_reply(t0)
    run.ttfr_ms = None if ttfr is None else ttfr * 1000
    gap = log.longest_gap(start, end)
    run.client_gap_ms = None if gap is None else gap * 1000
    lat = log.max_latency(start, end)
    run.client_max_latency_ms = None if lat is None else lat * 1000
    w = log.window(start, end)
    run.client_replies = len(w.replies)
    run.client_errors = [f"{(e.at - start) * 1000:,.0f} ms, connection {e.conn}: {e.what}"
                         for e in w.errors]


def judge(run: MigrationRun) -> None:
    """``ok`` unless migrate failed, VERIFY did not say OK, the worker saw a wrong page or the
    client's connection broke: a migration whose memory is wrong is a failure, never hidden."""
    if run.error is not None:
        run.ok = False
        return
    problems = []
    if run.verify is None or not run.verify.startswith("OK"):
        problems.append(f"VERIFY answered {run.verify!r}")
    if run.mismatches:
        problems.append(f"the worker found {run.mismatches} wrong hot pages")
    if run.client_errors:
        problems.append(f"the client's connection failed: {run.client_errors[0]}")
    run.ok = not problems
    run.error = "; ".join(problems) or None


# --- summaries -----------------------------------------------------------------------------------


@dataclass
class CellSummary:
    """One size, one method, over the rounds."""

    size_mib: int
    method: str
    runs: int
    ok: int
    figures: dict[str, Figure]
    ratios: dict[str, Figure]  # median of per-round ratios to eager (same size, same round)
    errors: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"size_mib": self.size_mib, "method": self.method, "runs": self.runs,
                "ok": self.ok, "figures": {k: v.to_dict() for k, v in self.figures.items()},
                "ratios": {k: v.to_dict() for k, v in self.ratios.items()},
                "errors": self.errors}


def round_ratios(runs: Sequence[MigrationRun], size: int, method: str,
                 metric: str) -> list[float]:
    """Per round: ``metric`` of ``method`` over eager's in the same round and size (rounds
    where either failed or lacks the figure give none)."""
    base = {r.round: r.value(metric) for r in runs
            if r.size_mib == size and r.method == EAGER and r.ok}
    out = []
    for r in runs:
        if r.size_mib != size or r.method != method or not r.ok:
            continue
        q = ratio(r.value(metric), base.get(r.round))
        if q is not None:
            out.append(q)
    return out


def method_order(m: str) -> int:
    return METHODS.index(m) if m in METHODS else len(METHODS)


def summarize(runs: Sequence[MigrationRun]) -> list[CellSummary]:
    out = []
    for size in sorted({r.size_mib for r in runs}):
        for method in sorted({r.method for r in runs if r.size_mib == size}, key=method_order):
            rs = [r for r in runs if r.size_mib == size and r.method == method]
            good = [r for r in rs if r.ok]
            figures = {k: Figure.of([r.value(k) for r in good]) for k, _, _ in METRICS}
            ratios = {k: Figure.of(round_ratios(runs, size, method, k))
                      for k in RATIO_METRICS} if method != EAGER else {}
            out.append(CellSummary(size, method, len(rs), len(good), figures, ratios,
                                   list(dict.fromkeys(str(r.error) for r in rs if r.error))))
    return out


def _cell(cells: Sequence[CellSummary], size: int, method: str) -> CellSummary | None:
    return next((c for c in cells if c.size_mib == size and c.method == method), None)


def _pct(f: Figure) -> str:
    if f.median is None:
        return "—"
    rng = f" [{f.low:.1%}-{f.high:.1%}]" if f.low is not None and f.n > 1 else ""
    return f"{f.median:.1%}{rng}"


def growth(cells: Sequence[CellSummary], method: str,
           metric: str = "downtime_ms") -> tuple[int, int, float] | None:
    """(smallest size, largest size, median at the largest over median at the smallest) of
    ``method``'s ``metric``; None without both."""
    mine = [c for c in cells if c.method == method and c.figures[metric].median is not None]
    if len(mine) < 2:
        return None
    lo, hi = mine[0], mine[-1]
    q = ratio(hi.figures[metric].median, lo.figures[metric].median)
    return None if q is None else (lo.size_mib, hi.size_mib, q)


def targets(cells: Sequence[CellSummary]) -> list[Target]:
    out = []
    goal = f"<= {TARGET_LAZY_RATIO:.0%} of eager"
    name = f"lazy downtime at {TARGET_SIZE_MIB:,} MiB"
    c = _cell(cells, TARGET_SIZE_MIB, LAZY)
    f = c.ratios.get("downtime_ms") if c is not None else None
    if f is None or f.median is None:
        out.append(Target(name, goal, "—", None, "not measured"))
    else:
        met = f.median <= TARGET_LAZY_RATIO
        out.append(Target(name, goal, _pct(f), met,
                          "" if met else f"{f.median / TARGET_LAZY_RATIO:.1f} x the goal"))
    name = "lazy downtime against memory size"
    g = growth(cells, LAZY)
    if g is None:
        out.append(Target(name, f"flat (largest <= {FLAT_GROWTH:g} x smallest)", "—", None,
                          "needs two sizes"))
    else:
        lo, hi, q = g
        e = growth(cells, EAGER)
        detail = f"eager: x{e[2]:.2f}" if e is not None else ""
        out.append(Target(name, f"flat (largest <= {FLAT_GROWTH:g} x smallest)",
                          f"x{q:.2f} from {lo:,} to {hi:,} MiB", q <= FLAT_GROWTH, detail))
    return out


# --- the results record --------------------------------------------------------------------------


@dataclass
class BenchResults:
    config: BenchConfig
    seed: int = 0
    env: dict[str, Any] = field(default_factory=dict)
    runs: list[MigrationRun] = field(default_factory=list)
    paging_memory: list[PagingMemoryRun] = field(default_factory=list)
    failovers: list[FailoverRun] = field(default_factory=list)
    started: str = ""
    finished: str | None = None
    wall_s: float | None = None
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def cells(self) -> list[CellSummary]:
        return summarize(self.runs)

    @property
    def has_paging(self) -> bool:
        return bool(self.paging_memory or self.failovers)

    @property
    def targets(self) -> list[Target]:
        # A run of the paging part alone lists no migration targets as "not measured".
        out = targets(self.cells) if self.runs or not self.has_paging else []
        return out + paging_targets(self.paging_memory, self.failovers)

    @property
    def ok(self) -> bool:
        """Every migration, memory run and failover succeeded."""
        return (all(r.ok for r in self.runs) and all(r.ok for r in self.paging_memory)
                and all(r.ok for r in self.failovers))

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "lazy", "config": self.config.to_dict(), "seed": self.seed,
            "env": self.env, "started": self.started, "finished": self.finished,
            "wall_s": self.wall_s, "interrupted": self.interrupted, "notes": self.notes,
            "targets": [t.to_dict() for t in self.targets],
            "cells": [c.to_dict() for c in self.cells],
            "paging_memory": [s.to_dict() for s in summarize_memory(self.paging_memory)],
            "failovers": [s.to_dict() for s in summarize_failovers(self.failovers)],
            "runs": {"migrations": [r.to_dict() for r in self.runs],
                     "paging_memory": [r.to_dict() for r in self.paging_memory],
                     "failovers": [r.to_dict() for r in self.failovers]},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResults:
        runs = d.get("runs") or {}
        return cls(config=BenchConfig.from_dict(d.get("config") or {}),
                   seed=int(d.get("seed") or 0), env=dict(d.get("env") or {}),
                   runs=[MigrationRun.from_dict(r) for r in runs.get("migrations", [])],
                   paging_memory=[PagingMemoryRun.from_dict(r)
                                  for r in runs.get("paging_memory", [])],
                   failovers=[FailoverRun.from_dict(r) for r in runs.get("failovers", [])],
                   started=str(d.get("started", "")), finished=d.get("finished"),
                   wall_s=d.get("wall_s"), interrupted=bool(d.get("interrupted")),
                   notes=list(d.get("notes") or []))


def load_results(path: Path) -> BenchResults:
    return BenchResults.from_dict(json.loads(path.read_text()))


# --- results.md ----------------------------------------------------------------------------------


def fmt_metric(f: Figure | None, unit: str) -> str:
    if unit == "bytes":
        return fmt_fig(f, fmt_bytes)
    if unit == "n":
        return fmt_fig(f, lambda v: "—" if v is None else f"{v:,.0f}")
    return fmt_fig(f, lambda v: fmt_ms(v, 1))


def run_line(r: MigrationRun) -> str:
    """One migration in a line (progress, and the failures list)."""
    head = f"{r.size_mib:,} MiB round {r.round + 1} {r.method} {r.source}->{r.dest}:"
    if not r.ok:
        return f"{head} FAILED: {r.error}"
    parts = [f"downtime {fmt_ms(r.downtime_ms, 1)} ms", f"first reply {fmt_ms(r.ttfr_ms, 1)} ms",
             f"total {fmt_ms(r.total_ms, 0)} ms", f"sent {fmt_bytes(r.bytes_total)}"]
    if r.pages_faulted is not None or r.pages_pushed is not None:
        parts.append(f"faulted {r.pages_faulted or 0:,.0f}, pushed {r.pages_pushed or 0:,.0f}"
                     f", last page at {fmt_ms(r.last_page_ms, 0)} ms")
    if r.precopy:
        parts.append(f"{len(r.precopy)} pre-copy rounds")
    return f"{head} " + ", ".join(parts) + f"; {r.verify}"


def notes_for(res: BenchResults) -> list[str]:
    notes = [f"{res.env.get('cpus', '?')} CPUs: the workload's worker, the client, CRIU, the "
             "lazy-pages daemon and the agents share them."]
    if res.runs:
        notes.append("*Time to first response* of a migration is measured by the client: from "
                     "the moment the lock took hold (the end of the lock stage; the freeze "
                     "follows) to the first PONG of a PING sent after it. A PING dropped "
                     "by the lock is resent by TCP after its retransmission timeout (200 ms, "
                     "then doubling), so this figure steps with that timeout; *downtime* is "
                     "migrate's own (frozen to serving).")
    if any(r.part == "memory" for r in res.paging_memory):
        notes.append("The memory runs stop their pair with its standby's part closed first: "
                     "``pair stop`` closes the active first, and while that close waits for a "
                     "checkpoint in flight the active renews no lease, so the witness grants "
                     "and the standby promotes and fences the active (seen in this "
                     "benchmark's first run).")
    if res.failovers:
        notes.append("Failover instants: the death is the active's link going down (its agent "
                     "and the workload are SIGKILLed right after); the promotion and the "
                     "restore's start and end come from the standby's ``promoted`` event (its "
                     "wall clock, the same machine's), the last lazy page from the daemon's "
                     "exit; the first response from a prober on the client host that opens a "
                     "fresh connection every few ms (20 ms connect timeout), so it is late by "
                     "at most about that.")
    if any(r.ok and r.ttfr_from == "migrate start" for r in res.runs):
        notes.append("Some runs never locked (they failed first, or saw no lock stage): "
                     "their time to first response counts from the start of the migration.")
    if any(r.bytes_summed for r in res.runs):
        notes.append("migrate gave no counts.bytes_total: *bytes sent* is the frozen dump's "
                     "bytes plus the pre-copy rounds' plus 4 KiB per page faulted or pushed.")
    return notes


def markdown(res: BenchResults) -> str:
    cfg = res.config
    env = res.env
    criu = env.get("criu")
    if isinstance(criu, dict):
        criu = criu.get("version") or criu.get("error")
    when = (f"Started {res.started}" + (f", finished {res.finished}" if res.finished else "")
            + (f" ({res.wall_s / 60:.1f} min)" if res.wall_s else "")
            + (" (interrupted: partial results)" if res.interrupted else "") + ".")
    lines = ["# Post-copy (lazy) and pre-copy migration against eager; the paging standby", "",
             f"Host: Linux {env.get('kernel', '?')}, {env.get('cpus', '?')} CPUs; CRIU "
             f"{criu or '?'}. Seed {res.seed}. {when}", ""]
    if res.runs:
        lines += [f"Migrations: the workload (``orthros_py.workloads.memhog``) of "
                  f"{', '.join(f'{s:,}' for s in cfg.sizes)} MiB, hot set "
                  f"{cfg.hot_fraction:.0%} ({cfg.hot_layout}), {cfg.rate:,.0f} pages/s "
                  f"{'read' if cfg.read_only_hot else 'read and rewritten'}; a client PINGs it "
                  f"{cfg.ping_rate:g} times a second on one connection that migrates with it. "
                  f"{cfg.reps} rounds per size, every method once per round in a shuffled "
                  "order, back and forth between two hosts.", ""]
    if res.has_paging:
        lines += [f"Paging standby: the same workload with its hot set spread, "
                  f"{cfg.paging_rate:,.0f} hot pages rewritten a second; memory at "
                  f"{', '.join(f'{s:,}' for s in cfg.paging_sizes)} MiB for hot fractions "
                  f"{', '.join(f'{h:.0%}' for h in cfg.hot_fractions)}; failovers at "
                  f"{', '.join(f'{s:,}' for s in cfg.failover_sizes)} MiB, "
                  f"{cfg.failover_hot:.0%} hot, {cfg.paging_reps} paging and eager each, "
                  "interleaved in a shuffled order"
                  + (", and one paging failover whose worker only reads its hot set"
                     if cfg.read_only_check else "") + ". Pairs: alpha active, beta "
                  f"standby, gamma witness, checkpoint every {cfg.paging_interval_s:g} s, hot "
                  f"window {cfg.hot_window_s:g} s.", ""]
    lines += ["## Targets", "", "| target | goal | measured | | |", "|---|---|---|---|---|"]
    met = {True: "**met**", False: "**not met**", None: "not measured"}
    for t in res.targets:
        lines.append(f"| {t.name} | {t.goal} | {t.value} | {met[t.met]} | {t.detail} |")
    cells = res.cells
    if res.runs:
        lines += ["", "## Migrations", "",
                  "Medians over the rounds [min-max]. A run counts only if migrate succeeded, "
                  "VERIFY found every page right, the worker saw no wrong page and the "
                  "client's connection lived.", ""]
    else:
        lines.append("")
    for size in sorted({c.size_mib for c in cells}):
        mine = [c for c in cells if c.size_mib == size]
        lines += [f"### {size:,} MiB", "",
                  "| | " + " | ".join(c.method for c in mine) + " |",
                  "|---|" + "---:|" * len(mine),
                  "| ok | " + " | ".join(f"{c.ok}/{c.runs}" for c in mine) + " |"]
        for key, label, unit in METRICS:
            lines.append(f"| {label}{' ms' if unit == 'ms' else ''} | "
                         + " | ".join(fmt_metric(c.figures[key], unit) for c in mine) + " |")
        for key in RATIO_METRICS:
            label = dict((k, lab) for k, lab, _ in METRICS)[key]
            lines.append(f"| {label} / eager | "
                         + " | ".join(_pct(c.ratios[key]) if c.ratios else "100%"
                                      for c in mine) + " |")
        lines.append("")
    g = [(m, growth(cells, m)) for m in METHODS]
    grown = [f"{m} x{q[2]:.2f}" for m, q in g if q is not None]
    if grown:
        lo, hi = next(q for _, q in g if q is not None)[:2]
        lines += [f"Downtime from {lo:,} to {hi:,} MiB: " + ", ".join(grown) + ".", ""]
    lines += paging_markdown(res.paging_memory, res.failovers)
    failed = [r for r in res.runs if not r.ok]
    if failed:
        lines += ["## Failures", ""] + [f"- {run_line(r)}" for r in failed] + [""]
    if res.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in res.notes] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


# --- plots ---------------------------------------------------------------------------------------


def _series(cells: Sequence[CellSummary], metric: str,
            methods: Iterable[str]) -> dict[str, tuple[list[int], list[float], list[list[float]]]]:
    """Per method: sizes, medians and [below, above] error bars of ``metric``."""
    out = {}
    for m in methods:
        xs, ys, lo, hi = [], [], [], []
        for c in cells:
            f = c.figures[metric]
            if c.method != m or f.median is None:
                continue
            xs.append(c.size_mib)
            ys.append(f.median)
            lo.append(f.median - (f.low if f.low is not None else f.median))
            hi.append((f.high if f.high is not None else f.median) - f.median)
        if xs:
            out[m] = (xs, ys, [lo, hi])
    return out


def plot(res: BenchResults, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    cells = res.cells
    methods = [m for m in METHODS if any(c.method == m for c in cells)]
    for name, panels in (
            ("downtime.png", (("downtime_ms", "downtime (frozen to serving), ms"),
                              ("ttfr_ms", "client: time to first response, ms"))),
            ("total.png", (("total_ms", "total (until the source is free), ms"),
                           ("bytes_total", "bytes sent, MiB")))):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
        drew = False
        for ax, (metric, title) in zip(axes, panels, strict=True):
            scale = 1 / 2**20 if metric == "bytes_total" else 1.0
            for m, (xs, ys, err) in _series(cells, metric, methods).items():
                ax.errorbar(xs, [y * scale for y in ys],
                            yerr=[[e * scale for e in err[0]], [e * scale for e in err[1]]],
                            marker="o", capsize=3, label=m)
                drew = True
            ax.set_xscale("log", base=2)
            ax.set_xlabel("workload memory, MiB")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            if metric.endswith("_ms"):
                ax.set_yscale("log")
        if drew:
            axes[0].legend()
            fig.suptitle("lazy and pre-copy against eager (medians, min-max bars)")
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            made.append(out / name)
        plt.close(fig)
    made += plot_paging(res.paging_memory, res.failovers, out)
    return made


def write_outputs(res: BenchResults, out: Path, *, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res.to_dict(), indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(res))
    made = [out / "results.json", out / "results.md"]
    if plots and (any(r.ok for r in res.runs) or any(r.ok for r in res.paging_memory)
                  or any(r.ok for r in res.failovers)):
        made += plot(res, out)
    return made
