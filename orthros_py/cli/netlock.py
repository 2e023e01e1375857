"""``orthros netlock status|flush|lock|unlock|prepare``: the network lock, for people and scripts.

A lock taken here stays in place after the command returns (pinned, attached through netlink);
``unlock`` or ``flush`` lifts it. The backends (and BCC, pyroute2) are imported inside the
commands, so ``orthros --help`` works on a host without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape
from rich.table import Table

from orthros_py.cli.context import Env
from orthros_py.errors import NetlockError
from orthros_py.netlock import BACKENDS, Conn, backend

if TYPE_CHECKING:
    from orthros_py.netlock import FlushResult, LockStatus, NetLock


class ConnType(click.ParamType[Conn]):
    name = "SRC:PORT,DST:PORT"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Conn:
        if isinstance(value, Conn):
            return value
        try:
            return Conn.parse(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


backend_option = click.option(
    "--backend", "backend_name", type=click.Choice(BACKENDS), default="xdp", show_default=True,
    help="Lock mechanism (iptables and nftables are for comparison).")
netns_option = click.option(
    "--netns", default=None, metavar="NS",
    help="Network namespace: a name under /run/netns or a path such as /proc/PID/ns/net.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
conn_option = click.option(
    "--conn", "conns", type=ConnType(), multiple=True,
    help="A connection, local end first: 10.0.0.1:80,10.0.0.2:51234 or [fd00::1]:80,[fd00::2]:5.")
pid_option = click.option(
    "--pid", type=int, default=None,
    help="Also every TCP connection of the process tree rooted at PID (in its namespace).")


def _open(name: str, netns: str | None) -> NetLock:
    # iptables/nftables rules live in one namespace; the XDP lock spans all of them.
    return backend(name) if name == "xdp" else backend(name, netns=netns)


@click.group()
def netlock() -> None:
    """Silence TCP connections in both directions while their owner is checkpointed or moved."""


@netlock.command()
@backend_option
@netns_option
@json_option
@click.pass_obj
def status(env: Env, backend_name: str, netns: str | None, as_json: bool) -> None:
    """What is attached where, which connections are locked, and the packet counters."""
    lock = _open(backend_name, netns)
    try:
        st = lock.status()
    finally:
        lock.close()
    if as_json:
        env.emit_json(st.to_dict())
    else:
        render_status(env, st)


@netlock.command()
@backend_option
@netns_option
@json_option
@click.pass_obj
def flush(env: Env, backend_name: str, netns: str | None, as_json: bool) -> None:
    """Remove every orthros lock: entries, programs (in every namespace recorded) and pins."""
    lock = _open(backend_name, netns)
    try:
        result = lock.flush()
    finally:
        lock.close()
    if as_json:
        env.emit_json(result.to_dict())
    else:
        render_flush(env, result)
    if result.problems:
        raise NetlockError("the flush left something behind: " + "; ".join(result.problems))


@netlock.command("lock")
@click.option("--iface", "ifaces", multiple=True, metavar="IF",
              help="Interface to put the XDP lock on (repeat; default with --pid: the "
                   "interfaces that route to the tree's peers).")
@netns_option
@conn_option
@pid_option
@backend_option
@json_option
@click.pass_obj
def lock_cmd(env: Env, ifaces: tuple[str, ...], netns: str | None, conns: tuple[Conn, ...],
             pid: int | None, backend_name: str, as_json: bool) -> None:
    """Lock connections and leave them locked (until unlock or flush)."""
    todo = list(conns)
    if pid is not None:
        from orthros_py.net.conns import discover_tree

        found = discover_tree(pid)
        todo += found.conns
        netns = netns or found.netns
        ifaces = ifaces or tuple(found.interfaces)
    if not todo:
        raise click.UsageError("nothing to lock: give --conn or --pid")
    lock = _open(backend_name, netns)
    try:
        report: dict[str, Any] = {"backend": backend_name, "netns": netns}
        if backend_name == "xdp":
            report.update(_lock_xdp(lock, list(ifaces), netns, todo))
        else:
            lock.lock(todo)
    finally:
        lock.close()
    report["locked"] = [str(c) for c in sorted(set(todo))]
    if as_json:
        env.emit_json(report)
        return
    where = f" on {', '.join(report['attached'])}" if report.get("attached") else ""
    how = (f" (compiled the program in {report['compile_seconds']:.1f} s)"
           if report.get("compile_seconds") else "")
    env.console.print(f"[green]locked[/] {len(report['locked'])} connections{escape(where)}"
                      f"{how}; they stay locked until 'orthros netlock unlock' or 'flush'")
    for note in report.get("notes", []):
        env.console.print(f"[yellow]note:[/] {escape(note)}")


def _lock_xdp(lock: NetLock, ifaces: list[str], netns: str | None, conns: list[Conn]
              ) -> dict[str, Any]:
    """Attach, then lock; on failure take off what this command attached."""
    from orthros_py.netlock.xdp import XdpNetLock

    assert isinstance(lock, XdpNetLock)
    before = {(a.iface, a.netns_id) for a in lock.status().attachments}
    # attach() checks the interfaces before it loads anything: a typo leaves nothing behind.
    attached = lock.attach(ifaces, netns=netns)
    try:
        lock.lock(conns)
    except BaseException:
        new = [a.iface for a in attached if (a.iface, a.netns_id) not in before]
        if new:
            lock.detach(new, netns=netns)
        raise
    notes = [] if ifaces or lock.status().attachments else [
        "no interface carries the program yet: give --iface"]
    return {"attached": [a.where for a in attached], "compile_seconds": lock.compile_seconds,
            "notes": notes}


@netlock.command("unlock")
@click.option("--iface", "ifaces", multiple=True, metavar="IF",
              help="Also take the XDP lock off this interface (repeat), as 'lock --iface' put "
                   "it on; without it the programs stay attached ('flush' removes them all).")
@netns_option
@conn_option
@pid_option
@click.option("--all", "everything", is_flag=True, help="Unlock every locked connection.")
@backend_option
@json_option
@click.pass_obj
def unlock_cmd(env: Env, ifaces: tuple[str, ...], netns: str | None, conns: tuple[Conn, ...],
               pid: int | None, everything: bool, backend_name: str, as_json: bool) -> None:
    """Unlock connections; takes the same arguments as 'lock', so that a script undoes exactly
    what it did (with --iface, the programs come off those interfaces too)."""
    todo = list(conns)
    if pid is not None:
        from orthros_py.net.conns import discover_tree

        found = discover_tree(pid)
        todo += found.conns
        netns = netns or found.netns
    if not todo and not everything and not ifaces:
        raise click.UsageError("nothing to unlock: give --conn, --pid, --iface or --all")
    if ifaces and backend_name != "xdp":
        raise click.UsageError(f"--iface is for the xdp lock; {backend_name} attaches nothing")
    lock = _open(backend_name, netns)
    report: dict[str, Any] = {"backend": backend_name, "netns": netns}
    try:
        if everything:
            todo = [lc.conn for lc in lock.status().conns]
        lock.unlock(todo)
        if ifaces:
            from orthros_py.netlock.xdp import XdpNetLock

            assert isinstance(lock, XdpNetLock)
            # Unlocked first: taking the programs off can only let traffic through sooner.
            result = lock.detach(list(ifaces), netns=netns)
            report["detached"] = [a.where for a in result.detached]
            if result.problems:
                raise NetlockError("unlocked, but detaching left something behind: "
                                   + "; ".join(result.problems))
    finally:
        lock.close()
    report["unlocked"] = [str(c) for c in sorted(set(todo))]
    if as_json:
        env.emit_json(report)
    else:
        where = f"; detached from {', '.join(report['detached'])}" \
            if report.get("detached") else ""
        env.console.print(f"[green]unlocked[/] {len(set(todo))} connections{escape(where)}")


@netlock.command()
@click.option("--print-source", is_flag=True, help="Print the BPF C source and exit.")
@json_option
@click.pass_obj
def prepare(env: Env, print_source: bool, as_json: bool) -> None:
    """Compile and pin the XDP lock now, so that later locks cost map writes only."""
    from orthros_py.netlock.xdp import XdpNetLock, source_text

    if print_source:
        env.stdout.write(source_text())
        return
    lock = XdpNetLock()
    try:
        with env.console.status("loading the XDP network lock"):
            info = lock.prepare()
    finally:
        lock.close()
    if as_json:
        env.emit_json(info)
    elif info["compiled"]:
        env.console.print(f"[green]compiled[/] and pinned in {info['pin_dir']} "
                          f"({info['compile_seconds']:.1f} s)")
    else:
        env.console.print(f"already pinned in {info['pin_dir']}: nothing to compile")


def render_status(env: Env, st: LockStatus) -> None:
    if not st.loaded and not st.attachments:
        env.console.print(f"no {st.backend} network lock is in place")
        return
    if st.attachments:
        table = Table(title="attached", title_justify="left")
        for col in ("interface", "namespace", "xdp (in)", "xdp mode", "tc (out)"):
            table.add_column(col)
        for a in st.attachments:
            table.add_row(a.iface, escape(a.netns or "host"), "yes" if a.xdp else "no",
                          a.mode if a.xdp else "-", "yes" if a.tc else "no")
        env.console.print(table)
    if not st.conns:
        env.console.print("no connections are locked")
    table = Table(title=f"{len(st.conns)} locked connections", title_justify="left")
    table.add_column("local")
    table.add_column("remote")
    table.add_column("dropped", justify="right")
    for lc in st.conns:
        c = lc.conn
        table.add_row(escape(str(c).split(",")[0]), escape(str(c).split(",")[1]),
                      "-" if lc.dropped is None else str(lc.dropped))
    if st.conns:
        env.console.print(table)
    if st.counters:
        env.console.print("packets: " + ", ".join(f"{k} {v}" for k, v in st.counters.items()))
    for problem in st.problems:
        env.console.print(f"[yellow]warning:[/] {escape(problem)}")


def render_flush(env: Env, r: FlushResult) -> None:
    env.console.print(f"[green]flushed[/] the {r.backend} lock: {r.unlocked} connections "
                      f"unlocked, detached from {len(r.detached)} interfaces, "
                      f"{len(r.removed)} pins/files removed", soft_wrap=True)


COMMANDS = [netlock]
