"""``orthros hosts``: every host of the inventory as its agent reports it (reachable, versions,
what ``orthros check`` says there, the service addresses it holds); and the options by which the
commands that talk to agents (this one, ``orthros migrate``, ``orthros recover``) choose the
inventory and the key that ``orthros_py.cluster.Cluster`` loads. ``--key`` overrides the key
(the lab's when a lab is up, else the inventory's ``key_file``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape
from rich.table import Table

from orthros_py.cli.context import Env
from orthros_py.errors import OrthrosError
from orthros_py.inventory import INVENTORY_ENV

if TYPE_CHECKING:
    from orthros_py.cluster import Cluster

inventory_option = click.option(
    "--inventory", type=click.Path(path_type=Path, dir_okay=False), envvar=INVENTORY_ENV,
    default=None, help=f"Inventory file (default: vagrant/inventory.toml, or ${INVENTORY_ENV}).")
key_option = click.option(
    "--key", "key_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
    help="Cluster key file [default: the lab's key when a lab is up, else the inventory's "
         "key_file].")


def journal_option(f: Any) -> Any:
    return click.option(
        "--journal", "journal_dir", type=click.Path(file_okay=False, path_type=Path),
        default=None, envvar="ORTHROS_JOURNAL",
        help="Where migrations record their progress for orthros recover "
             "[default: /run/orthros/migrations].")(f)


# --- orthros hosts -------------------------------------------------------------------------------


def probe_host(cluster: Cluster, name: str, *, check: bool) -> dict[str, Any]:
    """What one host's agent says; never raises (an unreachable host is a row too)."""
    h = cluster.inventory.host(name)
    row: dict[str, Any] = {"name": name, "address": h.address, "agent_port": h.agent_port,
                           "reachable": False, "error": None}
    try:
        client = cluster.client(name, timeout=10.0)
        start = time.perf_counter()
        ping = client.ping()
        row["rtt_ms"] = round((time.perf_counter() - start) * 1000, 2)
        row["reachable"] = True
        status = client.status()
        criu = status.get("criu") or {}
        row.update(orthros=ping.version, protocol=ping.protocol, hostname=ping.hostname,
                   kernel=status.get("kernel"), python=status.get("python"),
                   criu=criu.get("version"), criu_error=criu.get("error"),
                   images=len(status.get("images", [])),
                   restored=[t["pid"] for t in status.get("restored", []) if t.get("running")],
                   held=[t["pid"] for t in status.get("held", [])])
        addrs = {a.split("/")[0] for i in client.addr_list() for a in i["addresses"]}
        row["services"] = [s.name for s in cluster.inventory.services if s.address in addrs]
        row["foreign_services"] = [s.name for s in cluster.inventory.services
                                   if s.address in addrs and name not in s.hosts]
        if check:
            report = client.check(quick=True)
            probes = report.get("probes", {})
            row["check"] = {"ok": bool(report.get("ok")),
                            "missing_required": list(report.get("missing_required", [])),
                            "missing_optional": sorted(
                                n for n, r in probes.items()
                                if not r.get("required") and not r.get("ok")),
                            "default_network_lock": report.get("default_network_lock")}
    except OrthrosError as err:
        row["error"] = str(err)
    return row


@click.command()
@inventory_option
@key_option
@journal_option
@click.option("--no-check", is_flag=True, help="Skip running 'orthros check' on each host.")
@click.option("--json", "as_json", is_flag=True, help="Print the hosts as JSON.")
@click.pass_obj
def hosts(env: Env, inventory: Path | None, key_path: Path | None, journal_dir: Path | None,
          no_check: bool, as_json: bool) -> None:
    """Show every inventory host: reachable, versions, check summary, services held."""
    from orthros_py.cluster import Cluster

    cluster = Cluster.load(inventory, key_path)
    names = [h.name for h in cluster.inventory.hosts]
    with env.console.status(f"asking the agents of {len(names)} hosts"), \
            ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        rows = list(pool.map(lambda n: probe_host(cluster, n, check=not no_check), names))
    from orthros_py.policies.journal import Journal

    journal = Journal(journal_dir) if journal_dir else Journal()
    pending = [e for e in journal.entries() if not e.coordinator_alive()]
    if as_json:
        env.emit_json({"inventory": str(cluster.inventory.source), "key": str(cluster.key_path),
                       "hosts": rows,
                       # every policy's, each with its hosts by role (migrate's: source, dest)
                       "interrupted_migrations": [
                           {"image": e.id, "pid": e.pid,
                            **{role: ref.name for role, ref in e.hosts.items()},
                            "stage": e.stage} for e in pending]})
        return
    table = Table(title=f"hosts of {cluster.inventory.source}", title_justify="left")
    for col in ("host", "address", "agent", "orthros", "CRIU", "kernel", "check", "services"):
        table.add_column(col)
    for r in rows:
        if not r["reachable"]:
            table.add_row(r["name"], f"{r['address']}:{r['agent_port']}",
                          "[red]unreachable[/]", "-", "-", "-", "-", "-")
            continue
        chk = r.get("check")
        if chk is None:
            check_text = "-" if no_check else "?"
        elif chk["ok"]:
            check_text = "[green]ok[/]" + (f" ({len(chk['missing_optional'])} optional "
                                           "missing)" if chk["missing_optional"] else "")
        else:
            check_text = f"[red]missing: {escape(', '.join(chk['missing_required']))}[/]"
        services = ", ".join(r.get("services", [])) or "-"
        if r.get("restored"):
            services += f" (restored pids {', '.join(map(str, r['restored']))})"
        table.add_row(r["name"], f"{r['address']}:{r['agent_port']}",
                      f"[green]up[/] {r['rtt_ms']} ms", str(r.get("orthros")),
                      str(r.get("criu") or f"[red]{escape(str(r.get('criu_error')))}[/]"),
                      str(r.get("kernel")), check_text, escape(services))
    env.console.print(table)
    for r in rows:
        if r.get("error"):
            env.console.print(f"[yellow]{r['name']}:[/] {escape(r['error'])}")
        for s in r.get("foreign_services", []):
            env.console.print(f"[yellow]{r['name']} holds {s}, which the inventory does not "
                              "give it[/]")
    for e in pending:
        env.console.print(f"[red]interrupted {e.kind} {e.id}[/]: {escape(e.title)}, stopped "
                          f"during {e.stage}; run orthros recover (or orthros recover --forget "
                          f"{e.id} if its hosts are gone for good)", soft_wrap=True)


COMMANDS = [hosts]
