"""Trees an agent keeps stopped after a dump (CRIU's ``leave_stopped``), until the migration that
dumped them either fails (``resume``: the tree goes on where it stopped) or succeeds elsewhere
(``kill``: the tree goes without a word to its peers).

Why: a migration's dump streams the tree's memory to the destination's page server, so the
source holds no complete checkpoint to restore from. Leaving the dumped tree stopped instead of
killed keeps the one thing a rollback needs, the tree itself, at the cost of its memory staying
allocated until the migration ends. CRIU leaves the tree's TCP sockets in repair mode then (it
undoes that only for a tree it resumes itself): killing it closes them silently, which is what
a successful migration wants; resuming it needs repair mode turned off first, as CRIU's own
rollback does (``libsoccr_resume``: ``setsockopt(TCP_REPAIR, 0)`` on every socket it repaired).

Interfaces: pidfd_open(2) and pidfd_getfd(2) (a copy of each socket of the tree, to call
setsockopt on; the tree's own fds are untouched), setsockopt/getsockopt TCP_REPAIR, kill(2).
Needs root: CAP_SYS_PTRACE for pidfd_getfd on another user's process, CAP_NET_ADMIN for
TCP_REPAIR.

Not restored by ``resume``: the socket's SO_REUSEADDR, which turning repair off resets to 0
(CRIU puts back the value it saved; for an established socket it only matters to a later bind,
which an established socket never makes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from orthros_py.errors import NoSuchProcessError, OrthrosError
from orthros_py.proc.pidfd import pidfd_getfd
from orthros_py.proc.tree import ProcessRef

TCP_REPAIR = 19  # include/uapi/linux/tcp.h
TCP_REPAIR_OFF = 0


@dataclass
class HeldTree:
    """A tree dumped with leave_stopped: every process (pid, start time) stopped by CRIU."""

    pid: int
    image: str
    procs: list[ProcessRef]
    tids: list[int] = field(default_factory=list)  # every thread of them, leaders included
    held_at: float = field(default_factory=time.time)

    @classmethod
    def of(cls, pid: int, image: str, pids: list[int]) -> HeldTree:
        procs: list[ProcessRef] = []
        tids: list[int] = []
        for p in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(p)
                procs.append(ProcessRef(p, proc.create_time()))
                tids += [t.id for t in proc.threads()]
        return cls(pid, image, procs, tids)

    def live(self) -> list[psutil.Process]:
        """Those of its processes that still exist as themselves (not reused pids, not
        zombies)."""
        return [proc for ref in self.procs if (proc := ref.process()) is not None]

    def to_dict(self) -> dict[str, Any]:
        live = self.live()
        return {"pid": self.pid, "image": self.image, "pids": [r.pid for r in self.procs],
                "held_at": self.held_at, "alive": len(live),
                "stopped": sum(1 for p in live if _stopped(p))}


def _running(tids: list[int]) -> list[int]:
    """Those of ``tids`` that still exist and are not zombies."""
    out = []
    for tid in tids:
        try:
            if psutil.Process(tid).status() != psutil.STATUS_ZOMBIE:
                out.append(tid)
        except psutil.NoSuchProcess:
            continue
    return out


def _stopped(proc: psutil.Process) -> bool:
    try:
        return proc.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.NoSuchProcess:
        return False


def repair_off(pid: int, seen: set[int]) -> int:
    """Turn TCP repair mode off on every socket of process ``pid`` that has it on (sockets whose
    inode is in ``seen`` were done already: processes and threads share them); how many."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0
    done = 0
    try:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            return 0
        for name in names:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if not link.startswith("socket:["):
                continue
            inode = int(link[8:-1])
            if inode in seen:
                continue
            seen.add(inode)
            try:
                copy = pidfd_getfd(pidfd, int(name))
            except OSError as err:
                if err.errno in (errno.EBADF, errno.ESRCH):
                    continue  # closed, or the process went, meanwhile
                raise OrthrosError(f"cannot reach socket fd {name} of process {pid}: "
                                   f"{err.strerror}", pid=pid, stage="resume") from err
            sock = socket.socket(fileno=copy)
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or \
                        sock.type != socket.SOCK_STREAM or \
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) != \
                        socket.IPPROTO_TCP:
                    continue
                if sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR) == 0:
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
                done += 1
            except OSError as err:
                raise OrthrosError(f"cannot take socket fd {name} of process {pid} out of "
                                   f"TCP repair mode: {err.strerror}", pid=pid,
                                   stage="resume") from err
            finally:
                sock.close()
    finally:
        os.close(pidfd)
    return done


def resume(tree: HeldTree) -> dict[str, Any]:
    """Bring a held tree back: repair mode off on its TCP sockets, then SIGCONT to each
    process. NoSuchProcessError if none of its processes is left."""
    procs = tree.live()
    if not procs:
        raise NoSuchProcessError(f"the tree of pid {tree.pid} left stopped by the dump of "
                                 f"image {tree.image!r} is gone", pid=tree.pid, stage="resume")
    seen: set[int] = set()
    sockets = sum(repair_off(p.pid, seen) for p in procs)
    resumed = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGCONT)
            resumed.append(p.pid)
    return {"pid": tree.pid, "image": tree.image, "resumed": resumed, "sockets": sockets}


def kill(tree: HeldTree, wait: float = 5.0) -> dict[str, Any]:
    """SIGKILL every process of a held tree (its sockets, still in repair mode, close without
    a FIN or RST) and wait until none runs; a zombie is left to its parent to reap."""
    procs = tree.live()
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    # Until every thread is gone, not just the leaders: a killed leader shows as a zombie
    # while its other threads are still exiting, and those hold their TIDs, which a restore
    # of the same tree on this PID space (another host of the lab) needs free.
    deadline = time.monotonic() + wait
    while (left := _running(tree.tids or [r.pid for r in tree.procs])) and \
            time.monotonic() < deadline:
        time.sleep(0.005)
    return {"pid": tree.pid, "image": tree.image, "signaled": [p.pid for p in procs],
            "exited": not left, "left": left}
