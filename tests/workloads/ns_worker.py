"""A small tree meant to run as the init of its own PID and UTS namespaces.

It sets the hostname to HOSTNAME (in its UTS namespace), forks one child, and then every tick
both print what they see from inside: "init pid=P host=H n=N" and "child pid=P ppid=Q host=H
n=N", N counting in each process's memory. Under ``unshare --pid --uts --fork`` the init sees
pid 1 and its child pid 2.

Usage: ns_worker.py HOSTNAME [INTERVAL_SECONDS [HOST_MNTNS_INODE]]
(with the host's mount namespace inode given, mounts CRIU cannot dump are detached
from our own mount namespace, see prune_mounts)
"""

from __future__ import annotations

import os
import socket
import sys
import time

from orthros_py.workloads.unixpair import prune_mounts  # mounts CRIU cannot dump


def report(role: str, interval: float) -> None:
    n = 0
    while True:
        extra = f" ppid={os.getppid()}" if role == "child" else ""
        line = f"{role} pid={os.getpid()}{extra} host={socket.gethostname()} n={n}\n"
        os.write(1, line.encode())  # one write per line: two processes share this file
        n += 1
        time.sleep(interval)


def reopen_stdio() -> None:
    """Open stdin/stdout/stderr again from inside: the inherited ones belong to mounts of the
    parent's mount namespace, which CRIU cannot find in ours ("Can't lookup mount=N for fd=0")."""
    out = os.readlink("/proc/self/fd/1")
    if not out.startswith("/"):
        return  # a pipe or a socket: no mount involved
    fd = os.open(out, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)


def main() -> None:
    hostname = sys.argv[1]
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
    # Lead a session of our own: the one we were started in has its leader (unshare) outside
    # the namespace, which CRIU refuses ("A session leader of PID(1) is outside of its pid
    # namespace") unless told --shell-job.
    if os.getsid(0) != os.getpid():
        os.setsid()
    socket.sethostname(hostname)
    reopen_stdio()
    if len(sys.argv) > 3:
        prune_mounts(int(sys.argv[3]))
    if os.fork() == 0:
        report("child", interval)
    report("init", interval)


if __name__ == "__main__":
    main()
