"""The pair benchmark's pure half: the arms (unprotected, or paired at an interval with or
without output commit), the plan of interleaved rounds, redis-benchmark's report, the records
of one throughput run, one memory experiment and one death, their summaries (medians, min-max
spreads, per-round ratios to unprotected) and the targets of the issue, each met or not.

Wraps no interface and needs no privileges: nothing here starts a process or touches the host,
so all of it is unit-tested.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthros_py.bench.stats import median, ratio, spread

DEFAULT_INTERVALS_MS: tuple[int, ...] = (50, 100, 200, 500, 1000)
TESTS = ("SET", "GET")
PAGE = 4096

# The targets: reported, never asserted.
TARGET_INTERVAL_MS = 200
TARGET_THROUGHPUT_RATIO = 0.80  # paired at 200 ms against unprotected
TARGET_DEATH_MS = 500.0  # death of the active to the first correct reply from the standby
TARGET_BYTES_PER_WRITTEN = 2.0  # "writing 10 MiB between checkpoints sends at most 20 MiB"

# Output commit holds every reply until the next commit: with one request in flight per client
# (-P 1) a client completes about one request per checkpoint, so its runs are sized in
# checkpoints, never fewer than this many.
MIN_OC_CYCLES = 5


# --- arms and the plan -----------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One configuration of the throughput runs: unprotected (``interval_ms`` None), or paired
    at ``interval_ms`` with or without output commit."""

    interval_ms: int | None = None
    output_commit: bool = False

    @property
    def paired(self) -> bool:
        return self.interval_ms is not None

    @property
    def key(self) -> str:
        if self.interval_ms is None:
            return "unprotected"
        return f"{self.interval_ms}ms" + ("+oc" if self.output_commit else "")

    @property
    def label(self) -> str:
        if self.interval_ms is None:
            return "unprotected"
        return f"{self.interval_ms:,} ms" + (" + output commit" if self.output_commit else "")

    def to_dict(self) -> dict[str, Any]:
        return {"interval_ms": self.interval_ms, "output_commit": self.output_commit}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Arm:
        iv = d.get("interval_ms")
        return cls(None if iv is None else int(iv), bool(d.get("output_commit")))


UNPROTECTED = Arm()


def arms(intervals: Iterable[int]) -> tuple[Arm, ...]:
    """Unprotected first, then every interval without and with output commit."""
    out = [UNPROTECTED]
    for iv in intervals:
        out += [Arm(iv, False), Arm(iv, True)]
    return tuple(out)


def arm_order(arm: Arm) -> tuple[int, int, int]:
    """Table order: unprotected, then by interval, without output commit before with."""
    return (0 if arm.interval_ms is None else 1, arm.interval_ms or 0, int(arm.output_commit))


def parse_intervals(text: str) -> tuple[int, ...]:
    """``50,100,200ms,1s`` -> (50, 100, 200, 1000) ms; ValueError naming what is wrong."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip().replace("_", "").lower()
        if not part:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s)?", part)
        if m is None:
            raise ValueError(f"{part!r} is not an interval (give milliseconds: 50,100,200)")
        ms = float(m[1]) * (1000.0 if m[2] == "s" else 1.0)
        if not 10 <= ms <= 3_600_000 or ms != int(ms):
            raise ValueError(f"{part!r}: an interval is a whole number of milliseconds, "
                             "10 ms to an hour")
        out.append(int(ms))
    if not out:
        raise ValueError("no interval given")
    return tuple(sorted(dict.fromkeys(out)))


@dataclass(frozen=True)
class BenchConfig:
    intervals: tuple[int, ...] = DEFAULT_INTERVALS_MS
    reps: int = 3  # rounds of the throughput runs (every arm once per round)
    requests: int = 100_000  # redis-benchmark -n per test (SET, GET) without output commit
    clients: int = 50  # redis-benchmark -c
    keyspace: int = 100_000  # redis-benchmark -r: SETs spread over this many keys
    oc_seconds: float = 3.0  # output commit runs are sized to about this long per test
    death_reps: int = 3  # deaths of the active per mode (with, without output commit)
    death_interval_ms: int = TARGET_INTERVAL_MS
    heartbeat_ms: int = 100
    misses: int = 3
    memory_mib: int = 256  # redis filled with this much for the memory experiment; 0: skip
    write_mib: int = 10  # written between two checkpoints in the memory experiment
    memory_interval_ms: int = 1000
    memory_checkpoints: int = 5  # checkpoints with writes (and as many without, for the floor)
    seed: int | None = None
    out: Path = Path("results")
    port: int = 6379
    skip_throughput: bool = False
    skip_death: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["intervals"] = list(self.intervals)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["out"] = Path(kw.get("out", "results"))
        kw["intervals"] = tuple(int(x) for x in kw.get("intervals", DEFAULT_INTERVALS_MS))
        return cls(**kw)


def requests_for(config: BenchConfig, arm: Arm) -> int:
    """redis-benchmark's -n for ``arm``: ``requests``, except with output commit, where each
    client completes about one request per checkpoint: enough checkpoints for ``oc_seconds``
    (at least ``MIN_OC_CYCLES``), never more than ``requests``."""
    if not arm.output_commit or arm.interval_ms is None:
        return config.requests
    cycles = max(MIN_OC_CYCLES, math.ceil(config.oc_seconds * 1000 / arm.interval_ms))
    return min(config.requests, config.clients * cycles)


@dataclass(frozen=True)
class PlannedRun:
    round: int
    arm: Arm


def plan(config: BenchConfig, seed: int) -> list[PlannedRun]:
    """Every throughput run in order: ``reps`` rounds, each with every arm once, in an order
    shuffled anew each round (by ``seed``), so that drift hits every arm alike."""
    rng = random.Random(seed)
    out: list[PlannedRun] = []
    for rnd in range(config.reps):
        order = list(arms(config.intervals))
        rng.shuffle(order)
        out += [PlannedRun(rnd, a) for a in order]
    return out


def death_plan(config: BenchConfig, seed: int) -> list[tuple[int, bool]]:
    """(rep, output commit) of every death, both modes per rep in a shuffled order."""
    rng = random.Random(seed + 1)
    out: list[tuple[int, bool]] = []
    for rep in range(config.death_reps):
        modes = [False, True]
        rng.shuffle(modes)
        out += [(rep, m) for m in modes]
    return out


# --- redis-benchmark's report ------------------------------------------------------------------


@dataclass
class RedisTest:
    """One test of redis-benchmark (SET or GET): requests per second and latencies in ms (the
    latencies when this version prints them)."""

    test: str
    rps: float
    avg_ms: float | None = None
    min_ms: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RedisTest:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


_CSV_COLUMNS = {"rps": "rps", "avg_latency_ms": "avg_ms", "min_latency_ms": "min_ms",
                "p50_latency_ms": "p50_ms", "p95_latency_ms": "p95_ms",
                "p99_latency_ms": "p99_ms", "max_latency_ms": "max_ms"}
# -q: "SET: 74074.07 requests per second, p50=0.087 msec" (redis 7; redis 6 stops at "second").
_QUIET = re.compile(r"(?:^|\r)\s*([A-Z][A-Z0-9_ ()-]*?):\s+([\d.]+) requests per second"
                    r"(?:, p50=([\d.]+) msec)?", re.MULTILINE)


def _num(text: str | None) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        return None


def parse_redis_benchmark(stdout: str) -> dict[str, RedisTest]:
    """redis-benchmark's results by test name, from ``--csv`` (redis 7: a header and
    rps, avg, min, p50, p95, p99, max; redis 6: ``"SET","12345.67"`` without a header) or from
    ``-q`` (rps, and p50 in redis 7). Progress lines (``\\r``...) are skipped."""
    out: dict[str, RedisTest] = {}
    lines = [ln.rsplit("\r", 1)[-1].strip() for ln in stdout.splitlines()]
    rows = [ln for ln in lines if ln.startswith('"')]
    if rows:
        parsed = list(csv.reader(io.StringIO("\n".join(rows))))
        header: list[str] | None = None
        for row in parsed:
            if not row:
                continue
            if row[0] == "test":
                header = row
                continue
            rps = _num(row[1]) if len(row) > 1 else None
            if rps is None:
                continue
            t = RedisTest(row[0], rps)
            if header is not None:
                for col, val in zip(header[1:], row[1:], strict=False):
                    attr = _CSV_COLUMNS.get(col)
                    if attr is not None and attr != "rps":
                        setattr(t, attr, _num(val))
            out[t.test] = t
        return out
    for m in _QUIET.finditer(stdout):
        name = m[1].strip()
        out[name] = RedisTest(name, float(m[2]), p50_ms=_num(m[3]))
    return out


# --- one throughput run ----------------------------------------------------------------------


@dataclass
class ThroughputRun:
    round: int
    seq: int
    arm: Arm
    requests: int = 0
    ok: bool = False
    error: str | None = None
    tests: dict[str, RedisTest] = field(default_factory=dict)
    bench_s: float | None = None  # redis-benchmark's wall time
    # Paired runs: every checkpoint seen (the active keeps its newest ten), with "loaded" True
    # for those taken while redis-benchmark ran.
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    generations: int | None = None  # committed while redis-benchmark ran
    tracking: str | None = None
    output_hold: dict[str, Any] | None = None
    pair_state: str | None = None  # at the end of the run: replicating, or why not
    client_retrans: int | None = None  # TCP segments the client sent again meanwhile
    wall_s: float = 0.0

    def rps(self, test: str) -> float | None:
        t = self.tests.get(test)
        return t.rps if t is not None and self.ok else None

    def latency(self, test: str, which: str) -> float | None:
        t = self.tests.get(test)
        return getattr(t, f"{which}_ms") if t is not None and self.ok else None

    @property
    def achieved_interval_ms(self) -> float | None:
        """redis-benchmark's time over the generations committed meanwhile: the interval the
        pair kept under load (a checkpoint longer than the interval stretches it)."""
        if not self.generations or self.bench_s is None:
            return None
        return self.bench_s * 1000 / self.generations

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "seq": self.seq, "arm": self.arm.to_dict(),
                "requests": self.requests, "ok": self.ok, "error": self.error,
                "tests": {k: v.to_dict() for k, v in self.tests.items()},
                "bench_s": self.bench_s, "checkpoints": self.checkpoints,
                "generations": self.generations,
                "achieved_interval_ms": self.achieved_interval_ms,
                "tracking": self.tracking, "output_hold": self.output_hold,
                "pair_state": self.pair_state, "client_retrans": self.client_retrans,
                "wall_s": round(self.wall_s, 3)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ThroughputRun:
        return cls(round=int(d["round"]), seq=int(d.get("seq", 0)),
                   arm=Arm.from_dict(d.get("arm") or {}), requests=int(d.get("requests", 0)),
                   ok=bool(d.get("ok")), error=d.get("error"),
                   tests={k: RedisTest.from_dict(v) for k, v in (d.get("tests") or {}).items()},
                   bench_s=d.get("bench_s"), checkpoints=list(d.get("checkpoints") or []),
                   generations=d.get("generations"), tracking=d.get("tracking"),
                   output_hold=d.get("output_hold"), pair_state=d.get("pair_state"),
                   client_retrans=d.get("client_retrans"), wall_s=float(d.get("wall_s", 0.0)))


def checkpoint_bytes(c: dict[str, Any]) -> float | None:
    """What one checkpoint sent to the standby: memory pages plus the other image files."""
    pages, files = c.get("page_bytes"), c.get("file_bytes")
    if pages is None and files is None:
        return None
    return float(pages or 0) + float(files or 0)


def merge_checkpoints(*lists: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checkpoint records from several status reads, one per generation (the later read of a
    generation wins), oldest first."""
    by: dict[int, dict[str, Any]] = {}
    for lst in lists:
        for c in lst:
            gen = c.get("generation")
            if gen is not None:
                by[int(gen)] = {**by.get(int(gen), {}), **c}
    return [by[g] for g in sorted(by)]


# --- summaries ------------------------------------------------------------------------------


@dataclass
class Figure:
    """A median over repetitions and the min-max spread of the values it came from."""

    median: float | None
    low: float | None = None
    high: float | None = None
    n: int = 0

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Figure:
        got = [v for v in values if v is not None]
        s = spread(got)
        return cls(median(got), s[0] if s else None, s[1] if s else None, len(got))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TestSummary:
    """One arm, one test (SET or GET), over the rounds."""

    rps: Figure
    p50_ms: Figure
    p99_ms: Figure
    ratio: Figure  # median of the per-round ratios to unprotected
    max_ms: Figure = dataclasses.field(default_factory=lambda: Figure(None))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).to_dict()
                for k in ("rps", "p50_ms", "p99_ms", "max_ms", "ratio")}


@dataclass
class CheckpointSummary:
    """Checkpoint costs of one arm (or of all paired runs): full ones (the first generation of
    each pair) against incremental ones taken while redis-benchmark ran."""

    full_frozen_ms: Figure
    full_bytes: Figure
    incr_frozen_ms: Figure
    incr_bytes: Figure
    incr_pages: Figure
    incr_duration_ms: Figure
    achieved_interval_ms: Figure

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name).to_dict() for f in dataclasses.fields(self)}


@dataclass
class ArmSummary:
    arm: Arm
    runs: int
    ok: int
    requests: int
    tests: dict[str, TestSummary]
    checkpoints: CheckpointSummary | None
    errors: list[str]
    client_retrans: Figure = dataclasses.field(default_factory=lambda: Figure(None))

    def to_dict(self) -> dict[str, Any]:
        return {"arm": self.arm.to_dict(), "key": self.arm.key, "label": self.arm.label,
                "runs": self.runs, "ok": self.ok, "requests": self.requests,
                "tests": {k: v.to_dict() for k, v in self.tests.items()},
                "checkpoints": self.checkpoints.to_dict() if self.checkpoints else None,
                "client_retrans": self.client_retrans.to_dict(), "errors": self.errors}


def round_ratios(runs: Sequence[ThroughputRun], arm: Arm, test: str) -> list[float]:
    """Per round: the arm's throughput over unprotected's in the same round (rounds where
    either failed give none)."""
    base = {r.round: r.rps(test) for r in runs if r.arm == UNPROTECTED}
    out = []
    for r in runs:
        if r.arm != arm:
            continue
        q = ratio(r.rps(test), base.get(r.round))
        if q is not None:
            out.append(q)
    return out


def summarize_checkpoints(runs: Sequence[ThroughputRun]) -> CheckpointSummary:
    full = [c for r in runs for c in r.checkpoints if c.get("full")]
    incr = [c for r in runs for c in r.checkpoints if not c.get("full") and c.get("loaded")]
    return CheckpointSummary(
        full_frozen_ms=Figure.of([c.get("frozen_ms") for c in full]),
        full_bytes=Figure.of([checkpoint_bytes(c) for c in full]),
        incr_frozen_ms=Figure.of([c.get("frozen_ms") for c in incr]),
        incr_bytes=Figure.of([checkpoint_bytes(c) for c in incr]),
        incr_pages=Figure.of([c.get("pages_written") for c in incr]),
        incr_duration_ms=Figure.of([c.get("duration_ms") for c in incr]),
        achieved_interval_ms=Figure.of([r.achieved_interval_ms for r in runs if r.ok]))


def summarize(runs: Sequence[ThroughputRun]) -> list[ArmSummary]:
    out = []
    for arm in sorted({r.arm for r in runs}, key=arm_order):
        rs = [r for r in runs if r.arm == arm]
        good = [r for r in rs if r.ok]
        tests = {}
        for t in TESTS:
            tests[t] = TestSummary(
                rps=Figure.of([r.rps(t) for r in good]),
                p50_ms=Figure.of([r.latency(t, "p50") for r in good]),
                p99_ms=Figure.of([r.latency(t, "p99") for r in good]),
                max_ms=Figure.of([r.latency(t, "max") for r in good]),
                ratio=Figure.of(round_ratios(runs, arm, t)) if arm.paired
                else Figure(1.0 if good else None, n=len(good)))
        out.append(ArmSummary(
            arm=arm, runs=len(rs), ok=len(good),
            requests=max((r.requests for r in rs), default=0), tests=tests,
            checkpoints=summarize_checkpoints(good) if arm.paired else None,
            errors=list(dict.fromkeys(str(r.error) for r in rs if r.error)),
            client_retrans=Figure.of([None if r.client_retrans is None
                                      else float(r.client_retrans) for r in good])))
    return out


# --- the memory experiment ----------------------------------------------------------------------


@dataclass
class MemoryRun:
    """Redis filled with ``filled_mib`` of values, paired at ``interval_ms``; between checkpoints
    either nothing is written (the floor: what redis touches by itself) or ``written_bytes``
    are overwritten in place (SETRANGE over large values)."""

    filled_mib: int
    written_bytes: int
    interval_ms: int
    ok: bool = False
    error: str | None = None
    used_memory: int | None = None  # redis INFO memory, after filling
    rss_bytes: int | None = None
    full: dict[str, Any] | None = None  # generation 1
    idle: list[dict[str, Any]] = field(default_factory=list)
    written: list[dict[str, Any]] = field(default_factory=list)
    straddled: int = 0  # writes a checkpoint's freeze cut in two (left out)

    @property
    def full_bytes(self) -> float | None:
        return checkpoint_bytes(self.full) if self.full else None

    @property
    def idle_bytes(self) -> float | None:
        return median([checkpoint_bytes(c) for c in self.idle])

    @property
    def written_bytes_sent(self) -> float | None:
        return median([checkpoint_bytes(c) for c in self.written])

    @property
    def bytes_per_written(self) -> float | None:
        """Bytes a checkpoint sent per byte written since the one before (median)."""
        return ratio(self.written_bytes_sent, float(self.written_bytes))

    @property
    def full_over_incremental(self) -> float | None:
        return ratio(self.full_bytes, self.written_bytes_sent)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(full_bytes=self.full_bytes, idle_bytes=self.idle_bytes,
                 written_bytes_sent=self.written_bytes_sent,
                 bytes_per_written=self.bytes_per_written,
                 full_over_incremental=self.full_over_incremental)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryRun:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --- deaths -------------------------------------------------------------------------------


@dataclass
class DeathRun:
    """The active dies (agent and redis SIGKILLed, link down, at ``died_at``); the standby
    promotes itself; a prober on the client host finds the first correct reply. Times are
    this machine's wall clock (every host of the lab shares it)."""

    rep: int
    output_commit: bool
    interval_ms: int
    heartbeat_ms: int
    misses: int
    ok: bool = False
    error: str | None = None
    died_at: float | None = None
    first_pong_at: float | None = None
    first_get_at: float | None = None  # the canary key read back right
    probes_after: int = 0  # probes sent between the death and the first reply
    granted_at: float | None = None  # the witness's grant (its event)
    promoted: dict[str, Any] = field(default_factory=dict)  # the standby's "promoted" event
    keys_acked: int = 0  # acknowledged to the writer before the death
    acked_after_freeze: int = 0  # of those, after the restored generation's freeze
    lost: int | None = None  # of those acknowledged before the death, missing afterwards
    lost_before_freeze: int | None = None  # missing though acknowledged before the freeze
    resets: int = 0  # the writer's connections that broke
    leftovers: list[str] = field(default_factory=list)
    probe_log: list[str] = field(default_factory=list)  # the prober's outcomes after the death

    def _ms(self, a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else (b - a) * 1000

    @property
    def death_to_serving_ms(self) -> float | None:
        return self._ms(self.died_at, self.first_pong_at) if self.ok else None

    @property
    def death_to_data_ms(self) -> float | None:
        return self._ms(self.died_at, self.first_get_at) if self.ok else None

    def phases(self) -> dict[str, float | None]:
        """Where the time went: detection and the witness's grant, then the promotion (fence,
        connections locked and address taken, restore), then until the client's next probe
        got its answer (ARP, the probe's own timeout)."""
        ev = self.promoted
        start = ev.get("detected_at")  # when the standby started its promotion
        total = ev.get("total_ms")
        # Its end: the start plus its own total (the event's "at" comes after writing the
        # record to disk).
        at = start + total / 1000 if start is not None and total is not None else ev.get("at")
        return {
            "detect + grant": self._ms(self.died_at, self.granted_at or start),
            "grant -> promote": self._ms(self.granted_at, start) if self.granted_at else None,
            "fence": ev.get("fence_ms"),
            "lock + address": ev.get("address_ms"),
            "restore": ev.get("restore_ms"),
            "promotion total": ev.get("total_ms"),
            "promoted -> reply": self._ms(at, self.first_pong_at),
        }

    @property
    def generation_age_ms(self) -> float | None:
        v = self.promoted.get("generation_age_ms")
        return None if v is None else float(v)

    @property
    def loss_window_ms(self) -> float | None:
        """From the restored generation's freeze to the death: writes in it are lost without
        output commit."""
        return self._ms(self.promoted.get("generation_frozen_at"), self.died_at)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(death_to_serving_ms=self.death_to_serving_ms,
                 death_to_data_ms=self.death_to_data_ms, phases_ms=self.phases(),
                 generation_age_ms=self.generation_age_ms, loss_window_ms=self.loss_window_ms)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeathRun:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class DeathSummary:
    output_commit: bool
    runs: int
    ok: int
    serving_ms: Figure
    data_ms: Figure
    phases: dict[str, Figure]
    generation_age_ms: Figure
    loss_window_ms: Figure
    acked_after_freeze: Figure
    lost: Figure
    resets: Figure
    errors: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"output_commit": self.output_commit, "runs": self.runs, "ok": self.ok,
                "serving_ms": self.serving_ms.to_dict(), "data_ms": self.data_ms.to_dict(),
                "phases": {k: v.to_dict() for k, v in self.phases.items()},
                "generation_age_ms": self.generation_age_ms.to_dict(),
                "loss_window_ms": self.loss_window_ms.to_dict(),
                "acked_after_freeze": self.acked_after_freeze.to_dict(),
                "lost": self.lost.to_dict(), "resets": self.resets.to_dict(),
                "errors": self.errors}


def summarize_deaths(runs: Sequence[DeathRun]) -> list[DeathSummary]:
    out = []
    for oc in sorted({r.output_commit for r in runs}):
        rs = [r for r in runs if r.output_commit == oc]
        good = [r for r in rs if r.ok]
        names = list(good[0].phases()) if good else []
        out.append(DeathSummary(
            output_commit=oc, runs=len(rs), ok=len(good),
            serving_ms=Figure.of([r.death_to_serving_ms for r in good]),
            data_ms=Figure.of([r.death_to_data_ms for r in good]),
            phases={n: Figure.of([r.phases()[n] for r in good]) for n in names},
            generation_age_ms=Figure.of([r.generation_age_ms for r in good]),
            loss_window_ms=Figure.of([r.loss_window_ms for r in good]),
            acked_after_freeze=Figure.of([float(r.acked_after_freeze) for r in good]),
            lost=Figure.of([None if r.lost is None else float(r.lost) for r in good]),
            resets=Figure.of([float(r.resets) for r in good]),
            errors=list(dict.fromkeys(str(r.error) for r in rs if r.error))))
    return out


# --- targets ----------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    goal: str
    value: str
    met: bool | None  # None: not measured
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fmt_fig_pct(f: Figure) -> str:
    if f.median is None:
        return "—"
    rng = f" [{f.low:.1%}-{f.high:.1%}]" if f.low is not None and f.n > 1 else ""
    return f"{f.median:.1%}{rng}"


def targets(throughput: Sequence[ArmSummary], memory: MemoryRun | None,
            deaths: Sequence[DeathSummary]) -> list[Target]:
    out: list[Target] = []
    for oc in (False, True):
        arm = Arm(TARGET_INTERVAL_MS, oc)
        s = next((a for a in throughput if a.arm == arm), None)
        name = f"throughput at {TARGET_INTERVAL_MS} ms" + (" + output commit" if oc else "")
        if s is None or any(s.tests[t].ratio.median is None for t in TESTS):
            out.append(Target(name, f">= {TARGET_THROUGHPUT_RATIO:.0%} of unprotected",
                              "—", None, "not measured"))
            continue
        worst = min(s.tests[t].ratio.median or 0.0 for t in TESTS)
        value = ", ".join(f"{t} {_fmt_fig_pct(s.tests[t].ratio)}" for t in TESTS)
        met = worst >= TARGET_THROUGHPUT_RATIO
        detail = "" if met else (f"short by {TARGET_THROUGHPUT_RATIO - worst:.1%} of "
                                 "unprotected (the lower of SET and GET)")
        out.append(Target(name, f">= {TARGET_THROUGHPUT_RATIO:.0%} of unprotected", value,
                          met, detail))
    if memory is not None and memory.ok and memory.bytes_per_written is not None:
        q = memory.bytes_per_written
        met = q <= TARGET_BYTES_PER_WRITTEN
        out.append(Target(
            f"bytes per checkpoint ({memory.filled_mib} MiB filled, "
            f"{memory.written_bytes / 2**20:g} MiB written between checkpoints)",
            f"<= {TARGET_BYTES_PER_WRITTEN:g} x memory written", f"{q:.2f} x", met,
            "" if met else f"{q - TARGET_BYTES_PER_WRITTEN:.2f} x over"))
    else:
        out.append(Target("bytes per checkpoint", f"<= {TARGET_BYTES_PER_WRITTEN:g} x memory "
                          "written", "—", None, "not measured"))
    for d in deaths:
        name = "death to serving" + (" + output commit" if d.output_commit else "")
        m = d.serving_ms.median
        if m is None:
            out.append(Target(name, f"< {TARGET_DEATH_MS:g} ms", "—", None, "not measured"))
            continue
        rng = f" [{d.serving_ms.low:,.0f}-{d.serving_ms.high:,.0f}]" if d.serving_ms.n > 1 \
            else ""
        met = m < TARGET_DEATH_MS
        out.append(Target(name, f"< {TARGET_DEATH_MS:g} ms", f"{m:,.0f} ms{rng}", met,
                          "" if met else f"{m - TARGET_DEATH_MS:,.0f} ms over"))
    return out


# --- the results record ------------------------------------------------------------------------


@dataclass
class BenchResults:
    config: BenchConfig
    seed: int = 0
    env: dict[str, Any] = field(default_factory=dict)
    throughput: list[ThroughputRun] = field(default_factory=list)
    memory: MemoryRun | None = None
    deaths: list[DeathRun] = field(default_factory=list)
    started: str = ""
    finished: str | None = None
    wall_s: float | None = None
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # what the pairs left, found after

    @property
    def arms(self) -> list[ArmSummary]:
        return summarize(self.throughput)

    @property
    def all_checkpoints(self) -> CheckpointSummary:
        return summarize_checkpoints([r for r in self.throughput if r.ok and r.arm.paired])

    @property
    def death_summaries(self) -> list[DeathSummary]:
        return summarize_deaths(self.deaths)

    @property
    def targets(self) -> list[Target]:
        return targets(self.arms, self.memory, self.death_summaries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "pair", "config": self.config.to_dict(), "seed": self.seed,
            "env": self.env, "started": self.started, "finished": self.finished,
            "wall_s": self.wall_s, "interrupted": self.interrupted, "notes": self.notes,
            "leftovers": self.leftovers,
            "targets": [t.to_dict() for t in self.targets],
            "throughput": [a.to_dict() for a in self.arms],
            "checkpoints_all": self.all_checkpoints.to_dict(),
            "deaths": [d.to_dict() for d in self.death_summaries],
            "memory": self.memory.to_dict() if self.memory else None,
            "runs": {"throughput": [r.to_dict() for r in self.throughput],
                     "deaths": [r.to_dict() for r in self.deaths]},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResults:
        runs = d.get("runs") or {}
        return cls(config=BenchConfig.from_dict(d.get("config") or {}),
                   seed=int(d.get("seed") or 0), env=dict(d.get("env") or {}),
                   throughput=[ThroughputRun.from_dict(r) for r in runs.get("throughput", [])],
                   memory=MemoryRun.from_dict(d["memory"]) if d.get("memory") else None,
                   deaths=[DeathRun.from_dict(r) for r in runs.get("deaths", [])],
                   started=str(d.get("started", "")), finished=d.get("finished"),
                   wall_s=d.get("wall_s"), interrupted=bool(d.get("interrupted")),
                   notes=list(d.get("notes") or []), leftovers=list(d.get("leftovers") or []))


# --- the redis protocol (RESP), as much as the benchmark speaks ---------------------------------


def resp_command(*words: str | bytes) -> bytes:
    """One command as RESP: ``*N`` then each word as a bulk string."""
    out = [f"*{len(words)}\r\n".encode()]
    for w in words:
        b = w.encode() if isinstance(w, str) else bytes(w)
        out += [f"${len(b)}\r\n".encode(), b, b"\r\n"]
    return b"".join(out)


class RespError(Exception):
    """An error reply (``-ERR ...``) or a reply that is not RESP."""


def read_reply(f: io.BufferedIOBase | Any) -> Any:
    """One reply from the file ``f`` (a socket's ``makefile("rb")``): str for a simple string,
    int, bytes or None for a bulk string, a list for an array; RespError for an error reply.
    EOFError when the connection closed first."""
    line = f.readline()
    if not line:
        raise EOFError("the connection closed")
    if not line.endswith(b"\r\n"):
        raise RespError(f"a reply line without its end: {line[:60]!r}")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RespError(body.decode(errors="replace"))
    if kind == b":":
        return int(body)
    if kind == b"$":
        n = int(body)
        if n < 0:
            return None
        data = f.read(n + 2)
        if len(data) < n + 2:
            raise EOFError("the connection closed inside a bulk reply")
        return bytes(data[:-2])
    if kind == b"*":
        n = int(body)
        return None if n < 0 else [read_reply(f) for _ in range(n)]
    raise RespError(f"not a RESP reply: {line[:60]!r}")


def parse_snmp(text: str) -> dict[str, int]:
    """The ``Tcp:`` counters of ``/proc/net/snmp`` (a header line, then a values line)."""
    rows = [ln.split() for ln in text.splitlines() if ln.startswith("Tcp:")]
    if len(rows) < 2:
        return {}
    out = {}
    for k, v in zip(rows[0][1:], rows[1][1:], strict=False):
        with contextlib.suppress(ValueError):
            out[k] = int(v)
    return out


def parse_info(text: str) -> dict[str, str]:
    """``INFO``'s ``key:value`` lines."""
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out
