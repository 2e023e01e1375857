"""``orthros dump`` and ``orthros restore``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.table import Table

from orthros_py.checkpoint import DumpResult, RestoreResult, dump_tree, restore_tree, wait_exit
from orthros_py.cli.context import Env
from orthros_py.criu.request import CgroupMode, CriuNetworkLock, DumpOptions, RestoreOptions

CG_MODES = [m.value for m in CgroupMode]
LOCKS = [m.value for m in CriuNetworkLock]
F = TypeVar("F", bound=Callable[..., Any])


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
        click.option("--network-lock", type=click.Choice(LOCKS), default="iptables",
                     show_default=True, help="How connections are kept quiet meanwhile."),
        click.option("--log-level", type=click.IntRange(0, 4), default=2, show_default=True,
                     help="CRIU's log level (its log lands in the image directory)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]):
        f = opt(f)
    return f


@click.command()
@click.argument("pid", type=int)
@click.option("-D", "--images-dir", type=click.Path(path_type=Path), required=True,
              help="Directory to write the checkpoint into (created if missing).")
@click.option("--leave-running", is_flag=True, help="Keep the tree running after the dump.")
@common_options
@click.pass_obj
def dump(env: Env, pid: int, images_dir: Path, leave_running: bool, tcp_established: bool,
         ext_unix_sk: bool, shell_job: bool, manage_cgroups: str, network_lock: str,
         log_level: int, as_json: bool) -> None:
    """Checkpoint the process tree rooted at PID into a directory of images."""
    opts = DumpOptions(
        pid=pid, leave_running=leave_running, tcp_established=tcp_established,
        ext_unix_sk=ext_unix_sk, shell_job=shell_job,
        manage_cgroups=CgroupMode(manage_cgroups), network_lock=CriuNetworkLock(network_lock),
        log_level=log_level,
    )
    with env.console.status(f"dumping the tree of pid {pid}"):
        result = dump_tree(pid, images_dir, opts)
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
@common_options
@click.pass_obj
def restore(env: Env, images_dir: Path, detach: bool, root: str | None, tcp_established: bool,
            ext_unix_sk: bool, shell_job: bool, manage_cgroups: str, network_lock: str,
            log_level: int, as_json: bool) -> None:
    """Restore a checkpointed process tree."""
    opts = RestoreOptions(
        tcp_established=tcp_established, ext_unix_sk=ext_unix_sk, shell_job=shell_job,
        manage_cgroups=CgroupMode(manage_cgroups), network_lock=CriuNetworkLock(network_lock),
        log_level=log_level, root=root,
    )
    with env.console.status(f"restoring from {images_dir}"):
        result = restore_tree(images_dir, opts)
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


def _stats_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for k, v in rows:
        table.add_row(k, v)
    return table


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
    rows = [("orthros wall time", f"{r.elapsed_ms:.1f} ms")]
    if r.stats:
        s = r.stats
        rows += [("freezing", f"{s.freezing_ms:.2f} ms"), ("frozen", f"{s.frozen_ms:.2f} ms"),
                 ("memory dump", f"{s.memdump_ms:.2f} ms"),
                 ("memory write", f"{s.memwrite_ms:.2f} ms"),
                 ("pages scanned / written", f"{s.pages_scanned} / {s.pages_written}")]
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
    env.console.print(_stats_table("CRIU restore statistics", rows))


COMMANDS = [dump, restore]
