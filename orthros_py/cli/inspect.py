"""``orthros inspect``: what a checkpoint holds, before anyone restores it.

Reads the image directory through ``orthros_py.criu.images`` (no root, no CRIU needed). Tables go
to stderr; ``--json`` writes ``ImageSet.to_dict()`` to stdout.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from orthros_py.cgroup.model import RESTORED_FILE_NAME, CgroupFile, diff, hierarchy_label
from orthros_py.cli.context import Env
from orthros_py.criu.images import (
    PAGE_SIZE,
    CgroupHierarchy,
    CgroupState,
    FdRef,
    ImageSet,
    read_images,
)


@click.command()
@click.argument("images_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON on stdout.")
@click.pass_obj
def inspect(env: Env, images_dir: Path, as_json: bool) -> None:
    """Show what the checkpoint in DIR holds: processes, namespaces, cgroups, sockets, memory."""
    images = read_images(images_dir)
    cgf, restored = _cgroup_files(images_dir)
    if as_json:
        data = images.to_dict()
        if cgf is not None:
            data["cgroup_file"] = _cgroup_file_dict(cgf)
        if restored is not None and cgf is not None:
            data["cgroup_file_restored"] = _cgroup_file_dict(restored)
        env.emit_json(data)
    else:
        render(env, images)
        if cgf is not None:
            render_cgroup_file(env, cgf, restored)


def _cgroup_files(images_dir: Path) -> tuple[CgroupFile | None, CgroupFile | None]:
    """orthros's cgroup migration file of the checkpoint, and what a restore read back."""
    from orthros_py.checkpoint import load_cgroup_file

    cgf = load_cgroup_file(images_dir.resolve())
    back = images_dir / RESTORED_FILE_NAME
    restored = None
    if cgf is not None and back.exists():
        try:
            restored = CgroupFile.from_text(back.read_text())
        except (OSError, ValueError):
            restored = None
    return cgf, restored


def _cgroup_file_dict(cgf: CgroupFile) -> dict[str, object]:
    return {"hierarchy": [{"hierarchy": g.hierarchy, "path": g.path} for g in cgf.groups],
            "membership": [{"pid": m.pid, "groups": dict(m.groups)} for m in cgf.members],
            "limits": [{"hierarchy": h, "path": p, "file": f, "value": v}
                       for (h, p, f), v in cgf.limits().items()],
            "roots": dict(cgf.roots), "skipped": list(cgf.skipped)}


def render_cgroup_file(env: Env, cgf: CgroupFile, restored: CgroupFile | None) -> None:
    """The migration file orthros wrote at the dump, in its three parts, and how the restored
    tree's groups compare with it."""
    out = env.console
    if cgf.empty:
        out.print("cgroup migration file: the tree had no groups of its own"
                  + (f" (shared: {', '.join(hierarchy_label(h) for h in cgf.skipped)})"
                     if cgf.skipped else ""), soft_wrap=True)
        return
    groups = _table("cgroup migration file: hierarchy (1/3)", "hierarchy", "group")
    for g in cgf.groups:
        groups.add_row(hierarchy_label(g.hierarchy), Text(g.path))
    out.print(groups)
    members = _table("cgroup migration file: membership (2/3)", "pid", "hierarchy", "group",
                     right=("pid",))
    for m in cgf.members:
        for i, (h, path) in enumerate(m.groups):
            members.add_row(str(m.pid) if i == 0 else "", hierarchy_label(h), Text(path))
    out.print(members)
    limits = _table("cgroup migration file: limits (3/3)", "hierarchy", "group", "file",
                    "value")
    for (h, path, name), value in cgf.limits().items():
        limits.add_row(hierarchy_label(h), Text(path), name, Text(value))
    out.print(limits)
    if restored is not None:
        moved = cgf.rebased({h: p for h, p in restored.roots})
        bad = diff(moved, restored)
        out.print("restored groups: " + ("the same limits" if not bad else
                                         f"[red]{len(bad)} differ[/]: " + "; ".join(bad[:3])),
                  soft_wrap=True)


def _table(title: str, *columns: str, right: Iterable[str] = (), whole: Iterable[str] = (),
           caption: str | None = None) -> Table:
    """A table whose columns fold rather than truncate (a path or an address cut short is of no
    use to an operator); ``whole`` columns (addresses) do not wrap while others can."""
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    right, whole = set(right), set(whole)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", overflow="fold",
                         no_wrap=col in whole)
    return table


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {plural or word + 's'}"


def _owners(owners: Iterable[FdRef]) -> Text:
    return Text(", ".join(f"{o.pid}:fd{o.fd}" for o in owners) or "-")


def _hierarchy_label(name: str) -> str:
    return name or "cgroup2 (unified)"


def _endpoint(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _opt(value: int | None) -> str:
    return "-" if value is None else str(value)


def render(env: Env, im: ImageSet) -> None:
    out = env.console
    info = im.checkpoint
    threads = sum(len(p.threads) for p in im.processes)
    out.print(Text(
        f"checkpoint in {im.path}: root pid {im.root_pid}, "
        f"{_n(len(im.processes), 'process', 'processes')} "
        f"({_n(threads, 'thread')}), image version {info.img_version}, CRIU run "
        f"{info.criu_run_id or 'unknown'}, network lock {info.network_lock or 'unknown'}"
        + (f", incremental on {info.parent}" if info.parent else "")))

    procs = _table("processes", "pid", "ppid", "pgid", "sid", "command", "state", "threads",
                   right=("pid", "ppid", "pgid", "sid"))
    for p in im.processes:
        procs.add_row(str(p.pid), str(p.ppid), str(p.pgid), str(p.sid), Text(p.command),
                      p.state, " ".join(map(str, p.threads)))
    out.print(procs)

    ns = _table("namespaces", "kind", "id", "whose", "processes", "details", right=("id",))
    for n in im.namespaces:
        whose = {True: "the tree's own", False: "host's (CRIU's)", None: "unknown"}[n.own]
        details = (f"nodename {n.uts['nodename']}, domainname {n.uts['domainname']}"
                   if n.uts else "")
        ns.add_row(n.kind, str(n.id), whose, " ".join(map(str, n.pids)), Text(details))
    out.print(ns)

    render_cgroups(env, im.cgroups)

    tcp = _table("TCP sockets", "state", "local", "remote", "inq", "outq", "owners",
                 right=("inq", "outq"), whole=("state", "local", "remote"),
                 caption="inq/outq: bytes queued (CRIU saves them with --tcp-established)")
    for t in im.tcp:
        outq = _opt(t.outq) + (f" ({t.unsent} unsent)" if t.unsent else "")
        tcp.add_row(t.state, _endpoint(t.local), _endpoint(t.remote), _opt(t.inq), outq,
                    _owners(t.owners))
    out.print(tcp if im.tcp else "TCP sockets: none")

    by_id = {u.id: u for u in im.unix}
    unix = _table("UNIX sockets", "id", "type", "state", "name", "peer", "owners", right=("id",))
    for u in im.unix:
        if u.peer_ino == 0:
            peer = "-"
        elif u.peer_id is None:
            peer = f"outside the tree (ino {u.peer_ino})"
        else:
            peer_sock = by_id.get(u.peer_id)
            where = f" {_owners(peer_sock.owners)}" if peer_sock and peer_sock.owners else ""
            peer = f"#{u.peer_id} {u.peer_name or '(unnamed)'}{where}"
        name = (u.name or "(unnamed)") + (" (deleted)" if u.deleted else "")
        unix.add_row(str(u.id), u.type, u.state, Text(name), Text(peer), _owners(u.owners))
    out.print(unix if im.unix else "UNIX sockets: none")

    mem = _table(f"memory (pages of {PAGE_SIZE} bytes)", "pid", "pages", "MiB", "in this dir",
                 "lazy-capable", "in parent", right=("pid", "pages", "MiB", "in this dir",
                                                     "lazy-capable", "in parent"))
    for m in im.memory:
        mem.add_row(str(m.pid), str(m.pages), f"{m.bytes / 2**20:.1f}", str(m.present),
                    str(m.lazy), str(m.in_parent))
    out.print(mem if im.memory else "memory: no pagemap images (pages went to a page server?)")

    rows: list[tuple[str, str]] = []
    if im.dump_stats:
        s = im.dump_stats
        rows += [("dump: freezing", f"{s.freezing_ms:.2f} ms"),
                 ("dump: frozen", f"{s.frozen_ms:.2f} ms"),
                 ("dump: memory dump", f"{s.memdump_ms:.2f} ms"),
                 ("dump: memory write", f"{s.memwrite_ms:.2f} ms"),
                 ("dump: pages scanned / written", f"{s.pages_scanned} / {s.pages_written}"),
                 ("dump: pages in parent / lazy", f"{s.pages_skipped_parent} / {s.pages_lazy}")]
    if im.restore_stats:
        r = im.restore_stats
        rows += [("restore: forking", f"{r.forking_ms:.2f} ms"),
                 ("restore: restore", f"{r.restore_ms:.2f} ms"),
                 ("restore: pages compared / restored",
                  f"{r.pages_compared} / {r.pages_restored}")]
    if rows:
        stats = Table(title="CRIU statistics", show_header=False, title_justify="left")
        stats.add_column(style="bold")
        stats.add_column(justify="right")
        for k, v in rows:
            stats.add_row(k, v)
        out.print(stats)
    else:
        out.print("CRIU statistics: none recorded")


def _hierarchy_tree(h: CgroupHierarchy) -> Tree:
    tree = Tree(Text(f"{h.name} (v1)" if h.version == 1 else "cgroup2 (unified hierarchy)"))
    nodes: dict[str, Tree] = {}
    for g in h.groups:  # parents come first
        # Hang each group under its nearest recorded ancestor: CRIU records a process's group
        # without the groups above it, so "/a/b" may come with no "/a".
        parent, label, up = tree, g.path, g.path
        while up != "/":
            up = up.rsplit("/", 1)[0] or "/"
            if up in nodes:
                parent, label = nodes[up], g.path[len(up):].lstrip("/")
                break
        nodes[g.path] = parent.add(Text(label))
    return tree


def render_cgroups(env: Env, cg: CgroupState) -> None:
    out = env.console
    if not cg.recorded:
        if cg.membership and all(m.in_criu_cgroups for m in cg.membership):
            out.print("cgroups: not recorded: every process sat in the dumping CRIU's own "
                      "cgroups (a restore puts them in the restoring CRIU's)")
        else:
            out.print("cgroups: not recorded (dumped with --manage-cgroups ignore?)")
        return

    # Part 1: the group hierarchy, per hierarchy.
    tree = Tree("cgroup hierarchy (1/3: groups CRIU recorded)")
    for h in cg.hierarchies:
        tree.children.append(_hierarchy_tree(h))
    out.print(tree)

    # Part 2: which group each process sits in.
    members = _table("cgroup membership (2/3)", "pid", "set", "hierarchy", "group",
                     right=("pid", "set"))
    for m in cg.membership:
        if not m.groups:
            members.add_row(str(m.pid), _opt(m.cg_set), "-",
                            "the dumping CRIU's own cgroups" if m.in_criu_cgroups else "unknown")
        for i, (hierarchy, path) in enumerate(sorted(m.groups.items())):
            members.add_row(str(m.pid) if i == 0 else "", _opt(m.cg_set) if i == 0 else "",
                            _hierarchy_label(hierarchy), Text(path))
    out.print(members)

    # Part 3: every group's limit files and values.
    limits = _table("cgroup limits (3/3)", "hierarchy", "group", "file", "value",
                    caption="(root): CRIU records a hierarchy root's files but never writes "
                            "them back on restore")
    for g in cg.groups():
        items = list(g.limits.items())
        note = " (root)" if g.path == "/" else ""
        if not items:
            limits.add_row(_hierarchy_label(g.hierarchy), Text(g.path + note), "-", "")
        for i, (name, value) in enumerate(items):
            limits.add_row(_hierarchy_label(g.hierarchy) if i == 0 else "",
                           Text(g.path + note) if i == 0 else "", name, Text(value))
    out.print(limits)


COMMANDS = [inspect]
