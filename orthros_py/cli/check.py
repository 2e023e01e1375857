"""``orthros check``: what this host offers orthros, with the fix for each missing item."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from orthros_py.cli.context import Env
from orthros_py.host.probe import Report, Status, missing_error, run_probes

_MARK = {
    Status.OK: "[green]✓[/]",
    Status.WARN: "[yellow]![/]",
    Status.MISSING: "[bold red]✗[/]",
}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--quick", is_flag=True,
              help="Skip compiling a test BPF program (takes seconds); only look for BCC.")
@click.pass_obj
def check(env: Env, as_json: bool, quick: bool) -> None:
    """Probe this host for what dump, restore and the network locks need.

    Exits 0 when every required item (root, CRIU >= 4.2, a passing 'criu check') is present,
    and 4 naming what is missing otherwise.
    """
    with env.console.status("probing the host") as status:
        report = run_probes(quick=quick,
                            progress=lambda what: status.update(f"probing {escape(what)}"))
    render(env, report)
    if as_json:
        env.emit_json(report.to_dict())
    err = missing_error(report)
    if err is not None:
        raise err


def render(env: Env, report: Report) -> None:
    table = Table(title="orthros check", title_justify="left",
                  caption="✓ present   ! optional, missing or with a caveat   ✗ required, missing",
                  caption_justify="left")
    table.add_column("item", style="bold", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("detail", overflow="fold")
    table.add_column("fix", overflow="fold")
    for r in report.results:
        title = escape(r.title) + (" [dim](required)[/]" if r.required else "")
        table.add_row(title, _MARK[r.status], escape(r.detail), escape(r.fix or ""))
    env.console.print(table)
    lock = report.default_network_lock
    why = ("XDP works here" if lock == "xdp"
           else "BPF/XDP is unavailable, so CRIU's own iptables method")
    env.console.print(f"default network lock: [bold]{lock}[/] ({why})")
    tracking = {"soft-dirty": "soft-dirty bits",
                "uffd-wp": "userfaultfd write-protect, through orthros's patched CRIU"}
    method = report.dirty_tracking
    if method is None:
        env.console.print("dirty tracking: [bold]none[/] (incremental checkpoints fall back to "
                          "full ones)")
    else:
        env.console.print(f"dirty tracking: [bold]{method}[/] ({tracking.get(method, method)})")
    if report.ok:
        env.console.print("[green]this host can dump and restore[/]")


COMMANDS = [check]
