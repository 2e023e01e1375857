"""Closing a process tree's TCP connections without a word to their peers: each socket is taken
from its process with ``pidfd_getfd(2)``, put in TCP repair mode (``setsockopt TCP_REPAIR``),
and closed by us once the tree is dead; a socket closed in repair mode leaves no FIN, no RST and
no TIME_WAIT entry behind (the kernel's ``tcp_disconnect``). This is what CRIU does to a tree it
dumped and killed; ``orthros sync restore`` needs it for the tree it replaces, whose 4-tuples the
restored sockets take over a moment later, and whose peers are being restored too.

Interfaces: pidfd_open(2) and pidfd_getfd(2) (Linux 5.6+), setsockopt(2), and psutil for the
tree's sockets. Privileges: PTRACE_MODE_ATTACH over the tree (root) and CAP_NET_ADMIN.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Collection, Iterable, Iterator

import psutil

from orthros_py.net.conn import Conn
from orthros_py.proc.pidfd import pidfd_getfd

TCP_REPAIR = 19  # include/uapi/linux/tcp.h


@contextlib.contextmanager
def repaired_sockets(pids: Iterable[int], only: Collection[Conn] | None = None
                     ) -> Iterator[int]:
    """Hold every TCP socket of ``pids`` (``only`` those of these connections) in repair mode
    while the body kills them; closing our copies afterwards is what destroys the sockets,
    silently. The others close as a killed process's do (their peers hear of it). Yields how
    many were taken."""
    held: list[socket.socket] = []
    try:
        for pid in pids:
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
                pidfd = os.pidfd_open(pid)
            except (psutil.Error, ProcessLookupError):
                continue  # gone already: its sockets went with it
            try:
                for c in conns:
                    if c.fd < 0 or c.status == psutil.CONN_LISTEN or not c.raddr:
                        continue  # a listener has no peer to tell (and refuses repair mode)
                    if only is not None and Conn.of((str(c.laddr[0]), int(c.laddr[1])),
                                                    (str(c.raddr[0]), int(c.raddr[1]))) not in only:
                        continue
                    try:
                        fd = pidfd_getfd(pidfd, c.fd)
                    except OSError as err:
                        if err.errno in (errno.EBADF, errno.ESRCH):
                            continue  # closed or exited meanwhile
                        raise
                    sock = socket.socket(fileno=fd)
                    held.append(sock)
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
            finally:
                os.close(pidfd)
        yield len(held)
    finally:
        for sock in held:
            sock.close()
