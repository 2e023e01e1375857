"""The network lock interface every backend implements, and the values it speaks in.

A network lock keeps chosen TCP connections silent while their owner is frozen, checkpointed
or moved: every packet of a locked connection is dropped in both directions, so neither end sees
a reset and TCP's retransmissions carry the data once the lock is lifted. Backends (``xdp``,
``iptables``, ``nftables``) differ in cost, not in meaning.

Pure Python, no privileges: the backends' modules say what they need.
"""

from __future__ import annotations

import abc
import functools
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Self

_FAMILIES: dict[int, str] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


def _endpoint(text: str) -> tuple[str, int]:
    """``IP:PORT`` or ``[IPv6]:PORT`` -> (address, port); ValueError saying what is wrong."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not IP:PORT")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 endpoint as [ADDRESS]:PORT")
    try:
        _normal_ip(host)
    except ValueError as err:
        raise ValueError(f"{host!r} is not an IP address") from err
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{port!r} is not a TCP port (1-65535)")
    return host, int(port)


def _unmapped(addr: ipaddress.IPv4Address | ipaddress.IPv6Address
              ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d, but its packets on the wire are
    # IPv4: the lock must match them as such.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=4096)
def _normal_ip(text: str) -> tuple[int, str]:
    """(IP version, compressed text) of an address, IPv4-mapped IPv6 as IPv4. Cached: a tree's
    thousands of connections share a handful of addresses, and ipaddress is slow."""
    addr = _unmapped(ipaddress.ip_address(text))
    return addr.version, addr.compressed


@dataclass(frozen=True, order=True, slots=True)
class Conn:
    """One TCP connection as seen from the host that owns the local end.

    Addresses are kept normalized (compressed text; IPv4-mapped IPv6 becomes IPv4), so that two
    Conn values for the same connection compare and hash equal.
    """

    family: int  # socket.AF_INET or socket.AF_INET6
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int

    def __post_init__(self) -> None:
        lver, local = _normal_ip(self.local_ip)
        rver, remote = _normal_ip(self.remote_ip)
        if lver != rver:
            raise ValueError(f"{local} and {remote} are not of the same IP version")
        family = int(socket.AF_INET if lver == 4 else socket.AF_INET6)
        for port in (self.local_port, self.remote_port):
            if not 0 < int(port) < 65536:
                raise ValueError(f"{port} is not a TCP port (1-65535)")
        # Frozen, so normalize through object.__setattr__ (the documented dataclass idiom).
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "local_ip", local)
        object.__setattr__(self, "remote_ip", remote)
        object.__setattr__(self, "local_port", int(self.local_port))
        object.__setattr__(self, "remote_port", int(self.remote_port))

    @classmethod
    def of(cls, local: tuple[str, int], remote: tuple[str, int]) -> Conn:
        """From two (ip, port) pairs; the family follows the addresses."""
        fam = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        return cls(fam, local[0], local[1], remote[0], remote[1])

    @classmethod
    def parse(cls, text: str) -> Conn:
        """``SRC:PORT,DST:PORT`` (local end first; ``[v6]:PORT`` for IPv6) -> Conn."""
        src, sep, dst = text.partition(",")
        if not sep:
            raise ValueError(f"{text!r} is not SRC:PORT,DST:PORT")
        (laddr, lport), (raddr, rport) = _endpoint(src), _endpoint(dst)
        if _normal_ip(laddr)[0] != _normal_ip(raddr)[0]:
            raise ValueError(f"{text!r} mixes IPv4 and IPv6")
        return cls(socket.AF_INET, laddr, lport, raddr, rport)  # the family follows the addresses

    @property
    def local(self) -> tuple[str, int]:
        return (self.local_ip, self.local_port)

    @property
    def remote(self) -> tuple[str, int]:
        return (self.remote_ip, self.remote_port)

    def reversed(self) -> Conn:
        """The same connection seen from the other end."""
        return Conn(self.family, self.remote_ip, self.remote_port, self.local_ip, self.local_port)

    def __str__(self) -> str:
        def ep(ip: str, port: int) -> str:
            return f"[{ip}]:{port}" if self.family == socket.AF_INET6 else f"{ip}:{port}"
        return f"{ep(self.local_ip, self.local_port)},{ep(self.remote_ip, self.remote_port)}"

    def to_dict(self) -> dict[str, Any]:
        return {"family": _FAMILIES[self.family], "local": list(self.local),
                "remote": list(self.remote)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conn:
        return cls.of((str(data["local"][0]), int(data["local"][1])),
                      (str(data["remote"][0]), int(data["remote"][1])))


@dataclass(frozen=True)
class Attachment:
    """Where a backend hooks into the network: an interface in a network namespace.

    ``netns`` is the namespace as the caller named it (``/run/netns/NAME`` or ``/proc/PID/ns/net``;
    None: orthros's own), ``netns_id`` the (st_dev, st_ino) of that namespace, which finds it again
    if the path went stale.
    """

    iface: str
    netns: str | None = None
    netns_id: tuple[int, int] | None = None
    ifindex: int = 0
    xdp: bool = False  # the XDP program is on the interface (incoming packets)
    tc: bool = False  # the clsact egress filter is on the interface (outgoing packets)
    clsact_created: bool = False  # orthros added the clsact qdisc, so removes it when unused

    @property
    def where(self) -> str:
        return f"{self.iface} in {self.netns or 'the host namespace'}"

    def to_dict(self) -> dict[str, Any]:
        return {"iface": self.iface, "netns": self.netns,
                "netns_id": list(self.netns_id) if self.netns_id else None,
                "ifindex": self.ifindex, "xdp": self.xdp, "tc": self.tc,
                "clsact_created": self.clsact_created}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attachment:
        nsid = data.get("netns_id")
        return cls(iface=str(data["iface"]), netns=data.get("netns"),
                   netns_id=(int(nsid[0]), int(nsid[1])) if nsid else None,
                   ifindex=int(data.get("ifindex", 0)), xdp=bool(data.get("xdp")),
                   tc=bool(data.get("tc")), clsact_created=bool(data.get("clsact_created")))


@dataclass(frozen=True)
class LockedConn:
    conn: Conn
    dropped: int | None = None  # packets dropped for it since it was locked, if the backend counts

    def to_dict(self) -> dict[str, Any]:
        return {**self.conn.to_dict(), "conn": str(self.conn), "dropped": self.dropped}


@dataclass
class LockStatus:
    """What a backend has in place right now."""

    backend: str
    loaded: bool  # the backend's machinery (programs, tables) exists
    conns: list[LockedConn] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "loaded": self.loaded,
                "conns": [c.to_dict() for c in self.conns],
                "attachments": [a.to_dict() for a in self.attachments],
                "counters": dict(self.counters), "details": dict(self.details),
                "problems": list(self.problems)}


@dataclass
class FlushResult:
    """What ``flush`` removed, and what it could not reach."""

    backend: str
    unlocked: int = 0
    detached: list[Attachment] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # pins, tables, files
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "unlocked": self.unlocked,
                "detached": [a.to_dict() for a in self.detached],
                "removed": list(self.removed), "problems": list(self.problems)}


class NetLock(abc.ABC):
    """lock/unlock/status/flush over one mechanism.

    ``lock`` and ``unlock`` are idempotent. As a context manager the object unlocks, on every
    path out of the ``with`` block, the connections it locked itself; a lock meant to outlive the
    process (across a migration) is simply not taken inside a ``with``.
    """

    backend: ClassVar[str]

    def __init__(self) -> None:
        self._held: set[Conn] = set()

    @abc.abstractmethod
    def _add(self, conns: Sequence[Conn]) -> None:
        """Start dropping the packets of ``conns`` (already de-duplicated)."""

    @abc.abstractmethod
    def _remove(self, conns: Sequence[Conn]) -> None:
        """Stop dropping them; connections not locked are ignored."""

    @abc.abstractmethod
    def status(self) -> LockStatus: ...

    @abc.abstractmethod
    def flush(self) -> FlushResult:
        """Remove every lock of this backend, whoever took it, and what supports it."""

    def close(self) -> None:  # noqa: B027 - a hook: most backends hold nothing open
        """Release what this object holds open (not the locks)."""

    @property
    def held(self) -> frozenset[Conn]:
        """The connections this object locked and has not unlocked."""
        return frozenset(self._held)

    def lock(self, conns: Iterable[Conn]) -> list[Conn]:
        # dict.fromkeys: de-duplicated in the caller's order (sorting costs more than the lock).
        todo = list(dict.fromkeys(conns))
        if todo:
            self._add(todo)
            self._held.update(todo)
        return todo

    def unlock(self, conns: Iterable[Conn]) -> list[Conn]:
        todo = list(dict.fromkeys(conns))
        if todo:
            self._remove(todo)
            self._held.difference_update(todo)
        return todo

    def release(self) -> list[Conn]:
        """Unlock what this object locked."""
        return self.unlock(self._held)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.release()
        finally:
            self.close()
