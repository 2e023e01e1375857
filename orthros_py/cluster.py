"""The cluster as a caller sees it: its hosts, where their agents listen, the key to call them
with, and a typed ``AgentClient`` for each, in one place.

Which key and which path (``Cluster.load``): when a lab of the inventory is up, its agents hold
the lab's own key (``STATE_DIR/authkey``) and are reached at the lab's addresses, from the
caller's namespace through the lab's controller link, or from inside each host's network
namespace when the lab has none; otherwise the inventory's ``key_file`` and the hosts' addresses
as they are. A key given by the caller wins either way. ``Cluster.of_lab`` does the same for a
lab already in hand (benchmarks, tests).

No privileges but reading the key; entering a lab host's network namespace to connect needs
root, as the lab does. No I/O until a client calls.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orthros_py.agent.client import CALL_TIMEOUT, AgentClient, Connector
from orthros_py.errors import OrthrosError
from orthros_py.inventory import Inventory, InventoryError, load_inventory

if TYPE_CHECKING:
    from orthros_py.lab import Lab


@dataclass(frozen=True)
class AgentAddress:
    """Where one host's agent listens, and from which network namespace to connect to it."""

    name: str
    address: str
    port: int
    netns: str | None = None  # a lab host without a controller link: connect from inside it


class Cluster:
    """The hosts and how to call their agents from here. Cheap; clients hold no connection."""

    def __init__(self, agents: Iterable[AgentAddress], key_path: Path, *,
                 inventory: Inventory | None = None) -> None:
        self.agents = {a.name: a for a in agents}
        self.key_path = key_path
        self._inventory = inventory

    def __repr__(self) -> str:
        return f"Cluster({', '.join(self.agents)}; key {self.key_path})"

    @classmethod
    def load(cls, inventory: Path | None = None, key_path: Path | None = None) -> Cluster:
        """The inventory's hosts (``inventory``, or the default file), through its lab if one
        is up."""
        inv = load_inventory(inventory)
        try:
            from orthros_py.lab import Lab

            lab = Lab.find(inv)
        except (ImportError, OrthrosError):
            lab = None  # no lab support here, or no lab of this inventory: the hosts as listed
        agents = [AgentAddress(h.name, h.address, h.agent_port) for h in inv.hosts]
        key = key_path or inv.key_file
        if lab is not None:
            # Hosts the lab did not build stay as listed (and answer as unreachable).
            in_lab = cls.of_lab(lab).agents
            agents = [in_lab.get(a.name, a) for a in agents]
            key = key_path or lab.key_file
        return cls(agents, key, inventory=inv)

    @classmethod
    def of_lab(cls, lab: Lab, key_path: Path | None = None, *,
               inventory: Inventory | None = None) -> Cluster:
        """The hosts of a lab that is up, with its key unless ``key_path`` is given."""
        # Without a controller link the caller's namespace has no route to the hosts.
        direct = lab.controller is not None
        agents = [AgentAddress(h.name, h.address, h.agent_port, None if direct else h.netns)
                  for h in lab.hosts if h.agent_port is not None]
        return cls(agents, key_path or lab.key_file, inventory=inventory)

    @property
    def inventory(self) -> Inventory:
        """The inventory this cluster was loaded from (its services, its source)."""
        if self._inventory is None:
            raise InventoryError("this cluster was built from a lab, without its inventory")
        return self._inventory

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(self.agents)

    def agent(self, name: str) -> AgentAddress:
        found = self.agents.get(name)
        if found is None:
            if self._inventory is not None:
                self._inventory.host(name)  # says which hosts the inventory has
            known = ", ".join(self.agents)
            raise InventoryError(f"no host named {name!r} with an agent (hosts: {known})")
        return found

    def reach(self, name: str) -> tuple[str, int]:
        """Where the other hosts reach ``name``'s agent: (address, port)."""
        a = self.agent(name)
        return a.address, a.port

    def client(self, name: str, *, timeout: float | None = None) -> AgentClient:
        a = self.agent(name)
        return AgentClient(a.address, a.port, self.key_path, name=name,
                           timeout=timeout or CALL_TIMEOUT, connector=_connector(a.netns))

    def candidates(self, source: str, dest: str) -> list[str]:
        """The inventory's service addresses that both hosts may hold."""
        if self._inventory is None:
            return []
        return [s.cidr for s in self._inventory.services
                if source in s.hosts and dest in s.hosts]


def _connector(netns: str | None) -> Connector | None:
    if netns is None:
        return None

    def connect(address: tuple[str, int], timeout: float) -> socket.socket:
        from orthros_py.net.addr import in_netns

        with in_netns(netns):
            return socket.create_connection(address, timeout=timeout)

    return connect
