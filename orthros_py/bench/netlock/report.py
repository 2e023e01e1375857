"""The network lock benchmark's results on disk: results.json (and reading it back), the
markdown table beside the paper's figures, the notes a reader needs, and the PNG plots.

Wraps the output directory and matplotlib (imported lazily, only for plots). Needs no
privileges beyond writing ``--out``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from orthros_py.bench.netlock.model import (
    METHODS,
    PAPER,
    BenchResults,
    Method,
    PaperRow,
    RunRecord,
)
from orthros_py.bench.stats import fmt_ms
from orthros_py.bench.stats import fmt_ratio as fmt_ratio  # where the package exported it from

# --- results, files -------------------------------------------------------------------------------


def load_results(path: Path) -> BenchResults:
    return BenchResults.from_dict(json.loads(path.read_text()))


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
