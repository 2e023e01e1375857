"""The hosts as a policy sees them: the agent calls it may make (``AgentAPI``, typed, the results
of ``orthros_py.agent.messages``), a host with its agent and where its peers reach it (``Host``),
and what its agent reports of the host and of a process tree (``HostFacts``, ``TreeFacts``).

No privileges and no I/O here: the transport is opened by the caller and handed in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from orthros_py.agent.messages import (
    FileInfo,
    KillResult,
    PageServerInfo,
    RemoteDump,
    RemoteRestore,
)
from orthros_py.criu.request import DumpOptions, RestoreOptions
from orthros_py.errors import ExitStatus, OrthrosError
from orthros_py.net.conn import Conn

if TYPE_CHECKING:
    from orthros_py.cluster import Cluster


class AgentAPI(Protocol):
    """What policies call on an agent (``orthros_py.agent.client.AgentClient`` has it all;
    unit tests hand in fakes, ``tests/unit/fakes.py``)."""

    name: str

    def status(self) -> dict[str, Any]: ...
    def request(self, op: str, args: Mapping[str, Any] | None = None, *,
                timeout: float | None = None) -> dict[str, Any]: ...
    def tree(self, pid: int) -> dict[str, Any]: ...
    def pids_in_use(self, pids: Iterable[int]) -> list[tuple[int, str]]: ...
    def addr_list(self, *, netns: str | None = None) -> list[dict[str, Any]]: ...
    def netlock_prepare(self, backend: str = "xdp", *, timeout: float = 120.0
                        ) -> dict[str, Any]: ...
    def netlock_lock(self, backend: str, *, conns: Iterable[str | Conn] = (),
                     pids: Iterable[int] = (), ifaces: Iterable[str] = (),
                     netns: str | None = None, timeout: float = 120.0,
                     inbound_only: bool = False) -> list[str]: ...
    def netlock_engage(self, backend: str, *, conns: Iterable[str | Conn] = (),
                       pids: Iterable[int] = (), ifaces: Iterable[str] = (),
                       netns: str | None = None, timeout: float = 120.0,
                       inbound_only: bool = False) -> dict[str, Any]: ...
    def netlock_unlock(self, backend: str, conns: Iterable[str | Conn], *,
                       netns: str | None = None, detach: Iterable[str] = (),
                       tidy: bool = False, detach_after: float = 0.0) -> list[str]: ...
    def netlock_unlock_giving_back(self, backend: str, conns: Iterable[str | Conn], pid: int,
                                   segments: Iterable[str] = ()) -> dict[str, Any]: ...
    def netlock_caught(self, backend: str, conns: Iterable[str | Conn]) -> list[str]: ...
    def page_server(self, image: str, *, address: str | None = None, port: int = 0,
                    log_level: int = 2, parent: str | None = None,
                    scratch: bool = False) -> PageServerInfo: ...
    def page_server_stop(self, image: str) -> dict[str, Any]: ...
    def dump(self, pid: int, image: str, opts: DumpOptions | None = None, *,
             timeout: float = 600.0, page_nonce: str | None = None,
             dirty_track: str | None = None, scratch: bool = False) -> RemoteDump: ...
    def restore(self, image: str, opts: RestoreOptions | None = None, *,
                timeout: float = 600.0) -> RemoteRestore: ...
    def push_images(self, image: str, host: str, port: int, *, dest_image: str | None = None,
                    dest_name: str | None = None, overwrite: bool = False,
                    timeout: float = 600.0, files: Iterable[str] | None = None,
                    prefixes: Iterable[str] | None = None,
                    scratch: bool = False) -> list[FileInfo]: ...
    def kill(self, pid: int, *, signal: str = "KILL", wait: float = 5.0) -> KillResult: ...
    def resume(self, pid: int) -> dict[str, Any]: ...
    def remove_image(self, image: str, *, background: bool = False) -> bool: ...
    def cgroup_check(self, text: str, roots: Mapping[str, str] | None = None) -> list[str]: ...
    def cgroup_release(self, image: str) -> dict[str, Any]: ...
    def addr_add(self, ifname: str, address: str, *, netns: str | None = None) -> bool: ...
    def addr_del(self, ifname: str, address: str, *, netns: str | None = None) -> bool: ...
    def garp(self, ifname: str, address: str, *, count: int = 1,
             netns: str | None = None) -> int: ...


@dataclass(frozen=True)
class Host:
    """One host of a policy: its name, its agent (the transport, opened by the caller), and
    where the *other* hosts reach it (agent port, page server)."""

    name: str
    agent: AgentAPI
    address: str
    agent_port: int

    @classmethod
    def of(cls, cluster: Cluster, name: str) -> Host:
        """Host ``name`` of ``cluster``, with its agent's client."""
        address, port = cluster.reach(name)
        return cls(name, cluster.client(name), address, port)


@dataclass(frozen=True)
class HostFacts:
    name: str
    address: str  # the host's own cluster address
    interfaces: Mapping[str, tuple[ipaddress.IPv4Interface, ...]]  # ifname -> addresses
    boot_id: str | None = None
    pid_ns: int | None = None

    @classmethod
    def from_agent(cls, name: str, address: str, status: Mapping[str, Any],
                   interfaces: Sequence[Mapping[str, Any]]) -> HostFacts:
        return cls(name, address,
                   {str(i["ifname"]): tuple(ipaddress.IPv4Interface(a) for a in i["addresses"])
                    for i in interfaces},
                   status.get("boot_id"), status.get("pid_ns"))

    def holder_of(self, ip: ipaddress.IPv4Address) -> tuple[str, ipaddress.IPv4Interface] | None:
        """(ifname, address/prefix) of the interface holding ``ip``, or None."""
        for ifname, addrs in sorted(self.interfaces.items()):
            for a in addrs:
                if a.ip == ip:
                    return ifname, a
        return None


@dataclass(frozen=True)
class TreeFacts:
    pid: int
    pids: tuple[int, ...]
    conns: tuple[Conn, ...]  # everything a lock must cover
    interfaces: tuple[str, ...] = ()  # where their packets leave
    in_agent_netns: bool = True
    rss: int = 0  # resident bytes of all its processes (what a dump must copy, about)
    in_agent_mntns: bool = False  # every process shares the agent's mount namespace
    # Whether the root shares the agent's PID namespace (a restore then gives every process
    # and thread its very id again), not the init of one of its own; None: the agent did not say.
    in_agent_pidns: bool | None = None
    tids: tuple[int, ...] = ()  # every process and thread id, as far as the agent said

    @classmethod
    def from_agent(cls, data: Mapping[str, Any]) -> TreeFacts:
        procs = data["processes"]
        pidns = data.get("agent_pidns")
        return cls(int(data["pid"]), tuple(int(p["pid"]) for p in procs),
                   tuple(Conn.parse(c) for c in data["conns"]),
                   tuple(str(i) for i in data.get("interfaces", [])),
                   bool(data.get("agent_netns", True)),
                   sum(int(p.get("rss", 0)) for p in procs),
                   bool(data.get("agent_mntns", False)),
                   None if pidns is None else bool(pidns),
                   # An agent that lists no thread ids: at least the processes' own.
                   tuple(dict.fromkeys(int(t) for p in procs
                                       for t in (p.get("tids") or [p["pid"]]))))


def shared_pid_space(a: HostFacts, b: HostFacts) -> bool | None:
    """Whether processes of ``a`` and ``b`` draw from one PID space; None if unknown."""
    if None in (a.boot_id, b.boot_id, a.pid_ns, b.pid_ns):
        return None
    return a.boot_id == b.boot_id and a.pid_ns == b.pid_ns


class PlanError(OrthrosError):
    """The migration cannot be planned as asked; nothing was touched."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.USAGE


def parse_service_ip(text: str) -> ipaddress.IPv4Interface:
    """``10.0.0.5`` or ``10.0.0.5/32`` -> IPv4Interface; PlanError otherwise."""
    try:
        return ipaddress.IPv4Interface(text if "/" in text else f"{text}/32")
    except ValueError as err:
        raise PlanError(f"{text!r} is not an IPv4 service address") from err


def service_ifname(dest: HostFacts, service: ipaddress.IPv4Interface | None) -> str:
    """The destination's interface for the service address: the one holding its own cluster
    address, else the one on the service address's network, else its only non-loopback one."""
    own = dest.holder_of(ipaddress.IPv4Address(dest.address))
    if own is not None:
        return own[0]
    if service is not None:
        for ifname, addrs in sorted(dest.interfaces.items()):
            if any(service.ip in a.network for a in addrs):
                return ifname
    others = [i for i, addrs in dest.interfaces.items() if i != "lo" and addrs]
    if len(others) == 1:
        return others[0]
    raise PlanError(f"cannot tell which interface of {dest.name} should take the service "
                    f"address: none holds its address {dest.address}")
