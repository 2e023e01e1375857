"""What makes a lab host a machine of its own: a PID namespace and a mount namespace (with its own
/proc) inside the host's network namespace, and a way to start processes inside all three.

``python -m orthros_py.lab.init init --netns PATH --first-pid N``
    Joins the network namespace at PATH, unshares a PID and a mount namespace, makes every mount
    private (nothing made inside propagates out, nothing made on the machine later comes in),
    and forks the namespace's PID 1, which mounts a fresh /proc,
    starts the namespace's PIDs at N, reaps every process that ends up its child, and on SIGTERM
    kills its whole namespace and exits. Prints ``{"pid": MACHINE_PID}`` of that PID 1 once it is
    ready, then exits (PID 1 lives on, reparented to this machine's init).

``python -m orthros_py.lab.init spawn --init PID [--log FILE] [--cwd DIR] -- ARGV...``
    Starts ARGV inside the network, PID and mount namespaces of the init PID (a machine PID), as a
    session leader whose parent is that init (a double fork inside the namespace), stdin from
    /dev/null, stdout and stderr to FILE (or /dev/null), no other descriptor; prints
    ``{"host_pid": N, "machine_pid": M}``.

Both are separate processes on purpose: setns(CLONE_NEWNS) and unshare need a single-threaded
caller, which a test process or the CLI (threads, pyroute2) is not. Interfaces: setns(2),
unshare(2), mount(2) through libc (Python 3.11 has no os.setns), /proc/PID/ns/*, NSpid in
/proc/PID/status. Needs root (CAP_SYS_ADMIN).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import signal
import sys
from collections.abc import Sequence

from orthros_py.proc.tree import reap_children

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _c(s: str | None) -> bytes | None:
    return s.encode() if s is not None else None


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    enc = _c
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), None),
           f"mount {target}")


def nspids(machine_pid: int) -> list[int]:
    """The PIDs of ``machine_pid`` in each PID namespace it lives in, outermost first."""
    with open(f"/proc/{machine_pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    raise OSError(errno.ESRCH, f"no NSpid for {machine_pid}")


def nspid(machine_pid: int) -> int:
    """The PID of ``machine_pid`` in its innermost PID namespace (the last NSpid field)."""
    return nspids(machine_pid)[-1]


# --- the namespace's PID 1 ----------------------------------------------------------------------

def _pid1(first_pid: int, ready_w: int) -> None:
    """PID 1 of the host: /proc, the PID counter, then reap until told to stop."""
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # Every host counts its PIDs from its own base (spread over pid_max), as machines with
    # different histories do: a tree's PIDs are then free on the host it moves to.
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(max(first_pid - 1, 1)))
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    # Blocked, the signals wait for sigwaitinfo: no child's end is lost between two waits.
    # (An init ignores signals it has no handler for, hence the handlers.)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT})
    os.write(ready_w, b"ok")
    os.close(ready_w)
    while True:
        reap_children()
        info = signal.sigtimedwait({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}, 5.0)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
            break
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGKILL)  # everyone in this namespace but PID 1
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    os._exit(0)




def start_init(netns: str, first_pid: int) -> int:
    setns(netns, CLONE_NEWNET)
    unshare(CLONE_NEWPID | CLONE_NEWNS)
    # Private, as a machine's own mounts are: nothing crosses to or from the machine, and CRIU
    # meets no peer group outside the host (a nested container's mounts are then dumpable).
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        try:
            _pid1(first_pid, ready_w)
        except BaseException as err:
            os.write(2, f"lab init: {err}\n".encode())
        os._exit(1)
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as r:
        if r.read() != b"ok":
            os.waitpid(pid, 0)
            raise OSError(f"the PID namespace's init (pid {pid}) failed to start")
    return pid


# --- starting a process inside a host -----------------------------------------------------------

def spawn(init: int, argv: Sequence[str], *, log: str | None, cwd: str) -> tuple[int, int]:
    """(host pid, machine pid) of ``argv`` started inside the namespaces of ``init``."""
    ns = {kind: os.open(f"/proc/{init}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
          for kind in ("net", "pid", "mnt")}
    _check(_libc.setns(ns["net"], CLONE_NEWNET), "setns net")
    _check(_libc.setns(ns["pid"], CLONE_NEWPID), "setns pid")  # for the children only
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    middle = os.fork()
    if middle == 0:
        # In the host's PID namespace now. An orphan goes to the reaper of its late parent's
        # namespace: fork once more and exit, so that the host's init adopts the command.
        try:
            os.close(err_r)
            os.close(pid_r)
            _check(_libc.setns(ns["mnt"], CLONE_NEWNS), "setns mnt")
            os.chdir(cwd)  # setns(mnt) moved us to the namespace's root
            child = os.fork()
            if child:
                os.write(pid_w, str(child).encode())
                os._exit(0)
            os.setsid()
            fd_in = os.open(os.devnull, os.O_RDONLY)
            fd_out = (os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log
                      else os.open(os.devnull, os.O_WRONLY))
            os.dup2(fd_in, 0)
            os.dup2(fd_out, 1)
            os.dup2(fd_out, 2)
            os.closerange(3, err_w)
            os.closerange(err_w + 1, os.sysconf("SC_OPEN_MAX"))
            os.execvp(argv[0], list(argv))
        except BaseException as e:
            os.write(err_w, str(e).encode(errors="replace"))
        os._exit(127)
    os.close(err_w)
    os.close(pid_w)
    with os.fdopen(pid_r, "rb") as r:
        host_pid = r.read()
    os.waitpid(middle, 0)
    with os.fdopen(err_r, "rb") as r:
        failure = r.read()  # empty: the exec closed it
    if failure or not host_pid:
        raise OSError(f"cannot start {argv[0]}: {failure.decode(errors='replace')}")
    machine = machine_pid_of(init, int(host_pid))
    if machine is None:
        raise OSError(f"{argv[0]} (pid {int(host_pid)} in the host) exited at once")
    return int(host_pid), machine


def machine_pid_of(init: int, host_pid: int) -> int | None:
    """The machine pid of the process that the PID namespace of ``init`` calls ``host_pid``
    (which may live in a PID namespace nested in that one, as a container's init does)."""
    level = len(nspids(init)) - 1
    try:  # the host's own view of it, through the host's /proc, tells other hosts' apart
        with open(f"/proc/{init}/root/proc/{host_pid}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            pids = nspids(int(name))
            if len(pids) > level and pids[level] == host_pid:
                with open(f"/proc/{name}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[19] == started:
                        return int(name)
        except (OSError, IndexError):
            continue
    return None


def main(args: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m orthros_py.lab.init")
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init")
    i.add_argument("--netns", required=True)
    i.add_argument("--first-pid", type=int, default=300)
    s = sub.add_parser("spawn")
    s.add_argument("--init", type=int, required=True)
    s.add_argument("--log")
    s.add_argument("--cwd", default="/")
    s.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args(args)
    try:
        if a.cmd == "init":
            print(json.dumps({"pid": start_init(a.netns, a.first_pid)}), flush=True)
        else:
            argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
            if not argv:
                ap.error("nothing to run")
            host_pid, machine_pid = spawn(a.init, argv, log=a.log, cwd=a.cwd)
            print(json.dumps({"host_pid": host_pid, "machine_pid": machine_pid}), flush=True)
    except OSError as err:
        print(f"lab {a.cmd}: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
