"""The live cgroup filesystem: read a tree's groups and limits, check a host can honour them,
recreate them, remove them. cgroup v1 hierarchies and cgroup v2 alike (hybrid hosts have both).

Needs root to write. Mounts come from psutil; a process's groups from /proc/PID/cgroup.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from orthros_py.cgroup.model import (
    LIMIT_FILES,
    V2,
    V2_CORE_FILES,
    CgroupFile,
    Group,
    Member,
    controller_of,
    format_cpu_list,
    hierarchy_label,
    parse_cpu_list,
)
from orthros_py.errors import ExitStatus, OrthrosError
from orthros_py.proc.tree import read_cgroups

# Options of a v1 cgroup mount that are not controllers.
_MOUNT_FLAGS = {"rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec", "xattr",
                "clone_children", "noprefix", "cpuset_v2_mode", "nsdelegate",
                "memory_recursiveprot", "memory_localevents", "memory_hugetlb_accounting",
                "favordynmods"}


class CgroupError(OrthrosError):
    """A host cannot honour a tree's cgroups, or they could not be read or recreated."""

    exit_status = ExitStatus.CANNOT_HONOUR


def mounts() -> dict[str, Path]:
    """{hierarchy name as /proc/PID/cgroup gives it: mount point}; cgroup v2 is ``""``."""
    out: dict[str, Path] = {}
    for part in psutil.disk_partitions(all=True):
        if part.fstype == "cgroup2":
            out.setdefault(V2, Path(part.mountpoint))
        elif part.fstype == "cgroup":
            names = [o for o in part.opts.split(",") if o not in _MOUNT_FLAGS]
            if names:
                out.setdefault(",".join(names), Path(part.mountpoint))
    return out


def ns_pid(pid: int) -> int:
    """The PID a process has in its own (innermost) PID namespace."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        pass
    return pid


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as err:
        raise CgroupError(f"cannot write {value!r} to {path}: {err.strerror}") from err


@dataclass
class CgroupFs:
    """This host's cgroup hierarchies (by default: as mounted now)."""

    hierarchies: dict[str, Path]

    @classmethod
    def here(cls) -> CgroupFs:
        return cls(mounts())

    def _mount(self, hierarchy: str) -> Path | None:
        if hierarchy in self.hierarchies:
            return self.hierarchies[hierarchy]
        # /proc/PID/cgroup names co-mounted controllers in the kernel's order; match as a set.
        want = set(hierarchy.split(","))
        return next((p for h, p in self.hierarchies.items() if set(h.split(",")) == want), None)

    def dir(self, hierarchy: str, path: str) -> Path:
        mount = self._mount(hierarchy)
        if mount is None:
            raise CgroupError(f"this host has no cgroup hierarchy {hierarchy_label(hierarchy)}")
        return mount / path.lstrip("/")

    def _controllers(self, hierarchy: str, group_dir: Path) -> set[str]:
        """The controllers whose files a group has: a v1 hierarchy's own, or on v2 those its
        parent enabled (the group's cgroup.controllers)."""
        if hierarchy != V2:
            return {c for c in hierarchy.split(",") if not c.startswith("name=")}
        return set((_read(group_dir / "cgroup.controllers") or "").split())

    def _limits(self, hierarchy: str, group_dir: Path) -> tuple[tuple[str, str], ...]:
        names: list[str] = []
        for ctrl in sorted(self._controllers(hierarchy, group_dir)):
            names.extend(LIMIT_FILES.get(ctrl, ()))
        if hierarchy == V2:
            names.extend(V2_CORE_FILES)
            names.append("cgroup.subtree_control")  # the children's controllers
        out: list[tuple[str, str]] = []
        for name in names:
            value = _read(group_dir / name)
            if value is None or (name == "cgroup.subtree_control" and not value):
                continue
            out.append((name, value))
        return tuple(out)

    def yard(self) -> str | None:
        """A directory where every hierarchy is mounted under the name CRIU gives it (its
        controllers joined by commas, ``name=`` dropped; ``unified`` for v2), which CRIU can use
        as its cgroup yard instead of mounting one of its own per restore: /sys/fs/cgroup on a
        hybrid or v1 host. None when the layout differs (a pure v2 host)."""
        parents = {p.parent for p in self.hierarchies.values()}
        if len(parents) != 1:
            return None
        (parent,) = parents
        for h, mount in self.hierarchies.items():
            name = "unified" if h == V2 else ",".join(c.removeprefix("name=")
                                                      for c in h.split(","))
            if mount.name != name:
                return None
        return str(parent)

    # -- reading -------------------------------------------------------------------------------

    def read_tree(self, pids: Sequence[int]) -> CgroupFile:
        """The cgroup file of a live tree (root first in ``pids``).

        A hierarchy where the root sits at the top ("/") or in the same group as this process
        (the agent's or CLI's own) is not carried: CRIU too leaves such groups to the restorer.
        """
        if not pids:
            raise CgroupError("no processes to read cgroups of")
        own = read_cgroups(os.getpid())
        per_pid = {pid: read_cgroups(pid) for pid in pids}
        root = per_pid[pids[0]]
        if not root:
            raise CgroupError(f"cannot read the cgroups of process {pids[0]}", pid=pids[0])
        roots: list[tuple[str, str]] = []
        skipped: list[str] = []
        for h, path in sorted(root.items()):
            if path == "/" or own.get(h) == path or self._mount(h) is None:
                skipped.append(h)
            else:
                roots.append((h, path))
        groups: list[Group] = []
        seen: set[tuple[str, str]] = set()
        for h, top in roots:
            paths = [top]
            top_dir = self.dir(h, top)
            for dirpath, dirnames, _ in os.walk(top_dir):
                dirnames.sort()
                paths.extend("/" + str(Path(dirpath, d).relative_to(self.dir(h, "/")))
                             for d in dirnames)
            for cg in per_pid.values():  # a process moved outside the root's subtree
                p = cg.get(h)
                if p and p != "/" and p not in paths and own.get(h) != p:
                    paths.append(p)
            for p in paths:
                if (h, p) not in seen:
                    seen.add((h, p))
                    groups.append(Group(h, p, self._limits(h, self.dir(h, p))))
        members = tuple(
            Member(ns_pid(pid), tuple((h, cg[h]) for h, _ in roots if h in cg))
            for pid, cg in per_pid.items())
        groups.sort(key=lambda g: (g.hierarchy, g.depth, g.path))
        return CgroupFile(tuple(roots), tuple(groups), members, tuple(skipped))

    # -- checking ------------------------------------------------------------------------------

    def _nearest_existing(self, hierarchy: str, path: str) -> Path:
        d = self.dir(hierarchy, path)
        top = self.dir(hierarchy, "/")
        while not d.exists() and d != top:
            d = d.parent
        return d

    def check(self, cgf: CgroupFile) -> list[str]:
        """Why this host cannot give ``cgf``'s groups their limits (empty: it can). Reads only."""
        problems: list[str] = []
        for g in cgf.groups:
            label = hierarchy_label(g.hierarchy)
            if self._mount(g.hierarchy) is None:
                problems.append(f"it has no cgroup hierarchy {label} (needed for {g.path})")
                continue
            anchor = self._nearest_existing(g.hierarchy, g.path)
            if g.hierarchy == V2:
                offered = set((_read(self.dir(V2, "/") / "cgroup.controllers") or "").split())
                for name, _ in g.limits:
                    ctrl = controller_of(name)
                    if ctrl != "cgroup" and ctrl not in offered:
                        problems.append(f"its cgroup v2 hierarchy offers no {ctrl} controller "
                                        f"(needed for {name} of {g.path})")
            for name, value in g.limits:
                if name in ("cpuset.cpus", "cpuset.mems"):
                    kind = "CPUs" if name.endswith("cpus") else "memory nodes"
                    eff = _read(anchor / name.replace("cpuset.", "cpuset.effective_")) \
                        or _read(anchor / name) or ""
                    have, want = parse_cpu_list(eff), parse_cpu_list(value)
                    if want - have:
                        problems.append(
                            f"{g.path} is limited to {kind} {value}, but {label} offers only "
                            f"{format_cpu_list(have) or 'none'} there")
                elif g.hierarchy != V2 and anchor == self.dir(g.hierarchy, g.path) and \
                        not (anchor / name).exists():
                    problems.append(f"its {label} groups have no {name} (needed for {g.path})")
        return sorted(set(problems), key=problems.index)

    def require(self, cgf: CgroupFile, host: str | None = None) -> None:
        """CgroupError, one sentence, if this host cannot honour ``cgf``."""
        problems = self.check(cgf)
        if problems:
            where = host or "this host"
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CgroupError(f"{where} cannot honour the tree's cgroup limits: "
                              f"{problems[0]}{more}", host=host, stage="cgroup check",
                              hint="restore where the limits fit, or change them on the source")

    # -- writing -------------------------------------------------------------------------------

    @staticmethod
    def _enable_below(parent: Path, controllers: Iterable[str]) -> None:
        """Enable ``controllers`` for ``parent``'s children (v2 cgroup.subtree_control)."""
        have = set((_read(parent / "cgroup.subtree_control") or "").split())
        missing = sorted(set(controllers) - have)
        if missing:
            _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))

    def _make_v1_dir(self, d: Path) -> None:
        """mkdir, copying cpuset's cpus and mems down (a new cpuset group has none)."""
        d.mkdir()
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (d / name).exists() and not _read(d / name):
                _write(d / name, _read(d.parent / name) or "")

    def apply(self, cgf: CgroupFile) -> list[Path]:
        """Create ``cgf``'s groups (and missing ancestors) and write their limits, parents first.
        Returns the directories created, deepest last; on failure removes them and raises."""
        created: list[Path] = []
        try:
            for g in sorted(cgf.groups, key=lambda g: (g.hierarchy, g.depth)):
                d = self.dir(g.hierarchy, g.path)
                top = self.dir(g.hierarchy, "/")
                # From the hierarchy's root down: on v2 each level must enable the group's
                # controllers for the next before the group can have their files.
                ctrls = {controller_of(n) for n, _ in g.limits} - {"cgroup"}
                for p in [q for q in [*reversed(d.parents), d] if q == d or top in q.parents]:
                    if g.hierarchy == V2 and ctrls:
                        self._enable_below(p.parent, ctrls)
                    if p.exists():
                        continue
                    try:
                        if g.hierarchy == V2:
                            p.mkdir()
                        else:
                            self._make_v1_dir(p)
                    except OSError as err:
                        raise CgroupError(f"cannot create cgroup {p}: {err.strerror}") from err
                    created.append(p)
                for name, value in g.limits:
                    if name == "cgroup.subtree_control":
                        value = " ".join(f"+{c}" for c in value.split())
                    if _read(d / name) != value.lstrip("+"):
                        _write(d / name, value)
        except BaseException:
            remove_dirs(created)
            raise
        return created

    def remove(self, cgf: CgroupFile) -> list[str]:
        """Remove ``cgf``'s groups that are empty, deepest first; returns what stayed and why."""
        dirs = [self.dir(g.hierarchy, g.path) for g in cgf.groups
                if self._mount(g.hierarchy) is not None]
        return remove_dirs(dirs)


def favors_dynmods() -> bool | None:
    """Whether the cgroup v2 hierarchy is mounted with ``favordynmods`` (None: no v2 here).

    Moving a task into a cgroup takes a lock that, when idle, costs an RCU grace period to
    take for writing (about 12 ms here, paid once per restore); ``favordynmods`` keeps it ready
    at some cost to every fork and exit. The lock is global: the flag on v2 covers v1 too."""
    for part in psutil.disk_partitions(all=True):
        if part.fstype == "cgroup2":
            return "favordynmods" in part.opts.split(",")
    return None


def set_favor_dynmods(on: bool) -> bool:
    """Remount the v2 hierarchy with or without ``favordynmods``; returns the previous state.
    CgroupError if there is no v2 hierarchy or the kernel refuses."""
    import ctypes

    mount = mounts().get(V2)
    before = favors_dynmods()
    if mount is None or before is None:
        raise CgroupError("this host has no cgroup v2 hierarchy to set favordynmods on")
    if before == on:
        return before
    libc = ctypes.CDLL(None, use_errno=True)
    ms_remount = 32
    # The syscall, not mount(8): mount(8) would merge the options /proc/mounts lists back in.
    if libc.mount(None, str(mount).encode(), None, ms_remount,
                  b"favordynmods" if on else b"") != 0:
        err = ctypes.get_errno()
        raise CgroupError(f"cannot remount {mount} {'with' if on else 'without'} "
                          f"favordynmods: {os.strerror(err)}")
    return before


def remove_dirs(dirs: Iterable[Path]) -> list[str]:
    """rmdir cgroup directories, deepest first (their children too); returns the failures."""
    left: list[str] = []
    todo: set[Path] = set()
    for d in dirs:
        if d.is_dir():
            todo.add(d)
            todo.update(Path(p) / n for p, ns, _ in os.walk(d) for n in ns)
    for d in sorted(todo, key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except FileNotFoundError:
            continue
        except OSError as err:
            if err.errno == errno.EBUSY:
                left.append(f"{d} still holds processes")
            else:
                left.append(f"{d}: {err.strerror}")
    return left


def wait_empty(dirs: Iterable[Path], timeout: float = 2.0) -> None:
    """Wait until the groups hold no process (an exited task leaves before it is reaped)."""
    import time

    deadline = time.monotonic() + timeout
    pending = [d for d in dirs if d.is_dir()]
    while pending and time.monotonic() < deadline:
        pending = [d for d in pending if (_read(d / "cgroup.procs") or "")]
        if pending:
            time.sleep(0.02)
