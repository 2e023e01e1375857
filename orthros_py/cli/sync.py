"""``orthros sync save|restore|resume|list|delete``: the policy ``orthros_py.policies.sync``
with the inventory's agents as transport, rendered with rich on stderr or, with ``--json``, as
data on stdout."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape
from rich.table import Table

from orthros_py.cli.context import Env
from orthros_py.cli.hosts import inventory_option, journal_option, key_option
from orthros_py.cli.progress import ProgressView

if TYPE_CHECKING:
    from orthros_py.cluster import Cluster
    from orthros_py.policies.hosts import Host
    from orthros_py.policies.sync import SyncReport


def _hosts(cluster: Cluster) -> dict[str, Host]:
    from orthros_py.policies.hosts import Host

    return {n: Host.of(cluster, n) for n in cluster.hosts}


def _journal(journal_dir: Path | None) -> Any:
    from orthros_py.policies.journal import Journal

    return Journal(journal_dir) if journal_dir else Journal()


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def _render(env: Env, rep: SyncReport) -> None:
    con = env.console
    t = Table(title=f"sync {rep.action} {rep.name}", title_justify="left")
    for col in ("host", "member", "pid", "tasks", "conns", "time ns",
                "dump/restore ms", "image", "data"):
        t.add_column(col, justify="right" if col not in ("host", "member", "data") else "left")
    for m in rep.members:
        data = ", ".join(f"{d['source']} ({d['method']}, {_size(d.get('bytes'))})"
                         for d in m.get("data", []))
        t.add_row(m["host"], m["member"], str(m.get("pid") or "-"), str(m.get("tasks") or "-"),
                  str(m.get("conns") if m.get("conns") is not None else "-"),
                  {True: "own", False: "host's", None: "-"}[m.get("timens")],
                  f"{m.get('dump_ms') or m.get('restore_ms') or 0:.0f}",
                  _size(m.get("image_bytes")), escape(data or "-"))
    con.print(t)
    parts = []
    if rep.freeze_skew_us is not None:
        parts.append(f"froze within {rep.freeze_skew_us:g} µs")
    if rep.resume_skew_us is not None:
        parts.append(f"resumed within {rep.resume_skew_us:g} µs")
    parts.append(f"clocks known within {rep.clock_error_us:g} µs")
    if rep.action == "save":
        parts.append("members left running" if rep.left_running
                     else "members left frozen: restore, or 'orthros sync resume'")
    con.print("; ".join(parts) + f"; {rep.timings.get('total', 0):.0f} ms in all")
    for w in rep.warnings:
        con.print(f"[yellow]warning:[/] {escape(w)}")


def _run(env: Env, job: Any, as_json: bool) -> None:
    """Run a sync policy with its progress shown; its report as data or as a table."""
    with ProgressView(env, quiet=as_json) as view:
        job.observer = view
        rep = job.run()
    if as_json:
        env.emit_json(rep.to_dict())
    else:
        _render(env, rep)


@click.group()
def sync() -> None:
    """Save and restore process trees on several hosts at one instant, with their data."""


@sync.command("save")
@click.option("--member", "members", multiple=True, metavar="HOST:PID",
              help="A member: HOST:PID, or HOST:NAME for the one process tree of that name.")
@click.option("--group", default=None, metavar="NAME",
              help="The members (and data directories) of the inventory's [[group]] NAME.")
@click.option("--name", required=True, help="The snapshot's name.")
@click.option("--data", "data", multiple=True, metavar="HOST:PATH",
              help="A data directory snapshotted with the member on HOST, put back at restore.")
@click.option("--leave-running", is_flag=True,
              help="Resume the members at one instant after the save (default: leave them "
                   "frozen, for a restore to follow).")
@inventory_option
@key_option
@journal_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def sync_save(env: Env, members: tuple[str, ...], group: str | None, name: str,
              data: tuple[str, ...], leave_running: bool, inventory: Path | None,
              key_path: Path | None, journal_dir: Path | None, as_json: bool) -> None:
    """Freeze every member at one instant, dump it, snapshot its data directories, and keep
    the snapshot NAME on every member's host."""
    from orthros_py.cluster import Cluster
    from orthros_py.policies.sync import SyncSave, SyncUsageError, check_name, parse_members

    check_name(name)
    cluster = Cluster.load(inventory, key_path)
    specs, dirs = list(members), list(data)
    if group is not None:
        g = cluster.inventory.group(group)
        specs += list(g.members)
        dirs += list(g.data)
    if not specs:
        raise SyncUsageError("name the members: --member HOST:PID (several), or --group NAME")
    parsed = parse_members(specs, dirs, known_hosts=list(cluster.hosts))
    _run(env, SyncSave(_hosts(cluster), name, parsed, leave_running=leave_running,
                       journal=_journal(journal_dir)), as_json)


@sync.command("restore")
@click.option("--name", required=True, help="The snapshot to restore.")
@inventory_option
@key_option
@journal_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def sync_restore(env: Env, name: str, inventory: Path | None, key_path: Path | None,
                 journal_dir: Path | None, as_json: bool) -> None:
    """Stop what runs of the snapshot's members now, put their data directories back, restore
    them frozen, and resume them all at one instant."""
    from orthros_py.cluster import Cluster
    from orthros_py.policies.sync import SyncRestore, check_name

    check_name(name)
    _run(env, SyncRestore(_hosts(Cluster.load(inventory, key_path)), name,
                          journal=_journal(journal_dir)), as_json)


@sync.command("resume")
@click.option("--name", required=True, help="The snapshot whose members a save left frozen.")
@inventory_option
@key_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def sync_resume(env: Env, name: str, inventory: Path | None, key_path: Path | None,
                as_json: bool) -> None:
    """Resume at one instant the members a save (without --leave-running) left frozen."""
    from orthros_py.cluster import Cluster
    from orthros_py.policies.sync import SyncThaw, check_name

    check_name(name)
    _run(env, SyncThaw(_hosts(Cluster.load(inventory, key_path)), name), as_json)


@sync.command("list")
@inventory_option
@key_option
@click.option("--json", "as_json", is_flag=True, help="Print the snapshots as JSON.")
@click.pass_obj
def sync_list(env: Env, inventory: Path | None, key_path: Path | None, as_json: bool) -> None:
    """The snapshots kept on the inventory's hosts: members, sizes, age."""
    from orthros_py.cluster import Cluster
    from orthros_py.policies.sync import list_snapshots

    snaps, silent = list_snapshots(list(_hosts(Cluster.load(inventory, key_path)).values()))
    if as_json:
        env.emit_json({"snapshots": snaps, "unreachable": silent})
        return
    t = Table(title="snapshots", title_justify="left")
    for col in ("name", "members", "images", "data", "saved", "age"):
        t.add_column(col)
    for s in snaps:
        saved = datetime.datetime.fromtimestamp(s["created"]).strftime("%Y-%m-%d %H:%M:%S")
        t.add_row(s["name"], escape(", ".join(f"{m['host']}:{m['pid']} ({m['name']})"
                                              for m in s["members"])),
                  _size(s["image_bytes"]), _size(s["data_bytes"]), saved, f"{s['age_s']:.0f} s")
    env.console.print(t)
    if silent:
        env.console.print(f"[yellow]no answer from:[/] {', '.join(silent)}")


@sync.command("delete")
@click.option("--name", required=True, help="The snapshot to delete.")
@inventory_option
@key_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def sync_delete(env: Env, name: str, inventory: Path | None, key_path: Path | None,
                as_json: bool) -> None:
    """Delete snapshot NAME (checkpoints and data snapshots) from every host."""
    from orthros_py.cluster import Cluster
    from orthros_py.policies.sync import delete_snapshot

    out = delete_snapshot(list(_hosts(Cluster.load(inventory, key_path)).values()), name)
    if as_json:
        env.emit_json(out)
    else:
        env.console.print(f"snapshot {name} deleted ({len(out['removed'])} members)")


COMMANDS = [sync]
