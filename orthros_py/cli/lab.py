"""``orthros lab up|status|down|exec``: the inventory's hosts as network namespaces here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table

from orthros_py.cli.context import Env
from orthros_py.cli.hosts import journal_option
from orthros_py.errors import OrthrosError
from orthros_py.inventory import INVENTORY_ENV

if TYPE_CHECKING:
    from orthros_py.lab import DownReport, LabStatus

# orthros_py.lab (pyroute2, psutil) is imported inside the commands: `orthros --help` and the
# other commands do not pay for it.

inventory_option = click.option(
    "--inventory", type=click.Path(path_type=Path, dir_okay=False), envvar=INVENTORY_ENV,
    default=None, help=f"Inventory file (default: vagrant/inventory.toml, or ${INVENTORY_ENV}).")


@click.group()
def lab() -> None:
    """Hosts of the inventory as network namespaces on this machine, joined by a bridge."""


@lab.command()
@click.option("--hosts", "n_hosts", type=click.IntRange(min=1), default=2, show_default=True,
              help="How many of the inventory's hosts to build (plus its client).")
@inventory_option
@click.option("--no-agents", is_flag=True, help="Build the network only; start no agent.")
@click.option("--rebuild", is_flag=True, help="Tear down and rebuild even if the lab is up.")
@click.option("--json", "as_json", is_flag=True, help="Print the lab's status as JSON.")
@click.pass_obj
def up(env: Env, n_hosts: int, inventory: Path | None, no_agents: bool, rebuild: bool,
       as_json: bool) -> None:
    """Build the lab: a namespace per host, a bridge, an agent per host."""
    from orthros_py.lab import Lab

    with env.console.status(f"building a lab of {n_hosts} hosts and a client"):
        the_lab = Lab.up(n_hosts, inventory=inventory, agents=not no_agents, rebuild=rebuild)
        status = the_lab.status()
    if as_json:
        env.emit_json({**status.to_dict(), "reused": the_lab.reused})
        return
    verb = "is already up" if the_lab.reused else "is up"
    env.console.print(f"[green]the lab {verb}[/]: {len(the_lab.hosts)} hosts and a client "
                      f"(state in {the_lab.state_dir})")
    render_status(env, status)


@lab.command()
@inventory_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_obj
def status(env: Env, inventory: Path | None, as_json: bool) -> None:
    """Show each host's namespace, addresses and agent."""
    from orthros_py.lab import Lab, LabStatus

    the_lab = Lab.find(inventory)
    if the_lab is None:
        if as_json:
            env.emit_json(LabStatus(up=False, hosts=[], client=None, services=[]).to_dict())
        else:
            env.console.print("no lab is up; start one with: orthros lab up")
        return
    st = the_lab.status()
    if as_json:
        env.emit_json(st.to_dict())
    else:
        render_status(env, st)


@lab.command()
@inventory_option
@journal_option
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
@click.pass_obj
def down(env: Env, inventory: Path | None, journal_dir: Path | None, as_json: bool) -> None:
    """Remove the lab: agents and other processes in it, namespaces, bridge, veths, state; and
    the journal records of migrations between its hosts (nothing could recover them)."""
    from orthros_py.lab import Lab, teardown
    from orthros_py.policies.journal import Journal, drop_records_of

    # Read before the teardown removes the state file that names them. An unreadable state
    # must not stop down, which is what removes it; its records are then left to recover.
    try:
        up = Lab.find(inventory)
    except OrthrosError:
        up = None
    hosts = [(h.name, h.address) for h in up.hosts] if up is not None else []
    with env.console.status("taking the lab down"):
        report = teardown(inventory)
    # Here, not in the lab, which sits below the policies that own the journal.
    dropped = drop_records_of(Journal(journal_dir) if journal_dir else Journal(), hosts)
    if as_json:
        env.emit_json({**report.to_dict(), "journal_dropped": [r.id for r in dropped]})
    else:
        render_down(env, report)
        for r in dropped:
            env.console.print(f"dropped the journal record {escape(r.id)} ({r.kind}"
                              + (f": {escape(r.title)}" if r.title else "") + ")")


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("host")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@inventory_option
@click.option("--detach", is_flag=True,
              help="Start it in the background as a daemon of HOST and print its pid there.")
@click.option("--log", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="With --detach: its stdout and stderr go here (default /dev/null).")
@click.option("--json", "as_json", is_flag=True, help="With --detach: print both pids as JSON.")
@click.pass_obj
def exec_(env: Env, host: str, argv: tuple[str, ...], inventory: Path | None, detach: bool,
          log: Path | None, as_json: bool) -> None:
    """Run a command inside HOST's network, PID and mount namespaces: lab exec alpha -- CMD.

    With --detach, the pid printed is the one HOST sees (what `orthros migrate` takes)."""
    from orthros_py.lab import Lab

    the_lab = Lab.load(inventory)
    if not detach:
        full = the_lab.argv(host, argv)
        os.execv(full[0], full)
    proc = the_lab.spawn(host, argv, log=log.resolve() if log else None)
    if as_json:
        env.emit_json({"host": proc.host, "pid": proc.host_pid,
                       "machine_pid": proc.machine_pid})
    else:
        click.echo(proc.host_pid)


def render_status(env: Env, st: LabStatus) -> None:
    table = Table(title="lab hosts", title_justify="left")
    for col in ("host", "role", "namespaces", "addresses", "agent"):
        table.add_column(col)
    every = [*st.hosts, *([st.client] if st.client else [])]
    for h in every:
        if h.agent_pid is None:
            agent = "-" if h.role == "client" else f"port {h.agent_port}, not started"
        else:
            state = ("[green]listening[/]" if h.agent_listening
                     else "[yellow]alive[/]" if h.agent_alive else "[red]dead[/]")
            agent = f"{h.agent_pid} on port {h.agent_port}: {state}"
        ns = escape(h.netns) if h.netns_present else f"[red]{escape(h.netns)} (missing)[/]"
        if h.init_pid is not None:
            ns += (f", pid+mnt (init {h.init_pid})" if h.init_alive
                   else f" [red](init {h.init_pid} dead)[/]")
        table.add_row(h.name, h.role.value, ns, ", ".join(h.addresses) or "-", agent)
    env.console.print(table)
    for s in st.services:
        holder = s.get("holder") or "[red]nobody[/]"
        env.console.print(f"service {s['name']} {s['address']}: held by {holder}")
    if st.controller:
        env.console.print(f"this namespace reaches the lab as {st.controller} "
                          f"(bridge {st.bridge} in namespace {st.bridge_netns})")
    if st.agents_note:
        env.console.print(f"[yellow]{escape(st.agents_note)}[/]")


def render_down(env: Env, r: DownReport) -> None:
    if not r.anything:
        env.console.print("no lab was up; nothing to remove")
    else:
        parts = [f"{len(r.namespaces)} namespaces", f"{len(r.links)} links",
                 f"{len(r.killed)} processes"]
        env.console.print(f"[green]the lab is down[/]: removed {', '.join(parts)}"
                          + (f" and {r.state_dir}" if r.state_dir else ""))
    for w in r.warnings:
        env.console.print(f"[yellow]warning:[/] {escape(w)}")


COMMANDS = [lab]
