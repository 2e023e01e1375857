"""What a CRIU checkpoint holds, read from its image directory through ``pycriu.images.load``.

Wraps CRIU's image files (protobuf, field names from ``criu/images/*.proto``): ``inventory.img``,
``pstree.img``, ``core-PID.img``, ``ids-PID.img``, ``utsns-ID.img``, ``cgroup.img``,
``files.img`` with ``fdinfo-ID.img``, ``tcp-stream-INO.img``, ``pagemap-PID.img`` and the
``stats-dump``/``stats-restore`` statistics. Needs only read access to the directory, no root and
no CRIU binary. ``read_images`` does the I/O; the ``parse_*`` functions are pure, take pycriu's
dicts (loaded with ``pretty=False``: plain integers) and are unit-tested on fixtures.

The cgroup state comes in three parts, like the "cgroup migration file" of the Orthros paper:
the group hierarchy (every directory CRIU recorded, per hierarchy), which group each process sits
in, and every group's limit files with their values.
"""

from __future__ import annotations

import mmap
import quopri
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orthros_py.criu.stats import DumpStats, RestoreStats, dump_stats_from, restore_stats_from
from orthros_py.errors import BadImageError

# task_kobj_ids_entry field -> namespace name, in /proc/PID/ns spelling (as proc/tree.py uses).
NS_FIELDS = {
    "pid_ns_id": "pid",
    "net_ns_id": "net",
    "ipc_ns_id": "ipc",
    "uts_ns_id": "uts",
    "mnt_ns_id": "mnt",
    "user_ns_id": "user",
    "cgroup_ns_id": "cgroup",
    "time_ns_id": "time",
}

# task_core_entry.task_state (CRIU's compel task states).
TASK_STATES = {1: "alive", 3: "zombie", 6: "stopped"}
ZOMBIE = 3

# Socket constants CRIU copies from the kernel (inet_sk_entry / unix_sk_entry).
AF_INET, AF_INET6 = 2, 10
IPPROTO_TCP = 6
SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket"}
SOCK_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}

# pagemap_entry.flags (criu/include/pagemap.h).
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4

# CRIU's own enum NETWORK_LOCK_METHOD (cr_options.h), not the RPC one: inventory stores this.
NETWORK_LOCKS = {0: "iptables", 1: "nftables", 2: "skip"}

# Pages are counted in the dumping host's page size; CRIU restores only on the same architecture,
# so the reader's page size is the right one for any checkpoint it could restore.
PAGE_SIZE = mmap.PAGESIZE

# cgroup files CRIU records with an empty value only to keep their permissions: no limit.
CG_MEMBERSHIP_FILES = frozenset({"cgroup.procs", "tasks", "cgroup.threads"})


# --------------------------------------------------------------------------------------------
# Value objects


@dataclass(frozen=True)
class CheckpointInfo:
    """inventory.img: how and by which CRIU the checkpoint was made."""

    img_version: int
    criu_run_id: str | None
    network_lock: str | None
    tcp_close: bool
    lsm: str | None
    # The directory of the previous dump this one is incremental on (the ``parent`` link).
    parent: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProcessEntry:
    pid: int
    ppid: int  # 0 for the tree's root
    pgid: int
    sid: int
    command: str  # the kernel's comm (15 characters at most), from core-PID.img
    state: str
    threads: tuple[int, ...]
    # namespace name -> CRIU's id for it in this checkpoint (not an inode number).
    namespaces: dict[str, int] = field(default_factory=dict)
    cg_set: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["threads"] = list(self.threads)
        return d


@dataclass(frozen=True)
class NamespaceInfo:
    kind: str  # "net", "uts", ...
    id: int
    # True: the tree's own namespace, dumped with it. False: the one the dumping CRIU ran in,
    # which a restore joins as it finds it. None: the checkpoint does not say (no root_ids).
    own: bool | None
    pids: tuple[int, ...]
    # utsns-ID.img for an own UTS namespace: nodename and domainname.
    uts: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pids"] = list(self.pids)
        return d


@dataclass(frozen=True)
class CgroupGroup:
    """One cgroup directory CRIU recorded, with the files (limits) it saved."""

    hierarchy: str  # controllers joined by "," ("cpu", "name=systemd"); "" is cgroup v2
    path: str  # absolute within the hierarchy: "/", "/a/b"
    properties: tuple[tuple[str, str], ...]
    mode: int | None = None

    @property
    def limits(self) -> dict[str, str]:
        return {k: v for k, v in self.properties if k not in CG_MEMBERSHIP_FILES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "hierarchy": self.hierarchy,
            "path": self.path,
            # A hierarchy's root: CRIU records its files but never writes them back on restore.
            "root": self.path == "/",
            "mode": f"{self.mode & 0o7777:04o}" if self.mode is not None else None,
            "limits": self.limits,
        }


@dataclass(frozen=True)
class CgroupHierarchy:
    controllers: tuple[str, ...]
    threaded: bool
    groups: tuple[CgroupGroup, ...]  # every recorded directory, parents before children

    @property
    def name(self) -> str:
        return ",".join(self.controllers)

    @property
    def version(self) -> int:
        # CRIU names the cgroup2 hierarchy by an empty controller, as /proc/PID/cgroup's "0::".
        return 2 if self.name == "" else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "hierarchy": self.name,
            "version": self.version,
            "controllers": [c for c in self.controllers if c],
            "threaded": self.threaded,
            "groups": [g.path for g in self.groups],
        }


@dataclass(frozen=True)
class CgroupMembership:
    pid: int
    cg_set: int | None
    # hierarchy -> path; empty when CRIU recorded nothing for this process's set.
    groups: dict[str, str]
    # The process sat in the same cgroups as the dumping CRIU: a restore puts it in the
    # restoring CRIU's cgroups, whatever they are.
    in_criu_cgroups: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CgroupState:
    # False when cgroup.img is absent: every process was in CRIU's own cgroups, or cgroups
    # were not managed at all.
    recorded: bool
    hierarchies: tuple[CgroupHierarchy, ...]
    membership: tuple[CgroupMembership, ...]

    def groups(self) -> Iterator[CgroupGroup]:
        for h in self.hierarchies:
            yield from h.groups

    def group(self, hierarchy: str, path: str) -> CgroupGroup | None:
        return next((g for g in self.groups() if g.hierarchy == hierarchy and g.path == path),
                    None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recorded": self.recorded,
            "hierarchy": [h.to_dict() for h in self.hierarchies],
            "membership": [m.to_dict() for m in self.membership],
            "limits": [g.to_dict() for g in self.groups()],
        }


@dataclass(frozen=True)
class FdRef:
    """A file descriptor of a process that refers to a file (socket) of the checkpoint."""

    pid: int
    fd: int


@dataclass(frozen=True)
class TcpSocket:
    id: int
    ino: int
    family: str  # "ipv4" or "ipv6"
    state: str
    local: tuple[str, int]
    remote: tuple[str, int]
    # Queued bytes from tcp-stream-INO.img (established connections dumped with
    # --tcp-established); None where CRIU saved no stream.
    inq: int | None
    outq: int | None
    unsent: int | None
    owners: tuple[FdRef, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ino": self.ino,
            "family": self.family,
            "state": self.state,
            "local": list(self.local),
            "remote": list(self.remote),
            "inq": self.inq,
            "outq": self.outq,
            "unsent": self.unsent,
            "owners": [asdict(o) for o in self.owners],
        }


@dataclass(frozen=True)
class UnixSocket:
    id: int
    ino: int
    type: str  # "stream", "dgram", "seqpacket"
    state: str
    # A path, "@name" for an abstract name (NULs shown as "@", as ss does), "" when unnamed.
    name: str
    deleted: bool
    peer_ino: int  # 0: no peer
    # The peer's file id and name when it is part of the checkpoint; None when it is not
    # (an external peer, which a dump accepts only with --ext-unix-sk).
    peer_id: int | None
    peer_name: str | None
    owners: tuple[FdRef, ...] = ()

    @property
    def external_peer(self) -> bool:
        return self.peer_ino != 0 and self.peer_id is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["owners"] = [asdict(o) for o in self.owners]
        d["external_peer"] = self.external_peer
        return d


@dataclass(frozen=True)
class MemoryInfo:
    """pagemap-PID.img: the pages of one process's memory the checkpoint accounts for."""

    pid: int
    pages_id: int | None  # which pages-N.img holds them
    pages: int  # all pages the pagemap covers
    present: int  # written into this directory's pages-N.img
    # May be restored lazily (post-copy): private anonymous memory. Such pages are present too
    # unless the dump left them to be served from a page server (--lazy-pages).
    lazy: int
    in_parent: int  # in the parent checkpoint (incremental dump)

    @property
    def bytes(self) -> int:
        return self.pages * PAGE_SIZE

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bytes"] = self.bytes
        return d


@dataclass(frozen=True)
class ImageSet:
    """Everything ``orthros inspect`` shows of one checkpoint."""

    path: Path
    checkpoint: CheckpointInfo
    processes: tuple[ProcessEntry, ...]
    namespaces: tuple[NamespaceInfo, ...]
    cgroups: CgroupState
    tcp: tuple[TcpSocket, ...]
    unix: tuple[UnixSocket, ...]
    memory: tuple[MemoryInfo, ...]
    dump_stats: DumpStats | None
    restore_stats: RestoreStats | None

    @property
    def root_pid(self) -> int:
        return self.processes[0].pid

    def to_dict(self) -> dict[str, Any]:
        return {
            "images_dir": str(self.path),
            "root_pid": self.root_pid,
            "checkpoint": self.checkpoint.to_dict(),
            "processes": [p.to_dict() for p in self.processes],
            "namespaces": [n.to_dict() for n in self.namespaces],
            "cgroups": self.cgroups.to_dict(),
            "tcp": [t.to_dict() for t in self.tcp],
            "unix": [u.to_dict() for u in self.unix],
            "memory": [m.to_dict() for m in self.memory],
            "stats": {
                "dump": self.dump_stats.to_dict() if self.dump_stats else None,
                "restore": self.restore_stats.to_dict() if self.restore_stats else None,
            },
        }


# --------------------------------------------------------------------------------------------
# Pure parsing of pycriu's dicts


def parse_checkpoint(inventory: Mapping[str, Any], parent: str | None = None) -> CheckpointInfo:
    lock = inventory.get("network_lock_method")
    return CheckpointInfo(
        img_version=int(inventory["img_version"]),
        criu_run_id=inventory.get("dump_criu_run_id"),
        network_lock=NETWORK_LOCKS.get(int(lock), str(lock)) if lock is not None else None,
        tcp_close=bool(inventory.get("tcp_close", False)),
        lsm=inventory.get("lsmtype"),
        parent=parent,
    )


def core_cg_set(core: Mapping[str, Any]) -> int | None:
    """The cgroup set of a task's main thread: CRIU now keeps it per thread (thread_core),
    older images in the now deprecated task-wide tc.cg_set."""
    for part in ("thread_core", "tc"):
        value = (core.get(part) or {}).get("cg_set")
        if value is not None:
            return int(value)
    return None


def namespace_ids(ids: Mapping[str, Any]) -> dict[str, int]:
    return {name: int(ids[key]) for key, name in NS_FIELDS.items() if key in ids}


def parse_processes(
    pstree: Sequence[Mapping[str, Any]],
    cores: Mapping[int, Mapping[str, Any]],
    ids: Mapping[int, Mapping[str, Any]],
) -> list[ProcessEntry]:
    """pstree.img entries joined with each process's core-PID.img and ids-PID.img entries."""
    out: list[ProcessEntry] = []
    for entry in pstree:
        pid = int(entry["pid"])
        core = cores.get(pid, {})
        tc = core.get("tc") or {}
        state = int(tc.get("task_state", 1))
        out.append(ProcessEntry(
            pid=pid,
            ppid=int(entry["ppid"]),
            pgid=int(entry["pgid"]),
            sid=int(entry["sid"]),
            command=str(tc.get("comm", "")),
            state=TASK_STATES.get(state, str(state)),
            threads=tuple(int(t) for t in entry.get("threads") or [pid]),
            namespaces=namespace_ids(ids.get(pid, {})),
            cg_set=core_cg_set(core),
        ))
    return out


def parse_namespaces(
    processes: Sequence[ProcessEntry],
    root_ids: Mapping[str, Any] | None,
    uts: Mapping[int, Mapping[str, Any]],
) -> list[NamespaceInfo]:
    """Every namespace the tree's processes live in. ``root_ids`` (inventory.img) are the ids of
    the dumping CRIU's own namespaces: a namespace with another id belongs to the tree."""
    roots = namespace_ids(root_ids) if root_ids is not None else None
    members: dict[tuple[str, int], list[int]] = {}
    for p in processes:
        for kind, ns_id in p.namespaces.items():
            members.setdefault((kind, ns_id), []).append(p.pid)
    order = list(NS_FIELDS.values())
    out: list[NamespaceInfo] = []
    for (kind, ns_id), pids in sorted(members.items(), key=lambda m: (order.index(m[0][0]),
                                                                       m[0][1])):
        own = None if roots is None or kind not in roots else roots[kind] != ns_id
        uts_entry = uts.get(ns_id) if kind == "uts" else None
        out.append(NamespaceInfo(
            kind, ns_id, own, tuple(pids),
            {"nodename": str(uts_entry.get("nodename", "")),
             "domainname": str(uts_entry.get("domainname", ""))} if uts_entry else None,
        ))
    return out


def _walk_dirs(
    hierarchy: str, dirs: Sequence[Mapping[str, Any]], parent: str
) -> Iterator[CgroupGroup]:
    for d in dirs:
        # A top-level dir_name is its path from the hierarchy's root ("" for the root itself,
        # possibly several components); a child's dir_name is relative to its parent.
        name = str(d.get("dir_name", "")).strip("/")
        path = f"{parent.rstrip('/')}/{name}" if name else parent
        perms = d.get("dir_perms")
        yield CgroupGroup(
            hierarchy, path,
            tuple((str(p["name"]), str(p.get("value", ""))) for p in d.get("properties") or []),
            int(perms["mode"]) if perms else None,
        )
        yield from _walk_dirs(hierarchy, d.get("children") or [], path)


def _hierarchy_key(name: str, hierarchies: Sequence[CgroupHierarchy]) -> str:
    """The recorded hierarchy a cg_member_entry name ("cpu", "cpu,cpuacct", "") belongs to."""
    wanted = set(name.split(","))
    for h in hierarchies:
        if set(h.controllers) == wanted or name in h.controllers:
            return h.name
    return name


def parse_cgroups(
    cgroup: Mapping[str, Any] | None,
    cg_sets: Mapping[int, int | None],
    root_cg_set: int | None,
) -> CgroupState:
    """The three parts of the cgroup state from cgroup.img's entry (None when absent),
    each process's cg_set (pid -> set id, from core-PID.img) and inventory's root_cg_set,
    which is the set the dumping CRIU itself sat in."""
    hierarchies: list[CgroupHierarchy] = []
    sets: dict[int, dict[str, str]] = {}
    if cgroup is not None:
        for ctl in cgroup.get("controllers") or []:
            cnames = tuple(str(c) for c in ctl.get("cnames") or [""])
            name = ",".join(cnames)
            hierarchies.append(CgroupHierarchy(
                cnames, bool(ctl.get("is_threaded", False)),
                tuple(_walk_dirs(name, ctl.get("dirs") or [], "/")),
            ))
        for s in cgroup.get("sets") or []:
            sets[int(s["id"])] = {
                _hierarchy_key(str(m["name"]), hierarchies): str(m["path"])
                for m in s.get("ctls") or []
            }
    membership = [
        CgroupMembership(pid, set_id, dict(sets.get(set_id, {})) if set_id is not None else {},
                         set_id is not None and set_id == root_cg_set and set_id not in sets)
        for pid, set_id in cg_sets.items()
    ]
    return CgroupState(cgroup is not None, tuple(hierarchies), tuple(membership))


def inet_address(words: Sequence[int], family: int) -> str:
    """An address from inet_sk_entry's src_addr/dst_addr: 32-bit words that hold the address's
    bytes in network order, read as native integers by CRIU (as pycriu's own ntohl assumes)."""
    if family == AF_INET6:
        raw = struct.pack("=4I", *[*words, 0, 0, 0, 0][:4])
        return socket.inet_ntop(socket.AF_INET6, raw)
    raw = struct.pack("=I", int(words[0]) if words else 0)
    return socket.inet_ntop(socket.AF_INET, raw)


def unix_name(value: str | bytes) -> str:
    """unix_sk_entry.name as pycriu gives it (quoted-printable: the name may hold NULs)."""
    raw = quopri.decodestring(value.encode() if isinstance(value, str) else value)
    if not raw:
        return ""
    if raw[0] == 0:  # an abstract name; ss and /proc/net/unix write its NULs as "@"
        return raw.replace(b"\0", b"@").decode(errors="backslashreplace")
    # A path carries the terminating NUL when the binder counted it in the address length.
    return raw.split(b"\0", 1)[0].decode(errors="backslashreplace")


def fd_owners(
    files_ids: Mapping[int, int], fdinfo: Mapping[int, Sequence[Mapping[str, Any]]]
) -> dict[int, list[FdRef]]:
    """file id -> the (pid, fd) pairs that hold it. ``files_ids`` maps pid -> ids' files_id;
    ``fdinfo`` maps files_id -> fdinfo-ID.img entries (processes sharing a table share one)."""
    owners: dict[int, list[FdRef]] = {}
    for pid, files_id in files_ids.items():
        for e in fdinfo.get(files_id, []):
            owners.setdefault(int(e["id"]), []).append(FdRef(pid, int(e["fd"])))
    return owners


def parse_tcp(
    files: Sequence[Mapping[str, Any]],
    streams: Mapping[int, Mapping[str, Any]],
    owners: Mapping[int, Sequence[FdRef]],
) -> list[TcpSocket]:
    """TCP sockets among files.img entries; ``streams`` maps a socket's inode to its
    tcp-stream image entry."""
    out: list[TcpSocket] = []
    for f in files:
        isk = f.get("isk")
        if not isk or int(isk.get("proto", 0)) != IPPROTO_TCP:
            continue
        family = int(isk["family"])
        ino = int(isk["ino"])
        stream = streams.get(ino)
        state = int(isk["state"])
        out.append(TcpSocket(
            id=int(isk["id"]),
            ino=ino,
            family="ipv6" if family == AF_INET6 else "ipv4",
            state=SOCK_STATES.get(state, str(state)),
            local=(inet_address(isk.get("src_addr") or [], family), int(isk["src_port"])),
            remote=(inet_address(isk.get("dst_addr") or [], family), int(isk["dst_port"])),
            inq=int(stream["inq_len"]) if stream else None,
            outq=int(stream["outq_len"]) if stream else None,
            unsent=int(stream.get("unsq_len", 0)) if stream else None,
            owners=tuple(owners.get(int(isk["id"]), ())),
        ))
    return out


def parse_unix(
    files: Sequence[Mapping[str, Any]], owners: Mapping[int, Sequence[FdRef]]
) -> list[UnixSocket]:
    """UNIX sockets among files.img entries, each peer resolved through its inode number."""
    entries = [f["usk"] for f in files if f.get("usk")]
    by_ino = {int(u["ino"]): u for u in entries}
    out: list[UnixSocket] = []
    for u in entries:
        name = unix_name(u.get("name", ""))
        if name and not name.startswith(("/", "@")) and u.get("name_dir"):
            name = f"{str(u['name_dir']).rstrip('/')}/{name}"  # bound by a relative path
        peer_ino = int(u.get("peer", 0))
        peer = by_ino.get(peer_ino) if peer_ino else None
        stype, state = int(u["type"]), int(u["state"])
        out.append(UnixSocket(
            id=int(u["id"]),
            ino=int(u["ino"]),
            type=SOCK_TYPES.get(stype, str(stype)),
            state=SOCK_STATES.get(state, str(state)),
            name=name,
            deleted=bool(u.get("deleted", False)),
            peer_ino=peer_ino,
            peer_id=int(peer["id"]) if peer else None,
            peer_name=unix_name(peer.get("name", "")) if peer else None,
            owners=tuple(owners.get(int(u["id"]), ())),
        ))
    return out


def parse_memory(pid: int, pagemap: Sequence[Mapping[str, Any]]) -> MemoryInfo:
    """pagemap-PID.img: a pagemap_head entry, then one entry per run of pages."""
    pages_id: int | None = None
    total = present = lazy = in_parent = 0
    for e in pagemap:
        if "pages_id" in e:
            pages_id = int(e["pages_id"])
            continue
        n = int(e.get("nr_pages") or e.get("compat_nr_pages") or 0)
        flags = e.get("flags")
        if flags is None:  # images older than the flags field had only in_parent
            flags = PE_PARENT if e.get("in_parent") else PE_PRESENT
        total += n
        present += n if int(flags) & PE_PRESENT else 0
        lazy += n if int(flags) & PE_LAZY else 0
        in_parent += n if (int(flags) & PE_PARENT or e.get("in_parent")) else 0
    return MemoryInfo(pid, pages_id, total, present, lazy, in_parent)


# --------------------------------------------------------------------------------------------
# Reading a directory


class _Reader:
    """Loads image files of one directory, turning every failure into BadImageError."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def optional(
        self, name: str, magic: str, *, no_payload: bool = False
    ) -> list[dict[str, Any]] | None:
        """The entries of image ``name``, or None if the file does not exist."""
        file = self.path / name
        from pycriu import images as pimages  # lazy: ``orthros --help`` runs without pycriu

        try:
            with file.open("rb") as f:
                img = pimages.load(f, no_payload=no_payload)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise BadImageError(f"cannot read {file}: {err.strerror}") from err
        except Exception as err:  # pycriu raises bare exceptions of several kinds on bad data
            raise BadImageError(f"{name} in {self.path} is corrupt: {_reason(err)}") from err
        if img.get("magic") != magic:
            raise BadImageError(
                f"{name} in {self.path} is corrupt: it holds an image of type "
                f"{img.get('magic')} where {magic} belongs")
        return list(img.get("entries") or [])

    def required(self, name: str, magic: str) -> list[dict[str, Any]]:
        entries = self.optional(name, magic)
        if entries is None:
            raise BadImageError(f"the checkpoint in {self.path} is incomplete: {name} is missing")
        return entries

    def first(self, name: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """The single entry of an image that must hold one (inventory, core, ids, ...)."""
        if not entries:
            raise BadImageError(f"{name} in {self.path} is corrupt: it holds no entry")
        return entries[0]

    def one(self, name: str, magic: str) -> dict[str, Any]:
        return self.first(name, self.required(name, magic))

    def one_optional(self, name: str, magic: str) -> dict[str, Any] | None:
        entries = self.optional(name, magic)
        return None if entries is None else self.first(name, entries)


def _reason(err: Exception) -> str:
    from pycriu import images as pimages

    if isinstance(err, pimages.MagicException):
        return f"unknown image magic {err.magic & 0xFFFFFFFF:#010x}"
    if isinstance(err, struct.error):
        return "it is cut short"
    text = str(err).strip()
    if type(err).__name__ == "DecodeError":  # google.protobuf's, whichever backend raised it
        return f"its protobuf data is damaged ({text})"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_dump_stats(path: Path) -> DumpStats | None:
    """CRIU's ``stats-dump`` of a checkpoint, if CRIU wrote one."""
    entry = _Reader(path).one_optional("stats-dump", "STATS")
    return dump_stats_from(entry) if entry else None


def read_restore_stats(path: Path) -> RestoreStats | None:
    """CRIU's ``stats-restore``, written into the image directory by a restore."""
    entry = _Reader(path).one_optional("stats-restore", "STATS")
    return restore_stats_from(entry) if entry else None


def image_pids(images_dir: Path) -> list[int]:
    """The PIDs recorded in a checkpoint's process tree; BadImageError if it cannot be read.

    They are the PIDs in the tree's own PID namespace: host PIDs unless the root was the init of
    a PID namespace of its own (see ``image_has_own_pidns``). Reads inventory and pstree only."""
    images_dir = images_dir.resolve()
    if not images_dir.is_dir():
        raise BadImageError(f"image directory {images_dir} does not exist")
    for name in ("inventory.img", "pstree.img"):
        if not (images_dir / name).exists():
            raise BadImageError(f"{images_dir} holds no checkpoint: {name} is missing")
    r = _Reader(images_dir)
    r.one("inventory.img", "INVENTORY")
    pids: list[int] = []
    for entry in r.required("pstree.img", "PSTREE"):
        pids.append(int(entry["pid"]))
        pids.extend(int(t) for t in entry.get("threads", []) if int(t) != int(entry["pid"]))
    if not pids:
        raise BadImageError(f"the checkpoint in {images_dir} has an empty process tree")
    return pids


def _task_ids(images_dir: Path, root_pid: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the dumper's namespace ids, the root task's namespace ids), or None on old images."""
    r = _Reader(images_dir)
    inventory = r.one("inventory.img", "INVENTORY")
    task_ids = r.one_optional(f"ids-{root_pid}.img", "IDS")
    if "root_ids" not in inventory or task_ids is None:
        return None
    return inventory["root_ids"], task_ids


def image_has_own_pidns(images_dir: Path, root_pid: int) -> bool:
    """Whether the checkpoint's root was the init of a PID namespace other than the dumper's:
    CRIU then restores the tree into a new PID namespace, where its PIDs are free by nature."""
    ids = _task_ids(images_dir, root_pid)
    return ids is not None and int(ids[0]["pid_ns_id"]) != int(ids[1]["pid_ns_id"])


def image_root_mount(images_dir: Path, root_pid: int) -> dict[str, Any] | None:
    """The root mount ("/") of the checkpoint's mount namespace if the tree had one of its own
    (CRIU then rebuilds that namespace), or None if it shared the dumper's."""
    ids = _task_ids(images_dir, root_pid)
    if ids is None or int(ids[0]["mnt_ns_id"]) == int(ids[1]["mnt_ns_id"]):
        return None
    mounts = _Reader(images_dir).required(f"mountpoints-{ids[1]['mnt_ns_id']}.img", "MNTS")
    return next((m for m in mounts if m.get("mountpoint") == "/"), None)


def read_tcp(path: Path) -> list[TcpSocket]:
    """Only the TCP sockets of a checkpoint, from files.img alone: what a network lock needs,
    without parsing every process's images (a restore waits for this, connections locked)."""
    files = _Reader(path.resolve()).optional("files.img", "FILES") or []
    return parse_tcp(files, {}, {})


def read_images(path: Path) -> ImageSet:
    """Read the checkpoint in ``path``; BadImageError, in one sentence, if it cannot."""
    path = path.resolve()
    if not path.exists():
        raise BadImageError(f"image directory {path} does not exist")
    if not path.is_dir():
        raise BadImageError(f"{path} is not a directory")
    if not (path / "inventory.img").exists():
        raise BadImageError(f"{path} holds no checkpoint: inventory.img is missing")
    r = _Reader(path)
    try:
        return _read(r)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        # pycriu checked the protobuf; this is a checkpoint whose images disagree.
        raise BadImageError(f"the checkpoint in {path} is inconsistent: {_reason(err)}") from err


def _read(r: _Reader) -> ImageSet:
    inventory = r.one("inventory.img", "INVENTORY")
    parent_link = r.path / "parent"
    parent = str(parent_link.resolve()) if parent_link.is_symlink() else None
    pstree = r.required("pstree.img", "PSTREE")
    if not pstree:
        raise BadImageError(f"the checkpoint in {r.path} has an empty process tree")

    cores: dict[int, dict[str, Any]] = {}
    ids: dict[int, dict[str, Any]] = {}
    for entry in pstree:
        pid = int(entry["pid"])
        core = cores[pid] = r.one(f"core-{pid}.img", "CORE")
        # A zombie has no resources, so CRIU writes no ids image for it.
        zombie = int((core.get("tc") or {}).get("task_state", 1)) == ZOMBIE
        task_ids = (r.one_optional if zombie else r.one)(f"ids-{pid}.img", "IDS")
        if task_ids is not None:
            ids[pid] = task_ids
    processes = parse_processes(pstree, cores, ids)

    uts: dict[int, dict[str, Any]] = {}
    for p in processes:
        ns_id = p.namespaces.get("uts")
        if ns_id is not None and ns_id not in uts:
            # Present only for namespaces of the tree's own: CRIU dumps no host namespace.
            uts_entry = r.one_optional(f"utsns-{ns_id}.img", "UTSNS")
            if uts_entry is not None:
                uts[ns_id] = uts_entry
    namespaces = parse_namespaces(processes, inventory.get("root_ids"), uts)

    cgroup = r.one_optional("cgroup.img", "CGROUP")
    root_cg_set = inventory.get("root_cg_set")
    cgroups = parse_cgroups(cgroup, {p.pid: p.cg_set for p in processes},
                            int(root_cg_set) if root_cg_set is not None else None)

    files_ids = {pid: int(i["files_id"]) for pid, i in ids.items() if "files_id" in i}
    fdinfo: dict[int, list[dict[str, Any]]] = {}
    for files_id in sorted(set(files_ids.values())):
        fdinfo[files_id] = r.required(f"fdinfo-{files_id}.img", "FDINFO")
    owners = fd_owners(files_ids, fdinfo)
    files = r.optional("files.img", "FILES") or []
    streams: dict[int, dict[str, Any]] = {}
    for f in files:
        isk = f.get("isk")
        if isk and int(isk.get("proto", 0)) == IPPROTO_TCP:
            ino = int(isk["ino"])
            # The queued bytes themselves are not needed: skip them (no_payload).
            entries = r.optional(f"tcp-stream-{ino:x}.img", "TCP_STREAM", no_payload=True)
            if entries:
                streams[ino] = entries[0]

    memory: list[MemoryInfo] = []
    for p in processes:
        # Missing for zombies, and when the pages went to a page server with their pagemap.
        pagemap = r.optional(f"pagemap-{p.pid}.img", "PAGEMAP")
        if pagemap is not None:
            memory.append(parse_memory(p.pid, pagemap))

    dump = r.one_optional("stats-dump", "STATS")
    restore = r.one_optional("stats-restore", "STATS")
    return ImageSet(
        path=r.path,
        checkpoint=parse_checkpoint(inventory, parent),
        processes=tuple(processes),
        namespaces=tuple(namespaces),
        cgroups=cgroups,
        tcp=tuple(parse_tcp(files, streams, owners)),
        unix=tuple(parse_unix(files, owners)),
        memory=tuple(memory),
        dump_stats=dump_stats_from(dump) if dump else None,
        restore_stats=restore_stats_from(restore) if restore else None,
    )
