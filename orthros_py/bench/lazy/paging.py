"""The lazy benchmark's paging-standby half, pure: what a paging pair's standby holds against the
hot fraction (``pair status``'s paging figures, sampled after generations have aged out of the
hot window), and a failover of a paging pair against one of an eager pair (no ``--paging``) of
the same service: the time to the first response from the start of the standby's restore, the
time until every page is present, pages faulted and pushed, every page checked.

The records read ``pair status``'s ``paging`` (``agent.pair.tiers.TierStats.to_dict``), the
standby's ``promoted`` event (``at``, ``detected_at``, ``restore_ms``, ``lazy_plan_ms``,
``total_ms``, ``generation``, ``generation_age_ms``) and its ``lazy`` record (``eager_pages``,
``lazy_pages``, ``pages_faulted``, ``pages_pushed``, ``pages_copied``, ``pages_total``,
``elapsed_ms``, ``finished_at``, ``state``). Every instant is wall-clock seconds
(``time.time()``, one machine) and becomes milliseconds after the death here.

Wraps no interface and needs no privileges (matplotlib only to draw); unit-tested.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthros_py.bench.pair.model import Figure, Target
from orthros_py.bench.pair.report import fmt_bytes, fmt_fig
from orthros_py.bench.stats import fmt_ms, ratio
from orthros_py.workloads.memhog import PAGE, hot_pages

MIB = 2**20
PAGING, EAGER_PAIR = "paging", "eager"
PAIR_MODES: tuple[str, ...] = (PAGING, EAGER_PAIR)

# The targets: reported, never asserted.
MEMORY_SLACK = 0.10  # the paging standby's memory <= the hot set + 10 % of the size
TARGET_FAILOVER_MIB = 2048
TARGET_FAILOVER_RATIO = 0.10  # paging first response <= 10 % of eager's, from restore start

# ``pair status``'s paging figures, sampled: (key, label).
PAGING_KEYS: tuple[tuple[str, str], ...] = (
    ("hot_bytes", "hot set (written within the window)"),
    ("memory_bytes", "memory (tmpfs settled + base cached)"),
    ("settled_tmpfs_bytes", "tmpfs, settled"),
    ("peak_tmpfs_bytes", "tmpfs, peak"),
    ("disk_cached_bytes", "disk base in the page cache"),
    ("disk_bytes", "disk"),
)

# A failover's figures, in table order: (key, label, unit); unit "ms" or "n".
FAILOVER_METRICS: tuple[tuple[str, str, str], ...] = (
    ("detected_ms", "death to promotion (detection + witness)", "ms"),
    ("pre_restore_ms", "promotion to restore start (fence, address, store)", "ms"),
    ("restore_ms", "restore (standby's own)", "ms"),
    ("lazy_plan_ms", "of which the lazy plan", "ms"),
    ("ttfr_ms", "restore start to first response", "ms"),
    ("first_reply_ms", "death to first response", "ms"),
    ("client_first_reply_ms", "death to first response, long-lived client", "ms"),
    ("all_pages_from_restore_ms", "restore start to all pages present", "ms"),
    ("all_pages_ms", "death to all pages present", "ms"),
    ("eager_pages", "pages placed before the tree resumed", "n"),
    ("lazy_pages", "pages left to the lazy-pages daemon", "n"),
    ("pages_faulted", "pages faulted", "n"),
    ("pages_pushed", "pages pushed", "n"),
)


def parse_fractions(text: str) -> tuple[float, ...]:
    """``0.1,0.3,60%`` -> (0.1, 0.3, 0.6); ValueError naming what is wrong."""
    out: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part[:-1]) / 100 if part.endswith("%") else float(part)
        except ValueError:
            raise ValueError(f"{part!r} is not a fraction (give 0.1,0.3,0.6)") from None
        if not 0.0 < v <= 1.0:
            raise ValueError(f"the hot fraction {part} is not in (0, 1]")
        out.append(v)
    if not out:
        raise ValueError("no hot fraction given")
    return tuple(sorted(dict.fromkeys(out)))


def hot_set_bytes(size_mib: int, fraction: float) -> int:
    """The workload's hot set: the pages its worker rewrites (memhog's own count)."""
    return hot_pages(size_mib * MIB // PAGE, fraction, "spread") * PAGE


def memory_bound_bytes(size_mib: int, fraction: float) -> float:
    """The target: the hot set plus 10 % of the size."""
    return hot_set_bytes(size_mib, fraction) + MEMORY_SLACK * size_mib * MIB


# --- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedFailover:
    size_mib: int
    rep: int
    mode: str  # PAGING or EAGER_PAIR
    read_only_hot: bool = False


def failover_plan(sizes: Sequence[int], reps: int, seed: int, *,
                  read_only_check: bool = True) -> list[PlannedFailover]:
    """Per size, ``reps`` rounds of one paging and one eager failover in an order shuffled anew
    by ``seed`` (drift hits both alike); then, at the largest size, one paging failover whose
    worker only reads its hot set (what a hot set of written pages misses)."""
    rng = random.Random(seed ^ 0x5EED)
    out: list[PlannedFailover] = []
    for size in sizes:
        for rep in range(reps):
            order = list(PAIR_MODES)
            rng.shuffle(order)
            out += [PlannedFailover(size, rep, m) for m in order]
    if read_only_check and sizes and reps > 0:
        out.append(PlannedFailover(max(sizes), 0, PAGING, read_only_hot=True))
    return out


# --- what the standby holds ----------------------------------------------------------------------


@dataclass
class PagingMemoryRun:
    """One paging pair of the workload at ``hot_fraction``: ``pair status``'s paging figures
    sampled after generations aged out of the hot window. ``part`` says which part sampled it:
    ``memory`` (the run was for this), or ``failover`` (sampled before a failover's death)."""

    size_mib: int
    hot_fraction: float
    read_only_hot: bool = False
    rep: int = 0
    part: str = "memory"
    hot_window_s: float | None = None
    interval_s: float | None = None
    rate: float | None = None
    ok: bool = False
    error: str | None = None
    settle_s: float | None = None  # pair start to the samples (the window filled and aged)
    generation: int | None = None
    checkpoint_failures: int = 0  # "checkpoint failed" events among the pair's last 20
    samples: list[dict[str, Any]] = field(default_factory=list)

    def figure(self, key: str) -> Figure:
        return Figure.of([_num(s.get(key)) for s in self.samples])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PagingMemoryRun:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


def sample_of(paging: dict[str, Any]) -> dict[str, Any]:
    """The figures kept of one ``pair status`` paging record."""
    keep = [k for k, _ in PAGING_KEYS] + ["tmpfs_bytes", "hot_pages", "young_generations",
                                          "aged_in_place", "aged_by_merge", "punched_bytes"]
    return {k: paging.get(k) for k in keep if k in paging}


@dataclass
class MemorySummary:
    """One size, hot fraction, worker kind and part: every sample of every run of it."""

    size_mib: int
    hot_fraction: float
    read_only_hot: bool
    part: str
    runs: int
    ok: int
    samples: int
    figures: dict[str, Figure]
    hot_set_bytes: int
    bound_bytes: float
    errors: list[str]

    @property
    def memory(self) -> Figure:
        return self.figures["memory_bytes"]

    @property
    def share(self) -> float | None:
        """The standby's memory over the size: what a replica holding everything needs."""
        return ratio(self.memory.median, self.size_mib * MIB)

    @property
    def met(self) -> bool | None:
        m = self.memory.median
        return None if m is None else m <= self.bound_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"size_mib": self.size_mib, "hot_fraction": self.hot_fraction,
                "read_only_hot": self.read_only_hot, "part": self.part, "runs": self.runs,
                "ok": self.ok, "samples": self.samples,
                "figures": {k: v.to_dict() for k, v in self.figures.items()},
                "hot_set_bytes": self.hot_set_bytes, "bound_bytes": self.bound_bytes,
                "share": self.share, "met": self.met, "errors": self.errors}


def summarize_memory(runs: Sequence[PagingMemoryRun]) -> list[MemorySummary]:
    out = []
    keys = sorted({(r.part != "memory", r.size_mib, r.hot_fraction, r.read_only_hot, r.part)
                   for r in runs})
    for _, size, frac, ro, part in keys:
        rs = [r for r in runs
              if (r.size_mib, r.hot_fraction, r.read_only_hot, r.part) == (size, frac, ro, part)]
        good = [r for r in rs if r.ok]
        samples = [s for r in good for s in r.samples]
        figures = {k: Figure.of([_num(s.get(k)) for s in samples]) for k, _ in PAGING_KEYS}
        out.append(MemorySummary(size, frac, ro, part, len(rs), len(good), len(samples),
                                 figures,
                                 hot_set_bytes(size, frac), memory_bound_bytes(size, frac),
                                 list(dict.fromkeys(str(r.error) for r in rs if r.error))))
    return out


# --- a failover ----------------------------------------------------------------------------------


@dataclass
class FailoverRun:
    """The active of a pair (``mode``: a paging standby or an eager one) killed; every instant
    in ms after the death (the active's link going down)."""

    size_mib: int
    hot_fraction: float
    rep: int
    mode: str
    read_only_hot: bool = False
    ok: bool = False
    error: str | None = None
    died_at: float | None = None  # wall clock
    detected_ms: float | None = None  # the witness granted; the promotion starts
    restore_start_ms: float | None = None
    restore_end_ms: float | None = None
    restore_ms: float | None = None
    lazy_plan_ms: float | None = None
    fence_ms: float | None = None
    address_ms: float | None = None
    promote_ms: float | None = None  # the promotion's own total (fence, address, restore)
    first_reply_ms: float | None = None  # the first PONG to a fresh connection (prober)
    client_first_reply_ms: float | None = None  # ... on the long-lived client's connection
    all_pages_ms: float | None = None  # the daemon's last page (paging), the restore's end
    lazy_state: str | None = None
    eager_pages: float | None = None
    lazy_pages: float | None = None
    pages_faulted: float | None = None
    pages_pushed: float | None = None
    pages_copied: float | None = None
    pages_total: float | None = None
    lazy_elapsed_ms: float | None = None
    generation: int | None = None
    generation_age_ms: float | None = None
    verify: str | None = None
    verify_ms: float | None = None
    mismatches: int | None = None  # hot pages the worker found wrong across the failover
    client_replies: int = 0
    client_errors: int = 0
    probes: int = 0
    probe_log: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    @property
    def ttfr_ms(self) -> float | None:
        """From the start of the standby's restore to the first response: what the standby's
        kind decides (detection and the witness are the same for both)."""
        if self.first_reply_ms is None or self.restore_start_ms is None:
            return None
        return self.first_reply_ms - self.restore_start_ms

    @property
    def pre_restore_ms(self) -> float | None:
        """From the witness's grant to the restore's start: the fence, the address, waiting
        for the store (a generation being committed or merged)."""
        if self.restore_start_ms is None or self.detected_ms is None:
            return None
        return self.restore_start_ms - self.detected_ms

    @property
    def all_pages_from_restore_ms(self) -> float | None:
        if self.all_pages_ms is None or self.restore_start_ms is None:
            return None
        return self.all_pages_ms - self.restore_start_ms

    def value(self, metric: str) -> float | None:
        v = getattr(self, metric)
        return None if v is None else float(v)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ttfr_ms"] = self.ttfr_ms
        d["pre_restore_ms"] = self.pre_restore_ms
        d["all_pages_from_restore_ms"] = self.all_pages_from_restore_ms
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FailoverRun:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _after(t: Any, died: float) -> float | None:
    return None if t is None else (float(t) - died) * 1000


def read_promotion(run: FailoverRun, event: dict[str, Any], lazy: dict[str, Any] | None) -> None:
    """Fills ``run`` from the standby's ``promoted`` event and its ``lazy`` record (paging).
    The restore ends just before the event is recorded (``at``); it started ``restore_ms``
    earlier. An eager restore places every page before the tree resumes: all pages are there
    when it ends."""
    assert run.died_at is not None
    died = run.died_at
    run.detected_ms = _after(event.get("detected_at"), died)
    run.restore_ms = _num(event.get("restore_ms"))
    run.lazy_plan_ms = _num(event.get("lazy_plan_ms"))
    run.fence_ms = _num(event.get("fence_ms"))
    run.address_ms = _num(event.get("address_ms"))
    run.promote_ms = _num(event.get("total_ms"))
    at = event.get("at")
    if at is not None:
        run.restore_end_ms = _after(at, died)
        if run.restore_ms is not None and run.restore_end_ms is not None:
            run.restore_start_ms = run.restore_end_ms - run.restore_ms
    run.generation = None if event.get("generation") is None else int(event["generation"])
    run.generation_age_ms = _num(event.get("generation_age_ms"))
    if run.mode != PAGING:
        run.all_pages_ms = run.restore_end_ms
        return
    lz = lazy or event.get("lazy") or {}
    run.lazy_state = lz.get("state")
    for k in ("eager_pages", "lazy_pages", "pages_faulted", "pages_pushed", "pages_copied",
              "pages_total"):
        setattr(run, k, _num(lz.get(k)))
    run.lazy_elapsed_ms = _num(lz.get("elapsed_ms"))
    run.all_pages_ms = _after(lz.get("finished_at"), died) if lz.get("state") == "complete" \
        else None


def judge_failover(run: FailoverRun) -> None:
    """``ok`` unless something failed, no response came, VERIFY did not say OK, the worker saw
    a wrong page, or a paging standby's lazy pages did not all arrive: a failover that left
    the memory wrong is a failure, never hidden."""
    if run.error is not None:
        run.ok = False
        return
    problems = []
    if run.first_reply_ms is None:
        problems.append("no response from the standby")
    if run.verify is None or not run.verify.startswith("OK"):
        problems.append(f"VERIFY answered {run.verify!r}")
    if run.mismatches:
        problems.append(f"the worker found {run.mismatches} wrong hot pages")
    if run.mode == PAGING and run.lazy_state != "complete":
        problems.append(f"the lazy pages ended {run.lazy_state or 'unknown'}")
    elif run.mode == PAGING and run.pages_total is not None and \
            run.pages_copied is not None and run.pages_copied < run.pages_total:
        problems.append(f"only {run.pages_copied:,.0f} of {run.pages_total:,.0f} lazy pages "
                        "arrived")
    run.ok = not problems
    run.error = "; ".join(problems) or None


@dataclass
class FailoverSummary:
    size_mib: int
    hot_fraction: float
    read_only_hot: bool
    mode: str
    runs: int
    ok: int
    figures: dict[str, Figure]
    ratio: Figure  # paging's ttfr over eager's, per rep (same size and hot fraction)
    all_pages_ratio: Figure
    errors: list[str]

    @property
    def label(self) -> str:
        return self.mode + (" (read-only hot set)" if self.read_only_hot else "")

    def to_dict(self) -> dict[str, Any]:
        return {"size_mib": self.size_mib, "hot_fraction": self.hot_fraction,
                "read_only_hot": self.read_only_hot, "mode": self.mode, "runs": self.runs,
                "ok": self.ok, "figures": {k: v.to_dict() for k, v in self.figures.items()},
                "ratio": self.ratio.to_dict(), "all_pages_ratio": self.all_pages_ratio.to_dict(),
                "errors": self.errors}


def rep_ratios(runs: Sequence[FailoverRun], size: int, frac: float, metric: str,
               read_only_hot: bool = False) -> list[float]:
    """Per rep: a paging failover's ``metric`` over the eager one's of the same rep (reps where
    either failed give none; the read-only run is set against every eager rep's median)."""
    eager = {r.rep: r.value(metric) for r in runs
             if (r.size_mib, r.hot_fraction, r.mode) == (size, frac, EAGER_PAIR) and r.ok}
    out = []
    for r in runs:
        if (r.size_mib, r.hot_fraction, r.mode, r.read_only_hot) != (
                size, frac, PAGING, read_only_hot) or not r.ok:
            continue
        base = eager.get(r.rep) if not read_only_hot else \
            Figure.of(list(eager.values())).median
        q = ratio(r.value(metric), base)
        if q is not None:
            out.append(q)
    return out


def summarize_failovers(runs: Sequence[FailoverRun]) -> list[FailoverSummary]:
    out = []
    keys = sorted({(r.size_mib, r.hot_fraction, r.read_only_hot, r.mode) for r in runs},
                  key=lambda k: (k[0], k[1], k[2], PAIR_MODES.index(k[3])
                                 if k[3] in PAIR_MODES else 9))
    for size, frac, ro, mode in keys:
        rs = [r for r in runs
              if (r.size_mib, r.hot_fraction, r.read_only_hot, r.mode) == (size, frac, ro, mode)]
        good = [r for r in rs if r.ok]
        figures = {k: Figure.of([r.value(k) for r in good]) for k, _, _ in FAILOVER_METRICS}
        paging = mode == PAGING
        out.append(FailoverSummary(
            size, frac, ro, mode, len(rs), len(good), figures,
            Figure.of(rep_ratios(runs, size, frac, "ttfr_ms", ro)) if paging else Figure(None),
            Figure.of(rep_ratios(runs, size, frac, "all_pages_from_restore_ms", ro))
            if paging else Figure(None),
            list(dict.fromkeys(str(r.error) for r in rs if r.error))))
    return out


# --- targets -------------------------------------------------------------------------------------


def _pct(f: Figure) -> str:
    if f.median is None:
        return "—"
    rng = f" [{f.low:.1%}-{f.high:.1%}]" if f.low is not None and f.n > 1 else ""
    return f"{f.median:.1%}{rng}"


def paging_targets(memory: Sequence[PagingMemoryRun],
                   failovers: Sequence[FailoverRun]) -> list[Target]:
    """The standby's memory at most the hot set + 10 % of the size, for every hot fraction of
    the memory part (written hot sets); paging's first response at most 10 % of eager's at
    2 GiB (the largest failover size measured, named if it is not 2 GiB)."""
    out: list[Target] = []
    for s in summarize_memory(memory):
        if s.read_only_hot or s.part != "memory":
            continue
        name = f"paging standby memory, {s.hot_fraction:.0%} hot of {s.size_mib:,} MiB"
        goal = f"<= hot set + {MEMORY_SLACK:.0%} = {fmt_bytes(s.bound_bytes)}"
        m = s.memory.median
        if m is None:
            out.append(Target(name, goal, "—", None, "not measured: " + "; ".join(s.errors)))
            continue
        saved = 1 - (s.share or 0.0)
        out.append(Target(name, goal, f"{fmt_bytes(m)} ({saved:.0%} less than the size)",
                          s.met, f"hot set {fmt_bytes(s.hot_set_bytes)}, "
                                 f"{s.samples} samples [{fmt_bytes(s.memory.low)}-"
                                 f"{fmt_bytes(s.memory.high)}]"))
    sizes = sorted({r.size_mib for r in failovers if not r.read_only_hot})
    if sizes:
        size = TARGET_FAILOVER_MIB if TARGET_FAILOVER_MIB in sizes else sizes[-1]
        fracs = sorted({r.hot_fraction for r in failovers if r.size_mib == size})
        for frac in fracs:
            name = (f"failover first response at {size:,} MiB ({frac:.0%} hot), paging / "
                    "eager, from restore start")
            goal = f"<= {TARGET_FAILOVER_RATIO:.0%}"
            f = Figure.of(rep_ratios(failovers, size, frac, "ttfr_ms"))
            note = "" if size == TARGET_FAILOVER_MIB else \
                f"the target is stated at {TARGET_FAILOVER_MIB:,} MiB"
            if f.median is None:
                out.append(Target(name, goal, "—", None,
                                  "not measured (no paging and eager pair of one rep both "
                                  "succeeded)" + (f"; {note}" if note else "")))
                continue
            met = f.median <= TARGET_FAILOVER_RATIO
            detail = "" if met else f"{f.median / TARGET_FAILOVER_RATIO:.1f} x the goal"
            out.append(Target(name, goal, _pct(f), met,
                              "; ".join(x for x in (detail, note) if x)))
    return out


# --- results.md ----------------------------------------------------------------------------------


def _n(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def fmt_failover(f: Figure | None, unit: str) -> str:
    if unit == "n":
        return fmt_fig(f, _n)
    return fmt_fig(f, lambda v: fmt_ms(v, 0))


def failover_line(r: FailoverRun) -> str:
    """One failover in a line (progress, and the failures list)."""
    head = (f"{r.size_mib:,} MiB hot {r.hot_fraction:.0%} rep {r.rep + 1} {r.mode}"
            + (" (read-only hot set)" if r.read_only_hot else "") + ":")
    if not r.ok:
        return f"{head} FAILED: {r.error}"
    parts = [f"promoted {fmt_ms(r.detected_ms, 0)} ms after the death",
             f"restore {fmt_ms(r.restore_ms, 0)} ms",
             f"first response {fmt_ms(r.ttfr_ms, 0)} ms after the restore began",
             f"all pages {fmt_ms(r.all_pages_from_restore_ms, 0)} ms after it"]
    if r.mode == PAGING:
        parts.append(f"{_n(r.eager_pages)} placed, {_n(r.lazy_pages)} lazy "
                     f"({_n(r.pages_faulted)} faulted, {_n(r.pages_pushed)} pushed)")
    return f"{head} " + ", ".join(parts) + f"; {r.verify}"


def memory_line(r: PagingMemoryRun) -> str:
    head = (f"{r.size_mib:,} MiB hot {r.hot_fraction:.0%}"
            + (" (read-only hot set)" if r.read_only_hot else "") + " standby memory:")
    if not r.ok:
        return f"{head} FAILED: {r.error}"
    return (f"{head} {fmt_fig(r.figure('memory_bytes'), fmt_bytes)} (hot set "
            f"{fmt_fig(r.figure('hot_bytes'), fmt_bytes)}, disk "
            f"{fmt_fig(r.figure('disk_bytes'), fmt_bytes)}; bound "
            f"{fmt_bytes(memory_bound_bytes(r.size_mib, r.hot_fraction))})")


def paging_markdown(memory: Sequence[PagingMemoryRun],
                    failovers: Sequence[FailoverRun]) -> list[str]:
    """The paging standby's sections of results.md (empty without runs)."""
    lines: list[str] = []
    mem = summarize_memory(memory)
    if mem:
        first = next((r for r in memory if r.ok), memory[0])
        lines += [
            "## Paging standby: memory against the hot fraction", "",
            f"A pair with ``--paging --hot-window {first.hot_window_s or 0:g}s --interval "
            f"{first.interval_s or 0:g}s --failover`` (alpha -> beta, gamma the witness); the "
            f"workload's worker rewrites random pages of a hot set spread over its memory, "
            f"{first.rate or 0:,.0f} a second. Once generations have aged out of the window "
            "(at least two), ``pair status``'s paging figures are sampled; medians over the "
            "samples [min-max]. *memory* is the standby's memory for the replica between "
            "checkpoints (its tmpfs after the last re-sort and the disk base's pages in the "
            "page cache); *bound* the target (hot set + 10 % of the size); *share* memory "
            "over the size (a replica holding everything: 100 %). Rows marked *failover* were "
            "sampled before a failover run's death.", "",
            "| MiB | hot | worker | samples | hot set (workload) | hot set (standby) | "
            "memory | bound | met | share | tmpfs peak | base cached | disk |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for s in mem:
            worker = ("reads" if s.read_only_hot else "writes") + \
                (" (failover)" if s.part == "failover" else "")
            # The bound is for a hot set that is written; a read one is not kept by design.
            met = "n/a" if s.read_only_hot else {True: "yes", False: "**no**", None: "—"}[s.met]
            f = s.figures
            lines.append(
                f"| {s.size_mib:,} | {s.hot_fraction:.0%} | {worker} | {s.samples} "
                f"({s.ok}/{s.runs} runs) | {fmt_bytes(s.hot_set_bytes)} | "
                f"{fmt_fig(f['hot_bytes'], fmt_bytes)} | {fmt_fig(s.memory, fmt_bytes)} | "
                f"{fmt_bytes(s.bound_bytes)} | {met} | "
                f"{'—' if s.share is None else f'{s.share:.1%}'} | "
                f"{fmt_fig(f['peak_tmpfs_bytes'], fmt_bytes)} | "
                f"{fmt_fig(f['disk_cached_bytes'], fmt_bytes)} | "
                f"{fmt_fig(f['disk_bytes'], fmt_bytes)} |")
        for s in mem:
            for e in s.errors:
                lines.append(f"- failed ({s.size_mib:,} MiB, hot {s.hot_fraction:.0%}"
                             + (", read-only" if s.read_only_hot else "") + f"): {e}")
        if any(s.read_only_hot for s in mem):
            lines.append("- A worker that only *reads* its hot set leaves no written page "
                         "for the window to keep: the standby's hot set is next to nothing, "
                         "and after a failover those pages come on fault (a known limitation "
                         "of a hot set tracked by writes).")
        lines.append("")
    fo = summarize_failovers(failovers)
    if fo:
        lines += [
            "## Failover: paging standby against eager standby", "",
            "The active killed (its link down, its agent and the workload SIGKILLed at one "
            "instant) while clients PING the service. *detection + witness* is the death to "
            "the witness's grant (the same for both kinds); the comparison is from the start "
            "of the standby's restore: a paging standby places its hot pages and leaves the "
            "rest to CRIU's lazy-pages daemon (faulted on demand, pushed in the background), "
            "an eager standby restores every page before the tree resumes. *first response*: "
            "the first PONG to a fresh connection (a prober on the client host, every few ms "
            "with short timeouts); *long-lived client*: one connection PINGing all along "
            "(its PING in flight at the death waits for TCP's retransmission, so it lags). "
            "After each failover VERIFY must find every page right. Medians [min-max].", ""]
        for size in sorted({s.size_mib for s in fo}):
            for frac in sorted({s.hot_fraction for s in fo if s.size_mib == size}):
                mine = [s for s in fo if (s.size_mib, s.hot_fraction) == (size, frac)]
                lines += [f"### {size:,} MiB, {frac:.0%} hot", "",
                          "| | " + " | ".join(s.label for s in mine) + " |",
                          "|---|" + "---:|" * len(mine),
                          "| ok | " + " | ".join(f"{s.ok}/{s.runs}" for s in mine) + " |"]
                for key, label, unit in FAILOVER_METRICS:
                    lines.append(f"| {label}{' ms' if unit == 'ms' else ''} | "
                                 + " | ".join(fmt_failover(s.figures[key], unit)
                                              for s in mine) + " |")
                lines.append("| first response / eager's (from restore start) | "
                             + " | ".join(_pct(s.ratio) if s.mode == PAGING else "100%"
                                          for s in mine) + " |")
                lines.append("| all pages present / eager's (from restore start) | "
                             + " | ".join(_pct(s.all_pages_ratio) if s.mode == PAGING
                                          else "100%" for s in mine) + " |")
                lines.append("")
        failed = [r for r in failovers if not r.ok]
        if failed:
            lines += ["Failed failovers:", ""] + [f"- {failover_line(r)}" for r in failed]
            lines.append("")
        left = [(r, x) for r in failovers for x in r.leftovers]
        if left:
            lines += ["Cleanup after a failover:", ""] + [
                f"- {r.size_mib:,} MiB rep {r.rep + 1} {r.mode}: {x}" for r, x in left]
            lines.append("")
    return lines


# --- the plot ------------------------------------------------------------------------------------


def plot_paging(memory: Sequence[PagingMemoryRun], failovers: Sequence[FailoverRun],
                out: Path) -> list[Path]:
    """paging.png: the standby's memory against the hot fraction (with the hot set, the bound
    and the size), and the failover of a paging standby against an eager one."""
    mem = [s for s in summarize_memory(memory)
           if s.ok and not s.read_only_hot and s.part == "memory"]
    fo = [s for s in summarize_failovers(failovers) if s.ok]
    if not mem and not fo:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    for size in sorted({s.size_mib for s in mem}):
        mine = [s for s in mem if s.size_mib == size]
        xs = [s.hot_fraction * 100 for s in mine]
        ys = [(s.memory.median or 0) / MIB for s in mine]
        err = [[y - (s.memory.low or 0) / MIB for y, s in zip(ys, mine, strict=True)],
               [(s.memory.high or 0) / MIB - y for y, s in zip(ys, mine, strict=True)]]
        a.errorbar(xs, ys, yerr=err, marker="o", capsize=3,
                   label=f"paging standby, {size:,} MiB")
        a.plot(xs, [s.hot_set_bytes / MIB for s in mine], linestyle=":", color="gray", marker="x",
               label="hot set" if size == min(s.size_mib for s in mem) else None)
        a.plot(xs, [s.bound_bytes / MIB for s in mine], linestyle="--", color="tab:red", marker="_",
               label="target: hot set + 10 %" if size == min(s.size_mib for s in mem)
               else None)
        a.axhline(size, color="black", linewidth=0.8,
                  label=f"a replica holding all {size:,} MiB")
    a.set_ylim(bottom=0)
    a.set_xlabel("hot fraction, %")
    a.set_ylabel("standby memory, MiB")
    a.set_title("what the paging standby holds (medians, min-max bars)", fontsize=10)
    a.grid(alpha=0.3)
    if mem:
        a.legend(fontsize=8)
    groups = [s for s in fo if not s.read_only_hot] + [s for s in fo if s.read_only_hot]
    labels, ttfr, allp = [], [], []
    for s in groups:
        labels.append(f"{s.size_mib:,} MiB\n{s.label.replace(' (read-only hot set)', ', RO')}")
        ttfr.append(s.figures["ttfr_ms"])
        allp.append(s.figures["all_pages_from_restore_ms"])
    xs = list(range(len(groups)))
    for off, figs, name in ((-0.2, ttfr, "first response"), (0.2, allp, "all pages present")):
        ys = [(f.median or 0) / 1000 for f in figs]
        err = [[y - (f.low if f.low is not None else f.median or 0) / 1000
                for y, f in zip(ys, figs, strict=True)],
               [(f.high if f.high is not None else f.median or 0) / 1000 - y
                for y, f in zip(ys, figs, strict=True)]]
        b.bar([x + off for x in xs], ys, width=0.4, yerr=err, capsize=3, label=name)
    b.set_xticks(xs, labels, fontsize=8)
    b.set_ylabel("seconds from the start of the standby's restore")
    b.set_title("failover: paging standby against eager (medians, min-max bars)", fontsize=10)
    b.grid(alpha=0.3, axis="y")
    if groups:
        b.legend(fontsize=8)
    fig.tight_layout()
    path = out / "paging.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
