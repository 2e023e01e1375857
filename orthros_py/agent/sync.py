"""One host's part in a synchronized save or restore (``orthros sync``): its members (process
trees), frozen and resumed at instants the coordinator names on this host's own clock, their
connections locked from the freeze to the resume, their checkpoints and data directories kept
under the snapshot's name.

A member's life here, for a save: ``prepare`` (find the tree, give it a freezer group, load the
lock and attach it, check its data directories), ``freeze`` (at the instant: the cgroup freezer
stops every task of the tree at once, rather than CRIU seizing one task after another; then the
connections are locked), ``dump`` (CRIU dumps the frozen tree and leaves it frozen; the data
directories are snapshotted while nothing can write them; the manifest is written), then
``resume`` (connections unlocked, the group thawed at the instant) and ``finish`` (the group
given back and the lock taken off, once every member runs), or
``abort`` (the same at once, and nothing of the snapshot kept). For a restore: ``replace`` (lock
the checkpoint's connections, stop the member's current run without a word to its peers, put
the data directories back), ``restore`` (CRIU restores the tree stopped; it is frozen in its
group and continued, so that it runs only when thawed), then ``resume`` and ``finish``, or
``abort`` (killed without a word).

Interfaces: the cgroup freezer (``orthros_py.cgroup.freezer``), the XDP lock
(``orthros_py.netlock.tree``), CRIU (``orthros_py.checkpoint``), data directory snapshots
(``orthros_py.host.datasnap``), kill(2) and TCP repair (``orthros_py.net.quietclose``), the
datagrams waiting in UDP sockets (``orthros_py.net.udpqueue``), sock_diag's SOCK_DESTROY for what
closed connections left (``orthros_py.net.conns``), real-time scheduling for the instants
(``orthros_py.host.clock``). Root.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from orthros_py.agent.errors import ProtocolError, Refusal
from orthros_py.cgroup.freezer import FreezeGroup, Stamp
from orthros_py.errors import BadImageError, NoSuchProcessError, OrthrosError
from orthros_py.host import clock
from orthros_py.host.datasnap import (
    DataSnapshot,
    remove_snapshot,
    restore_dir,
    snapshot_dir,
    store_for,
)
from orthros_py.net import udpqueue
from orthros_py.net.conns import destroy_lingering
from orthros_py.netlock.method import NetworkLock
from orthros_py.netlock.tree import TreeLock

if TYPE_CHECKING:
    from orthros_py.agent.state import Agent
    from orthros_py.net.conn import Conn

MANIFEST = "sync.json"
PENDING_DIR = ".sync-pending"  # below the images root: what members hold while under way
UDP_QUEUE = "udp-queue.json"  # the datagrams waiting in the tree's UDP sockets at the save
IMAGE_PREFIX = "sync-"
SNAP_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
MEMBER_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
# An instant already this far behind when the call arrives is refused: the members would not
# freeze together (the coordinator schedules well ahead of its slowest round trip).
LATE_LIMIT_NS = 20_000_000
PID_GONE_TIMEOUT = 10.0
# Where data directories may be (defence in depth: the cluster key already makes a caller root;
# never the system's own directories). Root-owned trees only.
DATA_ROOTS = ("/var/lib", "/srv", "/data", "/home", "/opt", "/mnt", "/run/orthros")


class SyncError(OrthrosError):
    """A member cannot be saved, restored or resumed as asked."""


def bad(msg: str) -> ProtocolError:
    return ProtocolError(msg, code=Refusal.BAD_REQUEST)


def check_snap(name: str) -> str:
    if not isinstance(name, str) or not SNAP_RE.fullmatch(name):
        raise bad(f"snapshot name {name!r} is not allowed: 1-32 lower-case letters, digits and "
                  "'-', starting with a letter or digit")
    return name


def check_member(name: str) -> str:
    if not isinstance(name, str) or not MEMBER_RE.fullmatch(name):
        raise bad(f"member name {name!r} is not allowed: 1-40 lower-case letters, digits and '-'")
    return name


def image_name(snap: str, member: str) -> str:
    return f"{IMAGE_PREFIX}{check_snap(snap)}.{check_member(member)}"


def data_path(a: Agent, path: str) -> str:
    """A data directory named over the network: absolute, plain, an existing directory inside
    the allowed roots, not inside the images root."""
    clean = a.option_policy.inside(path, DATA_ROOTS, "a data directory")
    if Path(clean).resolve() != Path(clean):
        raise bad(f"the data directory {clean} goes through a symbolic link")
    if not Path(clean).is_dir():
        raise bad(f"the data directory {clean} does not exist on {a.name}")
    if Path(clean).is_relative_to(a.images_root) or a.images_root.is_relative_to(clean):
        raise bad(f"the data directory {clean} overlaps this agent's images root")
    return clean


def _identity(proc: psutil.Process) -> dict[str, Any]:
    with proc.oneshot():
        return {"name": proc.name(), "exe": _safe(proc.exe), "cmdline": proc.cmdline()}


def _safe(fn: Any) -> str:
    try:
        return str(fn())
    except (psutil.Error, OSError):
        return ""


def find_target(target: str) -> psutil.Process:
    """The root of a member's tree: a pid, or the one process of that name whose parent has
    another name (the root of its tree)."""
    if target.isdigit():
        try:
            return psutil.Process(int(target))
        except psutil.NoSuchProcess:
            raise NoSuchProcessError(f"no process {target} is running", pid=int(target)) from None
    roots = []
    for p in psutil.process_iter(["name", "ppid"]):
        if p.info["name"] != target:
            continue
        try:
            parent = psutil.Process(p.info["ppid"]).name()
        except psutil.Error:
            parent = ""
        if parent != target:
            roots.append(p)
    if not roots:
        raise NoSuchProcessError(f"no process named {target!r} is running")
    if len(roots) > 1:
        raise bad(f"{len(roots)} process trees are named {target!r} "
                  f"(pids {', '.join(str(p.pid) for p in roots)}): name the member by pid")
    return roots[0]


def tree_of(root: psutil.Process) -> list[int]:
    try:
        return [root.pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        raise NoSuchProcessError(f"process {root.pid} exited", pid=root.pid) from None


def own_timens(pid: int) -> bool:
    """Whether ``pid`` lives in a time namespace of its own (not this agent's)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/time") != os.readlink("/proc/self/ns/time")
    except OSError:
        return False


@dataclass
class Member:
    """One member's state on this agent, from prepare (or replace) to resume (or abort)."""

    snap: str
    member: str
    pid: int
    pids: list[int]
    group: FreezeGroup | None = None
    lock: TreeLock | None = None
    data: list[str] = field(default_factory=list)
    identity: dict[str, Any] = field(default_factory=dict)
    freeze: Stamp | None = None
    dumped: bool = False
    restored: bool = False
    resumed: bool = False
    warnings: list[str] = field(default_factory=list)
    total: int = 1  # members of the whole snapshot, on every host

    @property
    def key(self) -> str:
        return image_name(self.snap, self.member)


class Syncs:
    """This agent's members under way, by image name."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.members: dict[str, Member] = {}
        self.mutex = threading.Lock()

    def get(self, snap: str, member: str) -> Member:
        with self.mutex:
            m = self.members.get(image_name(snap, member))
        if m is None:
            raise bad(f"member {member} of snapshot {snap} is not under way on "
                      f"{self.agent.name}")
        return m

    def _add(self, m: Member) -> None:
        with self.mutex:
            if m.key in self.members:
                raise bad(f"member {m.member} of snapshot {m.snap} is under way on "
                          f"{self.agent.name} already")
            self.members[m.key] = m

    def _drop(self, m: Member) -> None:
        with self.mutex:
            self.members.pop(m.key, None)
        with contextlib.suppress(OSError):
            self._pending(m.key).unlink()

    # What a member holds on this host (its group, its locked connections) is also written to
    # disk before it is taken, so that an agent restarted in the middle (or ``orthros
    # recover``) can still give it back: an agent's memory dies with it, a frozen tree does not.
    def _pending(self, key: str) -> Path:
        return self.agent.images_root / PENDING_DIR / f"{key}.json"

    def _write_pending(self, m: Member, phase: str) -> None:
        path = self._pending(m.key)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "phase": phase, "pid": m.pid,
            "group": m.group.to_dict() if m.group is not None else None,
            "conns": [str(c) for c in m.lock.conns] if m.lock is not None else [],
            "interfaces": list(m.lock.report.interfaces) if m.lock is not None else []}))
        tmp.replace(path)

    def _abort_from_disk(self, key: str, done: dict[str, Any]) -> None:
        """Give back what a member held, from its pending record (no state in memory)."""
        path = self._pending(key)
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        from orthros_py.net.conn import Conn

        group = None
        if rec.get("group"):
            with contextlib.suppress(OrthrosError, OSError):
                group = FreezeGroup.at(rec["group"]["path"], owned=bool(rec["group"]["owned"]))
        # "resumed": it runs, and keeps running; "restore": a half-restored tree, killed.
        if rec.get("phase") == "restore" and group is not None:
            with contextlib.suppress(OrthrosError, OSError):
                with repaired_pids(group.pids()):
                    group.kill()
                done["killed"] = True
        if rec.get("conns"):
            lock = TreeLock(NetworkLock.XDP)
            lock.adopt([Conn.parse(c) for c in rec["conns"]])
            with contextlib.suppress(OrthrosError, OSError):
                lock.release()
        if group is not None:
            with contextlib.suppress(OrthrosError, OSError):
                group.release()
                done["resumed"] = rec.get("phase") != "restore"
        with contextlib.suppress(OSError):
            path.unlink()

    # -- save ---------------------------------------------------------------------------------

    def prepare(self, snap: str, member: str, target: str, data: list[str],
                total: int = 1) -> dict[str, Any]:
        a = self.agent
        image = image_name(snap, member)
        if (a.images_root / image).exists():
            raise BadImageError(f"{a.name} holds a snapshot {snap!r} of member {member} already",
                                hint=f"orthros sync delete --name {snap}, or another name")
        dirs = [data_path(a, d) for d in data]
        if len(set(dirs)) != len(dirs):
            raise bad("a data directory is named twice")
        root = find_target(target)
        pids = tree_of(root)
        m = Member(snap, member, root.pid, pids, data=dirs, identity=_identity(root), total=total)
        for d in dirs:
            store = store_for(d, snap, member)
            if store.exists():
                raise BadImageError(f"a snapshot of {d} named {snap!r} exists on {a.name} "
                                    f"already ({store})",
                                    hint=f"orthros sync delete --name {snap}")
        if not own_timens(root.pid):
            m.warnings.append(
                f"pid {root.pid} ({m.identity['name']}) on {a.name} shares the host's time "
                "namespace: after a restore its monotonic clock jumps by the time since the "
                "save and its timers fire at once; start it under 'unshare --time' to keep "
                "its clock continuous")
        self._add(m)
        try:
            m.group = FreezeGroup.for_tree(pids, f"{snap}-{member}")
            m.lock = TreeLock(NetworkLock.XDP)
            m.lock.prepare_tree(root.pid)
            self._write_pending(m, "save")
        except BaseException:
            self.abort(snap, member, remove=True)
            raise
        return {"member": member, "pid": root.pid, "pids": pids, "group": m.group.to_dict(),
                "conns": len(m.lock.conns), "interfaces": m.lock.report.interfaces,
                "timens": own_timens(root.pid), "identity": m.identity,
                "warnings": m.warnings}

    def freeze_at(self, snap: str, member: str, at_ns: int) -> dict[str, Any]:
        """Freeze the member at ``at_ns`` (this host's clock), then lock its connections."""
        m = self.get(snap, member)
        if m.group is None or m.lock is None:
            raise bad(f"member {member} of {snap} has nothing to freeze here")
        if clock.now_ns() - at_ns > LATE_LIMIT_NS:
            raise SyncError(f"the freeze instant had passed by "
                            f"{(clock.now_ns() - at_ns) / 1e6:.1f} ms when it reached "
                            f"{self.agent.name}", stage="freeze")
        late, m.freeze = _at_instant(at_ns, m.group.freeze)
        t0 = time.perf_counter()
        m.lock.engage()
        lock_ms = (time.perf_counter() - t0) * 1000
        # Connections made since the prepare: the tree is frozen, so the list is final now.
        added = m.lock.refresh(m.pid)
        if added:
            self._write_pending(m, "save")
        return {"member": member, "stamp": m.freeze.to_dict(), "late_ns": late,
                "lock_ms": round(lock_ms, 3), "tasks": len(m.group.pids()),
                "conns_added": len(added)}

    def dump(self, snap: str, member: str, *, datagrams: bool = True) -> dict[str, Any]:
        """Checkpoint the frozen member (it stays frozen), snapshot its data, write the manifest."""
        from orthros_py.checkpoint import dump_tree
        from orthros_py.criu.request import CriuNetworkLock, DumpOptions

        a = self.agent
        m = self.get(snap, member)
        if m.freeze is None or m.group is None or m.lock is None:
            raise bad(f"member {member} of {snap} is not frozen here")
        path = a.image_path(m.key, create=True)
        opts = DumpOptions(tcp_established=True, tcp_skip_in_flight=True, file_locks=True,
                           leave_running=True, freeze_cgroup=str(m.group.path),
                           network_lock=CriuNetworkLock.SKIP)
        t0 = time.perf_counter()
        with a.busy(m.key, "sync dump"):
            # CRIU keeps no datagram: those waiting in the frozen tree's UDP sockets are read
            # (and left) here, and given back to the restored sockets.
            queued = udpqueue.capture(m.group.pids() or m.pids) if datagrams else []
            result = dump_tree(m.pid, path, opts, network_lock=NetworkLock.SKIP)
            (path / UDP_QUEUE).write_text(json.dumps([d.to_dict() for d in queued]))
        dump_ms = (time.perf_counter() - t0) * 1000
        snaps: list[DataSnapshot] = []
        for d in m.data:
            snaps.append(snapshot_dir(d, store_for(d, snap, member)))
            if snaps[-1].warning:
                m.warnings.append(snaps[-1].warning)
        m.dumped = True
        manifest = {
            "snap": snap, "member": member, "host": a.name, "pid": m.pid, "pids": m.pids,
            "identity": m.identity, "created": time.time(), "freeze": m.freeze.to_dict(),
            "conns": [str(c) for c in m.lock.conns],
            "interfaces": list(m.lock.report.interfaces), "group": m.group.to_dict(),
            "timens": own_timens(m.pid), "data": [s.to_dict() for s in snaps],
            "dump_ms": round(dump_ms, 3), "criu": result.to_dict().get("stats"),
            "warnings": m.warnings, "members_total": m.total, "datagrams": len(queued),
        }
        (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return {"member": member, "dump_ms": round(dump_ms, 3), "datagrams": len(queued),
                "image_bytes": _du(path), "data": [s.to_dict() for s in snaps],
                "warnings": m.warnings}

    # -- restore ------------------------------------------------------------------------------

    def replace(self, snap: str, member: str) -> dict[str, Any]:
        """Lock the checkpoint's connections, stop what runs of the member now (silently), and
        put its data directories back."""
        a = self.agent
        image = image_name(snap, member)
        manifest = load_manifest(a.images_root / image)
        snaps = [DataSnapshot.from_dict(d) for d in manifest["data"]]
        for s in snaps:
            if not Path(s.path).exists():
                raise BadImageError(f"the snapshot of {s.source} for {snap!r} is missing on "
                                    f"{a.name} ({s.path})")
        pid = int(manifest["pid"])
        current = _current_run(pid, manifest["identity"])
        m = Member(snap, member, pid, list(manifest["pids"]), identity=manifest["identity"])
        self._add(m)
        t0 = time.perf_counter()
        try:
            from orthros_py.net.conn import Conn

            m.lock = TreeLock(NetworkLock.XDP)
            m.lock.prepare_conns([Conn.parse(c) for c in manifest["conns"]],
                                 list(manifest["interfaces"]))
            self._write_pending(m, "replace")
            m.lock.engage()
            # Quietly only for the snapshot's connections (their peers are restored too, or
            # take the restored socket's state); a client of the current run that the snapshot
            # does not know hears the connection close, and comes back at once.
            stopped = _stop_quietly(current, only=set(m.lock.conns)) \
                if current is not None else 0
            # A snapshot connection that closed since the save (the member's own doing) left
            # its 4-tuple taken (TIME_WAIT) for a minute: CRIU could not connect it back.
            lingering = destroy_lingering(m.lock.conns)
            data_ms = sum(restore_dir(s) for s in snaps)
        except BaseException:
            self.abort(snap, member, remove=False)
            raise
        return {"member": member, "stopped": current.pid if current else None,
                "sockets_closed": stopped, "lingering_removed": len(lingering),
                "data_ms": round(data_ms, 3),
                "replace_ms": round((time.perf_counter() - t0) * 1000, 3)}

    def restore(self, snap: str, member: str) -> dict[str, Any]:
        """Restore the member stopped, in its frozen group, ready to be thawed."""
        from orthros_py.agent.ops.criu import restore_image
        from orthros_py.checkpoint import wait_pids_free
        from orthros_py.criu.request import CriuNetworkLock, RestoreOptions

        a = self.agent
        m = self.get(snap, member)
        wait_pids_free(m.pids, timeout=PID_GONE_TIMEOUT)
        opts = RestoreOptions(tcp_established=True, file_locks=True, leave_stopped=True,
                              network_lock=CriuNetworkLock.SKIP)
        # No first-reply watch: its polling thread would hold the interpreter when the resume
        # instant comes (and a synchronized restore reports its skew, not a first reply).
        result = restore_image(a, m.key, opts, watch_reply=False)
        m.restored = True
        m.pid, m.pids = result.pid, list(result.pids)
        m.group = FreezeGroup.of_process(result.pid)
        self._write_pending(m, "restore")
        m.group.freeze()
        for pid in m.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # frozen: it runs only when the group thaws
        queued = a.images_root / m.key / UDP_QUEUE
        datagrams = [udpqueue.Datagram.from_dict(d) for d in json.loads(queued.read_text())] \
            if queued.exists() else []
        given = udpqueue.give_back(datagrams)
        return {"member": member, "pid": result.pid, "pids": m.pids, "datagrams": given,
                "restore_ms": round(result.elapsed_ms, 3), "group": m.group.to_dict()}

    # -- the end ------------------------------------------------------------------------------

    def resume_at(self, snap: str, member: str, at_ns: int) -> dict[str, Any]:
        """Unlock the member's connections, thaw it at ``at_ns``, give its group back."""
        m = self.get(snap, member)
        if m.group is None:
            raise bad(f"member {member} of {snap} is not frozen here")
        if m.lock is not None:
            m.lock.unlock()  # the tree is frozen still: only the kernels talk meanwhile
        if clock.now_ns() - at_ns > LATE_LIMIT_NS:
            warn = (f"the resume instant had passed by {(clock.now_ns() - at_ns) / 1e6:.1f} ms "
                    f"when it reached {self.agent.name}")
            m.warnings.append(warn)
        late, stamp = _at_instant(at_ns, m.group.thaw)
        # The group is given back by ``finish``, once every member has resumed: moving tasks
        # between groups holds the kernel's cgroup lock for milliseconds (an RCU grace
        # period), which the other members' thaws, on a host shared with them, would wait for.
        m.resumed = True
        self._write_pending(m, "resumed")
        return {"member": member, "stamp": stamp.to_dict(), "late_ns": late, "pid": m.pid,
                "warnings": m.warnings}

    def finish(self, snap: str, member: str) -> dict[str, Any]:
        """After the resume: the member's group given back, its lock taken off, its state
        here dropped."""
        m = self.get(snap, member)
        if not m.resumed:
            raise bad(f"member {member} of {snap} has not resumed here")
        self._finish(m)
        return {"member": member, "pid": m.pid}

    def hold(self, snap: str, member: str) -> dict[str, Any]:
        """Leave a saved member frozen (a restore is to follow), its connections unlocked: the
        kernels keep them alive meanwhile, and nothing of the lock stays in the data path."""
        m = self.get(snap, member)
        if m.lock is not None:
            with contextlib.suppress(OrthrosError, OSError):
                m.lock.release()
        self._drop(m)
        return {"member": member, "pid": m.pid,
                "group": m.group.to_dict() if m.group else None}

    def thaw_held(self, snap: str, member: str, at_ns: int) -> dict[str, Any]:
        """Resume at ``at_ns`` a member a save left frozen (``hold``)."""
        man = load_manifest(self.agent.images_root / image_name(snap, member))
        pid = int(man["pid"])
        if _current_run(pid, man["identity"]) is None:
            raise NoSuchProcessError(f"member {member} (pid {pid}) of {snap} is not running "
                                     f"on {self.agent.name}", pid=pid)
        m = Member(snap, member, pid, list(man["pids"]), identity=man["identity"])
        m.group = FreezeGroup.of_process(pid)
        self._add(m)
        return self.resume_at(snap, member, at_ns)

    def _finish(self, m: Member) -> None:
        with contextlib.suppress(OrthrosError, OSError):
            if m.group is not None:
                m.group.release()
        if m.lock is not None:
            with contextlib.suppress(OrthrosError, OSError):
                m.lock.release()
        self._drop(m)

    def abort(self, snap: str, member: str, *, remove: bool) -> dict[str, Any]:
        """Undo whatever this agent did for the member: a saved member resumes at once (and
        with ``remove`` its partial snapshot goes), a restored one is killed silently.
        Idempotent."""
        a = self.agent
        image = image_name(snap, member)
        with self.mutex:
            m = self.members.get(image)
        done: dict[str, Any] = {"member": member, "resumed": False, "killed": False,
                                "removed": False}
        if m is not None:
            if m.resumed:
                pass  # it runs: only its group and lock go (``_finish``)
            elif m.restored:
                with contextlib.suppress(psutil.Error):
                    _stop_quietly(psutil.Process(m.pid))
                    done["killed"] = True
                if m.group is not None:
                    with contextlib.suppress(OrthrosError, OSError):
                        m.group.kill()
            elif m.group is not None and m.lock is not None:
                m.lock.unlock()
                with contextlib.suppress(OrthrosError, OSError):
                    m.group.thaw()
                done["resumed"] = True
            self._finish(m)
        else:
            self._abort_from_disk(image, done)
        if remove:
            done["removed"] = remove_member(a, image)
        return done


def _at_instant(at_ns: int, act: Callable[..., Stamp]) -> tuple[int, Stamp]:
    """``act`` (a freeze or a thaw) at ``at_ns``: its files opened first, the wait and the
    write at real-time priority, so that neither waits for a core behind other work (the
    members another agent of this machine has just resumed). How late it woke, and its
    stamp."""
    late: list[int] = []
    with clock.urgent() as rt:
        spin = clock.URGENT_SPIN_NS if rt else clock.SPIN_NS
        stamp = act(before=lambda: late.append(clock.wait_until(at_ns, spin_ns=spin)))
    return late[0], stamp


def remove_member(a: Agent, image: str) -> bool:
    """Remove one member's checkpoint and its data snapshots."""
    path = a.images_root / image
    if not path.exists():
        return False
    with contextlib.suppress(BadImageError, OSError, KeyError, ValueError):
        for d in load_manifest(path)["data"]:
            remove_snapshot(DataSnapshot.from_dict(d))
    with a.busy(image, "removal"):
        shutil.rmtree(path)
    return True


def load_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise BadImageError(f"no snapshot member is kept in {path.name}",
                            hint="orthros sync list shows the snapshots") from None
    except (OSError, ValueError) as err:
        raise BadImageError(f"the snapshot member in {path} is corrupt: {MANIFEST}: "
                            f"{err}") from err
    if not isinstance(data, dict) or not {"snap", "member", "pid", "conns"} <= set(data):
        raise BadImageError(f"the snapshot member in {path} is corrupt: {MANIFEST} lacks fields")
    return data


def list_members(a: Agent) -> list[dict[str, Any]]:
    out = []
    for name in a.image_names():
        if not name.startswith(IMAGE_PREFIX):
            continue
        path = a.images_root / name
        try:
            man = load_manifest(path)
        except BadImageError:
            continue  # a member whose dump did not finish
        out.append({"snap": man["snap"], "member": man["member"], "pid": man["pid"],
                    "name": man["identity"].get("name"), "created": man["created"],
                    "image_bytes": _du(path),
                    "data_bytes": sum(int(d.get("bytes", 0)) for d in man["data"]),
                    "data": [{"source": d["source"], "method": d["method"]}
                             for d in man["data"]],
                    "timens": man.get("timens"),
                    "members_total": man.get("members_total")})
    return out


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def _current_run(pid: int, identity: dict[str, Any]) -> psutil.Process | None:
    """What runs of a member now: the process holding its pid, if it is the same program (a
    process of another program holding it is an error: the restore needs that pid)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        now = _identity(proc)
    except psutil.NoSuchProcess:
        return None
    if now["name"] != identity.get("name") or now["cmdline"] != identity.get("cmdline"):
        raise SyncError(f"pid {pid}, which the snapshot's member needs, is held by another "
                        f"program ({now['name']})", pid=pid,
                        hint="stop that process, then restore again")
    return proc


@contextlib.contextmanager
def repaired_pids(pids: list[int]) -> Any:
    from orthros_py.net.quietclose import repaired_sockets

    with repaired_sockets(pids) as n:
        yield n


def _stop_quietly(root: psutil.Process, only: set[Conn] | None = None) -> int:
    """Kill a tree whose TCP sockets its peers must not hear closing (they are being restored
    too, or the restored tree takes their 4-tuples over); wait until it is gone."""
    from orthros_py.net.quietclose import repaired_sockets

    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    group = None
    with contextlib.suppress(OrthrosError, OSError):
        group = FreezeGroup.of_process(root.pid)
    with repaired_sockets((p.pid for p in procs), only) as n:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        if group is not None and group.is_frozen():
            group.thaw()  # a frozen task dies only once thawed
        psutil.wait_procs(procs, timeout=PID_GONE_TIMEOUT)
    if group is not None and group.owned:
        with contextlib.suppress(OrthrosError, OSError):
            group.release()
    return n


