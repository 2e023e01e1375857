"""The migrate benchmark's results on disk: results.json (and reading it back), results.md with
the targets met or not, the medians per workload and arm, the ratio to CRIU alone, every run
with its reason if it failed, the notes a reader needs; and the PNG plots (downtime split into
CRIU and the rest; each run's longest client wait against its downtime).

Wraps the output directory and matplotlib (imported lazily, only for plots). Needs no
privileges beyond writing ``--out``.
"""

from __future__ import annotations

import json
from pathlib import Path

from orthros_py.bench.migrate.model import (
    ARM_LABELS,
    ARMS,
    CRIU,
    ECHO,
    METRICS,
    NGINX,
    ORTHROS,
    BenchResults,
    CellSummary,
    Comparison,
    RunRecord,
)
from orthros_py.bench.pair.model import Figure
from orthros_py.bench.pair.report import fmt_fig
from orthros_py.bench.stats import fmt_ms


def load_results(path: Path) -> BenchResults:
    return BenchResults.from_dict(json.loads(path.read_text()))


def fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"x{v:.2f}"


def fmt_metric(f: Figure | None, key: str) -> str:
    if key == "wait_ratio":
        return fmt_fig(f, fmt_ratio)
    return fmt_fig(f, lambda v: fmt_ms(v, 1))


def fmt_comparison(c: Comparison) -> str:
    r = c.ratio
    if r.median is None:
        return f"{c.workload}: no repetition has both arms counted"
    rng = f" [{r.low:.2f}-{r.high:.2f}]" if r.n > 1 and r.low is not None \
        and r.high is not None else ""
    return (f"{c.workload}: orthros's downtime / CRIU alone's dump + restore x{r.median:.2f}"
            f"{rng} over {r.n} repetition(s) (medians {fmt_ms(c.orthros_ms, 1)} / "
            f"{fmt_ms(c.criu_ms, 1)} ms, x{c.ratio_of_medians or 0:.2f})")


def workload_title(res: BenchResults, workload: str) -> str:
    cfg = res.config
    if workload == ECHO:
        return f"echo service, {cfg.echo_clients:,} clients"
    if workload == NGINX:
        return f"nginx under wrk, {cfg.nginx_conns:,} connections"
    return workload


def notes_for(res: BenchResults) -> list[str]:
    cfg = res.config
    notes = [f"{res.env.get('cpus', '?')} CPUs: the service, its clients (and wrk's "
             f"{cfg.wrk_threads} threads), CRIU, the agents and orthros share them."]
    if not res.runs:
        return notes
    notes.append(
        "Downtime: orthros's is migrate's own (its lock taken to its lock released: the "
        "clients' packets are held for exactly that window, so it is also the lock window); "
        "CRIU alone's runs from the start of its dump to the end of its restore. CRIU is "
        "CRIU's frozen time (the dump's stats) plus its restore; the share is the rest of the "
        "downtime: orthros's own steps (lock, transfer, address move, unlock, agents' RPC) for "
        "orthros, CRIU's start and freezing for CRIU alone. The ratio to CRIU alone divides "
        "orthros's downtime by CRIU alone's dump and restore calls of the same repetition.")
    notes.append(
        "CRIU alone is a dump and a restore of the tree on its own host through CRIU's RPC "
        "with the options orthros gives CRIU, but no lock (CRIU is told skip) and nothing of "
        "orthros around them. Without a lock a client's packet that arrives between the dump's "
        "end and the restore is answered with a reset: such a run's clients fail. That is the "
        "baseline's honest result: it is counted for CRIU's times, its clients' figures "
        "(longest wait) are left out of the medians, and the failure is shown. An orthros run "
        "whose clients saw any failure is failed and left out of every median.")
    if ECHO in cfg.workloads:
        notes.append(
            "echo: ClientPool sends a request on every connection, then reads every reply, "
            f"every {cfg.echo_interval_s * 1000:g} ms; the longest wait is its longest such "
            "round from the moment the run began to the end of the settle time.")
    if NGINX in cfg.workloads:
        notes.append(
            f"nginx: wrk -c {cfg.nginx_conns} -t {cfg.wrk_threads} --timeout "
            f"{cfg.wrk_timeout_s:g}s --latency, keep-alive; the longest wait is wrk's Max "
            "latency over its whole run (warm-up included); its socket errors (connect, read, "
            "write, timeout) and non-2xx/3xx answers are client failures.")
    notes.append(f"Each run starts a fresh tree and its clients, which run {cfg.warm_s:g} s "
                 f"before and {cfg.settle_s:g} s after the migration (or CRIU alone). orthros "
                 "migrates as `orthros migrate` does by default (xdp lock; no pre-copy below "
                 "64 MiB, so the same CRIU work as the baseline; images in the agents' scratch "
                 "roots, in memory). CRIU alone writes its images in memory too (/dev/shm), so "
                 "that the ratio is orthros's own work, not a disk's.")
    waits = [r.pid_wait_ms for r in res.runs if r.pid_wait_ms is not None]
    if waits:
        notes.append(f"CRIU alone waited up to {max(waits):,.2f} ms for the dumped PIDs to be "
                     "reaped before restoring them (in its downtime, not in its dump + "
                     "restore).")
    bad = [r for r in res.runs if r.arm == CRIU and r.clients_failed]
    if bad:
        notes.append(f"{len(bad)} of {sum(r.arm == CRIU for r in res.runs)} CRIU alone runs' "
                     "clients failed (see the runs).")
    return notes


def _met(m: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not judged"}[m]


def _cell_rows(cells: list[CellSummary]) -> list[str]:
    lines = ["| | " + " | ".join(c.label for c in cells) + " |",
             "|---|" + "---:|" * len(cells),
             "| runs counted | " + " | ".join(f"{c.ok}/{c.runs}" for c in cells) + " |",
             "| clients failed | " + " | ".join(f"{c.clients_failed}/{c.runs}"
                                                for c in cells) + " |"]
    for key, label in METRICS:
        if all(c.figures[key].median is None for c in cells):
            continue
        unit = "" if key == "wait_ratio" else " ms"
        lines.append(f"| {label}{unit} | "
                     + " | ".join(fmt_metric(c.figures[key], key) for c in cells) + " |")
    return lines


def run_row(r: RunRecord) -> str:
    where = f"{r.source}→{r.dest}" if r.arm == ORTHROS else r.source
    if not r.ok:
        result = f"**failed**{f' at {r.stage}' if r.stage else ''}: {_md(r.error or '?')}"
    elif r.clients_failed:
        result = f"clients failed: {r.client_errors}" + (
            f" ({_md(r.client_error_samples[0])})" if r.client_error_samples else "")
    else:
        result = "ok"
    lock = fmt_ms(r.lock_window_ms, 1) if r.arm == ORTHROS else "no lock"
    return (f"| {r.seq} | {r.workload} | {r.rep + 1} | {r.label} | {where} | "
            f"{fmt_ms(r.downtime_ms, 1)} | {lock} | {fmt_ms(r.criu_ms, 1)} | "
            f"{fmt_ms(r.share_ms, 1)} | "
            f"{fmt_ms(r.longest_wait_ms, 1)} | {fmt_ratio(r.wait_ratio)} | "
            f"{r.client_requests or 0:,} | {r.client_errors} | {result} |")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(res: BenchResults) -> str:
    cfg, env = res.config, res.env
    when = (f"Started {res.started}" + (f", finished {res.finished}" if res.finished else "")
            + (f" ({res.wall_s / 60:.1f} min)" if res.wall_s else "")
            + (" (interrupted: partial results)" if res.interrupted else "") + ".")
    lines = ["# orthros migrate against CRIU alone", "",
             f"Host: Linux {env.get('kernel', '?')}, {env.get('cpus', '?')} CPUs; CRIU "
             f"{env.get('criu', '?')}; nginx {env.get('nginx', '?')}. Seed {res.seed}. {when}",
             "",
             f"Per workload, {cfg.reps} repetitions, each with "
             + " and ".join(ARM_LABELS[a] for a in cfg.arms)
             + " once in a shuffled order, each on a fresh tree under its clients: orthros "
               "migrate moves it to the other lab host, CRIU alone dumps and restores it on "
               "its host.", "",
             "## Targets", "", "| target | goal | measured | | |", "|---|---|---|---|---|"]
    for t in res.targets:
        lines.append(f"| {t.name} | {t.goal} | {t.value} | {_met(t.met)} | {_md(t.detail)} |")
    cells = res.cells
    comps = {c.workload: c for c in res.comparisons}
    for w in [w for w in cfg.workloads if any(c.workload == w for c in cells)]:
        mine = sorted((c for c in cells if c.workload == w), key=lambda c: ARMS.index(c.arm))
        lines += ["", f"## {workload_title(res, w)}", "",
                  "Medians over the runs counted [min-max].", ""]
        lines += _cell_rows(mine)
        if w in comps:
            lines += ["", fmt_comparison(comps[w]) + "."]
    if res.runs:
        lines += ["", "## Runs", "",
                  "| # | workload | rep | arm | where | downtime ms | lock window ms | "
                  "CRIU ms | share ms | longest wait ms | wait / downtime | requests | "
                  "client errors | result |",
                  "|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        lines += [run_row(r) for r in res.runs]
    if res.leftovers:
        lines += ["", "## Left behind", ""] + [f"- {_md(x)}" for x in res.leftovers]
    if res.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res.notes]
    return "\n".join(lines).rstrip("\n") + "\n"


# --- plots ---------------------------------------------------------------------------------------


def plot(res: BenchResults, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = res.cells
    workloads = [w for w in res.config.workloads if any(c.workload == w for c in cells)]
    if not workloads:
        return []
    made: list[Path] = []
    colors = {ORTHROS: "tab:blue", CRIU: "tab:orange"}

    # Downtime per arm: CRIU's part and the rest (medians), min-max of the downtime.
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.4),
                             squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=True):
        mine = sorted((c for c in cells if c.workload == w), key=lambda c: ARMS.index(c.arm))
        for i, c in enumerate(mine):
            dt, cr = c.figures["downtime_ms"], c.figures["criu_ms"]
            if dt.median is None:
                continue
            part = min(cr.median or 0.0, dt.median)
            ax.bar(i, part, color="tab:gray", width=0.6,
                   label="CRIU (frozen + restore)" if i == 0 else None)
            ax.bar(i, dt.median - part, bottom=part, color=colors.get(c.arm, "tab:green"),
                   width=0.6, label=f"rest ({c.label})")
            if dt.low is not None and dt.high is not None:
                ax.errorbar(i, dt.median, yerr=[[dt.median - dt.low], [dt.high - dt.median]],
                            color="black", capsize=4)
            ys = [r.downtime_ms for r in res.runs if r.workload == w and r.arm == c.arm
                  and r.ok and r.downtime_ms is not None]
            ax.scatter([i + 0.22] * len(ys), ys, s=10, color="black", zorder=3)
        ax.set_xticks(range(len(mine)), [c.label for c in mine])
        ax.set_ylabel("downtime, ms")
        ax.set_title(workload_title(res, w), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("downtime: CRIU's part and the rest (medians, min-max bars, runs as dots)")
    fig.tight_layout()
    fig.savefig(out / "downtime.png", dpi=110)
    plt.close(fig)
    made.append(out / "downtime.png")

    # Each run's longest client wait against its downtime.
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.4),
                             squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=True):
        top = 1.0
        for arm in ARMS:
            rs = [r for r in res.runs if r.workload == w and r.arm == arm
                  and r.downtime_ms is not None and r.longest_wait_ms is not None]
            for failed in (False, True):
                pts = [r for r in rs if (r.clients_failed or not r.ok) == failed]
                if not pts:
                    continue
                xs = [r.downtime_ms or 0.0 for r in pts]
                ys = [r.longest_wait_ms or 0.0 for r in pts]
                top = max(top, *xs, *ys)
                ax.scatter(xs, ys, color=colors[arm], marker="x" if failed else "o",
                           label=ARM_LABELS[arm] + (" (failed)" if failed else ""))
        ax.plot([0, top * 1.05], [0, top * 1.05], color="gray", lw=0.8, ls="--",
                label="wait = downtime")
        ax.set_xlabel("downtime, ms")
        ax.set_ylabel("longest client wait, ms")
        ax.set_title(workload_title(res, w), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("each run: the clients' longest wait against the downtime")
    fig.tight_layout()
    fig.savefig(out / "waits.png", dpi=110)
    plt.close(fig)
    made.append(out / "waits.png")
    return made


def write_outputs(res: BenchResults, out: Path, *, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res.to_dict(), indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(res))
    made = [out / "results.json", out / "results.md"]
    if plots and any(r.downtime_ms is not None for r in res.runs):
        made += plot(res, out)
    return made
