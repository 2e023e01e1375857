"""Datagrams waiting in a frozen tree's UDP sockets, read without taking them, and given back to
the restored sockets. CRIU keeps TCP queues but no datagram: what a peer had sent over UDP and
the tree had not read yet (a raft or keepalived heartbeat) would be gone after a restore.

Reading: each UDP socket is copied out of its process with ``pidfd_getfd(2)``; with
``SO_PEEK_OFF`` set (UDP has it since Linux 6.9) successive ``recvmsg(MSG_PEEK)`` calls walk the
whole receive queue, each datagram with its sender, leaving the queue as it was; the option is
then put back (-1, its default). Giving back: each datagram is sent again to the socket's
address from its original sender's address and port, through a socket bound there with
``IP_TRANSPARENT`` (the sender is usually another host). Sockets bound to the wildcard address
are given their datagrams on the loopback address.

Privileges: PTRACE_MODE_ATTACH over the tree (root) and CAP_NET_ADMIN (IP_TRANSPARENT). IPv4.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from orthros_py.proc.pidfd import pidfd_getfd

SO_PEEK_OFF = 42  # include/uapi/asm-generic/socket.h
IP_TRANSPARENT = 19  # include/uapi/linux/in.h
MAX_DATAGRAM = 65535
MAX_QUEUED = 100_000  # a queue longer than this is not a heartbeat's: stop reading there


@dataclass(frozen=True)
class Datagram:
    """One datagram waiting in a socket: where it was going (the socket's own address) and
    where it came from."""

    local: tuple[str, int]
    remote: tuple[str, int]
    payload: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"local": list(self.local), "remote": list(self.remote),
                "payload": base64.b64encode(self.payload).decode()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Datagram:
        return cls((str(d["local"][0]), int(d["local"][1])),
                   (str(d["remote"][0]), int(d["remote"][1])),
                   base64.b64decode(d["payload"]))


def _peek_all(sock: socket.socket) -> list[tuple[bytes, tuple[str, int]]]:
    out: list[tuple[bytes, tuple[str, int]]] = []
    sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        while len(out) < MAX_QUEUED:
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            out.append((data, (str(addr[0]), int(addr[1]))))
    finally:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
    return out


def capture(pids: Iterable[int]) -> list[Datagram]:
    """Every datagram waiting in the UDP (IPv4) sockets of ``pids``, oldest first per socket;
    the queues are left as they were."""
    found: list[Datagram] = []
    seen: set[tuple[str, int]] = set()
    for pid in pids:
        try:
            conns = [c for c in psutil.Process(pid).net_connections(kind="udp4") if c.fd >= 0]
            pidfd = os.pidfd_open(pid)
        except (psutil.Error, ProcessLookupError):
            continue
        try:
            for c in conns:
                local = (str(c.laddr.ip), int(c.laddr.port))
                if local in seen:
                    continue  # shared by processes of the tree: read once
                try:
                    fd = pidfd_getfd(pidfd, c.fd)
                except OSError as err:
                    if err.errno in (errno.EBADF, errno.ESRCH):
                        continue
                    raise
                seen.add(local)
                with socket.socket(fileno=fd) as sock:
                    found += [Datagram(local, remote, data) for data, remote in _peek_all(sock)]
        finally:
            os.close(pidfd)
    return found


def give_back(datagrams: Sequence[Datagram]) -> int:
    """Send each datagram to its socket again, from its original sender; how many were sent."""
    senders: dict[tuple[str, int], socket.socket] = {}
    sent = 0
    try:
        for d in datagrams:
            sock = senders.get(d.remote)
            if sock is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                senders[d.remote] = sock
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(d.remote)
                except OSError as err:
                    if err.errno != errno.EADDRINUSE:
                        raise
                    # The sender is a socket of this host that holds its port without
                    # SO_REUSEADDR: its address, another port (a connected receiver drops it).
                    sock.bind((d.remote[0], 0))
            dest = ("127.0.0.1" if d.local[0] == "0.0.0.0" else d.local[0], d.local[1])
            sock.sendto(d.payload, dest)
            sent += 1
    finally:
        for sock in senders.values():
            with contextlib.suppress(OSError):
                sock.close()
    return sent
