"""``orthros pair start|status|stop`` and ``orthros failover``: the policy
``orthros_py.policies.pair`` with the inventory's agents as transport, rendered with rich on
stderr or, with ``--json``, as data on stdout."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape
from rich.table import Table

from orthros_py.cli.context import Env
from orthros_py.cli.hosts import inventory_option, journal_option, key_option

if TYPE_CHECKING:
    from orthros_py.cluster import Cluster
    from orthros_py.policies.hosts import Host
    from orthros_py.policies.pair import PairView


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    from orthros_py.agent.pair.guard import parse_duration
    from orthros_py.errors import OrthrosError

    try:
        return float(parse_duration(value))
    except (OrthrosError, ValueError) as err:
        raise click.BadParameter(str(getattr(err, "msg", err))) from err


def _hosts(cluster: Cluster) -> list[Host]:
    from orthros_py.policies.hosts import Host

    return [Host.of(cluster, n) for n in cluster.hosts]


def _lab_fence(cluster: Cluster, host: str) -> dict[str, str] | None:
    """Where the inventory names no fence for ``host`` but it is a lab host: the lab's own
    fence, which cuts the host's link on the bridge from outside."""
    try:
        inv_host = cluster.inventory.host(host)
    except Exception:
        return None
    fence = getattr(inv_host, "fence", None)
    if fence:
        return dict(fence)
    try:
        from orthros_py.lab import Lab

        lab = Lab.find(cluster.inventory)
    except Exception:
        return None
    if lab is None or not lab.bridge_netns:
        return None
    return {"agent": "lab", "netns": lab.bridge_netns, "ifname": f"b-{host}"}


@click.group()
def pair() -> None:
    """Protect a live service with a standby host that keeps a fresh replica of it."""


@pair.command("start")
@click.argument("pid", type=click.IntRange(min=2))
@click.option("--from", "source", required=True, metavar="HOST",
              help="The host the tree runs on (PID is a pid there): the active.")
@click.option("--to", "dest", required=True, metavar="HOST", help="The standby host.")
@click.option("--name", default=None, help="The pair's name [default: COMMAND-PID].")
@click.option("--interval", default="200ms", show_default=True, callback=_duration,
              help="Time between the starts of two checkpoints.")
@click.option("--keep", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Committed generations the standby keeps (older ones are merged in).")
@click.option("--service-ip", default=None, metavar="IP",
              help="The service address the standby takes at a failover [default: the "
                   "inventory's service address the active holds].")
@click.option("--output-commit", is_flag=True,
              help="Hold the packets the tree sends until the checkpoint that produced them is "
                   "on the standby: a failover then keeps every connection as clients saw it "
                   "(costs up to one interval of latency per reply).")
@click.option("--failover", "auto_failover", is_flag=True,
              help="The standby takes over by itself when the active misses heartbeats "
                   "(needs a witness).")
@click.option("--heartbeat", default="100ms", show_default=True, callback=_duration,
              help="How often the standby checks the active.")
@click.option("--misses", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Missed heartbeats before the standby asks the witness to take over.")
@click.option("--witness", default=None, metavar="HOST",
              help="The third host that breaks ties [default: the inventory's witness, else "
                   "the first other host whose agent answers].")
@click.option("--paging", is_flag=True,
              help="The standby keeps in memory only the pages the tree wrote within the hot "
                   "window (a tmpfs), the rest on disk; a failover restores with lazy pages: "
                   "the hot ones before the tree resumes, the cold ones on fault and in the "
                   "background. Pages only read count as cold.")
@click.option("--hot-window", default="30s", show_default=True, callback=_duration,
              help="With --paging: how recently a page must have been written to be hot.")
@click.option("--shell-job", is_flag=True, help="The tree was started from a shell.")
@click.option("--file-locks", is_flag=True, help="The tree holds file locks (CRIU's option).")
@inventory_option
@key_option
@click.option("--json", "as_json", is_flag=True, help="Print the pair's record as JSON.")
@click.pass_obj
def pair_start(env: Env, pid: int, source: str, dest: str, name: str | None,
               interval: float, keep: int, service_ip: str | None, output_commit: bool,
               auto_failover: bool, heartbeat: float, misses: int, witness: str | None,
               paging: bool, hot_window: float, shell_job: bool, file_locks: bool,
               inventory: Path | None,
               key_path: Path | None, as_json: bool) -> None:
    """Start protecting the live tree of PID on one host with another as its standby; prints
    the pair's name once the first generation is committed there."""
    from orthros_py.cluster import Cluster
    from orthros_py.policies.hosts import Host
    from orthros_py.policies.pair import PairOptions, start

    cluster = Cluster.load(inventory, key_path)
    active, standby = Host.of(cluster, source), Host.of(cluster, dest)
    others = [h for h in _hosts(cluster) if h.name not in (source, dest)]
    opts = PairOptions(name=name, interval=interval, keep=keep, service_ip=service_ip,
                       output_commit=output_commit, failover=auto_failover,
                       heartbeat=heartbeat, misses=misses, witness=witness,
                       paging=paging, hot_window=hot_window,
                       shell_job=shell_job, file_locks=file_locks,
                       fence=_lab_fence(cluster, source) if auto_failover else None)
    if not as_json:
        env.console.print(f"pairing pid {pid} on [bold]{source}[/] with [bold]{dest}[/] "
                          "(first checkpoint...)")
    rec = start(active, standby, pid, opts, others=others,
                inventory_witness=getattr(cluster.inventory, "witness", None),
                candidates=cluster.candidates(source, dest))
    if as_json:
        env.emit_json(rec)
        return
    cfg = rec["config"]
    click.echo(cfg["name"])
    env.console.print(
        f"[green]pair {cfg['name']}[/]: {source} -> {dest}, every "
        f"{cfg['interval'] * 1000:.0f} ms, keeps {cfg['keep']}; "
        + (f"witness {cfg['witness']['name']}; " if cfg.get("witness") else "")
        + ("automatic failover; " if cfg["failover"] else "")
        + ("output commit; " if cfg["output_commit"] else "")
        + (f"paging (hot window {cfg.get('hot_window', 30.0):g} s); " if cfg.get("paging")
           else "")
        + f"{rec.get('tracking') or ''}")


@pair.command("status")
@click.argument("name", required=False)
@inventory_option
@key_option
@click.option("--json", "as_json", is_flag=True, help="Print the pairs as JSON.")
@click.pass_obj
def pair_status(env: Env, name: str | None, inventory: Path | None, key_path: Path | None,
                as_json: bool) -> None:
    """Every pair (or NAME): hosts, state, the newest generation and its age, checkpoints,
    the standby's storage, heartbeats."""
    from orthros_py.cluster import Cluster
    from orthros_py.policies.pair import status

    views = status(_hosts(Cluster.load(inventory, key_path)), name)
    if as_json:
        env.emit_json([v.to_dict() for v in views])
        return
    if not views:
        env.console.print("no pairs")
    for v in views:
        render_view(env, v)


def render_view(env: Env, v: PairView) -> None:
    con = env.console
    color = {"replicating": "green", "failed over": "yellow"}.get(v.state, "red")
    hosts = ", ".join(f"{r} {h}" for r, h in v.hosts.items())
    con.print(f"[bold]{escape(v.name)}[/] [{color}]{escape(v.state)}[/]"
              + (f" ({escape(v.reason)})" if v.reason else "") + f" - {escape(hosts)}; "
              f"epoch {v.epoch}" + (f"; serving on {v.serving}" if v.serving else ""))
    age = "-" if v.generation_age_s is None else f"{v.generation_age_s * 1000:.0f} ms"
    con.print(f"  newest committed generation {v.generation}, {age} old (the data a failover "
              f"now would lose); standby storage "
              f"{'-' if v.storage_bytes is None else _size(v.storage_bytes)}; "
              f"{escape(v.tracking or '')}")
    if v.paging:
        p = v.paging
        con.print(f"  paging standby: hot set {p.get('hot_pages', 0)} pages "
                  f"({_size(int(p.get('hot_bytes') or 0))}, written within "
                  f"{float(p.get('hot_window_s') or 0):g} s); memory "
                  f"{_size(int(p.get('memory_bytes') or 0))} (tmpfs "
                  f"{_size(int(p.get('tmpfs_bytes') or 0))}, disk base cached "
                  f"{_size(int(p.get('disk_cached_bytes') or 0))}); disk "
                  f"{_size(int(p.get('disk_bytes') or 0))}; {p.get('young_generations', 0)} "
                  f"young generations on base {p.get('base_generation')}")
        for note in p.get("notes") or []:
            con.print(f"  [yellow]{escape(str(note))}[/]")
    if v.lazy:
        lz = v.lazy
        con.print(f"  lazy restore: {escape(str(lz.get('state')))}; "
                  f"{lz.get('eager_pages', 0)} pages placed before the tree resumed, "
                  f"{lz.get('lazy_pages', 0)} lazy"
                  + (f", {lz.get('pages_copied')} of {lz.get('pages_total')} in "
                     f"({lz.get('pages_faulted')} on fault) after "
                     f"{float(lz.get('elapsed_ms') or 0):.0f} ms"
                     if lz.get("state") == "complete" else ""))
    if v.heartbeats:
        con.print(f"  heartbeats seen {v.heartbeats.get('seen', 0)}, missed "
                  f"{v.heartbeats.get('missed', 0)}")
    if v.output_hold:
        h = v.output_hold
        con.print(f"  output hold: {h.get('held', 0)} packets held, {h.get('released', 0)} "
                  f"released, {h.get('dropped', 0)} dropped")
    if v.checkpoints:
        t = Table(title="newest checkpoints", title_justify="left")
        for col in ("gen", "frozen ms", "pages", "page bytes", "file bytes", "duration ms",
                    "full"):
            t.add_column(col, justify="right")
        for c in v.checkpoints[-5:]:
            t.add_row(str(c.get("generation")), _num(c.get("frozen_ms")),
                      str(c.get("pages_written")), str(c.get("page_bytes")),
                      str(c.get("file_bytes")), _num(c.get("duration_ms")),
                      "yes" if c.get("full") else "")
        con.print(t)
    for e in v.events[-5:]:
        when = time.strftime("%H:%M:%S", time.localtime(float(e.get("at", 0))))
        extra = {k: val for k, val in e.items() if k not in ("at", "what", "host")}
        con.print(f"  [dim]{when} {escape(str(e.get('host')))}: {escape(str(e.get('what')))} "
                  f"{escape(str(extra)) if extra else ''}[/]")
    if v.unreachable:
        con.print(f"  [yellow]did not answer:[/] {', '.join(v.unreachable)}")


def _num(x: Any) -> str:
    return "-" if x is None else f"{float(x):.1f}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n = int(n / 1024)
    return f"{n} TiB"


@pair.command("stop")
@click.argument("name")
@click.option("--keep-images", is_flag=True, help="Keep the standby's generations.")
@inventory_option
@key_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def pair_stop(env: Env, name: str, keep_images: bool, inventory: Path | None,
              key_path: Path | None, as_json: bool) -> None:
    """Stop protecting NAME; the service keeps running where it is."""
    from orthros_py.cluster import Cluster
    from orthros_py.errors import OrthrosError
    from orthros_py.policies.pair import stop

    out = stop(_hosts(Cluster.load(inventory, key_path)), name, keep_images=keep_images)
    if as_json:
        env.emit_json(out)
    else:
        env.console.print(f"pair {name} stopped on {', '.join(out['closed']) or 'no host'}")
    if out["problems"]:
        raise OrthrosError(f"pair {name} could not be stopped everywhere: "
                           f"{out['problems'][0]}")


@click.command()
@click.argument("name")
@inventory_option
@key_option
@journal_option
@click.option("--json", "as_json", is_flag=True, help="Print the result and timings as JSON.")
@click.pass_obj
def failover(env: Env, name: str, inventory: Path | None, key_path: Path | None,
             journal_dir: Path | None, as_json: bool) -> None:
    """Switch pair NAME to its standby now (planned): the live tree moves there with its
    connections and its service address; the old active stops its copy."""
    from orthros_py.cli.migrate import render_result
    from orthros_py.cli.progress import ProgressView
    from orthros_py.cluster import Cluster
    from orthros_py.policies.journal import Journal
    from orthros_py.policies.migrate import MigrateConfig, Migration
    from orthros_py.policies.pair import planned_failover


    cluster = Cluster.load(inventory, key_path)
    hosts = _hosts(cluster)
    moved: list[Any] = []

    def migrate(src: Host, dst: Host, pid: int, service_ip: str | None) -> Any:
        job = Migration(pid, src, dst, MigrateConfig(service_ip=service_ip),
                        candidates=cluster.candidates(src.name, dst.name),
                        journal=Journal(journal_dir) if journal_dir else Journal())
        with ProgressView(env, quiet=as_json) as view:
            job.observer = view
            moved.append(job.run())
            return moved[-1]

    out = planned_failover(hosts, name, migrate=migrate)
    if as_json:
        env.emit_json(out)
        return
    env.console.print(f"[green]pair {name} failed over[/]: {out['from']} -> {out['to']} "
                      f"(pid {out['pid']} there)")
    if moved:
        render_result(env, moved[-1])


COMMANDS = [pair, failover]
