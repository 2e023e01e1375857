"""``orthros recover``: finish or undo what a policy whose coordinator died left half way, from
the journal record it kept; each record goes to the recover function of the policy that wrote
it (``orthros_py.policies.engine.recover_function``, by the record's kind). ``--forget`` drops a
record whose tree is gone for good."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape

from orthros_py.cli.context import Env
from orthros_py.cli.hosts import inventory_option, journal_option, key_option
from orthros_py.cli.progress import ProgressView

if TYPE_CHECKING:
    from orthros_py.policies.journal import Journal


def _load_policies() -> None:
    """Import every policy that writes journal records: each registers its recover function."""
    import orthros_py.policies.migrate  # noqa: F401


@click.command()
@click.argument("image", required=False)
@click.option("--forget", is_flag=True,
              help="Drop the journal record of IMAGE without touching any host: for a run "
                   "whose tree and hosts are gone for good (a lab since taken down).")
@inventory_option
@key_option
@journal_option
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
@click.pass_obj
def recover(env: Env, image: str | None, forget: bool, inventory: Path | None,
            key_path: Path | None, journal_dir: Path | None, as_json: bool) -> None:
    """Finish or undo migrations whose `orthros migrate` died half way (killed, crashed, its
    session lost): from the journal it kept, finish one whose destination already runs the
    tree, roll back any other, so that nothing stays stopped, locked or moved. IMAGE picks one
    (`orthros recover` alone lists and handles them all); `--forget IMAGE` drops its record
    instead, touching no host."""
    from orthros_py.policies.engine import recover_function
    from orthros_py.policies.journal import Journal

    journal = Journal(journal_dir) if journal_dir else Journal()
    if forget:
        if image is None:
            raise click.UsageError("--forget needs the IMAGE whose record to drop")
        _forget(env, journal, image, as_json)
        return
    entries = [journal.read(image)] if image else journal.entries()
    waiting = [e for e in entries if e.coordinator_alive()]
    todo = [e for e in entries if not e.coordinator_alive()]
    for e in waiting:
        env.console.print(f"{e.kind} {e.id} ({e.title}) is still running (orthros {e.kind}, "
                          f"pid {e.coordinator}): left alone")
    if not todo:
        if not waiting:
            env.console.print(f"no interrupted migration in {journal.directory}")
        if as_json:
            env.emit_json([])
        return
    _load_policies()
    from orthros_py.cluster import Cluster
    from orthros_py.policies.hosts import Host

    cluster = Cluster.load(inventory, key_path)
    done = []
    for e in todo:
        env.console.print(f"[bold]{e.id}[/]: {e.kind} {escape(e.title)}, stopped during "
                          f"{e.stage}")
        fn = recover_function(e.kind)
        hosts = {role: Host.of(cluster, ref.name) for role, ref in e.hosts.items()}
        with ProgressView(env, quiet=as_json) as view:
            result = fn(e, hosts, journal=journal, observer=view)
        done.append(result.to_dict())
        if not as_json:
            where = (f"pid {result.pid} runs on {result.runs_on}"
                     + (f" as pid {result.runs_as}" if result.runs_as not in (None, result.pid)
                        else "")) if result.runs_as is not None else "the tree does not run"
            style = "green" if result.outcome != "failed" else "red"
            env.console.print(f"[{style}]{result.outcome}[/]: {where}", soft_wrap=True)
            for line in result.problems + result.leftovers + result.warnings:
                env.console.print(f"  [yellow]{escape(line)}[/]", soft_wrap=True)
    if as_json:
        env.emit_json(done)
    if any(d["outcome"] == "failed" for d in done):
        raise SystemExit(1)


def _forget(env: Env, journal: Journal, image: str, as_json: bool) -> None:
    """Drop one record, saying what it was; a running coordinator's is refused."""
    from orthros_py.policies.journal import JournalError

    path = journal.path(image)
    try:
        e = journal.read(image)
    except JournalError:
        if not path.exists():
            raise
        # Unreadable (damaged, or of another version): all there is to say is its path.
        journal.remove(image)
        if as_json:
            env.emit_json({"forgot": image, "path": str(path), "readable": False})
        else:
            env.console.print(f"forgot the unreadable journal record {escape(str(path))}")
        return
    if e.coordinator_alive():
        raise click.UsageError(f"{e.kind} {e.id} is still running (orthros {e.kind}, pid "
                               f"{e.coordinator}): it keeps its own record")
    journal.remove(image)
    hosts = {role: ref.name for role, ref in e.hosts.items()}
    if as_json:
        env.emit_json({"forgot": e.id, "path": str(path), "readable": True, "kind": e.kind,
                       "pid": e.pid, "hosts": hosts, "stage": e.stage, "title": e.title})
        return
    env.console.print(f"forgot {e.kind} {e.id}: {escape(e.title)}, stopped during {e.stage} "
                      f"(hosts: {', '.join(f'{r} {n}' for r, n in hosts.items())}); nothing "
                      "on those hosts was touched: whatever of it is still there (a stopped "
                      "tree, locks, an address, images) stays", soft_wrap=True)


COMMANDS = [recover]
