"""orthros's network lock around one CRIU dump or restore of a process tree.

CRIU's own methods (iptables, nftables) lock inside CRIU; for those this class does nothing and
CRIU is told which. With ``xdp``, CRIU is told ``skip`` and this class writes the tree's
connections into the pinned BPF map before the freeze, and removes them after the restore (or
at once, when the dump failed or left the tree running). Needs root (CAP_BPF, CAP_NET_ADMIN).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orthros_py.errors import NetlockError
from orthros_py.net.conn import Conn
from orthros_py.netlock.method import NetworkLock

__all__ = ["LockReport", "NetworkLock", "TreeLock", "default_method"]

if TYPE_CHECKING:
    from orthros_py.netlock.xdp import XdpNetLock


def default_method() -> NetworkLock:
    """xdp where BCC and kernel headers are present (`orthros check` proves it loads), else
    CRIU's iptables method."""
    headers = f"/lib/modules/{os.uname().release}/build"
    if importlib.util.find_spec("bcc") is not None and os.path.exists(headers):
        return NetworkLock.XDP
    return NetworkLock.IPTABLES


@dataclass
class LockReport:
    method: NetworkLock
    conns: int = 0
    interfaces: list[str] = field(default_factory=list)
    lock_ms: float | None = None
    unlock_ms: float | None = None
    # Segments the lock caught and gave to the restored tree at the unlock (net/replay.py).
    caught: int = 0
    given_back: int = 0
    give_back_ms: float | None = None
    refused: list[str] = field(default_factory=list)
    # Still locked when the operation returned (a dump that killed its tree waits for restore).
    held: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.value,
            "conns": self.conns,
            "interfaces": self.interfaces,
            "lock_ms": None if self.lock_ms is None else round(self.lock_ms, 3),
            "unlock_ms": None if self.unlock_ms is None else round(self.unlock_ms, 3),
            "caught": self.caught,
            "given_back": self.given_back,
            "give_back_ms": None if self.give_back_ms is None else round(self.give_back_ms, 3),
            "refused": self.refused[:5],
            "held": self.held,
        }


class TreeLock:
    """The XDP lock of one tree's connections, for one dump or restore."""

    def __init__(self, method: NetworkLock) -> None:
        self.method = method
        self.report = LockReport(method)
        self.conns: list[Conn] = []
        self._lock: XdpNetLock | None = None
        self._netns: str | None = None  # where prepare_tree attached the programs

    @property
    def active(self) -> bool:
        return self.method is NetworkLock.XDP

    def _xdp(self) -> XdpNetLock:
        if self._lock is None:
            from orthros_py.netlock.xdp import XdpNetLock

            self._lock = XdpNetLock()
        return self._lock

    def prepare_tree(self, pid: int, known: Sequence[Conn] | None = None) -> None:
        """Find the tree's connections and have the programs on their interfaces: everything
        slow (a compile, if nothing is pinned yet; netlink) happens here, before the dump.

        ``known``: the tree's connections as the caller already listed them in the caller's
        own network namespace (psutil); only valid when the tree shares that namespace.
        """
        if not self.active:
            return
        from orthros_py.net.conns import discover_tree, netns_of, route_interfaces

        netns, nsid = netns_of(pid)
        if known is not None and nsid == netns_of(os.getpid())[1]:
            conns = sorted(set(known))
            routes, _ = route_interfaces(None, conns)
            interfaces = sorted(set(routes.values()))
        else:
            found = discover_tree(pid)
            netns, conns, interfaces = found.netns, list(found.conns), found.interfaces
        if not conns:
            return
        lock = self._xdp()
        lock.prepare()
        lock.attach(interfaces, netns=netns)
        self._netns = netns
        self.conns = list(conns)
        self.report.conns = len(self.conns)
        self.report.interfaces = interfaces

    def prepare_conns(self, conns: Sequence[Conn], interfaces: Sequence[str],
                      netns: str | None = None) -> None:
        """Have the programs on ``interfaces`` for ``conns`` known beforehand (a checkpoint's,
        whose tree is not running here to discover them from)."""
        if not self.active or not conns:
            return
        lock = self._xdp()
        lock.prepare()
        lock.attach(list(interfaces), netns=netns)
        self._netns = netns
        self.conns = list(conns)
        self.report.conns = len(self.conns)
        self.report.interfaces = list(interfaces)

    def engage(self, *, inbound_only: bool = False) -> None:
        """Lock the prepared connections: map writes only. ``inbound_only`` for a tree that
        is not frozen yet (``XdpNetLock.lock_inbound``)."""
        if not self.active or not self.conns:
            return
        start = time.perf_counter()
        if inbound_only:
            self._xdp().lock_inbound(self.conns, fresh=True)
        else:
            self._xdp().lock(self.conns)
        self.report.lock_ms = (time.perf_counter() - start) * 1000
        self.report.held = True

    def refresh(self, pid: int) -> list[Conn]:
        """Lock the connections the tree has now that were not prepared (made since): once
        it is frozen, the list is final. Those added."""
        if not self.active:
            return []
        from orthros_py.net.conns import discover_tree

        found = discover_tree(pid)
        known = set(self.conns)
        new = [c for c in found.conns if c not in known]
        if not new:
            return []
        lock = self._xdp()
        lock.prepare()
        missing = [i for i in found.interfaces if i not in self.report.interfaces]
        if missing:
            lock.attach(missing, netns=found.netns)
            self.report.interfaces = sorted({*self.report.interfaces, *missing})
            self._netns = self._netns or found.netns
        lock.lock(new)
        self.conns += new
        self.report.conns = len(self.conns)
        return new

    def adopt(self, conns: Sequence[Conn]) -> None:
        """Take over connections a previous dump left locked (restore on the same host)."""
        if self.active:
            self.conns = list(conns)
            self.report.conns = len(self.conns)

    def unlock(self, give_back_to: int | None = None) -> None:
        """Remove exactly this tree's entries (map deletes only). ``give_back_to``: the pid of
        the restored tree, which is then given what its peers sent while locked (their
        retransmissions would otherwise wait out a backoff; ``net/replay.py``)."""
        if not self.active or not self.conns or self.report.unlock_ms is not None:
            return  # nothing to do, or done already
        lock = self._xdp()
        start = time.perf_counter()
        if give_back_to is None:
            lock.unlock(self.conns)
            self.report.unlock_ms = (time.perf_counter() - start) * 1000
            self.report.held = False
            return
        caught = lock.unlock_taking(self.conns)
        unlocked = time.perf_counter()
        self.report.unlock_ms = (unlocked - start) * 1000
        self.report.held = False
        self.report.caught = len(caught)
        if caught:
            self.give_back(caught, give_back_to)
            self.report.give_back_ms = (time.perf_counter() - unlocked) * 1000

    def give_back(self, caught: dict[Conn, bytes], pid: int) -> None:
        """Send ``caught`` to the tree of ``pid`` (in its network namespace); a failure is
        reported, never raised: the peers then only retransmit later."""
        from orthros_py.net.replay import give_back

        try:
            sent, refused = give_back(caught.values(), list(caught), f"/proc/{pid}/ns/net")
        except OSError as err:
            sent, refused = 0, [f"cannot give the caught segments back: {err}"]
        self.report.given_back += sent
        self.report.refused += refused

    def tidy(self) -> None:
        """Take the programs off the interfaces once no connection is locked any more, so that
        nothing of orthros stays in the data path. Slow (netlink): after the timed part."""
        if not self.active or self._lock is None:
            return
        lock = self._lock
        try:
            # The map is host-wide: keep the programs while another tree's connections on the
            # same addresses are locked (they may share our interfaces); otherwise detach.
            if not self.report.held and not lock.locks_on({c.local_ip for c in self.conns}):
                try:
                    lock.detach(None, netns=self._netns)
                except NetlockError:  # the tree's namespace went with the tree: ours, then
                    lock.detach(None, netns=None)
        finally:
            lock.close()

    def tidy_later(self, delay: float) -> threading.Timer | None:
        """``tidy`` ``delay`` seconds from now, on a thread the process waits for before it
        exits. Right after a restore: taking a program off a veth can drop a packet on its
        way, and a just-restored socket, with no RTT estimate yet, sends it again only a
        second later (seen: nginx's clients waiting 3 s in 5 restores of 7)."""
        if not self.active or self._lock is None:
            return None
        from orthros_py.netlock.xdp import XdpNetLock

        seen = XdpNetLock.attaches

        def tidy_unless_attached_since() -> None:
            # A dump in this process attached the programs again since: they are its now (a
            # detach between its attach and its lock would leave its connections open).
            if XdpNetLock.attaches == seen:
                self.tidy()
            elif self._lock is not None:
                self._lock.close()

        timer = threading.Timer(delay, tidy_unless_attached_since)
        timer.name = "netlock-tidy"
        timer.start()
        return timer

    def release(self) -> None:
        """Unlock and tidy: every path that must leave nothing behind."""
        try:
            self.unlock()
        finally:
            self.tidy()
