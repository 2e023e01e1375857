"""Network locks: keep a process tree's TCP connections silent while it is checkpointed or moved.

Backends share the ``NetLock`` interface (``base``): ``xdp`` (an XDP program plus a tc egress
filter over one pinned BPF hash map; locking N connections is 2N map writes), and, for
comparison, ``iptables`` and ``nftables`` (one rule pair per connection). Importing this package
is cheap: a backend's module (and BCC, pyroute2) loads only when ``backend()`` asks for it.

How a dump/restore uses the XDP lock, given the tree's pids::

    from orthros_py.net.conns import discover
    from orthros_py.netlock import XdpNetLock

    found = discover(pids)                    # conns in the tree's netns, and their interfaces
    lock = XdpNetLock()
    lock.prepare()                            # before freezing: compile once, or open the pins
    lock.attach(found.interfaces, netns=found.netns)
    lock.lock(found.conns)                    # ~ms; the lock now outlives this process
    ...                                       # criu dump with --network-lock skip, move, restore
    XdpNetLock().unlock(found.conns)          # in whichever process restores (no compile)

Inside ``with lock:`` the connections that object locked are unlocked on every path out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orthros_py.netlock.base import (
    Attachment,
    Conn,
    FlushResult,
    LockedConn,
    LockStatus,
    NetLock,
)
from orthros_py.netlock.method import NetworkLock

if TYPE_CHECKING:
    from orthros_py.netlock.xdp import XdpNetLock

# The backends, named as the methods that lock with them (skip has none).
BACKENDS: tuple[str, ...] = tuple(m.backend for m in NetworkLock if m.backend is not None)

__all__ = ["BACKENDS", "Attachment", "Conn", "FlushResult", "LockStatus", "LockedConn",
           "NetLock", "NetworkLock", "XdpNetLock", "backend"]


def backend(name: str, **kwargs: Any) -> NetLock:
    """A lock of the named backend (``netns=`` for iptables/nftables: where the rules go)."""
    if name == "xdp":
        from orthros_py.netlock.xdp import XdpNetLock
        return XdpNetLock(**kwargs)
    if name == "iptables":
        from orthros_py.netlock.iptables import IptablesNetLock
        return IptablesNetLock(**kwargs)
    if name == "nftables":
        from orthros_py.netlock.nftables import NftablesNetLock
        return NftablesNetLock(**kwargs)
    raise ValueError(f"unknown network lock backend {name!r} (one of {', '.join(BACKENDS)})")


def __getattr__(name: str) -> Any:
    # ``from orthros_py.netlock import XdpNetLock`` without importing pyroute2 at package import.
    if name == "XdpNetLock":
        from orthros_py.netlock.xdp import XdpNetLock
        return XdpNetLock
    raise AttributeError(name)
