"""The network lock benchmark's results on disk: results.json (and reading it back), the
markdown tables (CRIU's phases beside the paper's figures; the lock window and the longest
client wait), the notes a reader needs, and the PNG plots.

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
    Cell,
    Method,
    PaperRow,
    RunRecord,
)
from orthros_py.bench.stats import fmt_ms
from orthros_py.bench.stats import fmt_ratio as fmt_ratio  # where the package exported it from

# --- results, files -------------------------------------------------------------------------------


def load_results(path: Path) -> BenchResults:
    return BenchResults.from_dict(json.loads(path.read_text()))


def fmt_range(mid: float | None, lo: float | None, hi: float | None, digits: int = 2) -> str:
    """A median and the range of the runs: "112.30 (98.10-130.20)"; the median alone when
    one run (or none) gave it."""
    if mid is None or lo is None or hi is None or lo == hi:
        return fmt_ms(mid, digits)
    return f"{fmt_ms(mid, digits)} ({fmt_ms(lo, digits)}-{fmt_ms(hi, digits)})"


def fmt_failed(c: Cell) -> str:
    """How many runs of a cell failed, and how many of those for what the clients saw."""
    failed = c.runs - c.ok
    if not failed:
        return "0"
    return f"{failed}" + (f" ({c.client_failed} clients)" if c.client_failed else "")


WINDOW_TEXT = (
    "The lock window is what the clients wait through: from the moment the lock engages and "
    "CRIU's dump is called to the moment the restored connections flow again (xdp: its map "
    "entries deleted; iptables, nftables, none: CRIU's restore returned), one clock. *before* "
    "(discovery, xdp's attach) and *after* (xdp's detach, reading statistics) belong to the "
    "calls but not to the window; *wall* = before + window + after, from the dump call to the "
    "restore's return: what the operator waits (the first table's dump+restore is the two "
    "calls alone, without the time between them, inside the window, in which the benchmark "
    "collects the killed tree). *longest wait* is ab's longest request (its percentile "
    "table's 100% line): the longest any client waited, among the requests that completed "
    "before ab was stopped. Median (min-max) over the ok runs; a run whose clients saw any "
    "failure (failed requests, non-2xx responses, write errors, errors on ab's stderr, ab "
    "ending by itself) failed and is left out.")


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
        "Medians in ms over the ok runs (a run whose clients saw failures is not one). *total* "
        "is the wall time of orthros's `dump_tree`/`restore_tree` call; *criu* is CRIU's RPC "
        "minus the lock; *lock* is the time in CRIU's iptables/nft calls (from its log, level 4 "
        "for every method) or in orthros's XDP map writes. `none` = nobody locks (CRIU "
        "`skip`): the floor. *dump+restore* is the median over runs of the two calls' sum. "
        "Paper rows: seed 003's Table 2 (iptables method), lock = iptables + sh.",
        "",
        "| conns | method | runs ok | dump total | dump criu | dump lock | restore total "
        "| restore criu | restore lock | dump+restore |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for conc in sorted({c.concurrency for c in cells}):
        for c in (c for c in cells if c.concurrency == conc):
            okcol = f"{c.ok}/{c.runs}" + (" ✗" if c.ok < c.runs else "")
            lines.append(
                f"| {conc:,} | {c.method} | {okcol} | {fmt_ms(c.dump_total_ms)} | "
                f"{fmt_ms(c.dump_criu_ms)} | {fmt_ms(c.dump_lock_ms)} | "
                f"{fmt_ms(c.restore_total_ms)} | {fmt_ms(c.restore_criu_ms)} | "
                f"{fmt_ms(c.restore_lock_ms)} | {fmt_ms(c.sum_ms)} |")
        p = PAPER.get(conc)
        if p is not None:
            lines.append(
                f"| {conc:,} | *paper: iptables* | | *{fmt_ms(p.dump_total)}* | "
                f"*{fmt_ms(p.dump_criu)}* | *{fmt_ms(p.dump_lock)}* | "
                f"*{fmt_ms(p.restore_total)}* | *{fmt_ms(p.restore_criu)}* | "
                f"*{fmt_ms(p.restore_lock)}* | *{fmt_ms(p.total)}* |")
    lines += ["", "## What the clients waited through: the lock window and the longest wait",
              "", WINDOW_TEXT + f" ab ran {res.config.settle_s:g} s on after each restore; a "
              "request still waiting then is not counted.", "",
              "| conns | method | runs ok | failed | window | before | after | wall "
              "| longest wait | ab failed requests |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        okcol = f"{c.ok}/{c.runs}" + (" ✗" if c.ok < c.runs else "")
        aborted = f" ({c.ab_aborted} gave up)" if c.ab_aborted else ""
        lines.append(
            f"| {c.concurrency:,} | {c.method} | {okcol} | {fmt_failed(c)} | "
            f"{fmt_range(c.window_ms, c.window_min_ms, c.window_max_ms)} | "
            f"{fmt_ms(c.before_ms)} | {fmt_ms(c.after_ms)} | "
            f"{fmt_range(c.wall_ms, c.wall_min_ms, c.wall_max_ms)} | "
            f"{fmt_range(c.ab_longest_ms, c.ab_longest_min_ms, c.ab_longest_max_ms, 0)} | "
            f"{c.ab_failed}{aborted} |")
    lines += ["", "## xdp against iptables and none (dump + restore, medians)", "",
              "| conns | xdp | iptables | none | xdp : iptables | xdp : none |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in res.ratios:
        lines.append(f"| {r.concurrency:,} | {fmt_ms(r.xdp_ms)} | {fmt_ms(r.iptables_ms)} | "
                     f"{fmt_ms(r.none_ms)} | {fmt_ratio(r.xdp_iptables)} | "
                     f"{fmt_ratio(r.xdp_none)} |")
    lines += ["", "## xdp against none: what the clients waited (medians over the ok runs)", "",
              "| conns | window xdp | window none | xdp : none | longest wait xdp "
              "| longest wait none | xdp : none |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res.ratios:
        lines.append(f"| {r.concurrency:,} | {fmt_ms(r.xdp_window_ms)} | "
                     f"{fmt_ms(r.none_window_ms)} | {fmt_ratio(r.window_xdp_none)} | "
                     f"{fmt_ms(r.xdp_longest_ms, 0)} | {fmt_ms(r.none_longest_ms, 0)} | "
                     f"{fmt_ratio(r.longest_xdp_none)} |")
    if res.micro:
        m = res.micro
        lines += ["", "## XDP map alone", "",
                  f"Lock of {m.conns:,} synthetic connections ({2 * m.conns:,} map entries, one "
                  f"batch syscall): median {m.lock_ms:.3f} ms; unlock {m.unlock_ms:.3f} ms "
                  f"(median of {m.reps}); lock + unlock, best of {m.reps}: "
                  f"{m.round_best_ms:.3f} ms."]
    failed = [c for c in cells if c.failures]
    if failed or res.notes:
        lines += ["", "## Failures and notes", ""]
        # One line per failed run: they keep their figures in results.json, not in the tables.
        for c in failed:
            for e in c.failures:
                lines.append(f"- {c.concurrency:,} connections, {c.method}, {e}")
        lines += [f"- {n}" for n in res.notes]
    return "\n".join(lines) + "\n"


def plot(res: BenchResults, out: Path) -> list[Path]:
    """PNG plots: dump, restore, dump + restore, the lock window and the longest client wait
    against connections, one line per method (median over the ok runs, with their range), the
    paper's iptables figures dashed where it has them."""
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

    figures: list[tuple[str, str, Callable[[RunRecord], float | None],
                        Callable[[PaperRow], float] | None]] = [
        ("dump.png", "dump", lambda r: r.dump.total_ms if r.dump else None,
         lambda p: p.dump_total),
        ("restore.png", "restore", lambda r: r.restore.total_ms if r.restore else None,
         lambda p: p.restore_total),
        ("total.png", "dump + restore", lambda r: r.sum_ms, lambda p: p.total),
        ("window.png", "lock window (clients' connections not flowing)",
         lambda r: r.window.window_ms if r.window else None, None),
        ("longest.png", "longest client wait (ab's longest request)",
         lambda r: r.ab.longest_ms if r.ab else None, None),
    ]
    made: list[Path] = []
    methods = [m.value for m in METHODS if any(r.method == m.value for r in res.runs)]
    for name, title, get, paper in figures:
        if not any(get(r) is not None for r in res.runs if r.ok):
            continue  # older results without the figure, or no clients at all
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in methods:
            xs, ys, lo, hi = series(method, get)
            failed = sorted({r.concurrency for r in res.runs
                             if r.method == method and not r.ok})
            label = method + (f" (failed at {', '.join(map(str, failed))})" if failed else "")
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        if paper is not None:
            px = sorted(PAPER)
            ax.plot(px, [paper(PAPER[c]) for c in px], "k--", marker="x", alpha=0.6,
                    label="paper: iptables")
        ax.set_yscale("log")
        ax.set_xlabel("established connections")
        ax.set_ylabel("time (ms, log scale)")
        ax.set_title(f"{title} of nginx: network lock methods", fontsize="medium")
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
    ok = [r for r in runs if r.ok]
    no_window = [r for r in ok if r.window is None]
    if no_window:
        notes.append(f"{len(no_window)} ok runs have no lock window: recorded before the "
                     "benchmark measured it (dump_tree/restore_tree gave no engaged_at/"
                     "unlocked_at).")
    no_longest = [r for r in ok if r.ab is not None and r.ab.longest_ms is None]
    if no_longest:
        notes.append(f"{len(no_longest)} ok runs with clients have no longest wait: ab printed "
                     "no percentile table (it prints one only once 2 requests completed).")
    judged = sum(1 for r in runs if r.stage == "clients")
    if judged:
        notes.append(f"{judged} runs whose dump and restore succeeded failed for what their "
                     "clients saw; their figures stay in results.json.")
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
