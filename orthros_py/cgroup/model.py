"""The cgroup migration file: a tree's cgroups in the Orthros paper's three parts.

1. *hierarchy*: every group below the tree's own groups, per cgroup hierarchy;
2. *membership*: which group each process sits in;
3. *limits*: the limit files of each group and their values.

CRIU 4.2.1 records cgroup v1 limits in its images but no cgroup v2 controller limit
(``cpu.max``, ``memory.max``: its ``--cgroup-props`` cannot name the v2 hierarchy), so orthros
keeps its own record, checks it against the destination before anything is frozen, recreates the
groups from it and verifies the restored tree against it. The file is plain text, one fact per
line, so that an operator can read it and ``diff`` a source's against a destination's.

Pure Python: reading and writing the live cgroup filesystem is ``orthros_py.cgroup.fs``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

MAGIC = "# orthros cgroup migration file v1"
FILE_NAME = "orthros-cgroups.txt"  # beside CRIU's images
RESTORED_FILE_NAME = "orthros-cgroups-restored.txt"  # what the destination read back
V2 = ""  # the cgroup v2 hierarchy's name, as /proc/PID/cgroup's "0::" line gives it

# The limit files carried per controller: what constrains a container, not its statistics.
# Order matters where the kernel checks one against another (cpuset: cpus and mems before any
# task may enter; v1 memory: the limit before memsw).
LIMIT_FILES: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us",  # v1
            "cpu.weight", "cpu.max"),  # v2
    "cpuset": ("cpuset.cpus", "cpuset.mems"),
    "memory": ("memory.limit_in_bytes", "memory.soft_limit_in_bytes",  # v1
               "memory.min", "memory.low", "memory.high", "memory.max", "memory.swap.max"),
    "pids": ("pids.max",),
    "blkio": ("blkio.weight",),
    "io": ("io.weight", "io.max"),
    "hugetlb": ("hugetlb.2MB.limit_in_bytes", "hugetlb.1GB.limit_in_bytes",  # v1
                "hugetlb.2MB.max", "hugetlb.1GB.max"),
}
# cgroup v2's own (controller-less) limits.
V2_CORE_FILES = ("cgroup.max.descendants", "cgroup.max.depth")


def controller_of(limit_file: str) -> str:
    """``cpu.max`` -> ``cpu``; ``cgroup.max.depth`` -> ``cgroup`` (v2's core, no controller)."""
    return limit_file.split(".", 1)[0]


def hierarchy_label(name: str) -> str:
    """How a hierarchy reads in the file: its controllers, or ``unified`` for cgroup v2."""
    return name or "unified"


def parse_hierarchy_label(label: str) -> str:
    return V2 if label == "unified" else label


@dataclass(frozen=True)
class Group:
    """One cgroup directory: ``path`` from its hierarchy's root, limits in the order to write."""

    hierarchy: str
    path: str
    limits: tuple[tuple[str, str], ...] = ()

    @property
    def limit_map(self) -> dict[str, str]:
        return dict(self.limits)

    @property
    def depth(self) -> int:
        return 0 if self.path == "/" else self.path.count("/")


@dataclass(frozen=True)
class Member:
    """Where one process sits: ``pid`` as the tree sees it (namespace PID where it has its own)."""

    pid: int
    groups: tuple[tuple[str, str], ...]  # (hierarchy, path)

    def path_in(self, hierarchy: str) -> str | None:
        return dict(self.groups).get(hierarchy)


@dataclass(frozen=True)
class CgroupFile:
    """The three parts. ``roots``: per hierarchy, the tree's top group (the root process's)."""

    roots: tuple[tuple[str, str], ...] = ()
    groups: tuple[Group, ...] = ()
    members: tuple[Member, ...] = ()
    # Hierarchies whose groups the tree shares with the agent or the host's root: not carried.
    skipped: tuple[str, ...] = field(default=())

    @property
    def root_map(self) -> dict[str, str]:
        return dict(self.roots)

    @property
    def empty(self) -> bool:
        return not self.groups

    def group(self, hierarchy: str, path: str) -> Group | None:
        return next((g for g in self.groups if (g.hierarchy, g.path) == (hierarchy, path)), None)

    def limits(self) -> dict[tuple[str, str, str], str]:
        """{(hierarchy, path, file): value}: the part an operator compares."""
        return {(g.hierarchy, g.path, k): v for g in self.groups for k, v in g.limits}

    # -- moving between hosts ------------------------------------------------------------------

    def new_roots(self, given: Mapping[str, str]) -> dict[str, str]:
        """{hierarchy: new top group} from CRIU-style roots, where ``"*"`` names every
        hierarchy not named on its own (co-mounted controllers match as a set)."""
        out: dict[str, str] = {}
        for h in self.root_map:
            named = next((p for k, p in given.items()
                          if k != "*" and set(k.split(",")) == set(h.split(","))), None)
            if named is not None or "*" in given:
                out[h] = named if named is not None else given["*"]
        return out

    def relocated(self, src_root: str, dst_root: str) -> dict[str, str]:
        """{hierarchy: new top group} for a move between hosts that keep their containers'
        groups below different roots: each top group under ``src_root`` goes to the same place
        under ``dst_root``; the rest stay where they are."""
        src, dst = src_root.rstrip("/"), dst_root.rstrip("/")
        out: dict[str, str] = {}
        for h, path in self.roots:
            if src == dst:
                continue
            if not src or path == src or path.startswith(src + "/"):
                out[h] = (dst + path[len(src):]) or "/"
        return out

    def rebased(self, new_roots: Mapping[str, str]) -> CgroupFile:
        """The same groups with each hierarchy's top group moved to ``new_roots[hierarchy]``
        (where given): what a destination with a different cgroup layout creates."""
        def move(h: str, path: str) -> str:
            old, new = self.root_map.get(h), new_roots.get(h)
            if old is None or new is None or old == new:
                return path
            if path == old:
                return new
            if path.startswith(old.rstrip("/") + "/"):
                return new.rstrip("/") + path[len(old.rstrip("/")):]
            return path

        return CgroupFile(
            roots=tuple((h, move(h, p)) for h, p in self.roots),
            groups=tuple(replace(g, path=move(g.hierarchy, g.path)) for g in self.groups),
            members=tuple(Member(m.pid, tuple((h, move(h, p)) for h, p in m.groups))
                          for m in self.members),
            skipped=self.skipped)

    # -- text ---------------------------------------------------------------------------------

    def to_text(self) -> str:
        lines = [MAGIC, "", "[hierarchy]"]
        for h, root in self.roots:
            lines.append(f"root {hierarchy_label(h)} {root}")
        for g in self.groups:
            lines.append(f"group {hierarchy_label(g.hierarchy)} {g.path}")
        for h in self.skipped:
            lines.append(f"skipped {hierarchy_label(h)}")
        lines += ["", "[membership]"]
        for m in self.members:
            where = " ".join(f"{hierarchy_label(h)}:{p}" for h, p in m.groups)
            lines.append(f"pid {m.pid} {where}".rstrip())
        lines += ["", "[limits]"]
        for g in self.groups:
            for k, v in g.limits:
                lines.append(f"{hierarchy_label(g.hierarchy)} {g.path} {k} = {v}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str) -> CgroupFile:
        """Parse ``to_text``'s output; ValueError naming the line that is wrong."""
        lines = text.splitlines()
        if not lines or lines[0].strip() != MAGIC:
            raise ValueError("not an orthros cgroup migration file (first line)")
        section = ""
        roots: list[tuple[str, str]] = []
        order: list[tuple[str, str]] = []
        limits: dict[tuple[str, str], list[tuple[str, str]]] = {}
        members: list[Member] = []
        skipped: list[str] = []
        for no, raw in enumerate(lines[1:], start=2):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                if line.startswith("[") and line.endswith("]"):
                    section = line[1:-1]
                    if section not in ("hierarchy", "membership", "limits"):
                        raise ValueError(f"unknown section [{section}]")
                elif section == "hierarchy":
                    kind, _, rest = line.partition(" ")
                    if kind == "skipped":
                        skipped.append(parse_hierarchy_label(rest))
                        continue
                    label, path = rest.split(" ", 1)
                    check_path(path)
                    if kind == "root":
                        roots.append((parse_hierarchy_label(label), path))
                    elif kind == "group":
                        order.append((parse_hierarchy_label(label), path))
                    else:
                        raise ValueError(f"unknown entry {kind!r}")
                elif section == "membership":
                    kind, pid, *where = line.split(" ")
                    if kind != "pid":
                        raise ValueError(f"unknown entry {kind!r}")
                    groups = []
                    for w in where:
                        label, sep, path = w.partition(":")
                        if not sep:
                            raise ValueError(f"{w!r} is not HIERARCHY:PATH")
                        groups.append((parse_hierarchy_label(label), check_path(path)))
                    members.append(Member(int(pid), tuple(groups)))
                elif section == "limits":
                    head, sep, value = line.partition(" = ")
                    if not sep:
                        raise ValueError("a limit reads HIERARCHY PATH FILE = VALUE")
                    label, path, name = head.split(" ")
                    key = (parse_hierarchy_label(label), path)
                    if key not in order:
                        raise ValueError(f"limit of a group not listed in [hierarchy]: {path}")
                    limits.setdefault(key, []).append((name, value))
                else:
                    raise ValueError("entry outside any section")
            except ValueError as err:
                raise ValueError(f"line {no}: {err}") from None
        found = tuple(Group(h, p, tuple(limits.get((h, p), []))) for h, p in order)
        return cls(tuple(roots), found, tuple(members), tuple(skipped))


def check_path(path: str) -> str:
    """A cgroup path as the file may hold it: absolute, no ``.``/``..`` steps (a file that
    crossed the network must not name directories outside the cgroup hierarchies)."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute cgroup path")
    if any(part in (".", "..") for part in path.split("/")):
        raise ValueError(f"{path!r} steps out of its cgroup hierarchy")
    return path


def diff(expected: CgroupFile, actual: CgroupFile) -> list[str]:
    """What differs between two files, limits and groups, as sentences (empty: the same)."""
    out: list[str] = []
    want, got = expected.limits(), actual.limits()
    for key in sorted(want):
        h, path, name = key
        if key not in got:
            out.append(f"{hierarchy_label(h)} {path}: {name} is missing (expected {want[key]})")
        elif got[key] != want[key]:
            out.append(f"{hierarchy_label(h)} {path}: {name} is {got[key]}, expected {want[key]}")
    missing = {(g.hierarchy, g.path) for g in expected.groups} - \
        {(g.hierarchy, g.path) for g in actual.groups}
    for h, path in sorted(missing):
        out.append(f"{hierarchy_label(h)} {path}: the group is missing")
    return out


def parse_cpu_list(text: str) -> set[int]:
    """``0-2,5`` -> {0, 1, 2, 5}; the kernel's list format (cpuset.cpus, cpuset.mems)."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep:
            out.update(range(int(lo), int(hi) + 1))
        else:
            out.add(int(lo))
    return out


def format_cpu_list(cpus: Iterable[int]) -> str:
    """{0, 1, 2, 5} -> ``0-2,5``."""
    items = sorted(set(cpus))
    out: list[str] = []
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)
