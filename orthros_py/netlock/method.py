"""Which network lock keeps a tree's TCP connections silent: the one name every layer uses.

Pure Python, no privileges. The CLI offers these values, checkpoint and bench pass them on, and
``criu`` maps it onto what CRIU itself is told (``CriuNetworkLock``).
"""

from __future__ import annotations

import enum

from orthros_py.criu.request import CriuNetworkLock


class NetworkLock(enum.StrEnum):
    """How a tree's TCP connections are kept silent while it is frozen or away."""

    XDP = "xdp"  # orthros's BPF map: N connections cost 2N map writes
    IPTABLES = "iptables"  # CRIU's: two forks of sh + iptables per connection
    NFTABLES = "nftables"  # CRIU's: libnftables, one set element per direction
    SKIP = "skip"  # nobody locks: packets meanwhile may reset connections

    @property
    def backend(self) -> str | None:
        """The orthros backend (``orthros_py.netlock.backend``) of that name; None for skip."""
        return None if self is NetworkLock.SKIP else self.value

    @property
    def criu_locks(self) -> bool:
        """CRIU itself locks (its iptables or nftables method), inside one dump or restore."""
        return self in (NetworkLock.IPTABLES, NetworkLock.NFTABLES)

    @property
    def criu(self) -> CriuNetworkLock:
        """What CRIU itself is asked to do: its own method, or ``skip`` when orthros locks (or
        nobody does)."""
        return CriuNetworkLock(self.value) if self.criu_locks else CriuNetworkLock.SKIP
