"""``orthros migrate PID --from HOST --to HOST``: the policy ``orthros_py.policies.migrate`` with
the inventory's agents as transport, its progress on stderr (rich) and its result as tables or,
with ``--json``, as data on stdout."""

from __future__ import annotations

import ipaddress
import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table

from orthros_py.cli.checkpoint import (
    check_externals,
    dump_file_options,
    external_option,
    file_locks_option,
)
from orthros_py.cli.context import Env
from orthros_py.cli.hosts import inventory_option, journal_option, key_option
from orthros_py.cli.progress import ProgressView
from orthros_py.criu.request import CgroupMode
from orthros_py.netlock.method import NetworkLock

if TYPE_CHECKING:
    from orthros_py.policies.migrate import MigrationResult

# This order, not the enum's, is the one --help has always shown.
LOCKS = tuple(m.value for m in (NetworkLock.XDP, NetworkLock.NFTABLES, NetworkLock.IPTABLES,
                                NetworkLock.SKIP))
# The rows of the timings table (the policy measures a few more; --json has them all).
TABLE_ROWS = ("pre-copy", "lock", "dump", "transfer", "address move", "restore", "unlock",
              "memory", "total")
EXTRA_ROWS = ("prepare", "verify", "cleanup", "downtime", "first response", "release source",
              "criu restore")
LAZY_RISK = ("with --lazy the tree runs on the destination before its memory has arrived: "
             "until the last page has crossed, the death of either host loses the service")


@click.command()
@click.argument("pid", type=click.IntRange(min=1))
@click.option("--from", "source", required=True, metavar="HOST",
              help="The inventory host the tree runs on (PID is a pid there).")
@click.option("--to", "dest", required=True, metavar="HOST",
              help="The inventory host to move it to.")
@click.option("--service-ip", default=None, metavar="IP",
              help="The service address to move with it [default: the one its connections "
                   "use, or the one service address of the inventory the source holds].")
@click.option("--network-lock", type=click.Choice(LOCKS), default="xdp", show_default=True,
              help="How the connections are kept silent on both hosts meanwhile.")
@inventory_option
@key_option
@click.option("--shell-job", is_flag=True,
              help="The tree was started from a shell (it shares the shell's session and tty).")
@click.option("--ext-unix-sk", is_flag=True,
              help="Allow UNIX sockets whose peer is outside the tree.")
@file_locks_option
@dump_file_options("; that link must be reachable on the destination (shared storage)")
@external_option("A resource the dump on the source leaves out, in CRIU's form (e.g. "
                 "mnt[MOUNTPOINT]:KEY). Repeatable.")
@click.option("--restore-external", multiple=True, metavar="RES",
              callback=check_externals,
              help="Where the destination finds such a resource, in CRIU's form (e.g. "
                   "mnt[KEY]:PATH). Repeatable.")
@click.option("--manage-cgroups", type=click.Choice([m.value for m in CgroupMode]),
              default="soft", show_default=True,
              help="How strictly the tree's cgroups are recreated (CRIU's modes; 'ignore' "
                   "leaves them behind). The destination is checked first either way.")
@click.option("--lazy", is_flag=True,
              help="Post-copy: restore on the destination before the memory has arrived "
                   "(pages fetched on demand, the rest pushed), so the freeze does not grow "
                   "with the memory. RISK: until the last page has crossed, the death of either "
                   "host loses the service.")
@click.option("--precopy/--no-precopy", default=None,
              help="Copy the memory in rounds while the tree runs, each only what was written "
                   "since the last, before the final freeze [default: for trees of 64 MiB or "
                   "more, where the source's CRIU tracks memory].")
@click.option("--keep-images", is_flag=True,
              help="Keep the images (and CRIU's logs) on both hosts afterwards, also after a "
                   "rollback.")
@journal_option
# Hidden: the control of an experiment (the clients then wait out their retransmission backoff).
@click.option("--no-give-back", "give_back", is_flag=True, flag_value=False, default=True,
              hidden=True)
@click.option("--json", "as_json", is_flag=True,
              help="Print the result (timings, counts, the new PID) as JSON.")
@click.pass_obj
def migrate(env: Env, pid: int, source: str, dest: str, service_ip: str | None,
            network_lock: str, inventory: Path | None, key_path: Path | None,
            shell_job: bool, ext_unix_sk: bool, file_locks: bool, link_remap: bool,
            ghost_limit: int | None, skip_in_flight: bool, evasive_devices: bool,
            external: tuple[str, ...], restore_external: tuple[str, ...], manage_cgroups: str,
            lazy: bool, precopy: bool | None, keep_images: bool, journal_dir: Path | None,
            give_back: bool, as_json: bool) -> None:
    """Move the live process tree of PID, with its TCP connections and its service address,
    from one host to another; roll back if anything fails before the restore succeeded."""
    from orthros_py.cluster import Cluster
    from orthros_py.policies.hosts import Host
    from orthros_py.policies.migrate import MigrateConfig, Migration

    cluster = Cluster.load(inventory, key_path)
    src, dst = Host.of(cluster, source), Host.of(cluster, dest)
    if service_ip is not None:
        try:
            ip = ipaddress.IPv4Interface(service_ip if "/" in service_ip else f"{service_ip}/32")
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--service-ip") from err
        if cluster.inventory.services and not cluster.inventory.may_hold(dest, str(ip.ip)):
            raise click.BadParameter(f"the inventory does not let {dest} hold {ip.ip}",
                                     param_hint="--service-ip")
    config = MigrateConfig(network_lock=NetworkLock(network_lock), service_ip=service_ip,
                           shell_job=shell_job, ext_unix_sk=ext_unix_sk,
                           file_locks=file_locks, link_remap=link_remap,
                           ghost_limit=ghost_limit, skip_in_flight=skip_in_flight,
                           evasive_devices=evasive_devices, dump_external=external,
                           restore_external=restore_external,
                           manage_cgroups=CgroupMode(manage_cgroups), keep_images=keep_images,
                           lazy=lazy, precopy=precopy, give_back=give_back)
    from orthros_py.policies.journal import Journal

    job = Migration(pid, src, dst, config, candidates=cluster.candidates(source, dest),
                    journal=Journal(journal_dir) if journal_dir else Journal())
    if lazy:
        env.console.print(f"[yellow]warning:[/] {LAZY_RISK}")
    if not as_json:
        env.console.print(f"migrating pid {pid} from [bold]{source}[/] to [bold]{dest}[/] "
                          f"({network_lock} lock" + (", post-copy" if lazy else "") + ")")
    # SIGTERM (a service manager, a `timeout`) rolls back like Ctrl-C instead of leaving the
    # tree stopped and locked half way.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with ProgressView(env, quiet=as_json) as view:
            job.observer = view
            result = job.run()
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if as_json:
        env.emit_json(result.to_dict())
    else:
        render_result(env, result)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def render_result(env: Env, r: MigrationResult) -> None:
    con = env.console
    svc = f" with {r.plan.service.ip}" if r.plan.service else ""
    con.print(f"[green]pid {r.pid} now runs on {r.dest} as pid {r.new_pid}{svc}[/]")
    timings = Table(title="phase timings", title_justify="left")
    timings.add_column("phase")
    timings.add_column("ms", justify="right")
    for row in TABLE_ROWS:
        if row == "total":
            timings.add_section()
        if row in ("pre-copy", "memory") and row not in r.timings_ms:
            continue
        timings.add_row(row, f"{r.timings_ms.get(row, 0.0):.1f}")
    timings.add_section()
    for row in EXTRA_ROWS:
        if row in r.timings_ms:
            timings.add_row(f"[dim]{row}[/]", f"[dim]{r.timings_ms[row]:.1f}[/]")
    counts = Table(title="counts", title_justify="left")
    counts.add_column("what")
    counts.add_column("", justify="right")
    for name, value in (("processes", r.processes), ("connections", r.connections),
                        ("established after", r.established), ("pages", r.pages),
                        ("image bytes sent", r.bytes_transferred),
                        ("CRIU frozen ms", "-" if r.frozen_ms is None else f"{r.frozen_ms:.1f}"),
                        ("new pid", r.new_pid)):
        counts.add_row(name, str(value))
    if r.precopy:
        rounds = r.precopy.get("rounds", [])
        counts.add_row("pre-copy rounds", str(len(rounds)))
        counts.add_row("pre-copy pages", " + ".join(str(x["pages"]) for x in rounds))
    if r.lazy:
        counts.add_row("pages faulted on demand", str(r.lazy.get("pages_faulted")))
        counts.add_row("pages pushed", str(r.lazy.get("pages_pushed")))
        last = r.lazy.get("last_page_ms")
        counts.add_row("last page ms after serving", "-" if last is None else f"{last:.1f}")
    con.print(timings)
    con.print(counts)
    restored = r.cgroups.get("restore") or {}
    if restored.get("groups"):
        bad = restored.get("mismatches") or []
        where = ", ".join(sorted(set((r.cgroups.get("roots") or {}).values())))
        con.print(f"cgroups: {restored['groups']} groups recreated on {r.dest}"
                  + (f" at {escape(where)}" if where else "") + "; limits "
                  + ("as on the source" if not bad else f"[red]differ[/]: {escape(bad[0])}"))
    for w in r.warnings:
        con.print(f"[yellow]warning:[/] {escape(w)}")


COMMANDS = [migrate]
