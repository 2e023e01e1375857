"""Local checkpoint and restore of a process tree: validation, CRIU RPC, statistics.

Needs root. This is the layer the CLI and the policies call; it never prints. A failed dump
leaves the tree running as it was (CRIU resumes it), and every error says what and why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from orthros_py.cgroup.fs import CgroupFs, remove_dirs, wait_empty
from orthros_py.cgroup.model import FILE_NAME as CGROUP_FILE
from orthros_py.cgroup.model import RESTORED_FILE_NAME as CGROUP_RESTORED_FILE
from orthros_py.cgroup.model import CgroupFile, diff
from orthros_py.criu.dirtytrack import DirtyTracker
from orthros_py.criu.images import (
    image_has_own_pidns,
    image_root_mount,
    read_dump_stats,
    read_restore_stats,
)
from orthros_py.criu.images import image_pids as image_pids  # the agent's ops import it here
from orthros_py.criu.request import (
    TCP_TS_ADVANCE_MAX_MS,
    CgroupMode,
    CriuNetworkLock,
    DumpOptions,
    RestoreOptions,
    dump_request,
    restore_request,
)
from orthros_py.criu.session import CriuSession, NotifyHook
from orthros_py.criu.stats import DumpStats, RestoreStats
from orthros_py.errors import BadImageError, NotRootError, OrthrosError
from orthros_py.net.conn import Conn
from orthros_py.netlock.tree import NetworkLock, TreeLock
from orthros_py.proc.tree import ProcessRef, TreeSnapshot, snapshot

# How long a restore waits for a dumped tree's old PIDs to be reaped (PID 1 here took ~1.2 s).
PID_FREE_TIMEOUT = 5.0
# Beside CRIU's images: the connections a dump left locked, for the restore to unlock.
LOCKED_CONNS = "orthros-locked-conns.json"
# Beside CRIU's images: when the dump began (wall clock, seconds), for the restore to move the
# connections' TCP timestamp clock on by the time since (CRIU patch 0009).
DUMPED_AT = "orthros-dumped-at"
# Added to that time: the restore's own duration until CRIU sets the clocks, and clock error.
TS_ADVANCE_MARGIN_MS = 1000
# How long after a restore's unlock the lock programs come off (``TreeLock.tidy_later``).
DETACH_GRACE_S = 2.0


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NotRootError(f"{what} needs root: CRIU must ptrace, freeze and restore processes",
                           hint="run it with sudo")


@dataclass
class DumpResult:
    pid: int
    images_dir: Path
    live: TreeSnapshot
    elapsed_ms: float
    stats: DumpStats | None
    leave_running: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "images_dir": str(self.images_dir),
            "leave_running": self.leave_running,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "processes": [dataclasses.asdict(p) for p in self.live.processes],
            "tcp": [{"local": list(c.local), "remote": list(c.remote), "pid": c.pid}
                    for c in self.live.tcp],
            "unix": [dataclasses.asdict(u) for u in self.live.unix],
            "stats": self.stats.to_dict() if self.stats else None,
            **self.extra,
        }


@dataclass
class RestoreResult:
    pid: int
    images_dir: Path
    elapsed_ms: float
    stats: RestoreStats | None
    pids: list[int]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "images_dir": str(self.images_dir),
            "pids": self.pids,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "stats": self.stats.to_dict() if self.stats else None,
            **self.extra,
        }


def prepare_images_dir(path: Path) -> Path:
    """Create the directory for a new checkpoint; refuse one that already holds a checkpoint."""
    path = path.resolve()
    if path.exists() and not path.is_dir():
        raise BadImageError(f"{path} exists and is not a directory")
    if (path / "inventory.img").exists():
        raise BadImageError(f"{path} already holds a checkpoint",
                            hint="choose an empty directory or remove the old images")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadImageError(f"cannot create image directory {path}: {err.strerror}") from err
    if not os.access(path, os.W_OK):
        raise BadImageError(f"image directory {path} is not writable")
    return path


def dump_tree(
    pid: int,
    images_dir: Path,
    opts: DumpOptions,
    *,
    session: CriuSession | None = None,
    on_notify: NotifyHook | None = None,
    network_lock: NetworkLock | None = None,
    dirty_track: DirtyTracker | None = None,
) -> DumpResult:
    """Checkpoint the tree rooted at ``pid`` into ``images_dir`` (created if missing).

    ``network_lock`` (None: CRIU's method named in ``opts``) chooses who keeps the tree's
    connections silent. With xdp the connections stay locked after a dump that killed the tree,
    until ``restore_tree`` brings it back; on every other path they are unlocked here.

    ``dirty_track`` keeps the tree's memory tracked from this dump (``opts.track_mem``) to the
    next, whose ``opts.parent_img`` names this one, where the kernel has no soft-dirty bits: it
    collects what CRIU hands over, and forgets everything when the dump fails.
    """
    require_root("dump")
    ref = ProcessRef.of(pid)
    session = session or CriuSession()
    if dirty_track is not None:
        session.dirty_track = dirty_track.socket_for_criu()
    images_dir = prepare_images_dir(images_dir)
    live = snapshot(ref)
    opts = dataclasses.replace(opts, pid=pid)
    cgroups = _save_cgroups(live.pids, images_dir, opts.manage_cgroups)
    if cgroups and cgroups["hierarchies"] and not opts.cgroup_dump_controllers:
        # CRIU mounts each hierarchy it dumps: only the tree's own, which the restore
        # recreates; where it shares the root's or the dumper's group the restorer's is right.
        opts = dataclasses.replace(opts, cgroup_dump_controllers=tuple(cgroups["hierarchies"]))
    lock = TreeLock(network_lock or NetworkLock(opts.network_lock.value))
    if network_lock is not None:
        opts = dataclasses.replace(opts, network_lock=network_lock.criu)
    if opts.tcp_established:
        try:
            lock.prepare_tree(pid, [Conn.of(c.local, c.remote) for c in live.tcp])
        except BaseException:
            lock.release()  # an attach may have happened: take it off again
            raise
    start = time.perf_counter()
    (images_dir / DUMPED_AT).write_text(f"{time.time():.3f}\n")
    try:
        # Inbound only: CRIU freezes the tree after this, and what it answers meanwhile must
        # reach its clients (their acknowledgements are caught and given back at the restore).
        # Its sockets are killed in repair mode, silently, so nothing leaves after the dump.
        lock.engage(inbound_only=True)
        session.call(dump_request(opts, -1), images_dir=images_dir, on_notify=on_notify, pid=pid)
    except BaseException as err:
        if isinstance(err, OrthrosError):
            err.pid = err.pid or pid
        lock.release()  # CRIU resumed the tree: its connections must flow again
        if dirty_track is not None:
            # The failed dump's scans may have re-armed tracking for pages no image holds.
            dirty_track.forget()
        raise
    if dirty_track is not None:
        dirty_track.collect()
    if opts.leave_running:
        lock.unlock()
    elif lock.conns:
        # The restore will unlock exactly these: saved here, so it need not parse files.img
        # (slow in Python for thousands of sockets) while they wait locked.
        (images_dir / LOCKED_CONNS).write_text(json.dumps([str(c) for c in lock.conns]))
    elapsed = (time.perf_counter() - start) * 1000
    lock.tidy()  # detaches only once nothing is locked; a killed tree's lock waits for restore
    result = DumpResult(pid, images_dir, live, elapsed, read_dump_stats(images_dir),
                        opts.leave_running)
    result.extra["lock"] = lock.report.to_dict()
    # When the tree's connections stopped flowing (perf_counter): the start of the clients'
    # wait, which a caller ends with the restore's "unlocked_at".
    result.extra["engaged_at"] = start
    if cgroups is not None:
        result.extra["cgroups"] = cgroups
    return result


def _save_cgroups(pids: list[int], images_dir: Path, mode: CgroupMode) -> dict[str, Any] | None:
    """Write the tree's cgroup migration file beside the images (CRIU keeps no cgroup v2
    limits); returns what was carried and how long reading took."""
    if mode is CgroupMode.IGNORE:
        return None
    start = time.perf_counter()
    cgf = CgroupFs.here().read_tree(pids)
    read_ms = (time.perf_counter() - start) * 1000
    (images_dir / CGROUP_FILE).write_text(cgf.to_text())
    return {"groups": len(cgf.groups), "limits": len(cgf.limits()),
            "hierarchies": sorted({g.hierarchy for g in cgf.groups}), "read_ms": round(read_ms, 3)}


def load_cgroup_file(images_dir: Path) -> CgroupFile | None:
    """The checkpoint's cgroup migration file, None if it has none; BadImageError if corrupt."""
    path = images_dir / CGROUP_FILE
    if not path.exists():
        return None
    try:
        return CgroupFile.from_text(path.read_text())
    except (OSError, ValueError) as err:
        raise BadImageError(f"the checkpoint in {images_dir} is corrupt: {CGROUP_FILE}: "
                            f"{err}") from err


def is_host_root(mount: dict[str, Any]) -> bool:
    """Whether a dumped root mount is this host's root filesystem (CRIU keeps the kernel's
    device encoding, major << 20 | minor)."""
    dev = os.stat("/").st_dev
    return (int(mount.get("root_dev", -1)) == (os.major(dev) << 20 | os.minor(dev))
            and mount.get("root") == "/")


def wait_pids_free(pids: list[int], timeout: float = PID_FREE_TIMEOUT) -> None:
    """Wait until the checkpoint's PIDs are free: a just-dumped tree lingers as zombies until its
    reaper collects them. A PID held by a live, unrelated process is an error at once."""
    deadline = time.monotonic() + timeout
    while True:
        busy: list[tuple[int, str, str]] = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                busy.append((pid, p.name(), p.status()))
            except psutil.NoSuchProcess:
                continue
        live = [b for b in busy if b[2] != psutil.STATUS_ZOMBIE]
        if live:
            pid, name, _ = live[0]
            raise OrthrosError(
                f"pid {pid} of the checkpoint is in use by another process ({name})",
                pid=pid, stage="restore",
                hint="stop that process, or restore where the checkpoint's PIDs are free")
        if not busy:
            return
        if time.monotonic() > deadline:
            pid = busy[0][0]
            raise OrthrosError(f"pid {pid} of the checkpoint is still a zombie after "
                               f"{timeout:g} s", pid=pid, stage="restore")
        time.sleep(0.02)


def ts_advance_since_dump(images_dir: Path) -> int | None:
    """How far to move the restored connections' TCP timestamp clock on: the time since the
    dump began, plus a margin. The dumped tree's old sockets may have sent segments after the
    dump read their clock (retransmissions, from a tree held stopped); a peer that saw one drops
    every segment stamped earlier (PAWS) until the restored clock catches up. None where the
    dump left no record (CRIU then restores the clock as it was)."""
    try:
        began = float((images_dir / DUMPED_AT).read_text())
    except (OSError, ValueError):
        return None
    ms = int((time.time() - began) * 1000) + TS_ADVANCE_MARGIN_MS
    return max(0, min(ms, TCP_TS_ADVANCE_MAX_MS))


def restore_tree(
    images_dir: Path,
    opts: RestoreOptions,
    *,
    session: CriuSession | None = None,
    on_notify: NotifyHook | None = None,
    network_lock: NetworkLock | None = None,
    host: str | None = None,
    give_back: bool = True,
) -> RestoreResult:
    """Restore the checkpoint in ``images_dir``; the new root is orthros's child (rst_sibling).

    With the xdp lock, the checkpoint's connections (locked by the dump) are unlocked once the
    tree runs again, and also if the restore fails: nothing of the lock is left behind. What
    their peers sent meanwhile, which the lock caught, is then given to the restored tree
    (``give_back``; off only for experiments): they need not wait out a retransmission backoff.

    The tree's cgroups (the dump's migration file) are checked against this host first (a
    CgroupError, before CRIU runs, if a limit cannot be honoured), created with their limits,
    and read back after the restore. ``opts.cgroup_roots`` ({hierarchy: path}) moves a
    hierarchy's top group elsewhere, for a host whose layout differs from the source's.
    """
    require_root("restore")
    images_dir = images_dir.resolve()
    pids = image_pids(images_dir)
    expected = None if opts.manage_cgroups is CgroupMode.IGNORE else load_cgroup_file(images_dir)
    cg: dict[str, Any] = {}
    created: list[Path] = []
    cgfs = CgroupFs.here()
    if expected is not None:
        if opts.cgroup_roots:
            expected = expected.rebased(expected.new_roots(opts.cgroup_roots))
        t0 = time.perf_counter()
        cgfs.require(expected, host)
        t1 = time.perf_counter()
        if opts.manage_cgroups is not CgroupMode.STRICT:  # strict: CRIU must create them
            created = cgfs.apply(expected)
        if opts.cgroup_yard is None:
            opts = dataclasses.replace(opts, cgroup_yard=cgfs.yard())
        cg = {"groups": len(expected.groups), "check_ms": round((t1 - t0) * 1000, 3),
              "apply_ms": round((time.perf_counter() - t1) * 1000, 3),
              "created": [str(d) for d in created]}
    session = session or CriuSession()
    if session.tcp_ts_advance_ms is None:
        session.tcp_ts_advance_ms = (opts.tcp_ts_advance_ms if opts.tcp_ts_advance_ms is not None
                                     else ts_advance_since_dump(images_dir))
    lock = TreeLock(network_lock or NetworkLock(opts.network_lock.value))
    if network_lock is not None:
        opts = dataclasses.replace(opts, network_lock=network_lock.criu)
    if lock.active and (opts.tcp_established or opts.tcp_close):
        # tcp_close: CRIU closes them, and their clients must meet the reset, not the lock.
        lock.adopt(checkpoint_conns(images_dir))
    if opts.root is None:
        # A tree with its own mount namespace needs a root filesystem for it: without one
        # CRIU 4.2.1 crashes ("mnt: BUG at criu/mount.c:48"). The host's own is the right one
        # when the namespace was a copy of the host's (unshare --mount).
        root_mount = image_root_mount(images_dir, pids[0])
        if root_mount is not None:
            if not is_host_root(root_mount):
                raise OrthrosError(
                    f"the checkpoint in {images_dir} has its own mount namespace, whose root "
                    f"filesystem ({root_mount.get('source', '?')}) is not this host's /",
                    stage="restore", hint="give its root filesystem with --root DIR")
            opts = dataclasses.replace(opts, root="/")
    own_pidns = image_has_own_pidns(images_dir, pids[0])
    start = time.perf_counter()
    try:
        if not own_pidns:
            wait_pids_free(pids)
        start = time.perf_counter()
        resp = session.call(restore_request(opts, -1), images_dir=images_dir,
                            on_notify=on_notify)
    except BaseException:
        lock.release()  # the tree is not coming back here: leave nothing of the lock
        wait_empty(created)
        remove_dirs(created)
        raise
    lock.unlock(give_back_to=int(resp.restore.pid) if give_back else None)
    unlocked_at = time.perf_counter()  # connections flow again (the detach comes after)
    elapsed = (unlocked_at - start) * 1000
    lock.tidy_later(DETACH_GRACE_S)
    if opts.tcp_close and opts.network_lock is CriuNetworkLock.IPTABLES:
        from orthros_py.netlock.iptables import drop_criu_locks

        drop_criu_locks(checkpoint_conns(images_dir))  # CRIU 4.2.1 leaves them (see there)
    root = int(resp.restore.pid)
    if own_pidns:
        # The image holds the namespace's own PIDs (1, 2, ...): report the host's, which are
        # the ones a caller can signal.
        pids = host_pids(root)
    result = RestoreResult(root, images_dir, elapsed, read_restore_stats(images_dir), pids)
    result.extra["lock"] = lock.report.to_dict()
    result.extra["unlocked_at"] = unlocked_at
    if expected is not None:
        result.extra["cgroups"] = {**cg, **_verify_cgroups(
            cgfs, expected, root, images_dir,
            write_first=opts.manage_cgroups is CgroupMode.STRICT)}
    return result


def _verify_cgroups(cgfs: CgroupFs, expected: CgroupFile, root: int, images_dir: Path, *,
                    write_first: bool) -> dict[str, Any]:
    """Read the restored tree's cgroups back (strict mode: write the limits CRIU cannot, v2's,
    first), save them beside the images for an operator to diff, and say what differs."""
    start = time.perf_counter()
    if write_first and not expected.empty:
        try:
            cgfs.apply(expected)  # writes only the values that differ
        except OrthrosError as err:
            return {"mismatches": [str(err)]}
    try:
        top = psutil.Process(root)
        procs = [root, *(p.pid for p in top.children(recursive=True))]
    except psutil.NoSuchProcess:
        return {"mismatches": [f"the restored tree (pid {root}) exited before its cgroups "
                               "could be read"]}
    actual = cgfs.read_tree(procs)
    (images_dir / CGROUP_RESTORED_FILE).write_text(actual.to_text())
    return {"mismatches": diff(expected, actual),
            "verify_ms": round((time.perf_counter() - start) * 1000, 3)}


def checkpoint_conns(images_dir: Path) -> list[Conn]:
    """The established TCP connections a checkpoint holds, as lock entries."""
    from orthros_py.criu.images import read_tcp

    try:
        return [Conn.parse(text) for text in json.loads((images_dir / LOCKED_CONNS).read_text())]
    except (OSError, ValueError):  # not dumped by orthros's xdp lock, or damaged: ask CRIU's
        return [Conn.of(t.local, t.remote) for t in read_tcp(images_dir) if t.remote[1] != 0]


def host_pids(root: int) -> list[int]:
    """The host PIDs of a live tree's processes and threads, root first."""
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return [root]
    pids: list[int] = []
    for p in procs:
        try:
            tids = [t.id for t in p.threads()]
        except psutil.NoSuchProcess:
            continue
        pids.append(p.pid)
        pids.extend(t for t in tids if t != p.pid)
    return pids


def wait_exit(pid: int) -> int:
    """Wait for a restored root (our child) to exit; return its exit status as a shell would."""
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
