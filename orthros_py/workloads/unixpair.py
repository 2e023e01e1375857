"""The Orthros paper's container workload: two processes talking over many UNIX stream sockets in
PID, UTS, IPC and mount namespaces of their own.

``python -m orthros_py.workloads.unixpair run`` is the namespace's init (P1). It sets the hostname,
creates a System V shared memory segment holding a magic (the IPC object whose survival proves
the IPC namespace moved), binds DIR/p1.sock and DIR/p2.sock and forks P2. P2 connects N times to
p1.sock, P1 N times to p2.sock, so each process holds N accepted and N connected sockets, 2N in
all, plus its own listening socket, kept open so that a restore must bring a bound listener
back. Then, in lockstep rounds, each process sends on every socket the next value of that
socket's counter (8 bytes, big-endian) and reads the next one from every socket; any mismatch,
short read, EOF or exception is an error. Each writes DIR/status-p1.json or DIR/status-p2.json
every ~0.2 s (atomically), which is how a test sees from outside that nothing was lost.

``start()`` launches it under ``unshare --pid --fork --uts --ipc --mount --propagation private``
and returns a ``Container`` that reads the statuses, waits for progress and kills the tree,
also after a checkpoint and restore gave it other host PIDs.

Interfaces: unshare(1), sethostname, SysV shm (libc through ctypes), umount2, UNIX sockets;
psutil for /proc. Needs root (namespaces, hostname, cgroup moves). Nothing here prints except
the ``start`` and ``status`` subcommands, which write JSON to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from orthros_py.errors import OperationTimeout, OrthrosError
from orthros_py.proc.tree import ProcessRef, reap_children

ROLES = ("p1", "p2")
LOG = "unixpair.log"
# Fixed, not random: the segment must be found by the same key after a restore.
SHM_KEY = 0x0517A500
SHM_SIZE = 4096
SHM_MAGIC = b"orthros!"
IPC_CREAT = 0o1000
SHM_RDONLY = 0o10000
MNT_DETACH = 2
STATUS_EVERY = 0.2
# Besides the 2N data sockets: stdio, the listener, the log, what Python opens.
SPARE_FDS = 64
MSG = struct.Struct(">Q")

# Filesystems CRIU 4.2.1 can dump and rebuild inside a mount namespace of the tree's own
# (the same list as tests/workloads/ns_worker.py).
DUMPABLE_FS = {"ext4", "xfs", "btrfs", "overlay", "proc", "sysfs", "tmpfs", "devtmpfs", "devpts",
               "mqueue", "cgroup", "cgroup2"}


def sock_path(d: Path, role: str) -> Path:
    return d / f"{role}.sock"


def status_path(d: Path, role: str) -> Path:
    return d / f"status-{role}.json"


def check_nofile(sockets: int) -> None:
    """Refuse early if 2N sockets cannot fit under RLIMIT_NOFILE (it cannot be raised here)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if 2 * sockets + SPARE_FDS > soft:
        raise OrthrosError(
            f"{sockets} sockets per peer need {2 * sockets + SPARE_FDS} file descriptors per "
            f"process, RLIMIT_NOFILE is {soft}",
            hint=f"use at most {(soft - SPARE_FDS) // 2} sockets")


def max_restorable_sockets(nofile: int | None = None) -> int:
    """The largest N that CRIU 4.2.1 can restore under RLIMIT_NOFILE ``nofile`` (ours if None)
    when it cannot raise its own limit (no CAP_SYS_RESOURCE: "rlimit: Can't setup
    RLIMIT_NOFILE for self").

    CRIU restores each connection between the two peers as a pair in one task (P1) and passes
    one end over, so P1 briefly needs 4N descriptors, and its service fds must fit above them,
    below the limit rounded down to 128 ("sfd: Can't chose service_fd_base: 19968 19995" at
    N=4990 under 20,000; N=5000 hits "BUG at criu/files.c:182"). 48 covers the service fds and
    the workload's other descriptors; N=4980 restores under 20,000.
    """
    if nofile is None:
        nofile, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (nofile // 128 * 128 - 48) // 4


# --- inside the namespaces ----------------------------------------------------------------------

def reopen_stdio(log: Path) -> None:
    """Open stdin/stdout/stderr again from inside: the inherited ones belong to mounts of the
    parent's mount namespace, which CRIU cannot find in ours ("Can't lookup mount=N for fd=0")."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)


def prune_mounts(host_mntns: int) -> None:
    """Detach, in our own mount namespace only, what other software on this host mounted and
    CRIU cannot dump (bpffs: "FS mnt ./sys/fs/bpf dev 0x27 root / unsupported"; nsfs from
    ``ip netns add``). Does nothing in the host's mount namespace (inode ``host_mntns``)."""
    if os.stat("/proc/self/ns/mnt").st_ino == host_mntns:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f.read().splitlines()]
    for fields in reversed(mounts):  # children before their parents
        fstype = fields[fields.index("-") + 1]
        if fstype not in DUMPABLE_FS:
            libc.umount2(fields[4].encode(), MNT_DETACH)


class SharedMagic:
    """A SysV shared memory segment holding SHM_MAGIC, attached before the fork (both peers map
    it). ``ok()`` looks the segment up again by its key and reads it through a fresh attach as
    well as through the old mapping: after a restore both must still hold the magic."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
        self.libc.shmget.restype = ctypes.c_int
        self.libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        self.libc.shmat.restype = ctypes.c_void_p
        self.libc.shmdt.argtypes = [ctypes.c_void_p]
        self.libc.shmdt.restype = ctypes.c_int
        shmid = self.libc.shmget(SHM_KEY, SHM_SIZE, IPC_CREAT | 0o600)
        if shmid < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"shmget({SHM_KEY:#x}): {os.strerror(err)}")
        self.addr = self._attach(shmid, 0)
        ctypes.memmove(self.addr, SHM_MAGIC, len(SHM_MAGIC))

    def _attach(self, shmid: int, flags: int) -> int:
        addr = self.libc.shmat(shmid, None, flags)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, f"shmat({shmid}): {os.strerror(err)}")
        return int(addr)

    def ok(self) -> bool:
        if ctypes.string_at(self.addr, len(SHM_MAGIC)) != SHM_MAGIC:
            return False
        shmid = self.libc.shmget(SHM_KEY, 0, 0)
        if shmid < 0:
            return False
        try:
            addr = self._attach(shmid, SHM_RDONLY)
        except OSError:
            return False
        try:
            return ctypes.string_at(addr, len(SHM_MAGIC)) == SHM_MAGIC
        finally:
            self.libc.shmdt(addr)


def listen_at(path: Path, backlog: int) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(backlog)  # the kernel caps it at somaxconn; a blocking connect then just waits
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    return s.recv(n, socket.MSG_WAITALL)


class Peer:
    """One of the two processes: its 2N data sockets and their counters.

    Socket k's counter starts at a base that names its connection (which listener, which
    connect), so a message delivered on the wrong socket is a mismatch, not a coincidence.
    Both ends of a connection send and expect the same sequence.
    """

    def __init__(self, role: str, d: Path, sockets: int, hostname: str, shm: SharedMagic,
                 listener: socket.socket, interval: float) -> None:
        self.role, self.dir, self.n, self.hostname = role, d, sockets, hostname
        self.shm, self.listener, self.interval = shm, listener, interval
        self.socks: list[socket.socket] = []
        self.names: list[str] = []
        self.sent: list[int] = []
        self.expected: list[int] = []
        self.rounds = 0
        self.errors = 0
        self.first_error: str | None = None

    # Connections to p1.sock are direction 0, to p2.sock direction 1.
    @staticmethod
    def base(direction: int, index: int) -> int:
        return (direction << 48) | (index << 32)

    def connect_all(self) -> None:
        """Accept N on our listener (in a thread) while connecting N to the other's: done one
        after the other in both processes, the two connect loops could block each other on
        full backlogs."""
        other = "p2" if self.role == "p1" else "p1"
        accepted: list[socket.socket | None] = [None] * self.n
        failure: list[BaseException] = []

        def accept_all() -> None:
            try:
                for _ in range(self.n):
                    conn, _ = self.listener.accept()
                    hello = recv_exact(conn, MSG.size)
                    if len(hello) != MSG.size:
                        raise ConnectionError(f"short hello ({len(hello)} bytes)")
                    (i,) = MSG.unpack(hello)
                    if not 0 <= i < self.n or accepted[i] is not None:
                        raise ConnectionError(f"bad or repeated connection index {i}")
                    accepted[i] = conn
            except BaseException as err:
                failure.append(err)

        t = threading.Thread(target=accept_all, name="accept", daemon=True)
        t.start()
        connected = []
        for i in range(self.n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock_path(self.dir, other)))
            s.sendall(MSG.pack(i))
            connected.append(s)
        t.join()
        if failure:
            raise failure[0]
        mine = 0 if self.role == "p1" else 1  # the direction of connections to our listener
        for i, a in enumerate(accepted):
            assert a is not None  # accept_all filled every slot or failed
            self.socks.append(a)
            self.names.append(f"accepted #{i} on {self.role}.sock")
            self.sent.append(self.base(mine, i))
        for i, s in enumerate(connected):
            self.socks.append(s)
            self.names.append(f"connected #{i} to {other}.sock")
            self.sent.append(self.base(1 - mine, i))
        self.expected = list(self.sent)

    def error(self, k: int, what: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{self.role} round {self.rounds + 1}, {self.names[k]}: {what}"

    def round(self) -> None:
        """Send on every socket, then read from every socket. Both peers send everything before
        reading, so neither waits on the other for more than one round's 8 bytes a socket."""
        for k, s in enumerate(self.socks):
            try:
                s.sendall(MSG.pack(self.sent[k]))
                self.sent[k] += 1
            except Exception as err:
                self.error(k, f"send: {err!r}")
        for k, s in enumerate(self.socks):
            try:
                data = recv_exact(s, MSG.size)
            except Exception as err:
                self.error(k, f"recv: {err!r}")
                continue
            if not data:
                self.error(k, "EOF")
                continue
            if len(data) != MSG.size:
                self.error(k, f"short read of {len(data)} bytes")
                continue
            (got,) = MSG.unpack(data)
            if got != self.expected[k]:
                self.error(k, f"expected {self.expected[k]:#x}, got {got:#x}")
            self.expected[k] += 1
        if not self.errors:
            self.rounds += 1

    def open_sockets(self) -> int:
        """How many of our data sockets' fds the kernel still holds as sockets."""
        n = 0
        for s in self.socks:
            fd = s.fileno()
            if fd < 0:
                continue
            with contextlib.suppress(OSError):
                n += stat.S_ISSOCK(os.fstat(fd).st_mode)
        return n

    def write_status(self) -> None:
        try:
            ipc_ok = self.shm.ok()
        except Exception:
            ipc_ok = False
        status = {
            "role": self.role,
            "nspid": os.getpid(),
            "hostname": socket.gethostname(),
            "rounds": self.rounds,
            "errors": self.errors,
            "first_error": self.first_error,
            "sockets": self.open_sockets(),
            "ipc_magic_ok": ipc_ok,
            "time": time.time(),
        }
        path = status_path(self.dir, self.role)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, path)

    def serve(self) -> None:
        self.connect_all()
        self.write_status()
        next_status = 0.0
        while True:
            if not self.errors:
                self.round()
            now = time.monotonic()
            if now >= next_status:
                self.write_status()
                if self.role == "p1":
                    reap_children()
                next_status = now + STATUS_EVERY
            # After an error the exchange stops (a read could wait forever); statuses go on.
            time.sleep(self.interval if not self.errors else STATUS_EVERY)




def run(args: argparse.Namespace) -> None:
    if os.getpid() != 1:
        # sethostname and a shm segment in the host's namespaces would be harmful: refuse.
        sys.exit("unixpair run: must be pid 1 of a new PID namespace "
                 "(use start(), or unshare --pid --fork --uts --ipc --mount)")
    d: Path = args.dir
    # Lead a session of our own: the one we were started in has its leader (unshare) outside
    # the namespace, which CRIU refuses ("A session leader of PID(1) is outside of its pid
    # namespace") unless told --shell-job.
    if os.getsid(0) != os.getpid():
        os.setsid()
    socket.sethostname(args.hostname)
    reopen_stdio(d / LOG)
    if args.host_mntns:
        prune_mounts(args.host_mntns)
    check_nofile(args.sockets)
    shm = SharedMagic()
    listeners = {role: listen_at(sock_path(d, role), args.sockets) for role in ROLES}
    if os.fork() == 0:
        try:
            listeners["p1"].close()
            Peer("p2", d, args.sockets, args.hostname, shm, listeners["p2"],
                 args.interval).serve()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)  # never fall back into P1's code
    listeners["p2"].close()
    Peer("p1", d, args.sockets, args.hostname, shm, listeners["p1"], args.interval).serve()


# --- the launcher, on the host -------------------------------------------------------------------

def read_status(d: Path) -> dict[str, dict[str, Any]]:
    """The statuses in ``d`` by role; a peer that has not written one yet is absent."""
    out: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        try:
            out[role] = json.loads(status_path(d, role).read_text())
        except (OSError, ValueError):
            continue
    return out


def _innermost_pid(pid: int) -> int | None:
    """``pid`` as its own PID namespace numbers it (the last NSpid field), None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except OSError:
        pass
    return None


def _log_tail(d: Path, lines: int = 10) -> str:
    try:
        text = (d / LOG).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


@dataclass
class Container:
    """A running workload: ``unshare_pid`` (our child) and ``init_pid``, the host PID of the
    namespace's PID 1. After a restore the tree's root is another host PID: ``adopt`` it, or
    hand it to ``stop``."""

    unshare_pid: int
    init_pid: int
    dir: Path
    sockets: int
    _unshare: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    # Creation time of init_pid, so that stop() never kills a process that reused the PID.
    _init_ctime: float | None = field(default=None, repr=False, compare=False)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def status(self) -> dict[str, dict[str, Any]]:
        """Both peers' last status; a peer that has not written one yet is absent."""
        return read_status(self.dir)

    def _check_errors(self, st: dict[str, dict[str, Any]]) -> None:
        for role, s in st.items():
            if s.get("errors"):
                raise OrthrosError(
                    f"unixpair {role} counted {s['errors']} errors after {s.get('rounds')} "
                    f"rounds; the first: {s.get('first_error')}",
                    pid=self.init_pid, stage="workload")

    def wait_ready(self, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """Wait until both peers hold all 2N sockets and finished a round; return statuses."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            self._check_errors(st)
            if all(r in st and st[r]["rounds"] >= 1 and st[r]["sockets"] == 2 * self.sockets
                   for r in ROLES):
                return st
            if time.monotonic() > deadline:
                seen = {r: {k: st[r].get(k) for k in ("rounds", "sockets")} if r in st
                        else "no status" for r in ROLES}
                raise OperationTimeout(
                    f"unixpair in {self.dir} not ready after {timeout:g} s (want "
                    f"{2 * self.sockets} sockets and a round each): {seen}; "
                    f"log: {_log_tail(self.dir) or 'empty'}",
                    pid=self.init_pid, stage="workload")
            self._check_alive()
            time.sleep(0.05)

    def _check_alive(self) -> None:
        if self._unshare is not None and self._unshare.poll() is not None \
                and not psutil.pid_exists(self.init_pid):
            raise OrthrosError(
                f"unixpair in {self.dir} exited (unshare status {self._unshare.returncode}); "
                f"log: {_log_tail(self.dir) or 'empty'}", pid=self.init_pid, stage="workload")

    def wait_progress(self, min_more_rounds: int,
                      timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """Wait until each peer did ``min_more_rounds`` more rounds than its status shows now,
        with no error; return the new statuses."""
        start = self.status()
        self._check_errors(start)
        base = {r: int(start.get(r, {}).get("rounds", 0)) for r in ROLES}
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            self._check_errors(st)
            if all(r in st and st[r]["rounds"] >= base[r] + min_more_rounds for r in ROLES):
                return st
            if time.monotonic() > deadline:
                now = time.time()
                behind = []
                for r in ROLES:
                    if r not in st:
                        behind.append(f"{r}: no status")
                        continue
                    done = st[r]["rounds"] - base[r]
                    if done < min_more_rounds:
                        behind.append(
                            f"{r}: {done} rounds (from {base[r]} to {st[r]['rounds']}), "
                            f"status written {now - st[r]['time']:.1f} s ago")
                raise OperationTimeout(
                    f"unixpair in {self.dir}: fewer than {min_more_rounds} more rounds in "
                    f"{timeout:g} s: {'; '.join(behind)}", pid=self.init_pid, stage="workload")
            time.sleep(0.05)

    def adopt(self, root_pid: int) -> None:
        """Follow the tree to the host PID a restore gave its PID 1."""
        self.init_pid = root_pid
        self._init_ctime = _ctime(root_pid)

    def host_pids(self, root_pid: int | None = None) -> list[int]:
        """The host PIDs of the tree's processes (threads not included), its root first."""
        root = root_pid if root_pid is not None else self.init_pid
        try:
            top = psutil.Process(root)
            return [root, *(p.pid for p in top.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self, root_pid: int | None = None) -> None:
        """SIGKILL the tree, wherever it hangs now: under ``root_pid`` if given, and under our
        ``init_pid`` if that is still the process we started or adopted; and unshare. Reaps
        what is ours and removes the socket and status files. Idempotent."""
        roots = [] if root_pid is None else [root_pid]
        if self._init_ctime is not None and _ctime(self.init_pid) == self._init_ctime:
            roots.append(self.init_pid)
        procs: list[psutil.Process] = []
        for pid in roots:
            try:
                top = psutil.Process(pid)
                procs += [top, *top.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)
        for pid in roots:  # a restored root may be our child (rst_sibling)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if self._unshare is not None:
            if self._unshare.poll() is None:
                self._unshare.kill()
            self._unshare.wait(timeout=10)
        for role in ROLES:
            for path in (sock_path(self.dir, role), status_path(self.dir, role),
                         status_path(self.dir, role).with_suffix(".json.tmp")):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _ctime(pid: int) -> float | None:
    ref = ProcessRef.find(pid)
    return ref.create_time if ref is not None else None


def _join_cgroups(dirs: Sequence[Path]) -> None:
    """In the child before exec: into each cgroup, before unshare forks the init."""
    for d in dirs:
        fd = os.open(d / "cgroup.procs", os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


def start(dir: Path, sockets: int = 500, hostname: str = "orthros-ctr",
          cgroup_dirs: Sequence[Path] = (), interval: float = 0.02,
          timeout: float = 10.0, prefix: Sequence[str] = ()) -> Container:
    """Start the workload under unshare in ``dir`` (created if missing) and return once the
    namespace's init exists; call ``wait_ready`` before relying on its sockets.

    ``prefix``: a command that runs the rest inside a lab host (``Lab.argv(host, [])``), so
    that the tree lives in that host; it may fork (nsenter into a PID namespace does): the
    init is the first process below ours that is PID 1 of its namespace."""
    if sockets < 1:
        raise ValueError("sockets must be at least 1")
    check_nofile(sockets)
    d = dir.resolve()
    d.mkdir(parents=True, exist_ok=True)
    cgroups = [Path(c) for c in cgroup_dirs]
    for c in cgroups:
        if not (c / "cgroup.procs").exists():
            raise OrthrosError(f"{c} is not a cgroup directory (no cgroup.procs)",
                               stage="workload")
    # A status left by an earlier run must not pass for this one's.
    for role in ROLES:
        for path in (sock_path(d, role), status_path(d, role)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    argv = [*prefix, "unshare", "--pid", "--fork", "--uts", "--ipc", "--mount",
            "--propagation", "private",
            sys.executable, "-m", "orthros_py.workloads.unixpair", "run",
            "--sockets", str(sockets), "--dir", str(d), "--hostname", hostname,
            "--interval", str(interval),
            "--host-mntns", str(os.stat("/proc/self/ns/mnt").st_ino)]
    with open(d / LOG, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd="/",
            close_fds=True, start_new_session=True,
            preexec_fn=(lambda: _join_cgroups(cgroups)) if cgroups else None)
    deadline = time.monotonic() + timeout
    while True:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        inits = [c.pid for c in children if _innermost_pid(c.pid) == 1]
        if inits:
            init = inits[0]
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            raise OrthrosError(
                f"unshare did not start the workload (exit status {proc.returncode}); "
                f"log: {_log_tail(d) or 'empty'}", pid=proc.pid, stage="workload")
        time.sleep(0.01)
    return Container(proc.pid, init, d, sockets, proc, _ctime(init))


# --- command line ---------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m orthros_py.workloads.unixpair",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="be the namespace's init (started by start() under unshare)")
    s = sub.add_parser("start", help="start a container, wait until it is ready, print its "
                                     "pids as JSON and leave it running")
    for p in (r, s):
        p.add_argument("--sockets", type=int, default=500,
                       help="connections each way (each process holds 2N sockets)")
        p.add_argument("--dir", type=Path, required=True,
                       help="where p1.sock, p2.sock, the statuses and the log go")
        p.add_argument("--hostname", default="orthros-ctr")
        p.add_argument("--interval", type=float, default=0.02,
                       help="pause between rounds, seconds")
    r.add_argument("--host-mntns", type=int, default=0,
                   help="inode of the host's mount namespace (mounts CRIU cannot dump are "
                        "detached from ours)")
    s.add_argument("--cgroup", type=Path, action="append", default=[],
                   help="a cgroup directory to start in (repeatable)")
    s.add_argument("--timeout", type=float, default=120.0)
    st = sub.add_parser("status", help="print both peers' statuses as JSON")
    st.add_argument("--dir", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args)
    elif args.cmd == "start":
        c = start(args.dir, args.sockets, args.hostname, args.cgroup, args.interval)
        try:
            c.wait_ready(args.timeout)
        except BaseException:
            c.stop()
            raise
        print(json.dumps({"unshare_pid": c.unshare_pid, "init_pid": c.init_pid,
                          "dir": str(c.dir), "sockets": c.sockets}))
    else:
        print(json.dumps(read_status(args.dir)))


if __name__ == "__main__":
    main()
