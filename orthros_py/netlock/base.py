"""The network lock interface every backend implements, and the values it speaks in.

A network lock keeps chosen TCP connections silent while their owner is frozen, checkpointed
or moved: every packet of a locked connection is dropped in both directions, so neither end sees
a reset and TCP's retransmissions carry the data once the lock is lifted. Backends (``xdp``,
``iptables``, ``nftables``) differ in cost, not in meaning.

Pure Python, no privileges: the backends' modules say what they need.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Self

from orthros_py.net.conn import Conn

__all__ = ["Attachment", "Conn", "FlushResult", "LockStatus", "LockedConn", "NetLock"]


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
    mode: str = "generic"  # how the XDP program is attached: "native" (driver) or "generic" (SKB)

    @property
    def where(self) -> str:
        return f"{self.iface} in {self.netns or 'the host namespace'}"

    def to_dict(self) -> dict[str, Any]:
        return {"iface": self.iface, "netns": self.netns,
                "netns_id": list(self.netns_id) if self.netns_id else None,
                "ifindex": self.ifindex, "xdp": self.xdp, "tc": self.tc,
                "clsact_created": self.clsact_created, "mode": self.mode}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attachment:
        nsid = data.get("netns_id")
        return cls(iface=str(data["iface"]), netns=data.get("netns"),
                   netns_id=(int(nsid[0]), int(nsid[1])) if nsid else None,
                   ifindex=int(data.get("ifindex", 0)), xdp=bool(data.get("xdp")),
                   tc=bool(data.get("tc")), clsact_created=bool(data.get("clsact_created")),
                   # State files written before native mode existed: everything was generic.
                   mode=str(data.get("mode") or "generic"))


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

    def prepare(self) -> dict[str, Any]:
        """Get ready to lock fast (XDP: compile and pin its programs), before the time-critical
        part of a migration; what was done, for the caller's report. Most backends need nothing."""
        return {}

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
