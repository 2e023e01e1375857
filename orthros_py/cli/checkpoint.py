"""``orthros dump`` and ``orthros restore``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.table import Table

from orthros_py.checkpoint import DumpResult, RestoreResult, dump_tree, restore_tree, wait_exit
from orthros_py.cli.context import Env
from orthros_py.criu.request import (
    GHOST_LIMIT_MAX,
    CgroupMode,
    DumpOptions,
    RestoreOptions,
    check_external,
    parse_size,
)
from orthros_py.netlock.method import NetworkLock
from orthros_py.netlock.tree import default_method
from orthros_py.proc.tree import read_namespaces

CG_MODES = [m.value for m in CgroupMode]
LOCKS = [m.value for m in NetworkLock]
F = TypeVar("F", bound=Callable[..., Any])


class Size(click.ParamType[int]):
    """A byte count as CRIU takes it: 4096, 512K, 10M, 1G."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)
        if size > GHOST_LIMIT_MAX:
            self.fail(f"{value} is above CRIU's limit of 4G - 1 bytes", param, ctx)
        return size


def check_externals(_ctx: click.Context, param: click.Parameter,
                    values: tuple[str, ...]) -> tuple[str, ...]:
    """Click callback: every value one of CRIU's --external forms."""
    try:
        return tuple(check_external(v) for v in values)
    except ValueError as err:
        raise click.BadParameter(str(err), param=param) from err


def external_option(help_text: str) -> Callable[[F], F]:
    return click.option("--external", "external", multiple=True, metavar="RES",
                        callback=check_externals, help=help_text)


def file_locks_option(f: F) -> F:
    return click.option(
        "--file-locks", is_flag=True,
        help="Carry the tree's file locks (flock, POSIX, OFD: a database, SQLite, a "
             "pidfile). A checkpoint dumped with it must be restored with it.")(f)


def dump_file_options(link_remap_note: str) -> Callable[[F], F]:
    """The dump's options for files and sockets CRIU refuses by default, shared by ``dump``
    and ``migrate`` (which adds where the link CRIU makes must be found)."""
    def wrap(f: F) -> F:
        for opt in reversed([
            click.option("--link-remap", is_flag=True,
                         help="Allow files the tree holds open (or watches with inotify) that "
                              "were unlinked but are still linked elsewhere: CRIU links them "
                              f"back into their directory for the restore{link_remap_note}."),
            click.option("--ghost-limit", type=Size(), default=None, metavar="SIZE",
                         help="Carry deleted-but-open files up to SIZE (e.g. 10M, 1G) in the "
                              "images [CRIU's default: 1M]."),
            click.option("--skip-in-flight", is_flag=True,
                         help="Drop connections still waiting in a listening socket's queue, "
                              "not yet accepted, instead of refusing the dump (their clients "
                              "connect again)."),
            click.option("--evasive-devices", is_flag=True,
                         help="Accept a device the tree opened by a path that now names "
                              "another node of the same device (e.g. under a remounted /dev)."),
        ]):
            f = opt(f)
        return f
    return wrap


def common_options(f: F) -> F:
    for opt in reversed([
        click.option("--tcp-established", is_flag=True,
                     help="Checkpoint/restore established TCP connections."),
        click.option("--ext-unix-sk", is_flag=True,
                     help="Allow UNIX sockets whose peer is outside the tree."),
        click.option("--shell-job", is_flag=True,
                     help="The tree was started from a shell (shares its session and tty)."),
        click.option("--manage-cgroups", type=click.Choice(CG_MODES), default="soft",
                     show_default=True, help="How CRIU saves and recreates cgroups."),
        click.option("--network-lock", type=click.Choice(LOCKS), default=None,
                     help="How connections are kept silent meanwhile: xdp (orthros's BPF map; "
                          "the default where BPF works), CRIU's iptables or nftables, or skip."),
        click.option("--log-level", type=click.IntRange(0, 4), default=2, show_default=True,
                     help="CRIU's log level (its log lands in the image directory)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]):
        f = opt(f)
    return f


def _lock(name: str | None) -> NetworkLock:
    return NetworkLock(name) if name else default_method()


def _print_bpf(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from orthros_py.netlock.xdp import source_text

    click.echo(source_text(), nl=False)
    ctx.exit(0)


@click.command()
@click.argument("pid", type=int)
@click.option("--dump-bpf", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_bpf, help="Print the BPF C source of the xdp lock and exit.")
@click.option("-D", "--images-dir", type=click.Path(path_type=Path), required=True,
              help="Directory to write the checkpoint into (created if missing).")
@click.option("--leave-running", is_flag=True, help="Keep the tree running after the dump.")
@file_locks_option
@dump_file_options("")
@external_option("Leave a resource to the restorer, in CRIU's form: mnt[MOUNTPOINT]:KEY (a "
                 "mount), dev[MAJ/MIN]:KEY, file[MNT_ID:INODE], unix[INODE], tty[RDEV:DEV], "
                 "net[INODE]:KEY, pid[INODE]:KEY. Repeatable.")
@common_options
@click.pass_obj
def dump(env: Env, pid: int, images_dir: Path, leave_running: bool, file_locks: bool,
         link_remap: bool, ghost_limit: int | None, skip_in_flight: bool, evasive_devices: bool,
         external: tuple[str, ...], tcp_established: bool, ext_unix_sk: bool, shell_job: bool,
         manage_cgroups: str, network_lock: str | None, log_level: int, as_json: bool) -> None:
    """Checkpoint the process tree rooted at PID into a directory of images."""
    opts = DumpOptions(
        pid=pid, leave_running=leave_running, tcp_established=tcp_established,
        ext_unix_sk=ext_unix_sk, shell_job=shell_job,
        manage_cgroups=CgroupMode(manage_cgroups),
        log_level=log_level, file_locks=file_locks, link_remap=link_remap,
        ghost_limit=ghost_limit, tcp_skip_in_flight=skip_in_flight,
        evasive_devices=evasive_devices, external=external,
    )
    with env.console.status(f"dumping the tree of pid {pid}"):
        result = dump_tree(pid, images_dir, opts, network_lock=_lock(network_lock))
    if as_json:
        env.emit_json(result.to_dict())
    else:
        render_dump(env, result)


@click.command()
@click.option("-D", "--images-dir", type=click.Path(path_type=Path), required=True,
              help="Directory holding the checkpoint.")
@click.option("-d", "--detach", is_flag=True,
              help="Leave the restored tree running and return at once.")
@click.option("--root", type=click.Path(exists=True, file_okay=False),
              help="Root filesystem for a tree with its own mount namespace "
                   "(default: this host's /, when the tree's namespace was a copy of it).")
@click.option("--cgroup-root", "cgroup_roots", multiple=True, metavar="HIERARCHY=PATH",
              callback=lambda _c, _p, v: _cgroup_roots(v),
              help="Recreate the tree's top group of a cgroup hierarchy at PATH instead of "
                   "its dumped path (HIERARCHY: controllers as in /proc/PID/cgroup, e.g. "
                   "cpu,cpuacct; 'unified' for cgroup v2). Repeatable.")
@file_locks_option
@click.option("--tcp-close", is_flag=True,
              help="Close the dumped TCP connections instead of restoring them, so that their "
                   "clients reconnect; listening sockets are restored and accept.")
@click.option("--auto-dedup", is_flag=True,
              help="Punch each page out of the images as soon as it is restored: the image "
                   "directory gives its disk space back (it cannot be restored again).")
@external_option("Where a resource the dump left external is on this host, in CRIU's form: "
                 "mnt[KEY]:PATH (bind PATH at the mount dumped as KEY), dev[KEY]:DEVPATH, "
                 "veth[IF]:OUTER, macvlan[IF]:OUTER. Repeatable.")
# Hidden: the control of an experiment (the peers then wait out their retransmission backoff).
@click.option("--no-give-back", "give_back", is_flag=True, flag_value=False, default=True,
              hidden=True)
@common_options
@click.pass_obj
def restore(env: Env, images_dir: Path, detach: bool, root: str | None,
            cgroup_roots: dict[str, str], file_locks: bool, tcp_close: bool, auto_dedup: bool,
            external: tuple[str, ...], give_back: bool, tcp_established: bool,
            ext_unix_sk: bool, shell_job: bool, manage_cgroups: str, network_lock: str | None,
            log_level: int, as_json: bool) -> None:
    """Restore a checkpointed process tree."""
    opts = RestoreOptions(
        tcp_established=tcp_established, ext_unix_sk=ext_unix_sk, shell_job=shell_job,
        manage_cgroups=CgroupMode(manage_cgroups),
        log_level=log_level, root=root, cgroup_roots=cgroup_roots, file_locks=file_locks,
        tcp_close=tcp_close, auto_dedup=auto_dedup, external=external,
    )
    with env.console.status(f"restoring from {images_dir}"):
        result = restore_tree(images_dir, opts, network_lock=_lock(network_lock),
                              give_back=give_back)
    if as_json:
        env.emit_json(result.to_dict())
    else:
        render_restore(env, result)
    if not detach:
        env.console.print(f"waiting for pid {result.pid} to exit (Ctrl-C leaves it running)")
        try:
            status = wait_exit(result.pid)
        except KeyboardInterrupt:
            env.console.print(f"pid {result.pid} keeps running")
            raise
        raise SystemExit(status)


def _cgroup_roots(values: tuple[str, ...]) -> dict[str, str]:
    from orthros_py.cgroup.model import parse_hierarchy_label

    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not path.startswith("/"):
            raise click.BadParameter(f"{v!r} is not HIERARCHY=/PATH", param_hint="--cgroup-root")
        out[parse_hierarchy_label(name)] = path
    return out


def _cgroup_rows(cg: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not cg:
        return []
    rows = [("cgroups carried", f"{cg.get('groups', 0)} groups")]
    for key, label in (("read_ms", "cgroup read"), ("check_ms", "cgroup check"),
                       ("apply_ms", "cgroup create"), ("verify_ms", "cgroup verify")):
        if cg.get(key) is not None:
            rows.append((label, f"{cg[key]:.2f} ms"))
    if "mismatches" in cg:
        bad = cg["mismatches"]
        rows.append(("cgroup limits", "as dumped" if not bad else f"[red]{len(bad)} differ[/]: "
                     + "; ".join(bad[:3])))
    return rows


def _stats_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for k, v in rows:
        table.add_row(k, v)
    return table


def _lock_rows(lock: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not lock:
        return []
    rows = [("network lock", f"{lock['method']} ({lock['conns']} connections)")]
    for key, label in (("lock_ms", "lock"), ("unlock_ms", "unlock")):
        if lock.get(key) is not None:
            rows.append((label, f"{lock[key]:.2f} ms"))
    if lock.get("held"):
        rows.append(("connections", "stay locked until restore"))
    return rows


def render_dump(env: Env, r: DumpResult) -> None:
    live = r.live
    env.console.print(
        f"[green]dumped[/] pid {r.pid} into {r.images_dir}: {len(live.processes)} processes, "
        f"{len(live.tcp)} TCP connections, {len(live.unix)} UNIX sockets"
        + (" (left running)" if r.leave_running else ""), soft_wrap=True)
    procs = Table(title="processes", title_justify="left")
    for col in ("pid", "ppid", "command"):
        procs.add_column(col)
    for p in live.processes:
        procs.add_row(str(p.pid), str(p.ppid), " ".join(p.cmdline) or p.name)
    env.console.print(procs)
    if live.processes:
        root = live.processes[0]
        mine = read_namespaces(os.getpid())
        own = [ns for ns, ino in sorted(root.namespaces.items()) if mine.get(ns) != ino]
        shared = "none (it shares the host's)"
        env.console.print(f"namespaces of its own: {', '.join(own) or shared}", soft_wrap=True)
        groups = sorted({f"{k or 'v2'}:{v}" for k, v in root.cgroups.items() if v != "/"})
        env.console.print(f"cgroups: {', '.join(groups) or 'the root groups only'}",
                          soft_wrap=True)
    rows = [("orthros wall time", f"{r.elapsed_ms:.1f} ms")]
    if r.stats:
        s = r.stats
        rows += [("freezing", f"{s.freezing_ms:.2f} ms"), ("frozen", f"{s.frozen_ms:.2f} ms"),
                 ("memory dump", f"{s.memdump_ms:.2f} ms"),
                 ("memory write", f"{s.memwrite_ms:.2f} ms"),
                 ("pages scanned / written", f"{s.pages_scanned} / {s.pages_written}")]
    rows += _lock_rows(r.extra.get("lock"))
    rows += _cgroup_rows(r.extra.get("cgroups"))
    env.console.print(_stats_table("CRIU dump statistics", rows))


def render_restore(env: Env, r: RestoreResult) -> None:
    # soft_wrap: a log read later must not find the path broken over two lines.
    env.console.print(f"[green]restored[/] {len(r.pids)} tasks from {r.images_dir}; "
                      f"root pid [bold]{r.pid}[/]", soft_wrap=True)
    rows = [("orthros wall time", f"{r.elapsed_ms:.1f} ms")]
    if r.stats:
        rows += [("forking", f"{r.stats.forking_ms:.2f} ms"),
                 ("restore", f"{r.stats.restore_ms:.2f} ms"),
                 ("pages restored", str(r.stats.pages_restored))]
    rows += _lock_rows(r.extra.get("lock"))
    rows += _cgroup_rows(r.extra.get("cgroups"))
    env.console.print(_stats_table("CRIU restore statistics", rows))


COMMANDS = [dump, restore]
