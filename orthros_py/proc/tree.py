"""Process references and tree snapshots, through psutil (reads /proc; root sees every process).

A process is identified by pid *and* creation time, so that a pid reused between looking and
acting is noticed instead of dumping a stranger.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from orthros_py.errors import NoSuchProcessError

NAMESPACES = ("pid", "uts", "ipc", "mnt", "net", "user", "cgroup", "time")
KTHREADD_PID = 2


@dataclass(frozen=True)
class ProcessRef:
    """A process as pid and creation time: a pid reused by another process does not match."""

    pid: int
    create_time: float

    @classmethod
    def current(cls, pid: int) -> ProcessRef:
        """Whatever process has ``pid`` now (zombies included); NoSuchProcessError if none."""
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except psutil.NoSuchProcess as err:
            raise NoSuchProcessError(f"no process with pid {pid} exists", pid=pid) from err

    @classmethod
    def find(cls, pid: int) -> ProcessRef | None:
        """``current``, or None if no process has ``pid``."""
        try:
            return cls.current(pid)
        except NoSuchProcessError:
            return None

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        """A reference to a live, checkpointable process, or NoSuchProcessError saying why not."""
        if pid <= 0:
            raise NoSuchProcessError(f"{pid} is not a process id", pid=pid)
        if pid == 1:
            raise NoSuchProcessError(
                "pid 1 is this host's init: it cannot be checkpointed from inside its own "
                "namespace", pid=pid)
        if pid == os.getpid():
            raise NoSuchProcessError("orthros cannot checkpoint itself", pid=pid)
        try:
            proc = psutil.Process(pid)
            ppid = proc.ppid()
            create_time = proc.create_time()
            exe_missing = not proc.cmdline()
        except psutil.NoSuchProcess as err:
            raise NoSuchProcessError(f"no process with pid {pid} exists", pid=pid) from err
        except psutil.ZombieProcess as err:
            raise NoSuchProcessError(f"process {pid} is a zombie", pid=pid) from err
        if pid == KTHREADD_PID or (ppid == KTHREADD_PID and exe_missing):
            raise NoSuchProcessError(
                f"pid {pid} ({proc.name()}) is a kernel thread, not a user process", pid=pid)
        return cls(pid, create_time)

    def is_same(self, proc: psutil.Process) -> bool:
        """Whether ``proc`` is this process (dead or alive), not a later one with its pid."""
        try:
            return proc.pid == self.pid and proc.create_time() == self.create_time
        except psutil.NoSuchProcess:
            return False

    def alive(self) -> bool:
        """This process still runs: the pid is not free or reused, and not a zombie (which has
        exited and only waits for its parent)."""
        return self.process() is not None

    def process(self) -> psutil.Process | None:
        """This process if it still runs (see ``alive``), else None. One lookup for checking
        and acting, so that a pid reused in between is not acted on."""
        try:
            proc = psutil.Process(self.pid)
            if self.is_same(proc) and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
        except psutil.NoSuchProcess:
            pass
        return None


@dataclass
class ProcessInfo:
    pid: int
    ppid: int
    name: str
    cmdline: list[str]
    # Namespace ids ("net" -> inode number), from /proc/PID/ns.
    namespaces: dict[str, int] = field(default_factory=dict)
    # cgroup membership: hierarchy (controllers, or "" for the v2 hierarchy) -> path.
    cgroups: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TcpConn:
    """An established TCP connection, seen from the process that owns it."""

    family: int
    local: tuple[str, int]
    remote: tuple[str, int]
    status: str
    pid: int

    def __str__(self) -> str:
        def ep(a: tuple[str, int]) -> str:
            return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"
        return f"{ep(self.local)} -> {ep(self.remote)}"


@dataclass(frozen=True)
class UnixConn:
    type: str  # "stream", "dgram" or "seqpacket"
    path: str
    pid: int


@dataclass
class TreeSnapshot:
    root: int
    processes: list[ProcessInfo]
    tcp: list[TcpConn]
    unix: list[UnixConn]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]


def read_namespaces(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for ns in NAMESPACES:
        try:
            out[ns] = os.stat(f"/proc/{pid}/ns/{ns}").st_ino
        except OSError:
            continue
    return out


def read_cgroups(pid: int) -> dict[str, str]:
    """/proc/PID/cgroup as {controllers: path}; the v2 hierarchy's key is ""."""
    out: dict[str, str] = {}
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out[parts[1]] = parts[2]
    return out


_SOCK_TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram",
               socket.SOCK_SEQPACKET: "seqpacket"}


def snapshot(ref: ProcessRef) -> TreeSnapshot:
    """What the live tree rooted at ``ref`` holds, as psutil sees it (host's network namespace)."""
    try:
        root = psutil.Process(ref.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess as err:
        raise NoSuchProcessError(f"process {ref.pid} exited", pid=ref.pid) from err
    infos: list[ProcessInfo] = []
    tcp: list[TcpConn] = []
    unix: list[UnixConn] = []
    for p in procs:
        try:
            with p.oneshot():
                infos.append(ProcessInfo(p.pid, p.ppid(), p.name(), p.cmdline(),
                                         read_namespaces(p.pid), read_cgroups(p.pid)))
            # One pass over the process's descriptors for both kinds (a container holds
            # thousands: each pass reads every fd link).
            for c in p.net_connections(kind="all"):
                if c.family == socket.AF_UNIX:
                    unix.append(UnixConn(_SOCK_TYPES.get(c.type, str(c.type)),
                                         str(c.laddr or ""), p.pid))
                elif c.type == socket.SOCK_STREAM and c.status == psutil.CONN_ESTABLISHED \
                        and c.raddr:
                    tcp.append(TcpConn(int(c.family), (c.laddr.ip, c.laddr.port),
                                       (c.raddr.ip, c.raddr.port), c.status, p.pid))
        except psutil.NoSuchProcess:
            continue  # a child that exited while we looked is not part of the tree any more
    return TreeSnapshot(ref.pid, infos, tcp, unix)


def reap(pids: Sequence[int]) -> None:
    """Collect the exit status of those of ``pids`` that are our children (zombies included):
    a restored root is our child (rst_sibling), and its PID is not free until collected."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def alive(pid: int) -> bool:
    """Running, or a zombie nobody has collected yet."""
    try:
        psutil.Process(pid).status()
        return True
    except psutil.NoSuchProcess:
        return False


def kill_tree(target: int | ProcessRef, timeout: float = 10.0) -> None:
    """SIGKILL a process and its descendants, and reap those that are (or became) our children,
    until all are gone or ``timeout`` runs out.

    ``target`` is best a ProcessRef taken when the process was started: if its pid now belongs
    to another process (the tree exited and the pid was reused), nothing is killed. A bare pid
    means whatever process has it now. Each process is signalled through psutil, which checks
    its creation time again, so a pid reused while this runs is never hit either.
    """
    pid = target.pid if isinstance(target, ProcessRef) else target
    try:
        root = psutil.Process(pid)
        if isinstance(target, ProcessRef) and not target.is_same(root):
            return  # our process is gone; this pid is a stranger's now
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap([p.pid for p in procs if p.is_running()])
        # is_running() compares creation times: a zombie still counts, a reused pid does not.
        if not any(p.is_running() for p in procs):
            return
        time.sleep(0.01)


def reap_children() -> None:
    """Collect every child that has ended, without waiting for the others: what an init
    (PID 1 of a namespace, or a subreaper) must do whenever SIGCHLD arrives."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
