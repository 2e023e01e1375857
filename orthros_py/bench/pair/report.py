"""The pair benchmark's results on disk: results.json (and reading it back), results.md with
the targets met or not, the notes a reader needs, and the PNG plots (throughput ratio and p99
against the interval, bytes per checkpoint full against incremental, death to serving).

Wraps the output directory and matplotlib (imported lazily, only for plots). Needs no
privileges beyond writing ``--out``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orthros_py.bench.pair.model import (
    TARGET_DEATH_MS,
    TARGET_INTERVAL_MS,
    TARGET_THROUGHPUT_RATIO,
    TESTS,
    ArmSummary,
    BenchResults,
    Figure,
)
from orthros_py.bench.stats import fmt_ms, median

# --- formatting ----------------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


def fmt_fig(f: Figure | None, fmt: Callable[[float | None], str] = fmt_ms) -> str:
    """``median [min-max]``; the range only when there was more than one value."""
    if f is None or f.median is None:
        return "—"
    if f.n > 1 and f.low is not None and f.high is not None:
        return f"{fmt(f.median)} [{fmt(f.low)}-{fmt(f.high)}]"
    return fmt(f.median)


def fmt_pct0(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def fmt_int(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def load_results(path: Path) -> BenchResults:
    return BenchResults.from_dict(json.loads(path.read_text()))


# --- results.md ----------------------------------------------------------------------------------


def _met(m: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[m]


def markdown(res: BenchResults) -> str:
    cfg = res.config
    lines = ["# Pair protection of redis: throughput, checkpoint cost, death to serving", ""]
    env = res.env
    criu = env.get("criu")
    if isinstance(criu, dict):  # the agent's status: path, version, error
        criu = criu.get("version") or criu.get("error")
    lines.append(
        f"Host: Linux {env.get('kernel', '?')}, {env.get('cpus', '?')} CPUs; "
        f"{env.get('redis', 'redis ?')}; CRIU {criu or '?'}. Lab: alpha active, "
        "beta standby, gamma witness, redis-benchmark on the client host. Seed "
        f"{res.seed}. Started {res.started}"
        + (f", finished {res.finished}" if res.finished else "")
        + (f" ({res.wall_s / 60:.1f} min)" if res.wall_s else "")
        + (" (interrupted: partial results)" if res.interrupted else "") + ".")
    lines += ["", "## Targets", "", "| target | goal | measured | | |", "|---|---|---|---|---|"]
    for tg in res.targets:
        lines.append(f"| {tg.name} | {tg.goal} | {tg.value} | {_met(tg.met)} | {tg.detail} |")

    arms = res.arms
    if arms:
        lines += ["", "## 1. Throughput and latency", "",
                  f"redis-benchmark `-t set,get -P 1 -c {cfg.clients} -r {cfg.keyspace}`, "
                  f"{cfg.requests:,} requests per test (with output commit fewer: about "
                  f"{cfg.oc_seconds:g} s of checkpoints, see *requests*); {cfg.reps} rounds, "
                  "each arm once per round in a shuffled order. Medians over the rounds, "
                  "[min-max]; *ratio* is the median of the per-round ratios to unprotected "
                  "in the same round. Latencies in ms as redis-benchmark prints them.", ""]
        for t in TESTS:
            lines += [f"### {t}", "",
                      "| arm | ok | requests | requests/s | ratio | p50 ms | p99 ms | max ms |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for a in arms:
                s = a.tests[t]
                lines.append(f"| {a.arm.label} | {a.ok}/{a.runs} | {a.requests:,} | "
                             f"{fmt_fig(s.rps, fmt_int)} | "
                             f"{fmt_fig(s.ratio, fmt_pct0) if a.arm.paired else '100%'} | "
                             f"{fmt_fig(s.p50_ms, _ms3)} | {fmt_fig(s.p99_ms, _ms3)} | "
                             f"{fmt_fig(s.max_ms, fmt_int)} |")
            lines.append("")
        base_retrans = next((a.client_retrans for a in arms if not a.arm.paired), None)
        lines += ["## 2. Checkpoint cost", "",
                  "Per paired arm: *full* is each pair's first generation (taken before "
                  "redis-benchmark starts; CRIU has no parent then); *incremental* the "
                  "generations taken while redis-benchmark ran. This CRIU has no setting that "
                  "turns the tracking off for a pair, so full is generation 1 against the "
                  "median of the later ones. *bytes* = memory pages sent + the other image "
                  "files. *kept* is redis-benchmark's time over the generations committed "
                  "meanwhile: the interval the pair kept under load. *client retransmits*: "
                  "TCP segments the client host sent again during one run (its RetransSegs; "
                  f"unprotected: {fmt_fig(base_retrans, fmt_int)}).", "",
                  "| arm | full frozen ms | full bytes | incr. frozen ms | incr. bytes | "
                  "incr. pages | incr. duration ms | kept interval ms | client retransmits |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for a in arms:
            c = a.checkpoints
            if c is None:
                continue
            lines.append(f"| {a.arm.label} | {fmt_fig(c.full_frozen_ms)} | "
                         f"{fmt_fig(c.full_bytes, fmt_bytes)} | {fmt_fig(c.incr_frozen_ms)} | "
                         f"{fmt_fig(c.incr_bytes, fmt_bytes)} | "
                         f"{fmt_fig(c.incr_pages, fmt_int)} | "
                         f"{fmt_fig(c.incr_duration_ms)} | "
                         f"{fmt_fig(c.achieved_interval_ms, fmt_int)} | "
                         f"{fmt_fig(a.client_retrans, fmt_int)} |")
        allc = res.all_checkpoints
        lines += ["", f"All paired runs: full {fmt_fig(allc.full_frozen_ms)} ms frozen, "
                  f"{fmt_fig(allc.full_bytes, fmt_bytes)}; incremental "
                  f"{fmt_fig(allc.incr_frozen_ms)} ms frozen, "
                  f"{fmt_fig(allc.incr_bytes, fmt_bytes)}."]
        tracking = next((r.tracking for r in res.throughput if r.tracking), None)
        if tracking:
            lines.append(f"Tracking: {tracking}.")
    m = res.memory
    if m is not None:
        lines += ["", "### Bytes per checkpoint against memory written", ""]
        if m.ok:
            lines += [
                f"redis filled with `DEBUG POPULATE` ({m.filled_mib} MiB of 256-byte values; "
                f"used_memory {fmt_bytes(m.used_memory)}, RSS {fmt_bytes(m.rss_bytes)}), "
                f"paired at {m.interval_ms:,} ms. Between two checkpoints either nothing is "
                f"written, or {fmt_bytes(m.written_bytes)} are overwritten in place (SETRANGE, "
                "a page at a time, over large values).", "",
                "| checkpoint | n | frozen ms | pages | bytes sent |",
                "|---|---:|---:|---:|---:|",
                f"| full (generation 1) | 1 | {fmt_ms((m.full or {}).get('frozen_ms'))} | "
                f"{fmt_int((m.full or {}).get('pages_written'))} | {fmt_bytes(m.full_bytes)} |",
                f"| incremental, nothing written | {len(m.idle)} | "
                f"{fmt_ms(median([c.get('frozen_ms') for c in m.idle]))} | "
                f"{fmt_int(median([c.get('pages_written') for c in m.idle]))} | "
                f"{fmt_bytes(m.idle_bytes)} |",
                f"| incremental, {fmt_bytes(m.written_bytes)} written | {len(m.written)} | "
                f"{fmt_ms(median([c.get('frozen_ms') for c in m.written]))} | "
                f"{fmt_int(median([c.get('pages_written') for c in m.written]))} | "
                f"{fmt_bytes(m.written_bytes_sent)} |", "",
                f"Bytes sent per byte written: **{m.bytes_per_written:.2f}** (goal <= 2: "
                "a 1 GiB process writing 10 MiB sends at most 20 MiB); full / incremental "
                f"{m.full_over_incremental:,.1f} x."
                + (f" {m.straddled} write(s) cut by a freeze were left out." if m.straddled
                   else "")]
        else:
            lines.append(f"Failed: {m.error}")
    deaths = res.death_summaries
    if deaths:
        lines += ["", "## 3. Death to serving", "",
                  f"`--failover --heartbeat {cfg.heartbeat_ms}ms --misses {cfg.misses}`, "
                  f"interval {cfg.death_interval_ms} ms, {cfg.death_reps} deaths per mode. At "
                  "one instant alpha's link goes down and its agent and redis are SIGKILLed; a "
                  "prober on the client host opens a connection to the service address in a "
                  "tight loop (20 ms connect timeout) and sends PING and GET of a canary key. "
                  "*serving*: death to the first PONG; *data*: to the canary read back. A "
                  "writer SETs unique keys on 2 connections throughout. Medians [min-max], ms.",
                  "", "| | " + " | ".join(_mode(d.output_commit) for d in deaths) + " |",
                  "|---|" + "---:|" * len(deaths)]
        rows: list[tuple[str, Any]] = [
            ("deaths ok", lambda d: f"{d.ok}/{d.runs}"),
            ("**death to serving**", lambda d: f"**{fmt_fig(d.serving_ms, fmt_int)}**"),
            ("death to data", lambda d: fmt_fig(d.data_ms, fmt_int))]
        names = list(deaths[0].phases) if deaths[0].phases else []
        rows += [(f"&nbsp;&nbsp;{n}", (lambda d, n=n: fmt_fig(d.phases.get(n), fmt_int)))
                 for n in names]
        rows += [
            ("generation age at promotion", lambda d: fmt_fig(d.generation_age_ms, fmt_int)),
            ("freeze of restored generation to death",
             lambda d: fmt_fig(d.loss_window_ms, fmt_int)),
            ("keys acked after that freeze (without output commit: lost)",
             lambda d: fmt_fig(d.acked_after_freeze, fmt_int)),
            ("acked keys missing afterwards", lambda d: fmt_fig(d.lost, fmt_int)),
            ("writer connections reset", lambda d: fmt_fig(d.resets, fmt_int))]
        for label, get in rows:
            lines.append(f"| {label} | " + " | ".join(get(d) for d in deaths) + " |")
        lines += ["", "*detect + grant*: death to the witness's grant (the standby's missed "
                  "heartbeats, then its request); *grant -> promote*: to the start of the "
                  "promotion; *fence*: alpha's bridge port set down; *lock + address*: the "
                  "kept connections locked (output commit) and the address taken with "
                  "gratuitous ARP; *restore*: CRIU's restore of the newest generation; "
                  "*promoted -> reply*: until a probe got its answer (the client's ARP, the "
                  "probe's own timeout). With output commit a reply leaves only once its "
                  "checkpoint is committed, so keys acknowledged after the restored "
                  "generation's freeze can still be in it: there only *missing* counts."]
    if res.deaths:
        lines += ["", "### Deaths one by one", ""]
        for d in res.deaths:
            head = f"- death {d.rep + 1}, {_mode(d.output_commit)}: "
            if not d.ok:
                lines.append(head + f"failed: {d.error}")
            else:
                ph = d.phases()
                lines.append(head + f"serving after {fmt_int(d.death_to_serving_ms)} ms ("
                             + ", ".join(f"{k} {fmt_int(v)}" for k, v in ph.items())
                             + f"); generation {d.promoted.get('generation')}, "
                             f"{fmt_int(d.generation_age_ms)} ms old; {d.keys_acked:,} keys "
                             f"acked, {d.acked_after_freeze} after the freeze, {d.lost} "
                             f"missing; {d.resets} writer resets")
            if d.probe_log:
                lines.append("  probes after the death: " + "; ".join(d.probe_log[:8])
                             + (" ..." if len(d.probe_log) > 8 else ""))
    failed = [(a.arm.label, e) for a in arms for e in a.errors]
    failed += [(_mode(d.output_commit), e) for d in deaths for e in d.errors]
    if failed or res.notes:
        lines += ["", "## Failures and notes", ""]
        lines += [f"- {who}: {e}" for who, e in failed]
        lines += [f"- {n}" for n in res.notes]
    return "\n".join(lines) + "\n"


def _mode(oc: bool) -> str:
    return "with output commit" if oc else "without output commit"


def _ms3(v: float | None) -> str:
    return fmt_ms(v, 3)


def notes_for(res: BenchResults) -> list[str]:
    """What a reader of the tables needs to know about these runs."""
    notes = [f"{res.env.get('cpus', '?')} CPUs: redis, redis-benchmark and the agents' "
             "checkpoints (CRIU, the page channel, Python) share them, so a paired run pays "
             "for the checkpoint's CPU as well as for the freeze."]
    if any(r.arm.output_commit for r in res.throughput):
        notes.append("With output commit every reply waits for the next committed checkpoint; "
                     "with one request in flight per client (-P 1) each client completes about "
                     "one request per checkpoint, so its throughput is bounded by clients / "
                     "interval whatever the server's speed. The 80 % target is for the arm "
                     "without output commit; the output commit figure is reported beside it.")
    if res.leftovers:
        notes.append("Left behind by the pairs (found after them and removed): "
                     + "; ".join(dict.fromkeys(res.leftovers)) + ".")
    failed_cleanup = [x for d in res.deaths for x in d.leftovers if x.startswith("cleanup")]
    if failed_cleanup:
        notes.append(f"After a death: {'; '.join(dict.fromkeys(failed_cleanup))} (the lab "
                     "was rebuilt).")
    if res.memory is not None and res.memory.ok and res.memory.idle_bytes:
        notes.append("The memory experiment's bytes include what redis touches by itself "
                     "between checkpoints (see the *nothing written* row) and its query buffer.")
    return notes


# --- plots ---------------------------------------------------------------------------------------


def _err(f: Figure) -> tuple[float, float]:
    if f.median is None or f.low is None or f.high is None:
        return 0.0, 0.0
    return f.median - f.low, f.high - f.median


def plot(res: BenchResults, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    arms = [a for a in res.arms if a.arm.paired]

    def series(oc: bool, test: str, get: Any) -> tuple[list[int], list[float], list[list[float]]]:
        xs, ys, lo, hi = [], [], [], []
        for a in sorted((a for a in arms if a.arm.output_commit == oc),
                        key=lambda a: a.arm.interval_ms or 0):
            f: Figure = get(a.tests[test])
            if f.median is None:
                continue
            xs.append(int(a.arm.interval_ms or 0))
            ys.append(f.median)
            e = _err(f)
            lo.append(e[0])
            hi.append(e[1])
        return xs, ys, [lo, hi]

    if arms:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for oc, color in ((False, "tab:blue"), (True, "tab:red")):
            for test, style in (("SET", "-o"), ("GET", "--s")):
                xs, ys, err = series(oc, test, lambda s: s.ratio)
                if xs:
                    ax.errorbar(xs, ys, yerr=err, fmt=style, color=color, capsize=3,
                                label=f"{test}, {'with' if oc else 'without'} output commit")
        ax.axhline(TARGET_THROUGHPUT_RATIO, color="grey", linestyle=":", linewidth=1,
                   label=f"target {TARGET_THROUGHPUT_RATIO:.0%}")
        ax.axvline(TARGET_INTERVAL_MS, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("checkpoint interval (ms, log scale)")
        ax.set_ylabel("throughput / unprotected (log scale)")
        ax.set_title("redis under redis-benchmark -P 1: paired against unprotected")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        made.append(_save(fig, out / "throughput_ratio.png"))
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        base = next((a for a in res.arms if not a.arm.paired), None)
        for oc, color in ((False, "tab:blue"), (True, "tab:red")):
            for test, style in (("SET", "-o"), ("GET", "--s")):
                xs, ys, err = series(oc, test, lambda s: s.p99_ms)
                if xs:
                    ax.errorbar(xs, ys, yerr=err, fmt=style, color=color, capsize=3,
                                label=f"{test}, {'with' if oc else 'without'} output commit")
        if base is not None:
            for test, style in (("SET", "-"), ("GET", "--")):
                v = base.tests[test].p99_ms.median
                if v is not None:
                    ax.axhline(v, color="black", linestyle=style, linewidth=1,
                               label=f"{test} unprotected")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("checkpoint interval (ms, log scale)")
        ax.set_ylabel("p99 latency (ms, log scale)")
        ax.set_title("p99 latency against the checkpoint interval")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        made.append(_save(fig, out / "p99.png"))
        plt.close(fig)

        made += _plot_bytes(plt, res, arms, out)
    if res.deaths:
        made += _plot_deaths(plt, res, out)
    return made


def _plot_bytes(plt: Any, res: BenchResults, arms: Sequence[ArmSummary],
                out: Path) -> list[Path]:
    labels, full, incr = [], [], []
    for a in arms:
        c = a.checkpoints
        if c is None:
            continue
        labels.append(a.arm.label.replace(" + output commit", "\n+ oc"))
        full.append(c.full_bytes.median or 0.0)
        incr.append(c.incr_bytes.median or 0.0)
    m = res.memory
    if m is not None and m.ok:
        labels.append(f"{m.filled_mib} MiB filled,\n{m.written_bytes / 2**20:g} MiB written")
        full.append(m.full_bytes or 0.0)
        incr.append(m.written_bytes_sent or 0.0)
    if not labels:
        return []
    fig, ax = plt.subplots(figsize=(max(7.5, 0.9 * len(labels) + 2), 4.5))
    xs = list(range(len(labels)))
    ax.bar([x - 0.2 for x in xs], [v / 2**20 for v in full], 0.4, label="full (generation 1)")
    ax.bar([x + 0.2 for x in xs], [v / 2**20 for v in incr], 0.4,
           label="incremental (median)")
    if m is not None and m.ok:
        ax.axhline(2 * m.written_bytes / 2**20, color="grey", linestyle=":", linewidth=1,
                   label="2 x memory written (memory experiment)")
    ax.set_xticks(xs, labels, fontsize="small")
    ax.set_yscale("log")
    ax.set_ylabel("MiB sent per checkpoint (log scale)")
    ax.set_title("bytes per checkpoint: full against incremental")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = _save(fig, out / "checkpoint_bytes.png")
    plt.close(fig)
    return [path]


def _plot_deaths(plt: Any, res: BenchResults, out: Path) -> list[Path]:
    groups: list[list[float]] = []
    for oc in (False, True):
        vals = [d.death_to_serving_ms for d in res.deaths if d.output_commit == oc and d.ok]
        groups.append([v for v in vals if v is not None])
    if not any(groups):
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, got in enumerate(groups):
        if got:
            ax.boxplot([got], positions=[i], widths=0.4, showfliers=False)
            ax.scatter([i] * len(got), got, color="tab:red" if i else "tab:blue", zorder=3)
    ax.axhline(TARGET_DEATH_MS, color="grey", linestyle=":", linewidth=1,
               label=f"target {TARGET_DEATH_MS:g} ms")
    ax.set_xticks([0, 1], ["without output commit", "with output commit"])
    ax.set_ylabel("death to first correct reply (ms)")
    ax.set_title("death of the active to serving from the standby")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = _save(fig, out / "death_to_serving.png")
    plt.close(fig)
    return [path]


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


# --- files ---------------------------------------------------------------------------------------


def write_outputs(res: BenchResults, out: Path, *, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res.to_dict(), indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(res))
    made = [out / "results.json", out / "results.md"]
    if plots and (res.throughput or res.deaths or res.memory):
        made += plot(res, out)
    return made
