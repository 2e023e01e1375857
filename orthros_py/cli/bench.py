"""``orthros bench netlock``: network lock methods around a real dump and restore of nginx.

The measurement lives in ``orthros_py.bench.netlock`` (``scripts/bench_netlock.py`` runs this
same command); here are only the options, the progress lines and the rich tables (stderr).
``--json`` prints results.json to stdout as well.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orthros_py.bench.netlock import (
    DEFAULT_CONCURRENCY,
    METHODS,
    PAPER,
    BenchConfig,
    BenchResults,
    NetlockBench,
    RunRecord,
    default_out,
    fmt_ratio,
    load_results,
    notes_for,
    parse_concurrency,
    parse_methods,
    plan,
    write_outputs,
)
from orthros_py.bench.stats import fmt_ms
from orthros_py.cli.context import Env

WIDE = 150


class _ListOf(click.ParamType[Any]):
    def __init__(self, name: str, parse: Any) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


@click.group()
def bench() -> None:
    """Benchmarks on real workloads."""


@contextmanager
def _term_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP stop the benchmark the way Ctrl-C does: cleanup runs, partial results
    are written."""
    def handler(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@bench.command("netlock")
@click.option("--concurrency", type=_ListOf("LIST", parse_concurrency),
              default=",".join(map(str, DEFAULT_CONCURRENCY)), show_default=True,
              help="Connections ab keeps open, comma separated (3000, 5000 also work).")
@click.option("--reps", type=click.IntRange(1), default=3, show_default=True,
              help="Repetitions of each (concurrency, method).")
@click.option("--reps-slow", type=click.IntRange(1), default=None,
              help="Repetitions of iptables from --slow-from connections on (minutes per run). "
                   "[default: --reps]")
@click.option("--slow-from", type=click.IntRange(0), default=1000, show_default=True,
              help="Concurrency from which --reps-slow applies to iptables.")
@click.option("--methods", type=_ListOf("LIST", parse_methods),
              default=",".join(m.value for m in METHODS), show_default=True,
              help="Methods to compare: iptables, nftables, xdp, none (nobody locks).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: results/netlock-<timestamp>].")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--subnet", default=None,
              help="A private /24 for the veth pair [default: a free 10.99.x.0/24].")
@click.option("--settle", "settle_s", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Seconds ab keeps running after the restore.")
@click.option("--seed", type=int, default=None, help="Seed for the per-round method order.")
@click.option("--keep-images", is_flag=True, help="Keep CRIU's images (logs are always kept).")
@click.option("--micro-conns", type=click.IntRange(0), default=1000, show_default=True,
              help="Connections in the XDP map microbenchmark (0: skip it).")
@click.option("--micro-reps", type=click.IntRange(1), default=7, show_default=True)
@click.option("--from-json", "from_json", type=click.Path(exists=True, path_type=Path),
              default=None, help="Measure nothing: render an earlier results.json again "
                                 "(markdown, plots, tables) into its directory.")
@click.option("--json", "as_json", is_flag=True, help="Also print results.json on stdout.")
@click.pass_obj
def netlock(env: Env, concurrency: tuple[int, ...], reps: int, reps_slow: int | None,
            slow_from: int, methods: tuple[Any, ...], out: Path | None, port: int,
            subnet: str | None, settle_s: float, seed: int | None, keep_images: bool,
            micro_conns: int, micro_reps: int, from_json: Path | None, as_json: bool) -> None:
    """Dump and restore nginx under ApacheBench with each network lock method (seed 003's
    Table 2): per concurrency, repetition and method, a fresh nginx, ab's connections, a
    dump and a restore, timed in total, CRIU's part and the lock's part; and the lock window
    (how long the clients' connections did not flow) and the longest client wait. A run
    whose clients saw any failure counts as failed.

    Needs root. Leaves nothing behind: the client namespace, veth, nginx, ab and any lock
    rule a failed CRIU left are removed, also on Ctrl-C.
    """
    if from_json is not None:
        res = load_results(from_json)
        res.notes = notes_for(res.runs)
        made = write_outputs(res, from_json.parent)
        render(env, res)
        _say_files(env, made)
        if as_json:
            env.emit_json(res.to_dict())
        return
    cfg = BenchConfig(concurrency=concurrency, reps=reps, reps_slow=reps_slow,
                      slow_from=slow_from, methods=methods, out=out or default_out(),
                      port=port, subnet=subnet, settle_s=settle_s, seed=seed,
                      keep_images=keep_images, micro_conns=micro_conns, micro_reps=micro_reps)
    runs = plan(cfg)
    env.console.print(f"[bold]netlock benchmark[/]: {len(runs)} runs "
                      f"({', '.join(m.value for m in cfg.methods)} at "
                      f"{', '.join(map(str, cfg.concurrency))} connections) -> "
                      f"{escape(str(cfg.out))}")

    def progress(msg: str) -> None:
        env.console.print(f"[dim]{escape(msg)}[/]")

    def on_run(rec: RunRecord, i: int, n: int) -> None:
        env.console.print(f"[{i}/{n}] {escape(run_line(rec))}", soft_wrap=True)

    with _term_as_interrupt():
        res = NetlockBench(cfg, progress=progress, on_run=on_run).run()
    render(env, res)
    _say_files(env, sorted(cfg.out.glob("*.*")))
    if as_json:
        env.emit_json(json.loads((cfg.out / "results.json").read_text()))


def run_line(rec: RunRecord) -> str:
    head = f"{rec.concurrency} conns {rec.method:<8} rep {rec.rep + 1}:"
    if not rec.ok and (rec.dump is None or rec.restore is None):
        return f"{head} FAILED at {rec.stage}: {rec.error}"
    assert rec.dump and rec.restore
    text = (f"{head} dump {rec.dump.total_ms:,.1f} ms (criu {rec.dump.criu_ms:,.1f}, lock "
            f"{rec.dump.lock_ms:,.1f}), restore {rec.restore.total_ms:,.1f} ms (criu "
            f"{rec.restore.criu_ms:,.1f}, lock {rec.restore.lock_ms:,.1f})")
    w = rec.window
    text += (f"; window {w.window_ms:,.1f} ms (before {w.before_ms:,.1f}, after "
             f"{w.after_ms:,.1f}, wall {w.wall_ms:,.1f})" if w else "; no window recorded")
    if rec.ab:
        text += f"; ab: {rec.ab.failed} failed"
        text += (f", longest wait {rec.ab.longest_ms:,.0f} ms" if rec.ab.longest_ms is not None
                 else ", no longest wait (ab printed no percentile table)")
    if not rec.ok:
        # The checkpoint worked but the clients saw failures: the run does not count.
        text += f" -- FAILED at {rec.stage}: {rec.error}"
    return text


def render(env: Env, res: BenchResults) -> None:
    from orthros_py.bench.netlock.report import fmt_failed, fmt_range

    table = Table(title="dump and restore of nginx (medians over ok runs, ms)",
                  title_justify="left")
    for col in ("conns", "method", "ok", "dump", "criu", "lock", "restore", "criu", "lock",
                "dump+restore"):
        table.add_column(col, justify="left" if col == "method" else "right")
    cells = res.cells
    for conc in sorted({c.concurrency for c in cells}):
        for c in (c for c in cells if c.concurrency == conc):
            style = "red" if c.ok < c.runs else None
            table.add_row(f"{conc:,}", c.method, f"{c.ok}/{c.runs}", fmt_ms(c.dump_total_ms),
                          fmt_ms(c.dump_criu_ms), fmt_ms(c.dump_lock_ms),
                          fmt_ms(c.restore_total_ms), fmt_ms(c.restore_criu_ms),
                          fmt_ms(c.restore_lock_ms), fmt_ms(c.sum_ms), style=style)
        p = PAPER.get(conc)
        if p is not None:
            table.add_row(f"{conc:,}", "paper: iptables", "", fmt_ms(p.dump_total),
                          fmt_ms(p.dump_criu), fmt_ms(p.dump_lock), fmt_ms(p.restore_total),
                          fmt_ms(p.restore_criu), fmt_ms(p.restore_lock), fmt_ms(p.total),
                          style="dim italic")
        table.add_section()
    wide = _wide(env)
    wide.print(table)
    # What the clients waited through (window) apart from what the operator waits (wall =
    # before + window + after): median (min-max) over the ok runs.
    wt = Table(title="lock window and longest client wait (median (min-max) over ok runs, ms)",
               title_justify="left")
    for col in ("conns", "method", "ok", "failed", "window", "before", "after", "wall",
                "longest wait", "ab failed"):
        wt.add_column(col, justify="left" if col == "method" else "right")
    last = None
    for c in cells:
        if last is not None and c.concurrency != last:
            wt.add_section()
        last = c.concurrency
        wt.add_row(f"{c.concurrency:,}", c.method, f"{c.ok}/{c.runs}", fmt_failed(c),
                   fmt_range(c.window_ms, c.window_min_ms, c.window_max_ms),
                   fmt_ms(c.before_ms), fmt_ms(c.after_ms),
                   fmt_range(c.wall_ms, c.wall_min_ms, c.wall_max_ms),
                   fmt_range(c.ab_longest_ms, c.ab_longest_min_ms, c.ab_longest_max_ms, 0),
                   str(c.ab_failed) + (f" ({c.ab_aborted} gave up)" if c.ab_aborted else ""),
                   style="red" if c.ok < c.runs else None)
    wide.print(wt)
    rt = Table(title="xdp against iptables and none (dump + restore)", title_justify="left")
    for col in ("conns", "xdp", "iptables", "none", "xdp : iptables", "xdp : none"):
        rt.add_column(col, justify="right")
    for r in res.ratios:
        rt.add_row(f"{r.concurrency:,}", fmt_ms(r.xdp_ms), fmt_ms(r.iptables_ms),
                   fmt_ms(r.none_ms), fmt_ratio(r.xdp_iptables), fmt_ratio(r.xdp_none))
    wide.print(rt)
    ct = Table(title="xdp against none: what the clients waited (medians over ok runs, ms)",
               title_justify="left")
    for col in ("conns", "window xdp", "window none", "xdp : none", "longest wait xdp",
                "longest wait none", "xdp : none"):
        ct.add_column(col, justify="right")
    for r in res.ratios:
        ct.add_row(f"{r.concurrency:,}", fmt_ms(r.xdp_window_ms), fmt_ms(r.none_window_ms),
                   fmt_ratio(r.window_xdp_none), fmt_ms(r.xdp_longest_ms, 0),
                   fmt_ms(r.none_longest_ms, 0), fmt_ratio(r.longest_xdp_none))
    wide.print(ct)
    if res.micro:
        m = res.micro
        env.console.print(f"XDP map alone: lock {m.conns:,} connections {m.lock_ms:.3f} ms, "
                          f"unlock {m.unlock_ms:.3f} ms (median of {m.reps}); lock + unlock "
                          f"{m.round_best_ms:.3f} ms (best of {m.reps})")
    # One line per failed run (left out of the medians and ratios).
    for c in cells:
        for e in c.failures:
            env.console.print(f"[red]{c.concurrency} conns, {c.method}, {escape(e)}[/]",
                              soft_wrap=True)
    for n in res.notes:
        env.console.print(f"[dim]note: {escape(n)}[/]", soft_wrap=True)


def _socket_counts(text: str) -> tuple[int, ...]:
    counts = tuple(int(x) for x in text.split(",") if x.strip())
    if not counts or min(counts) < 1:
        raise ValueError("give socket counts like 500,5000")
    return counts


@bench.command("container")
@click.option("--sockets", type=_ListOf("LIST", _socket_counts), default="500,4980",
              show_default=True,
              help="UNIX sockets each of the two processes accepts from the other, per run "
                   "(4,980 is the most CRIU restores under this host's fixed RLIMIT_NOFILE of "
                   "20,000).")
@click.option("--reps", type=click.IntRange(1), default=5, show_default=True,
              help="Repetitions; each migrates twice (CRIU log level 4 for the parts, 2 for "
                   "the whole), alternating directions.")
@click.option("--hierarchy", type=click.Choice(["v1", "v2"]), default="v1", show_default=True,
              help="Where the container's limits live: cgroup v1 (cpuset cores and cpu "
                   "quota) or cgroup v2.")
@click.option("--interval", type=click.FloatRange(0), default=0.02, show_default=True,
              help="The workload's pause between two rounds of messages.")
@click.option("--favordynmods", is_flag=True,
              help="Mount cgroup v2 with favordynmods for the run (put back afterwards): task "
                   "moves into cgroups then skip an RCU grace period, forks and exits pay.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: results/container-<timestamp>].")
@click.option("--from-json", "from_json", type=click.Path(exists=True, path_type=Path),
              default=None, help="Measure nothing: render an earlier results.json again.")
@click.pass_obj
def container(env: Env, sockets: tuple[int, ...], reps: int, hierarchy: str, interval: float,
              favordynmods: bool, out: Path | None, from_json: Path | None) -> None:
    """Migrate the Orthros paper's container workload between the lab's hosts and time each
    part of it (seed 000's table): cgroups, namespaces, UNIX sockets, the whole.

    Needs root. Builds the lab and tears it down, also on Ctrl-C.
    """
    import time as _time

    from orthros_py.bench import container as cb

    if from_json is not None:
        runs, meta = cb.load_runs(from_json)
        made = cb.write_outputs(runs, meta, from_json.parent)
    else:
        cfg = cb.BenchConfig(sockets=sockets, reps=reps, hierarchy=hierarchy, interval=interval,
                             favordynmods=favordynmods)
        out = out or Path("results") / f"container-{_time.strftime('%Y%m%d-%H%M%S')}"
        meta = cb.meta_now(cfg)
        env.console.print(f"[bold]container benchmark[/]: {reps} x 2 migrations at "
                          f"{', '.join(map(str, sockets))} sockets per process -> "
                          f"{escape(str(out))}")
        bench_ = cb.ContainerBench(cfg, out, progress=lambda m: env.console.print(
            escape(m), soft_wrap=True))
        try:
            with _term_as_interrupt():
                runs = bench_.run()
        finally:
            made = cb.write_outputs(bench_.runs, meta, out)
    render_container(env, runs)
    _say_files(env, made)
    if any(not r.ok for r in runs):
        raise SystemExit(1)


def _run_bench(env: Env, bench_: Any, render: Any, out: Path, as_json: bool) -> None:
    """Run a lab benchmark (SIGTERM as an interrupt: its results are written however it
    ends), render its tables, list its files, and exit 1 if a run in it failed."""
    with _term_as_interrupt():
        res = bench_.run()
    render(env, res)
    _say_files(env, sorted(out.glob("*.*")))
    if res.wall_s is not None:
        env.console.print(f"took {res.wall_s / 60:.1f} min (seed {res.seed})")
    if as_json:
        env.emit_json(json.loads((out / "results.json").read_text()))
    if not res.ok:
        raise SystemExit(1)


def render_container(env: Env, runs: list[Any]) -> None:
    from orthros_py.bench import container as cb

    sums = cb.summarize(runs)
    table = Table(title="container migration, part by part (medians, ms)", title_justify="left")
    table.add_column("part")
    table.add_column("paper", justify="right")
    for s in sums:
        table.add_column(f"{s.sockets:,} sockets", justify="right")
        table.add_column("share", justify="right")
    for row in cb.ROWS:
        cells = [cb.ROW_LABELS[row], fmt_ms(cb.PAPER_MS[row])]
        for s in sums:
            share = s.share(row)
            cells += [fmt_ms(s.medians.get(row)), "—" if share is None else f"{share:.1%}"]
        table.add_row(*cells)
    table.add_section()
    for key in ("cgroup orthros", "cgroup criu", "mounts", "downtime", "total"):
        cells = [f"[dim]{key}[/]", ""]
        for s in sums:
            cells += [f"[dim]{fmt_ms(s.detail.get(key))}[/]", ""]
        table.add_row(*cells)
    _wide(env).print(table)
    for s in sums:
        whole, cg = s.medians.get("whole"), s.medians.get("cgroup")
        if whole is not None and cg is not None:
            env.console.print(
                f"{s.sockets:,} sockets: whole {whole:,.1f} ms "
                f"({'under' if whole < cb.GOAL_WHOLE_MS else 'over'} the paper's "
                f"{cb.GOAL_WHOLE_MS} ms), cgroup part {cg:,.1f} ms "
                f"({'under' if cg < cb.GOAL_CGROUP_MS else 'over'} {cb.GOAL_CGROUP_MS:g} ms)")


def _wide(env: Env) -> Console:
    """The tables have twelve columns: on a log file (no terminal to size them by) rich's
    default of 80 would cut every number short."""
    if env.console.is_terminal:
        return env.console
    return Console(file=env.stderr, width=WIDE, highlight=False)


def _say_files(env: Env, paths: list[Path]) -> None:
    for p in paths:
        env.console.print(f"wrote {escape(str(p))}")


# --- orthros bench pair ------------------------------------------------------------------------


def _intervals(text: str) -> tuple[int, ...]:
    from orthros_py.bench.pair.model import parse_intervals

    return parse_intervals(text)


@bench.command("pair")
@click.option("--intervals", type=_ListOf("LIST", _intervals), default="50,100,200,500,1000",
              show_default=True, help="Checkpoint intervals of the paired arms, in ms.")
@click.option("--reps", type=click.IntRange(1), default=3, show_default=True,
              help="Rounds of the throughput runs; each round runs every arm once, in an "
                   "order shuffled by --seed.")
@click.option("--requests", type=click.IntRange(100), default=100_000, show_default=True,
              help="redis-benchmark requests per test (SET, GET); output commit runs use fewer "
                   "(about --oc-seconds of checkpoints).")
@click.option("--clients", type=click.IntRange(1, 5000), default=50, show_default=True,
              help="redis-benchmark connections (-c); pipelining is off (-P 1).")
@click.option("--keyspace", type=click.IntRange(1), default=100_000, show_default=True,
              help="Keys the SETs spread over (redis-benchmark -r).")
@click.option("--oc-seconds", type=click.FloatRange(0.1), default=3.0, show_default=True,
              help="How long an output commit run lasts per test, about.")
@click.option("--death-reps", type=click.IntRange(0), default=3, show_default=True,
              help="Deaths of the active per mode (with and without output commit).")
@click.option("--death-interval", "death_interval_ms", type=click.IntRange(10), default=200,
              show_default=True, help="Checkpoint interval of the pairs that die (ms).")
@click.option("--heartbeat", "heartbeat_ms", type=click.IntRange(10, 10_000), default=100,
              show_default=True, help="The standby's heartbeat in the deaths (ms).")
@click.option("--misses", type=click.IntRange(2, 100), default=3, show_default=True,
              help="Missed heartbeats before the standby asks the witness.")
@click.option("--memory-mib", type=click.IntRange(0), default=256, show_default=True,
              help="Fill redis with this much for the bytes-per-checkpoint experiment "
                   "(0: skip it).")
@click.option("--write-mib", type=click.IntRange(1, 1024), default=10, show_default=True,
              help="Written between two checkpoints in that experiment.")
@click.option("--skip-throughput", is_flag=True, help="Skip the throughput runs.")
@click.option("--skip-death", is_flag=True, help="Skip the deaths.")
@click.option("--seed", type=int, default=None,
              help="Seed of the arms' order [default: a random one, recorded].")
@click.option("--port", type=click.IntRange(1, 65535), default=6379, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: results/pair-<timestamp>].")
@click.option("--from-json", "from_json", type=click.Path(exists=True, path_type=Path),
              default=None, help="Measure nothing: render an earlier results.json again "
                                 "(markdown, plots, tables) into its directory.")
@click.option("--json", "as_json", is_flag=True, help="Also print results.json on stdout.")
@click.pass_obj
def pair(env: Env, intervals: tuple[int, ...], reps: int, requests: int, clients: int,
         keyspace: int, oc_seconds: float, death_reps: int, death_interval_ms: int,
         heartbeat_ms: int, misses: int, memory_mib: int, write_mib: int,
         skip_throughput: bool, skip_death: bool, seed: int | None, port: int,
         out: Path | None, from_json: Path | None, as_json: bool) -> None:
    """Protect redis with a standby host (``orthros pair``) and measure it on the lab: throughput
    and p50/p99 under redis-benchmark unprotected and paired at each interval with and without
    output commit (interleaved rounds), checkpoint cost (frozen time, bytes, full against
    incremental, bytes against memory written), and the time from the active's death to the
    first correct reply from the standby. Reports the issue's targets, met or not.

    Needs root. Builds a lab of three hosts and tears it down, also on Ctrl-C.
    """
    from orthros_py.bench import pair as pb

    if from_json is not None:
        res = pb.load_results(from_json)
        made = pb.write_outputs(res, from_json.parent)
        render_pair(env, res)
        _say_files(env, made)
        if as_json:
            env.emit_json(res.to_dict())
        return
    cfg = pb.BenchConfig(intervals=intervals, reps=reps, requests=requests, clients=clients,
                         keyspace=keyspace, oc_seconds=oc_seconds, death_reps=death_reps,
                         death_interval_ms=death_interval_ms, heartbeat_ms=heartbeat_ms,
                         misses=misses, memory_mib=memory_mib, write_mib=write_mib, seed=seed,
                         out=out or pb.default_out(), port=port,
                         skip_throughput=skip_throughput, skip_death=skip_death)
    n_arms = len(pb.arms(intervals))
    env.console.print(
        "[bold]pair benchmark[/]: "
        + ("" if skip_throughput else f"{reps} rounds x {n_arms} arms, ")
        + (f"memory {memory_mib} MiB, " if memory_mib else "")
        + ("" if skip_death else f"{death_reps} x 2 deaths, ")
        + f"-> {escape(str(cfg.out))}")

    def progress(msg: str) -> None:
        env.console.print(f"[dim]{escape(msg)}[/]", soft_wrap=True)

    def on_run(rec: Any, i: int, n: int) -> None:
        env.console.print(f"[{i}/{n}] {escape(pair_run_line(rec))}", soft_wrap=True)

    bench_ = pb.PairBench(cfg, progress=progress, on_run=on_run)
    with _term_as_interrupt():
        res = bench_.run()
    render_pair(env, res)
    _say_files(env, sorted(cfg.out.glob("*.*")))
    if res.wall_s is not None:
        env.console.print(f"took {res.wall_s / 60:.1f} min (seed {res.seed})")
    if as_json:
        env.emit_json(json.loads((cfg.out / "results.json").read_text()))
    if any(not r.ok for r in res.throughput) or any(not d.ok for d in res.deaths) or (
            res.memory is not None and not res.memory.ok):
        raise SystemExit(1)


def pair_run_line(rec: Any) -> str:
    from orthros_py.bench import pair as pb

    if isinstance(rec, pb.DeathRun):
        head = (f"death {rec.rep + 1} " + ("with" if rec.output_commit else "without")
                + " output commit:")
        if not rec.ok:
            return f"{head} FAILED: {rec.error}"
        ph = rec.phases()
        return (f"{head} serving after {fmt_ms(rec.death_to_serving_ms, 0)} ms (detect + "
                f"grant {fmt_ms(ph['detect + grant'], 0)}, fence {fmt_ms(ph['fence'], 0)}, "
                f"address {fmt_ms(ph['lock + address'], 0)}, restore "
                f"{fmt_ms(ph['restore'], 0)}, then reply {fmt_ms(ph['promoted -> reply'], 0)}"
                f"); generation {fmt_ms(rec.generation_age_ms, 0)} ms old; "
                f"{rec.acked_after_freeze} keys acked after its freeze, {rec.lost} missing")
    head = f"round {rec.round + 1} {rec.arm.label}:"
    if not rec.ok:
        return f"{head} FAILED: {rec.error}"
    parts = [f"{t} {rec.tests[t].rps:,.0f}/s p99 {fmt_ms(rec.tests[t].p99_ms, 3)} ms"
             for t in ("SET", "GET") if t in rec.tests]
    text = f"{head} " + ", ".join(parts)
    if rec.arm.paired:
        text += f"; {rec.generations} generations"
    return text


def render_pair(env: Env, res: Any) -> None:
    from orthros_py.bench import pair as pb

    wide = _wide(env)
    arms = res.arms
    if arms:
        t = Table(title="redis under redis-benchmark -P 1 (medians \\[min-max] over rounds)",
                  title_justify="left")
        for col in ("arm", "ok", "SET req/s", "SET ratio", "SET p50", "SET p99", "GET req/s",
                    "GET ratio", "GET p50", "GET p99"):
            t.add_column(col, justify="left" if col == "arm" else "right")
        for a in arms:
            cells = [a.arm.label, f"{a.ok}/{a.runs}"]
            for test in pb.TESTS:
                s = a.tests[test]
                cells += [pb.fmt_fig(s.rps, _int), pb.fmt_fig(s.ratio, _pct) if a.arm.paired
                          else "100%", pb.fmt_fig(s.p50_ms, _ms3), pb.fmt_fig(s.p99_ms, _ms3)]
            t.add_row(*cells, style="red" if a.ok < a.runs else None)
        wide.print(t)
        c = Table(title="checkpoints (medians \\[min-max]; full: generation 1; incremental: "
                        "under load)", title_justify="left")
        for col in ("arm", "full frozen ms", "full bytes", "incr frozen ms", "incr bytes",
                    "incr duration ms", "kept interval ms", "client retrans"):
            c.add_column(col, justify="left" if col == "arm" else "right")
        for a in arms:
            k = a.checkpoints
            if k is None:
                continue
            c.add_row(a.arm.label, pb.fmt_fig(k.full_frozen_ms), pb.fmt_fig(k.full_bytes,
                                                                             pb.fmt_bytes),
                      pb.fmt_fig(k.incr_frozen_ms), pb.fmt_fig(k.incr_bytes, pb.fmt_bytes),
                      pb.fmt_fig(k.incr_duration_ms), pb.fmt_fig(k.achieved_interval_ms, _int),
                      pb.fmt_fig(a.client_retrans, _int))
        wide.print(c)
    m = res.memory
    if m is not None:
        if m.ok:
            env.console.print(
                f"memory: {m.filled_mib} MiB filled (RSS {pb.fmt_bytes(m.rss_bytes)}): full "
                f"checkpoint {pb.fmt_bytes(m.full_bytes)}; incremental with nothing written "
                f"{pb.fmt_bytes(m.idle_bytes)}, with {pb.fmt_bytes(m.written_bytes)} written "
                f"{pb.fmt_bytes(m.written_bytes_sent)} ({m.bytes_per_written:.2f} x written)",
                soft_wrap=True)
        else:
            env.console.print(f"[red]memory experiment failed:[/] {escape(str(m.error))}")
    deaths = res.death_summaries
    if deaths:
        d = Table(title="death of the active to serving (ms, medians \\[min-max])",
                  title_justify="left")
        d.add_column("")
        for s in deaths:
            d.add_column("output commit" if s.output_commit else "no output commit",
                         justify="right")
        d.add_row("deaths ok", *(f"{s.ok}/{s.runs}" for s in deaths))
        d.add_row("death to serving", *(pb.fmt_fig(s.serving_ms, _int) for s in deaths),
                  style="bold")
        d.add_row("death to data", *(pb.fmt_fig(s.data_ms, _int) for s in deaths))
        for name in (deaths[0].phases or {}):
            d.add_row(f"  {name}", *(pb.fmt_fig(s.phases.get(name), _int) for s in deaths))
        d.add_row("generation age", *(pb.fmt_fig(s.generation_age_ms, _int) for s in deaths))
        d.add_row("keys acked after freeze", *(pb.fmt_fig(s.acked_after_freeze, _int)
                                               for s in deaths))
        d.add_row("acked keys missing", *(pb.fmt_fig(s.lost, _int) for s in deaths))
        wide.print(d)
    tg = Table(title="targets", title_justify="left")
    for col in ("target", "goal", "measured", "", "detail"):
        tg.add_column(col)
    for x in res.targets:
        mark = {True: "[green]met[/]", False: "[red]not met[/]", None: "[dim]—[/]"}[x.met]
        tg.add_row(escape(x.name), escape(x.goal), escape(x.value), mark, escape(x.detail))
    wide.print(tg)
    for n in res.notes:
        env.console.print(f"[dim]note: {escape(n)}[/]", soft_wrap=True)
    for a in arms:
        for e in a.errors:
            env.console.print(f"[red]{escape(a.arm.label)}:[/] {escape(e)}", soft_wrap=True)
    for s in deaths:
        for e in s.errors:
            env.console.print(f"[red]death {'with' if s.output_commit else 'without'} output "
                              f"commit:[/] {escape(e)}", soft_wrap=True)


def _int(v: float | None) -> str:
    return fmt_ms(v, 0)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def _ms3(v: float | None) -> str:
    return fmt_ms(v, 3)


# --- orthros bench lazy ------------------------------------------------------------------------


def _sizes(text: str) -> tuple[int, ...]:
    from orthros_py.bench.lazy.model import parse_sizes

    return parse_sizes(text)


def _lazy_methods(text: str) -> tuple[str, ...]:
    from orthros_py.bench.lazy.model import parse_methods

    return parse_methods(text)


def _fractions(text: str) -> tuple[float, ...]:
    from orthros_py.bench.lazy.paging import parse_fractions

    return parse_fractions(text)


@bench.command("lazy")
@click.option("--sizes", type=_ListOf("LIST", _sizes), default="256,1024,2048",
              show_default=True, help="Workload sizes in MiB (2g also works).")
@click.option("--reps", type=click.IntRange(1), default=3, show_default=True,
              help="Rounds per size; each round migrates once with every method, in an order "
                   "shuffled by --seed.")
@click.option("--methods", type=_ListOf("LIST", _lazy_methods),
              default="eager,precopy,lazy,precopy+lazy", show_default=True,
              help="Methods to compare (eager is the base of the ratios).")
@click.option("--hot-fraction", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Share of the workload's pages its worker keeps reading and writing.")
@click.option("--hot-layout", type=click.Choice(["first", "spread"]), default="first",
              show_default=True, help="The hot pages: the first ones, or spread evenly.")
@click.option("--rate", type=click.FloatRange(0), default=2000.0, show_default=True,
              help="Hot pages the worker visits a second (0: no limit).")
@click.option("--read-only-hot", is_flag=True,
              help="The worker only reads its hot pages (what write tracking misses).")
@click.option("--ping-rate", type=click.FloatRange(1), default=100.0, show_default=True,
              help="The client's PINGs a second.")
@click.option("--settle", "settle_s", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Seconds the client keeps measuring after migrate returns.")
@click.option("--seed", type=int, default=None,
              help="Seed of the methods' order [default: a random one, recorded].")
@click.option("--port", type=click.IntRange(1, 65535), default=7070, show_default=True)
@click.option("--no-warmup", is_flag=True, help="Skip the unrecorded first migration.")
@click.option("--paging-only", "--skip-migrations", "paging_only", is_flag=True,
              help="Only the paging standby's part (no migrations).")
@click.option("--skip-paging", is_flag=True,
              help="Only the migrations (no paging standby: a lab of two hosts).")
@click.option("--paging-sizes", type=_ListOf("LIST", _sizes), default="1024",
              show_default=True, help="Paging standby: workload sizes (MiB) of the memory "
                                      "against hot fraction runs.")
@click.option("--hot-fractions", type=_ListOf("LIST", _fractions), default="0.1,0.3,0.6",
              show_default=True, help="Paging standby: hot fractions of the memory runs.")
@click.option("--failover-sizes", type=_ListOf("LIST", _sizes), default="2048",
              show_default=True, help="Paging standby: workload sizes (MiB) of the failovers, "
                                      "paging against eager.")
@click.option("--failover-hot", type=click.FloatRange(0, 1, min_open=True), default=0.3,
              show_default=True, help="Paging standby: hot fraction of the failovers.")
@click.option("--paging-reps", type=click.IntRange(0), default=3, show_default=True,
              help="Failovers of each kind (paging, eager) per size, interleaved in an order "
                   "shuffled by --seed; 0: no failovers.")
@click.option("--no-read-only-check", is_flag=True,
              help="Skip the paging failover whose worker only reads its hot set.")
@click.option("--hot-window", "hot_window_s", type=click.FloatRange(0, min_open=True),
              default=20.0, show_default=True, help="Paging pairs' --hot-window, seconds.")
@click.option("--paging-interval", "paging_interval_s",
              type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="Paging and eager pairs' --interval, seconds.")
@click.option("--paging-rate", type=click.FloatRange(0), default=20000.0, show_default=True,
              help="Paging standby: hot pages the worker rewrites a second (the hot window "
                   "must see the whole hot set).")
@click.option("--paging-samples", type=click.IntRange(1), default=5, show_default=True,
              help="pair status samples per memory run.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: results/lazy-<timestamp>].")
@click.option("--from-json", "from_json", type=click.Path(exists=True, path_type=Path),
              default=None, help="Measure nothing: render an earlier results.json again "
                                 "(markdown, plots, tables) into its directory.")
@click.option("--json", "as_json", is_flag=True, help="Also print results.json on stdout.")
@click.pass_obj
def lazy(env: Env, sizes: tuple[int, ...], reps: int, methods: tuple[str, ...],
         hot_fraction: float, hot_layout: str, rate: float, read_only_hot: bool,
         ping_rate: float, settle_s: float, seed: int | None, port: int, no_warmup: bool,
         paging_only: bool, skip_paging: bool, paging_sizes: tuple[int, ...],
         hot_fractions: tuple[float, ...], failover_sizes: tuple[int, ...],
         failover_hot: float, paging_reps: int, no_read_only_check: bool,
         hot_window_s: float, paging_interval_s: float, paging_rate: float,
         paging_samples: int, out: Path | None, from_json: Path | None,
         as_json: bool) -> None:
    """Migrate a memory workload (``orthros_py.workloads.memhog``) of each size back and forth
    between two lab hosts, eagerly, with pre-copy rounds, lazily (post-copy) and with both,
    interleaved: downtime, the client's time to first response, total time until the source
    is free, bytes sent, pages faulted and pushed. Every migration must leave every page
    right (the workload's VERIFY). Reports lazy downtime against eager at 1 GiB and across
    sizes.

    Then the paging standby (``pair start --paging``): its memory against the hot fraction,
    and failovers of a paging pair against an eager one (time to the first response from the
    start of the standby's restore, time until every page is present), every page checked.

    Needs root. Builds a lab of three hosts (two with --skip-paging) and tears it down, also
    on Ctrl-C.
    """
    from orthros_py.bench import lazy as lb

    if from_json is not None:
        res = lb.load_results(from_json)
        made = lb.write_outputs(res, from_json.parent)
        render_lazy(env, res)
        _say_files(env, made)
        if as_json:
            env.emit_json(res.to_dict())
        return
    if paging_only and skip_paging:
        raise click.UsageError("--paging-only and --skip-paging leave nothing to run")
    cfg = lb.BenchConfig(sizes=sizes, reps=reps, methods=methods, hot_fraction=hot_fraction,
                         hot_layout=hot_layout, rate=rate, read_only_hot=read_only_hot,
                         ping_rate=ping_rate, settle_s=settle_s, seed=seed,
                         out=out or lb.default_out(), port=port, warmup=not no_warmup,
                         migrations=not paging_only, paging=not skip_paging,
                         paging_sizes=paging_sizes, hot_fractions=hot_fractions,
                         failover_sizes=failover_sizes, failover_hot=failover_hot,
                         paging_reps=paging_reps, read_only_check=not no_read_only_check,
                         hot_window_s=hot_window_s, paging_interval_s=paging_interval_s,
                         paging_rate=paging_rate, paging_samples=paging_samples)
    parts = []
    if cfg.migrations:
        parts.append(f"{reps} rounds x {len(methods)} methods at "
                     f"{', '.join(f'{s:,}' for s in sizes)} MiB")
    if cfg.paging:
        parts.append(f"paging standby: memory at {', '.join(f'{s:,}' for s in paging_sizes)} "
                     f"MiB x {len(hot_fractions)} hot fractions, {paging_reps} failovers of "
                     f"each kind at {', '.join(f'{s:,}' for s in failover_sizes)} MiB")
    env.console.print(f"[bold]lazy benchmark[/]: {'; '.join(parts)} -> {escape(str(cfg.out))}")

    def progress(msg: str) -> None:
        env.console.print(f"[dim]{escape(msg)}[/]", soft_wrap=True)

    def on_run(rec: Any, i: int, n: int) -> None:
        env.console.print(f"[{i}/{n}] {escape(lb.run_line(rec))}", soft_wrap=True,
                          style=None if rec.ok else "red")

    def on_paging(rec: Any, i: int, n: int) -> None:
        line = lb.failover_line(rec) if isinstance(rec, lb.FailoverRun) else \
            lb.memory_line(rec)
        env.console.print(f"[{i}/{n}] {escape(line)}", soft_wrap=True,
                          style=None if rec.ok else "red")

    bench_ = lb.LazyBench(cfg, progress=progress, on_run=on_run, on_paging=on_paging)
    _run_bench(env, bench_, render_lazy, cfg.out, as_json)


def render_lazy(env: Env, res: Any) -> None:
    from orthros_py.bench.lazy import model as lm

    wide = _wide(env)
    cells = res.cells
    for size in sorted({c.size_mib for c in cells}):
        mine = [c for c in cells if c.size_mib == size]
        t = Table(title=f"{size:,} MiB (medians \\[min-max])", title_justify="left")
        t.add_column("")
        for c in mine:
            t.add_column(c.method, justify="right")
        t.add_row("ok", *(f"{c.ok}/{c.runs}" for c in mine))
        for key, label, unit in lm.METRICS:
            t.add_row(label + (" ms" if unit == "ms" else ""),
                      *(lm.fmt_metric(c.figures[key], unit) for c in mine),
                      style="bold" if key == "downtime_ms" else None)
        t.add_row("downtime / eager",
                  *(_pct(c.ratios["downtime_ms"].median) if c.ratios else "100%"
                    for c in mine))
        wide.print(t)
    render_paging(env, res)
    tg = Table(title="targets", title_justify="left")
    for col in ("target", "goal", "measured", "", "detail"):
        tg.add_column(col)
    for x in res.targets:
        mark = {True: "[green]met[/]", False: "[red]not met[/]", None: "[dim]—[/]"}[x.met]
        tg.add_row(escape(x.name), escape(x.goal), escape(x.value), mark, escape(x.detail))
    wide.print(tg)
    for n in res.notes:
        env.console.print(f"[dim]note: {escape(n)}[/]", soft_wrap=True)
    for r in res.runs:
        if not r.ok:
            env.console.print(f"[red]{escape(lm.run_line(r))}[/]", soft_wrap=True)
    from orthros_py.bench.lazy import paging as lp

    for f in res.failovers:
        if not f.ok:
            env.console.print(f"[red]{escape(lp.failover_line(f))}[/]", soft_wrap=True)


def render_paging(env: Env, res: Any) -> None:
    """The paging standby's tables: memory against the hot fraction, failovers."""
    from orthros_py.bench.lazy import paging as lp
    from orthros_py.bench.pair.report import fmt_bytes, fmt_fig

    wide = _wide(env)
    mem = lp.summarize_memory(res.paging_memory)
    if mem:
        t = Table(title="paging standby: memory against the hot fraction (medians "
                        "\\[min-max] over the samples)", title_justify="left")
        for col in ("MiB", "hot", "worker", "samples", "hot set", "standby hot set", "memory",
                    "bound", "share", "tmpfs peak", "disk"):
            t.add_column(col, justify="left" if col == "worker" else "right")
        for s in mem:
            style = None if s.met is not False or s.read_only_hot else "red"
            t.add_row(f"{s.size_mib:,}", f"{s.hot_fraction:.0%}",
                      "reads" if s.read_only_hot else "writes", str(s.samples),
                      fmt_bytes(s.hot_set_bytes), fmt_fig(s.figures["hot_bytes"], fmt_bytes),
                      fmt_fig(s.memory, fmt_bytes), fmt_bytes(s.bound_bytes), _pct(s.share),
                      fmt_fig(s.figures["peak_tmpfs_bytes"], fmt_bytes),
                      fmt_fig(s.figures["disk_bytes"], fmt_bytes), style=style)
        wide.print(t)
    fo = lp.summarize_failovers(res.failovers)
    for size, frac in sorted({(x.size_mib, x.hot_fraction) for x in fo}):
        mine = [x for x in fo if (x.size_mib, x.hot_fraction) == (size, frac)]
        t = Table(title=f"failover at {size:,} MiB, {frac:.0%} hot (medians \\[min-max])",
                  title_justify="left")
        t.add_column("")
        for x in mine:
            t.add_column(x.label, justify="right")
        t.add_row("ok", *(f"{x.ok}/{x.runs}" for x in mine))
        for key, label, unit in lp.FAILOVER_METRICS:
            t.add_row(label + (" ms" if unit == "ms" else ""),
                      *(lp.fmt_failover(x.figures[key], unit) for x in mine),
                      style="bold" if key == "ttfr_ms" else None)
        t.add_row("first response / eager's",
                  *(_pct(x.ratio.median) if x.mode == lp.PAGING else "100%" for x in mine))
        wide.print(t)



# --- orthros bench sync ------------------------------------------------------------------------


def _heartbeats(text: str) -> tuple[int, ...]:
    from orthros_py.bench.sync.model import parse_heartbeats

    return parse_heartbeats(text)


def _staggers(text: str) -> tuple[int, ...]:
    from orthros_py.bench.sync.model import parse_staggers

    return parse_staggers(text)


@bench.command("sync")
@click.option("--heartbeats", type=_ListOf("LIST", _heartbeats), default=None,
              help="etcd heartbeat intervals (ms), one fresh cluster each, in this order. "
                   "[default: 1000,300,100,50,20; --quick: 100]")
@click.option("--reps", type=click.IntRange(1), default=None,
              help="Rounds per heartbeat (save left running, writes, restore). "
                   "[default: 5; --quick: 2]")
@click.option("--staggers", type=_ListOf("LIST", _staggers), default=None,
              help="The control: restores whose members resume this far apart (ms). "
                   "[default: 0,50,200,400,1000; --quick: 0,1000]")
@click.option("--stagger-reps", type=click.IntRange(0), default=None,
              help="Rounds of the stagger sweep, every stagger once per round in a shuffled "
                   "order; 0: no stagger sweep. [default: 3; --quick: 1]")
@click.option("--stagger-heartbeat", "stagger_heartbeat_ms", type=click.IntRange(1, 10_000),
              default=100, show_default=True, help="Heartbeat (ms) of the stagger sweep.")
@click.option("--election-factor", type=click.FloatRange(5.0), default=5.0,
              show_default=True, help="Election timeout = this x heartbeat (etcd needs >= 5).")
@click.option("--write-seconds", "write_s", type=click.FloatRange(0), default=0.5,
              show_default=True, help="How long the writer writes between a save and its "
                                      "restore (at least two election timeouts).")
@click.option("--settle", "settle_s", type=click.FloatRange(0), default=1.0, show_default=True,
              help="When the cluster is looked at again after a restore, seconds (at least "
                   "two election timeouts).")
@click.option("--volume-mib", type=click.IntRange(256), default=2048, show_default=True,
              help="Size of the sparse btrfs volume the data directories live on.")
@click.option("--seed", type=int, default=None,
              help="Seed of the staggers' order [default: a random one, recorded].")
@click.option("--quick", is_flag=True,
              help="A short run: heartbeat 100 ms, 2 rounds, staggers 0 and 1000 once "
                   "(options given explicitly win).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: results/sync-<timestamp>].")
@click.option("--from-json", "from_json", type=click.Path(exists=True, path_type=Path),
              default=None, help="Measure nothing: render an earlier results.json again "
                                 "(markdown, plots, tables) into its directory.")
@click.option("--json", "as_json", is_flag=True, help="Also print results.json on stdout.")
@click.pass_obj
def sync(env: Env, heartbeats: tuple[int, ...] | None, reps: int | None,
         staggers: tuple[int, ...] | None, stagger_reps: int | None, stagger_heartbeat_ms: int,
         election_factor: float, write_s: float, settle_s: float, volume_mib: int,
         seed: int | None, quick: bool, out: Path | None, from_json: Path | None,
         as_json: bool) -> None:
    """Save and restore a 3-member etcd cluster (``orthros sync``) under a writer, on the lab:
    per heartbeat interval a fresh cluster and rounds of a save left running and a restore,
    each checked for an election (the raft term grew, or another leader); the times, the
    freeze and resume skews, the snapshot sizes, the writer's longest gap. Reports the
    shortest heartbeat at which every round went without an election. Then the control:
    restores whose members resume a stagger apart, and the elections that follow.

    Needs root. Mounts a btrfs volume under /var/lib/orthros, builds a lab of three hosts,
    and leaves none of it behind (etcd, snapshots, lab, volume), also on Ctrl-C.
    """
    from orthros_py.bench import sync as sb

    if from_json is not None:
        res = sb.load_results(from_json)
        made = sb.write_outputs(res, from_json.parent)
        render_sync(env, res)
        _say_files(env, made)
        if as_json:
            env.emit_json(res.to_dict())
        return
    try:
        cfg = sb.config_for(quick=quick, heartbeats=heartbeats, reps=reps, staggers=staggers,
                            stagger_reps=stagger_reps, stagger_heartbeat_ms=stagger_heartbeat_ms,
                            election_factor=election_factor, write_s=write_s,
                            settle_s=settle_s, volume_mib=volume_mib, seed=seed,
                            out=out or sb.default_out())
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    n_rounds = len(sb.plan(cfg, 0))
    env.console.print(
        f"[bold]sync benchmark[/]: {n_rounds} rounds (heartbeats "
        f"{', '.join(map(str, cfg.heartbeats))} ms x {cfg.reps}"
        + (f"; staggers {', '.join(map(str, cfg.staggers))} ms x {cfg.stagger_reps} at "
           f"{cfg.stagger_heartbeat_ms} ms" if cfg.stagger_reps else "")
        + f") -> {escape(str(cfg.out))}")

    def progress(msg: str) -> None:
        env.console.print(f"[dim]{escape(msg)}[/]", soft_wrap=True)

    def on_round(rec: Any, i: int, n: int) -> None:
        env.console.print(f"[{i}/{n}] {escape(sb.round_line(rec))}", soft_wrap=True,
                          style=None if rec.ok else "red")

    bench_ = sb.SyncBench(cfg, progress=progress, on_round=on_round)
    _run_bench(env, bench_, render_sync, cfg.out, as_json)


def render_sync(env: Env, res: Any) -> None:
    from orthros_py.bench.pair.report import fmt_bytes, fmt_fig
    from orthros_py.bench.sync.report import fig, fmt_by_leader, fmt_s, fmt_us

    wide = _wide(env)
    hbs = res.heartbeats
    if hbs:
        t = Table(title="heartbeat sweep: save --leave-running, writes, restore (medians "
                        "\\[min-max] over rounds)", title_justify="left")
        for col in ("heartbeat", "election", "ok", "no election", "el. save", "el. restore",
                    "save ms", "restore ms", "frozen ms", "freeze skew µs",
                    "resume skew µs", "clock err µs", "gap restore s", "snapshot"):
            t.add_column(col, justify="right")
        for s in hbs:
            style = None if s.all_survived else "red"
            t.add_row(f"{s.heartbeat_ms:,} ms", f"{s.election_ms:,} ms", f"{s.ok}/{s.rounds}",
                      f"{s.survived}/{s.rounds}", str(s.save_elections),
                      str(s.restore_elections), fig(s, "save_ms"), fig(s, "restore_ms"),
                      fig(s, "frozen_ms"), fig(s, "freeze_skew_us", fmt_us),
                      fig(s, "resume_skew_us", fmt_us),
                      fig(s, "restore_clock_error_us", fmt_us), fig(s, "gap_restore_s", fmt_s),
                      fig(s, "image_bytes", fmt_bytes), style=style)
        wide.print(t)
    sts = res.staggers
    if sts:
        t = Table(title=f"stagger sweep at heartbeat {res.config.stagger_heartbeat_ms} ms: "
                        "members resumed a stagger apart", title_justify="left")
        for col in ("stagger", "ok", "elections", "by leader's turn", "campaigns",
                    "term growth", "healthy at once", "healthy again after s",
                    "resume spread µs", "gap restore s"):
            t.add_column(col, justify="right")
        for s in sts:
            t.add_row(f"{s.stagger_ms:,} ms", f"{s.ok}/{s.rounds}",
                      f"{s.restore_elections}/{s.ok}", fmt_by_leader(s),
                      fmt_fig(s.campaigns, _int), fmt_fig(s.term_growth, _int),
                      f"{s.healthy_at_once}/{s.ok}", fmt_fig(s.recovered_s, fmt_s),
                      fig(s, "resume_skew_us", fmt_us), fig(s, "gap_restore_s", fmt_s))
        wide.print(t)
    env.console.print(f"[bold]{escape(res.headline)}[/]", soft_wrap=True)
    tg = Table(title="targets", title_justify="left")
    for col in ("target", "goal", "measured", "", "detail"):
        tg.add_column(col)
    for x in res.targets:
        mark = {True: "[green]met[/]", False: "[red]not met[/]", None: "[dim]—[/]"}[x.met]
        tg.add_row(escape(x.name), escape(x.goal), escape(x.value), mark, escape(x.detail))
    wide.print(tg)
    for n in res.notes:
        env.console.print(f"[dim]note: {escape(n)}[/]", soft_wrap=True)
    for x in res.leftovers:
        env.console.print(f"[yellow]cleanup:[/] {escape(x)}", soft_wrap=True)
    for s in [*hbs, *sts]:
        for e in s.errors:
            env.console.print(f"[red]{escape(e)}[/]", soft_wrap=True)


COMMANDS = [bench]


# --- orthros bench migrate ---------------------------------------------------------------------


def _workloads(text: str) -> tuple[str, ...]:
    from orthros_py.bench.migrate.model import parse_workloads

    return parse_workloads(text)


def _arms(text: str) -> tuple[str, ...]:
    from orthros_py.bench.migrate.model import parse_arms

    return parse_arms(text)


@bench.command("migrate")
@click.option("--reps", type=click.IntRange(1), default=7, show_default=True,
              help="Repetitions per workload; each runs every arm once, in an order shuffled "
                   "by --seed.")
@click.option("--workloads", type=_ListOf("LIST", _workloads), default="echo,nginx",
              show_default=True, help="echo (the echo service under its clients), nginx "
                                      "(under wrk).")
@click.option("--arms", type=_ListOf("LIST", _arms), default="orthros,criu",
              show_default=True, help="orthros (orthros migrate to the other host), criu (CRIU "
                                      "alone: dump and restore on the host, no lock).")
@click.option("--clients", "echo_clients", type=click.IntRange(1, 5000), default=200,
              show_default=True, help="Connections of the echo clients (the targets are for "
                                      "200).")
@click.option("--connections", "nginx_conns", type=click.IntRange(1, 20_000), default=1500,
              show_default=True, help="wrk's connections to nginx (-c).")
@click.option("--wrk-threads", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--ballast-mb", "echo_ballast_mb", type=click.IntRange(0), default=0,
              show_default=True, help="Memory the echo server holds besides its own.")
@click.option("--warm", "warm_s", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Seconds the clients run before the migration.")
@click.option("--settle", "settle_s", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Seconds the clients run after it.")
@click.option("--no-warmup", is_flag=True,
              help="Skip the unrecorded first run of each arm (which builds the XDP lock).")
@click.option("--seed", type=int, default=None,
              help="Seed of the arms' order [default: a random one, recorded].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: results/migrate-<timestamp>].")
@click.option("--from-json", "from_json", type=click.Path(exists=True, path_type=Path),
              default=None, help="Measure nothing: render an earlier results.json again "
                                 "(markdown, plots, tables) into its directory.")
@click.option("--json", "as_json", is_flag=True, help="Also print results.json on stdout.")
@click.pass_obj
def migrate(env: Env, reps: int, workloads: tuple[str, ...], arms: tuple[str, ...],
            echo_clients: int, nginx_conns: int, wrk_threads: int, echo_ballast_mb: int,
            warm_s: float, settle_s: float, no_warmup: bool, seed: int | None,
            out: Path | None, from_json: Path | None, as_json: bool) -> None:
    """orthros's own overhead: the echo service under its clients and nginx under wrk,
    migrated between the lab's hosts by ``orthros migrate``, interleaved with CRIU alone (a
    dump and a restore of the same kind of tree through CRIU's RPC, no lock, nothing of
    orthros around them). Per run the downtime, CRIU's frozen time and restore, orthros's
    share, the clients' longest wait and failures; the ratio of orthros's downtime to CRIU's
    own dump and restore; the issue's targets, met or not.

    Needs root. Builds a lab of two hosts and tears it down, also on Ctrl-C.
    """
    from orthros_py.bench import migrate as mb

    if from_json is not None:
        res = mb.load_results(from_json)
        made = mb.write_outputs(res, from_json.parent)
        render_migrate(env, res)
        _say_files(env, made)
        if as_json:
            env.emit_json(res.to_dict())
        return
    try:
        cfg = mb.BenchConfig(reps=reps, workloads=workloads, arms=arms,
                             echo_clients=echo_clients, nginx_conns=nginx_conns,
                             wrk_threads=wrk_threads, echo_ballast_mb=echo_ballast_mb,
                             warm_s=warm_s, settle_s=settle_s, warmup=not no_warmup, seed=seed,
                             out=out or mb.default_out())
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    env.console.print(
        f"[bold]migrate benchmark[/]: {len(workloads) * reps * len(arms)} runs ("
        + ", ".join(mb.workload_title(mb.BenchResults(cfg), w) for w in workloads)
        + f"; {' and '.join(mb.ARM_LABELS[a] for a in arms)}, {reps} repetitions) -> "
        f"{escape(str(cfg.out))}")

    def progress(msg: str) -> None:
        env.console.print(f"[dim]{escape(msg)}[/]", soft_wrap=True)

    def on_run(rec: Any, i: int, n: int) -> None:
        style = "red" if not rec.ok else "yellow" if rec.clients_failed else None
        env.console.print(f"[{i}/{n}] {escape(mb.run_line(rec))}", soft_wrap=True,
                          style=style)

    bench_ = mb.MigrateBench(cfg, progress=progress, on_run=on_run)
    _run_bench(env, bench_, render_migrate, cfg.out, as_json)


def render_migrate(env: Env, res: Any) -> None:
    from orthros_py.bench import migrate as mb
    from orthros_py.bench.pair.report import fmt_fig

    wide = _wide(env)
    cells = res.cells
    if cells:
        t = Table(title="orthros migrate against CRIU alone (ms, medians \\[min-max] over the "
                        "runs counted)", title_justify="left")
        for col in ("workload", "arm", "counted", "clients failed", "downtime", "CRIU",
                    "share", "longest wait", "wait / downtime"):
            t.add_column(col, justify="left" if col in ("workload", "arm") else "right")
        for w in res.config.workloads:
            mine = sorted((c for c in cells if c.workload == w),
                          key=lambda c: mb.ARMS.index(c.arm))
            for c in mine:
                f = c.figures
                # Short: the five figure columns with their ranges need the width.
                t.add_row(f"{w} x{res.config.clients_of(w):,}", c.label, f"{c.ok}/{c.runs}",
                          f"{c.clients_failed}/{c.runs}",
                          *(fmt_fig(f[k], _int) for k in (
                              "downtime_ms", "criu_ms", "share_ms", "longest_wait_ms")),
                          mb.fmt_metric(f["wait_ratio"], "wait_ratio"),
                          style="red" if c.ok < c.runs else None)
            if mine:
                t.add_section()
        wide.print(t)
        for comp in res.comparisons:
            env.console.print(escape(mb.fmt_comparison(comp)), soft_wrap=True)
    tg = Table(title="targets", title_justify="left")
    for col in ("target", "goal", "measured", "", "detail"):
        tg.add_column(col)
    for x in res.targets:
        mark = {True: "[green]met[/]", False: "[red]not met[/]", None: "[dim]—[/]"}[x.met]
        tg.add_row(escape(x.name), escape(x.goal), escape(x.value), mark, escape(x.detail))
    wide.print(tg)
    for n in res.notes:
        env.console.print(f"[dim]note: {escape(n)}[/]", soft_wrap=True)
    for x in res.leftovers:
        env.console.print(f"[yellow]cleanup:[/] {escape(x)}", soft_wrap=True)
    for r in res.runs:
        if not r.ok:
            env.console.print(f"[red]{escape(mb.run_line(r))}[/]", soft_wrap=True)
        elif r.clients_failed:
            env.console.print(f"[yellow]{escape(mb.run_line(r))}[/]", soft_wrap=True)
