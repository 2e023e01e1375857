"""The lab: the inventory's hosts built as network namespaces on this machine.

Each host (and the client) gets a namespace ``PREFIX+NAME`` with an ``eth0`` whose veth peer is a
port of a bridge that lives in a namespace of its own, so the kernel routes real packets between
the hosts. The caller's namespace only gets one veth to the bridge, carrying the inventory's
controller address (as a Vagrant host holds the .1 of its private network), so that ``orthros``
reaches the agents from a plain shell.

Each host also has a PID namespace and a mount namespace of its own (its own /proc; every other
mount a private copy of the machine's), made by a small init that is their PID 1
(``orthros_py.lab.init``). So lab hosts behave as separate machines where it matters to a
migration: the agents report different PID namespaces, the source tree stays stopped through the
restore on the other host (which gives it the same PIDs), a failed restore is undone by resuming
it, and nothing waits for this machine's init to reap PIDs. Agents and services are started
inside all three namespaces as daemons of the host (``Lab.spawn``: children of its init), with
their own image directory, as on separate machines; never through ``ip netns exec``, which
remounts /sys in a mount namespace CRIU would see as foreign.

Everything the lab makes is written down in ``STATE_DIR/state.json`` and undone by ``down``,
which also finds what a crashed run left (namespaces named by the inventory, bridge ports that
carry the lab's alias, processes inside those namespaces).

Interfaces: pyroute2.netns (bind mounts under /run/netns), rtnetlink (veth, bridge, addresses),
setns/unshare (through orthros_py.lab.init), nsenter(1), /proc/PID/ns/*, NSpid. Needs root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fcntl
import importlib.util
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
from pyroute2 import NetlinkError

from orthros_py.errors import MissingFeatureError, NotRootError, OperationTimeout, OrthrosError
from orthros_py.inventory import Inventory, LabSettings, inventory_path, load_inventory
from orthros_py.lab.init import machine_pid_of, nspids
from orthros_py.net.addr import (
    AddressMove,
    Link,
    call_in_netns,
    find_holder,
    in_netns,
    iproute,
    move_address,
    netns_exists,
    netns_path,
)
from orthros_py.net.links import (
    add_bridge,
    add_veth,
    create_netns,
    link_up,
    loopback_up,
    no_forwarding,
    remove_netns,
)
from orthros_py.proc.tree import ProcessRef
from orthros_py.run import run

T = TypeVar("T")

STATE_FILE = "state.json"
MARKER = ".orthros-lab"  # the lab made this directory: down may delete it whole
# The lab agents' scratch roots (transient images in memory; see orthros agent --scratch-root).
LAB_SCRATCH = Path("/dev/shm/orthros-lab")
KEY_FILE = "authkey"
ETH = "eth0"
# The lab hosts share one cgroup filesystem: each keeps its containers' groups below its own
# root here, so that a migrated container's groups are really made anew on the destination.
CGROUP_ROOT = "/orthros-lab"
ALIAS = "orthros-lab:"  # ifalias of every link the lab makes: NAME after the colon
CONTROLLER_PORT = "c-root"
AGENT_START_TIMEOUT = 30.0
STOP_GRACE = 3.0


class Role(enum.StrEnum):
    HOST = "host"
    CLIENT = "client"


@dataclass(frozen=True)
class LabHost:
    """One namespace host: where it is, and the agent it runs (if any)."""

    name: str
    role: Role
    netns: str
    interface: ipaddress.IPv4Interface
    agent_port: int | None = None  # None for the client, which runs no agent
    agent_pid: int | None = None
    agent_create_time: float | None = None  # with the pid, tells a reused pid apart
    agent_log: Path | None = None
    images_root: Path | None = None
    ifname: str = ETH
    # PID 1 of the host's own PID and mount namespaces (orthros_py.lab.init), a machine pid.
    init_pid: int | None = None
    init_create_time: float | None = None
    agent_host_pid: int | None = None  # the agent's pid as the host sees it

    @property
    def address(self) -> str:
        return str(self.interface.ip)

    @property
    def cidr(self) -> str:
        return self.interface.with_prefixlen

    @property
    def link(self) -> Link:
        return Link(self.netns, self.ifname)

    @property
    def netns_path(self) -> Path:
        return netns_path(self.netns)

    def agent_alive(self) -> bool:
        if self.agent_pid is None or self.agent_create_time is None:
            return False
        return ProcessRef(self.agent_pid, self.agent_create_time).alive()

    def init_alive(self) -> bool:
        if self.init_pid is None or self.init_create_time is None:
            return False
        return ProcessRef(self.init_pid, self.init_create_time).alive()

    def namespaces(self) -> dict[str, int]:
        """{"net"|"pid"|"mnt": inode} of the host's namespaces (those its init holds)."""
        out: dict[str, int] = {}
        with contextlib.suppress(OSError):
            out["net"] = os.stat(self.netns_path).st_ino
        if self.init_alive():
            for kind in ("pid", "mnt"):
                with contextlib.suppress(OSError):
                    out[kind] = os.stat(f"/proc/{self.init_pid}/ns/{kind}").st_ino
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role.value,
            "netns": self.netns,
            "ifname": self.ifname,
            "address": self.cidr,
            "agent_port": self.agent_port,
            "agent_pid": self.agent_pid,
            "agent_create_time": self.agent_create_time,
            "agent_log": str(self.agent_log) if self.agent_log else None,
            "images_root": str(self.images_root) if self.images_root else None,
            "init_pid": self.init_pid,
            "init_create_time": self.init_create_time,
            "agent_host_pid": self.agent_host_pid,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabHost:
        return cls(
            name=d["name"], role=Role(d["role"]), netns=d["netns"],
            interface=ipaddress.IPv4Interface(d["address"]), agent_port=d.get("agent_port"),
            agent_pid=d.get("agent_pid"), agent_create_time=d.get("agent_create_time"),
            agent_log=Path(d["agent_log"]) if d.get("agent_log") else None,
            images_root=Path(d["images_root"]) if d.get("images_root") else None,
            ifname=d.get("ifname", ETH), init_pid=d.get("init_pid"),
            init_create_time=d.get("init_create_time"),
            agent_host_pid=d.get("agent_host_pid"))


@dataclass(frozen=True)
class LabService:
    name: str
    interface: ipaddress.IPv4Interface
    hosts: tuple[str, ...]  # who may hold it, present in the lab
    holder: str  # who got it at `up`

    @property
    def address(self) -> str:
        return str(self.interface.ip)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.interface.with_prefixlen,
                "hosts": list(self.hosts), "holder": self.holder}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabService:
        return cls(d["name"], ipaddress.IPv4Interface(d["address"]), tuple(d["hosts"]),
                   d["holder"])


@dataclass(frozen=True)
class HostStatus:
    name: str
    role: Role
    netns: str
    netns_present: bool
    addresses: list[str]
    agent_port: int | None
    agent_pid: int | None
    agent_alive: bool
    agent_listening: bool | None  # None: no agent to ask
    init_pid: int | None = None
    init_alive: bool = False
    namespaces: dict[str, int] = field(default_factory=dict)  # kind -> inode
    agent_host_pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role.value, "netns": self.netns,
                "netns_present": self.netns_present, "addresses": self.addresses,
                "agent_port": self.agent_port, "agent_pid": self.agent_pid,
                "agent_host_pid": self.agent_host_pid,
                "agent_alive": self.agent_alive, "agent_listening": self.agent_listening,
                "init_pid": self.init_pid, "init_alive": self.init_alive,
                "namespaces": self.namespaces}


@dataclass(frozen=True)
class LabStatus:
    up: bool
    hosts: list[HostStatus]
    client: HostStatus | None
    services: list[dict[str, Any]]
    bridge: str | None = None
    bridge_netns: str | None = None
    controller: str | None = None
    agents_note: str | None = None
    state_dir: str | None = None

    @property
    def healthy(self) -> bool:
        every = [*self.hosts, *([self.client] if self.client else [])]
        return self.up and all(h.netns_present for h in every) and all(
            h.agent_alive for h in self.hosts if h.agent_pid is not None) and all(
            h.init_alive for h in every if h.init_pid is not None)

    def to_dict(self) -> dict[str, Any]:
        return {"up": self.up, "healthy": self.healthy, "state_dir": self.state_dir,
                "bridge": self.bridge, "bridge_netns": self.bridge_netns,
                "controller": self.controller, "agents_note": self.agents_note,
                "hosts": [h.to_dict() for h in self.hosts],
                "client": self.client.to_dict() if self.client else None,
                "services": self.services}


@dataclass(frozen=True)
class HostProcess:
    """A process started inside a lab host: its pid there (what ``orthros migrate`` and the
    host's agent take) and on this machine (what psutil and kill(2) here take)."""

    host: str
    host_pid: int
    machine_pid: int


@dataclass
class DownReport:
    """What ``down`` removed, and what it could not."""

    killed: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    state_dir: str | None = None  # removed
    warnings: list[str] = field(default_factory=list)

    @property
    def anything(self) -> bool:
        return bool(self.killed or self.namespaces or self.links or self.state_dir)

    def to_dict(self) -> dict[str, Any]:
        return {"killed": self.killed, "namespaces": self.namespaces, "links": self.links,
                "state_dir": self.state_dir, "warnings": self.warnings}


def agent_unavailable() -> str | None:
    """Why ``orthros agent`` cannot be started here, or None if it can."""
    if importlib.util.find_spec("orthros_py.cli.agent") is None:
        return "the agent command does not exist yet (no orthros_py/cli/agent.py)"
    if _orthros_exe() is None:
        return "the orthros command is not installed (run scripts/setup.sh)"
    return None


def _orthros_exe() -> str | None:
    beside = Path(sys.executable).parent / "orthros"
    return str(beside) if beside.exists() else shutil.which("orthros")


def _nsenter() -> str:
    exe = shutil.which("nsenter")
    if exe is None:
        raise MissingFeatureError("nsenter is not installed",
                                  hint="apt-get install util-linux (scripts/setup.sh does)")
    return exe


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NotRootError(f"{what} needs root (network namespaces, veths, setns)",
                           hint="run it with sudo")


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One ``up``/``down`` at a time: a lock on the state directory's parent (which stays)."""
    parent = state_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Lab:
    """A lab that is up (``Lab.up``) or was found up (``Lab.load``)."""

    def __init__(self, *, state_dir: Path, hosts: Sequence[LabHost], client: LabHost,
                 services: Sequence[LabService], subnet: ipaddress.IPv4Network, bridge: str,
                 bridge_netns: str, controller: ipaddress.IPv4Interface | None,
                 controller_link: str | None, key_file: Path, agents_note: str | None,
                 inventory_source: str | None, created: float, reused: bool = False,
                 xdp_pinned_before: bool = True) -> None:
        self.state_dir = state_dir
        self.hosts = tuple(hosts)
        self.client = client
        self.services = tuple(services)
        self.subnet = subnet
        self.bridge = bridge
        self.bridge_netns = bridge_netns
        self.controller = controller
        self.controller_link = controller_link
        self.key_file = key_file
        self.agents_note = agents_note  # why agents were not started, if they were not
        self.inventory_source = inventory_source
        self.created = created
        self.reused = reused  # `up` found this lab already up and kept it
        # Whether the XDP lock was pinned before this lab came up: if not, the lab's migrations
        # pinned it, and `down` removes it again when nobody holds a lock in it.
        self.xdp_pinned_before = xdp_pinned_before

    def __repr__(self) -> str:
        return (f"Lab(hosts={[h.name for h in self.hosts]}, client={self.client.name!r}, "
                f"state_dir={str(self.state_dir)!r})")

    # --- building and removing ---------------------------------------------------------------

    @classmethod
    def up(cls, n_hosts: int = 2, *, inventory: Inventory | Path | str | None = None,
           agents: bool = True, rebuild: bool = False,
           agent_timeout: float = AGENT_START_TIMEOUT,
           agent_command: Sequence[str] | None = None) -> Lab:
        """Build the first ``n_hosts`` hosts of the inventory and its client, start an agent in
        each host (unless ``agents`` is False or there is no agent command yet: see
        ``agents_note``), and wait until every agent accepts connections.

        A lab that is already up as asked is kept (``reused``); anything else there, a
        different lab or the remains of a crashed one, is removed first.

        ``agent_command`` replaces ``orthros agent`` (a wrapper, a test double); the lab
        appends ``--listen ADDR:PORT --key FILE --images-root DIR --name NAME``.
        """
        inv = inventory if isinstance(inventory, Inventory) else load_inventory(inventory)
        inv = inv.first(n_hosts)
        _require_root("orthros lab up")
        settings = inv.lab
        with _locked(settings.state_dir):
            if not rebuild:
                existing = cls._load_state(settings.state_dir)
                if existing is not None and existing._matches(inv, agents, agent_command):
                    existing.reused = True
                    return existing
            _teardown(inv, settings.state_dir, DownReport())
            try:
                return cls._build(inv, agents, agent_timeout, agent_command)
            except BaseException:
                _teardown(inv, settings.state_dir, DownReport())
                raise

    @classmethod
    def load(cls, inventory: Inventory | Path | str | None = None,
             state_dir: Path | None = None) -> Lab:
        """The lab that is up, from its state file; OrthrosError if none is."""
        sdir = state_dir or _state_dir_of(inventory)
        lab = cls._load_state(sdir)
        if lab is None:
            raise OrthrosError(f"no lab is up (no {sdir / STATE_FILE})",
                               hint="start one with: orthros lab up")
        return lab

    @classmethod
    def find(cls, inventory: Inventory | Path | str | None = None,
             state_dir: Path | None = None) -> Lab | None:
        """The lab that is up, or None."""
        return cls._load_state(state_dir or _state_dir_of(inventory))

    def down(self) -> DownReport:
        """Remove everything this lab made: agents and every other process in its namespaces,
        the namespaces, the bridge, the veths, the state directory."""
        return teardown(state_dir=self.state_dir)

    # --- hosts and namespaces ------------------------------------------------------------

    @property
    def all_hosts(self) -> tuple[LabHost, ...]:
        return (*self.hosts, self.client)

    def host(self, name: str | LabHost) -> LabHost:
        """The host (or the client) called ``name``."""
        if isinstance(name, LabHost):
            return name
        for h in self.all_hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.all_hosts)
        raise OrthrosError(f"the lab has no host {name!r} (it has {known})")

    def netns(self, host: str | LabHost) -> str:
        return self.host(host).netns

    def in_netns(self, host: str | LabHost) -> contextlib.AbstractContextManager[None]:
        """``with lab.in_netns("alpha"):`` runs the body (this thread only) in alpha's netns;
        sockets made there stay there."""
        return in_netns(self.host(host).netns)

    def call(self, host: str | LabHost, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` inside ``host``'s namespace, on a thread of its own."""
        return call_in_netns(self.host(host).netns, fn, *args, **kwargs)

    def argv(self, host: str | LabHost, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside ``host``'s network, PID and mount namespaces, in the
        host's root directory (nsenter's --wd would open the directory before entering: a cwd
        in this machine's mount namespace, where CRIU's parasite cannot mount). nsenter forks
        into the PID namespace and waits: its pid is not the command's (``spawn`` gives that)."""
        h = self.host(host)
        if h.init_pid is None:  # a lab made before hosts had PID namespaces
            return [_nsenter(), f"--net={h.netns_path}", "--", *map(str, argv)]
        return [_nsenter(), f"--target={h.init_pid}", "--net", "--pid", "--mount", "--",
                *map(str, argv)]

    def popen(self, host: str | LabHost, argv: Sequence[str],
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host``'s namespaces, under nsenter; ``kwargs`` go to Popen."""
        return subprocess.Popen(self.argv(host, argv), **kwargs)

    def spawn(self, host: str | LabHost, argv: Sequence[str], *, log: Path | None = None,
              cwd: Path | str | None = None) -> HostProcess:
        """Start ``argv`` in the background inside ``host``'s namespaces, as a daemon of that
        host: a session leader whose parent is the host's init (which reaps it), stdin from
        /dev/null, stdout and stderr to ``log`` (or /dev/null), no descriptor of ours."""
        h = self.host(host)
        if h.init_pid is None or not h.init_alive():
            raise OrthrosError(f"the lab host {h.name} has no init running", host=h.name,
                               stage="lab spawn", hint="rebuild the lab: orthros lab up --rebuild")
        cmd = [sys.executable, "-m", "orthros_py.lab.init", "spawn", "--init", str(h.init_pid),
               "--cwd", str(cwd or os.getcwd()), *(["--log", str(log)] if log else []),
               "--", *map(str, argv)]
        res = run(cmd, timeout=30.0)
        out = json.loads(res.stdout)
        return HostProcess(h.name, int(out["host_pid"]), int(out["machine_pid"]))

    def host_pid(self, host: str | LabHost, machine_pid: int) -> int:
        """What ``host`` calls the process this machine calls ``machine_pid`` (which lives in
        that host's PID namespace or in one nested below it)."""
        h = self.host(host)
        if h.init_pid is None:
            return machine_pid  # a lab without PID namespaces
        level = len(nspids(h.init_pid)) - 1
        pids = nspids(machine_pid)
        if len(pids) <= level:
            raise OrthrosError(f"process {machine_pid} does not live in lab host {h.name}",
                               host=h.name, pid=machine_pid)
        return pids[level]

    def machine_pid(self, host: str | LabHost, host_pid: int) -> int | None:
        """The machine pid of the process that ``host`` calls ``host_pid``, or None."""
        h = self.host(host)
        if h.init_pid is None or not h.init_alive():
            return None
        try:
            return machine_pid_of(h.init_pid, host_pid)
        except OSError:
            return None

    def run(self, host: str | LabHost, argv: Sequence[str], *, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside ``host``'s namespace (orthros_py.run.run)."""
        return run(self.argv(host, argv), timeout=timeout, check=check)

    def connect(self, address: tuple[str, int], *, via: str | LabHost | None = None,
                timeout: float = 5.0) -> socket.socket:
        """A TCP connection to ``address`` made from ``via``'s namespace (the client's by
        default); the socket stays in that namespace."""
        with self.in_netns(via or self.client):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    # --- service addresses --------------------------------------------------------------

    def service(self, name_or_address: str) -> LabService:
        for s in self.services:
            if name_or_address in (s.name, s.address, s.interface.with_prefixlen):
                return s
        raise OrthrosError(f"the lab has no service {name_or_address!r}")

    def holder(self, address: str) -> LabHost | None:
        """The host whose eth0 holds ``address`` now, or None."""
        found = find_holder(address, [h.link for h in self.hosts])
        return None if found is None else next(h for h in self.hosts if h.link == found)

    def move_service(self, address: str, to: str | LabHost, *, arp_count: int = 1) -> AddressMove:
        """Move ``address`` (a service name or address) from whichever host holds it to
        ``to``, with a gratuitous ARP from ``to``."""
        with contextlib.suppress(OrthrosError):
            address = self.service(address).interface.with_prefixlen
        dst = self.host(to)
        src = self.holder(address)
        if src is None:
            raise OrthrosError(f"no host of the lab holds {address}")
        return move_address(address, src.link, dst.link, arp_count=arp_count)

    # --- status ----------------------------------------------------------------------------

    def status(self) -> LabStatus:
        def one(h: LabHost) -> HostStatus:
            present = netns_exists(h.netns)
            addrs: list[str] = []
            if present:
                with contextlib.suppress(OrthrosError):
                    addrs = [a.with_prefixlen for a in h.link.addresses()]
            alive = h.agent_alive()
            listening = None
            if h.agent_pid is not None and h.agent_port is not None:
                listening = alive and present and _accepts(h.netns, h.address, h.agent_port, 0.5)
            return HostStatus(h.name, h.role, h.netns, present, addrs, h.agent_port,
                              h.agent_pid, alive, listening, h.init_pid, h.init_alive(),
                              h.namespaces(), h.agent_host_pid)

        services = []
        for s in self.services:
            holder = self.holder(s.address)
            services.append({**s.to_dict(), "holder": holder.name if holder else None})
        return LabStatus(
            up=True, hosts=[one(h) for h in self.hosts], client=one(self.client),
            services=services, bridge=self.bridge, bridge_netns=self.bridge_netns,
            controller=self.controller.with_prefixlen if self.controller else None,
            agents_note=self.agents_note, state_dir=str(self.state_dir))

    # --- state ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "created": self.created,
            "inventory": self.inventory_source,
            "state_dir": str(self.state_dir),
            "subnet": str(self.subnet),
            "bridge": self.bridge,
            "bridge_netns": self.bridge_netns,
            "controller": self.controller.with_prefixlen if self.controller else None,
            "controller_link": self.controller_link,
            "key_file": str(self.key_file),
            "agents_note": self.agents_note,
            "hosts": [h.to_dict() for h in self.hosts],
            "client": self.client.to_dict(),
            "services": [s.to_dict() for s in self.services],
            "xdp_pinned_before": self.xdp_pinned_before,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lab:
        return cls(
            state_dir=Path(d["state_dir"]),
            hosts=[LabHost.from_dict(h) for h in d["hosts"]],
            client=LabHost.from_dict(d["client"]),
            services=[LabService.from_dict(s) for s in d.get("services", [])],
            subnet=ipaddress.IPv4Network(d["subnet"]), bridge=d["bridge"],
            bridge_netns=d["bridge_netns"],
            controller=ipaddress.IPv4Interface(d["controller"]) if d.get("controller") else None,
            controller_link=d.get("controller_link"), key_file=Path(d["key_file"]),
            agents_note=d.get("agents_note"), inventory_source=d.get("inventory"),
            created=float(d.get("created", 0.0)),
            xdp_pinned_before=bool(d.get("xdp_pinned_before", True)))

    def _save(self) -> None:
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def _load_state(cls, state_dir: Path) -> Lab | None:
        try:
            data = json.loads((state_dir / STATE_FILE).read_text())
            return cls.from_dict(data)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as err:
            raise OrthrosError(f"the lab state {state_dir / STATE_FILE} is unreadable: {err}",
                               hint="remove what is left with: orthros lab down") from err

    def _matches(self, inv: Inventory, agents: bool,
                 agent_command: Sequence[str] | None) -> bool:
        """Is this lab, as it runs now, the one ``inv`` and ``agents`` ask for?"""
        want = [(h.name, h.cidr, h.agent_port) for h in inv.hosts]
        have = [(h.name, h.cidr, h.agent_port) for h in self.hosts]
        if want != have or (self.client.name, self.client.cidr) != (
                inv.client.name, inv.client.cidr):
            return False
        if not all(netns_exists(h.netns) for h in self.all_hosts):
            return False
        if not netns_exists(self.bridge_netns):
            return False
        if not all(h.init_alive() for h in self.all_hosts):
            return False
        started = all(h.agent_pid is not None for h in self.hosts)
        if agents and (agent_command is not None or agent_unavailable() is None):
            return started and all(h.agent_alive() for h in self.hosts)
        return not any(h.agent_pid is not None for h in self.hosts)

    # --- the build -----------------------------------------------------------------------

    @classmethod
    def _build(cls, inv: Inventory, agents: bool, agent_timeout: float,
               agent_command: Sequence[str] | None) -> Lab:
        s = inv.lab
        if s.controller is not None:
            _check_subnet_free(inv.subnet, s.controller_link)
        state_dir = s.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (state_dir / MARKER).write_text("made by orthros lab up; removed by orthros lab down\n")

        create_netns(s.bridge_netns)
        loopback_up(s.bridge_netns)
        add_bridge(s.bridge_netns, s.bridge)
        link_up(s.bridge_netns, s.bridge, alias=f"{ALIAS}bridge")

        hosts = [LabHost(h.name, Role.HOST, s.netns_prefix + h.name, h.interface, h.agent_port)
                 for h in inv.hosts]
        client = LabHost(inv.client.name, Role.CLIENT, s.netns_prefix + inv.client.name,
                         inv.client.interface)
        for h in (*hosts, client):
            _make_host(s, h)
        # Each host's PIDs start from a base of its own, spread over pid_max (see init.py).
        step = _pid_max() // (len(hosts) + 2)
        hosts = [_start_init(h, step * i + 300) for i, h in enumerate(hosts)]
        client = _start_init(client, step * len(hosts) + 300)
        if s.controller is not None:
            _make_controller_link(s)

        services = []
        for svc in inv.services:
            holder = next(h for h in hosts if h.name == svc.hosts[0])
            holder.link.add(svc.interface)
            services.append(LabService(svc.name, svc.interface, svc.hosts, holder.name))

        key = state_dir / KEY_FILE
        _make_key(key)
        lab = cls(state_dir=state_dir, hosts=hosts, client=client, services=services,
                  subnet=inv.subnet, bridge=s.bridge, bridge_netns=s.bridge_netns,
                  controller=s.controller,
                  controller_link=s.controller_link if s.controller else None,
                  key_file=key, agents_note=None,
                  inventory_source=str(inv.source) if inv.source else None,
                  created=time.time(), xdp_pinned_before=_xdp_pinned())
        lab._save()  # written before the agents start, so a crash from here on is undone too
        if not agents:
            lab.agents_note = "agents not started (--no-agents)"
        else:
            lab.agents_note = None if agent_command is not None else agent_unavailable()
            if lab.agents_note is None:
                command = list(agent_command or [str(_orthros_exe()), "agent"])
                lab.hosts = tuple(lab._start_agent(h, command) for h in lab.hosts)
                lab._save()
                for h in lab.hosts:
                    lab._wait_agent(h, agent_timeout)
        lab._save()
        return lab

    def stop_agent(self, host: str | LabHost, sig: int = signal.SIGKILL) -> None:
        """Kill a host's agent (a crash, for fault tests); what it started keeps running."""
        h = self.host(host)
        if h.agent_alive():
            assert h.agent_pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(h.agent_pid, sig)
            deadline = time.monotonic() + 10
            while h.agent_alive() and time.monotonic() < deadline:
                time.sleep(0.02)

    def restart_agent(self, host: str | LabHost, timeout: float = 60.0) -> LabHost:
        """Start a host's agent again after ``stop_agent`` (it takes up its pairs again)."""
        h = self.host(host)
        if h.agent_alive():
            return h
        h = self._start_agent(h, [str(_orthros_exe()), "agent"])
        self.hosts = tuple(h if x.name == h.name else x for x in self.hosts)
        self._save()
        self._wait_agent(h, timeout)
        return h

    def _start_agent(self, h: LabHost, command: list[str]) -> LabHost:
        assert h.agent_port is not None
        home = self.state_dir / h.name
        images = home / "images"
        images.mkdir(parents=True, exist_ok=True, mode=0o700)
        log = home / "agent.log"
        argv = [*command, "--listen", f"{h.address}:{h.agent_port}",
                "--key", str(self.key_file), "--images-root", str(images), "--name", h.name,
                "--cgroup-root", cgroup_root(h.name),
                # The lab's own, removed with it: images an agent killed by a test left there
                # would otherwise outlive the lab (its images root holds only links to them).
                "--scratch-root", str(LAB_SCRATCH / h.name)]
        # A daemon of the host: inside its namespaces, a child of its init.
        proc = self.spawn(h, argv, log=log, cwd="/")
        ref = ProcessRef.find(proc.machine_pid)
        created = ref.create_time if ref is not None else None
        return dataclasses.replace(h, agent_pid=proc.machine_pid, agent_create_time=created,
                                   agent_log=log, images_root=images,
                                   agent_host_pid=proc.host_pid)

    def _wait_agent(self, h: LabHost, timeout: float) -> None:
        """Until the agent accepts a TCP connection on its address, from inside its host."""
        assert h.agent_pid is not None and h.agent_port is not None
        deadline = time.monotonic() + timeout
        while True:
            if not h.agent_alive():
                raise OrthrosError(
                    f"the agent of {h.name} exited before listening on "
                    f"{h.address}:{h.agent_port}", host=h.name, pid=h.agent_pid,
                    stage="lab up", hint=_log_tail(h.agent_log))
            if _accepts(h.netns, h.address, h.agent_port, 0.5):
                return
            if time.monotonic() > deadline:
                raise OperationTimeout(
                    f"the agent of {h.name} did not listen on {h.address}:{h.agent_port} "
                    f"within {timeout:g} s", host=h.name, pid=h.agent_pid, stage="lab up",
                    hint=_log_tail(h.agent_log))
            time.sleep(0.05)


# --- pieces of the build ------------------------------------------------------------------------

def _make_host(s: LabSettings, h: LabHost) -> None:
    """Namespace, veth (eth0 inside, b-NAME on the bridge), address, links up."""
    create_netns(h.netns)
    port = f"b-{h.name}"
    add_veth(s.bridge_netns, port, peer=h.ifname, peer_netns=h.netns)
    # The alias names the namespace at the far end: `down` finds it even without state.
    link_up(s.bridge_netns, port, master=s.bridge, alias=f"{ALIAS}{h.netns}")
    loopback_up(h.netns)
    no_forwarding(h.netns)
    link_up(h.netns, h.ifname, address=h.interface)


def _pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 32768


def _start_init(h: LabHost, first_pid: int) -> LabHost:
    """PID 1 of the host's own PID and mount namespaces, inside its network namespace."""
    res = run([sys.executable, "-m", "orthros_py.lab.init", "init", "--netns",
               str(h.netns_path), "--first-pid", str(first_pid)], timeout=30.0)
    pid = int(json.loads(res.stdout)["pid"])
    ref = ProcessRef.find(pid)
    if ref is None:
        raise OrthrosError(f"the init of lab host {h.name} (pid {pid}) exited at once",
                           host=h.name, pid=pid, stage="lab up")
    return dataclasses.replace(h, init_pid=pid, init_create_time=ref.create_time)


def _make_controller_link(s: LabSettings) -> None:
    assert s.controller is not None
    add_veth(None, s.controller_link, peer=CONTROLLER_PORT, peer_netns=s.bridge_netns)
    link_up(None, s.controller_link, address=s.controller, alias=f"{ALIAS}controller")
    link_up(s.bridge_netns, CONTROLLER_PORT, master=s.bridge, alias=f"{ALIAS}controller")


def _check_subnet_free(subnet: ipaddress.IPv4Network, own_link: str) -> None:
    """Refuse to put the lab's subnet beside an address of this namespace that overlaps it."""
    with iproute(None) as ipr:
        names = {int(link["index"]): str(link.get("IFLA_IFNAME")) for link in ipr.get_links()}
        for a in ipr.get_addr(family=socket.AF_INET):
            net = ipaddress.IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}").network
            name = names.get(int(a["index"]), "?")
            if name != own_link and net.overlaps(subnet):
                raise OrthrosError(
                    f"the lab subnet {subnet} overlaps {net} on {name} in this namespace",
                    stage="lab up", hint="choose another [cluster] subnet in the inventory")


def _make_key(path: Path) -> None:
    """A random 32-byte cluster key, readable by root only; kept if present."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))


def _accepts(netns: str, address: str, port: int, timeout: float) -> bool:
    """Does ``address:port`` accept a TCP connection, seen from inside ``netns``?"""
    try:
        with in_netns(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OrthrosError:
        return False
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except OSError:
            return False
    return True


def _log_tail(log: Path | None, lines: int = 5) -> str | None:
    """The end of an agent's log, quoted: a failed `up` removes the log with the lab."""
    if log is None:
        return None
    try:
        tail = log.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return None
    return "its log ends: " + " | ".join(tail) if tail else "its log is empty"


# --- teardown -------------------------------------------------------------------------------

def _state_dir_of(inventory: Inventory | Path | str | None) -> Path:
    if isinstance(inventory, Inventory):
        return inventory.lab.state_dir
    path = inventory_path(inventory)
    if inventory is None and not path.exists():
        return LabSettings().state_dir  # no inventory file here: the default place
    return load_inventory(path).lab.state_dir


def teardown(inventory: Inventory | Path | str | None = None,
             state_dir: Path | None = None) -> DownReport:
    """Remove the lab whose state is in ``state_dir`` (default: the inventory's), and whatever a
    crashed lab of that inventory left behind; harmless when there is nothing."""
    _require_root("orthros lab down")
    inv: Inventory | None
    if isinstance(inventory, Inventory):
        inv = inventory
    else:
        path = inventory_path(inventory)
        inv = load_inventory(path) if (inventory is not None or path.exists()) else None
    sdir = state_dir or (inv.lab.state_dir if inv else LabSettings().state_dir)
    report = DownReport()
    # Before the lab's own lock: the XDP lock serializes on the same directory (/run/orthros).
    _xdp_detach(sdir, report)
    with _locked(sdir):
        _teardown(inv, sdir, report)
    with contextlib.suppress(OSError):
        sdir.parent.rmdir()  # /run/orthros, if nothing else lives there (nor starts to)
    return report


def _xdp_pinned() -> bool:
    try:
        from orthros_py.netlock.xdp import XdpNetLock
    except Exception:
        return True  # cannot tell: never remove what may not be ours
    return XdpNetLock().pinned


def _xdp_detach(state_dir: Path, report: DownReport) -> None:
    """Take the XDP lock's programs off the interfaces of the lab that is up (a migration
    that could not finish its unlock may have left them), so that its record goes with it.
    The pinned programs and map are machine-wide: they stay if they were there before the lab
    came up or anyone still holds a lock or an attachment in them; otherwise the lab's own
    migrations pinned them and they go with the lab."""
    try:
        lab = Lab._load_state(state_dir)
        from orthros_py.netlock.xdp import XdpNetLock
    except Exception:
        return
    if lab is None:
        return
    lock = XdpNetLock()
    try:
        if lock.state_file.exists():
            for name in [h.netns for h in lab.all_hosts]:
                if netns_exists(name):
                    lock.detach(None, netns=name)  # by the namespace's identity
        if not lab.xdp_pinned_before and lock.pinned:
            lock.flush_if_unused()
    except Exception as err:
        report.warnings.append(f"could not take the XDP lock off the lab: {err}")
    finally:
        lock.close()


def _teardown(inv: Inventory | None, state_dir: Path, report: DownReport) -> None:
    lab: Lab | None = None
    try:
        lab = Lab._load_state(state_dir)
    except OrthrosError as err:
        report.warnings.append(str(err))

    settings = [inv.lab] if inv else []
    names: list[str] = []  # namespaces, the bridge's last
    bridge_nss: list[str] = []
    ctl_links: list[str] = []
    if lab is not None:
        names += [h.netns for h in lab.all_hosts]
        bridge_nss.append(lab.bridge_netns)
        if lab.controller_link:
            ctl_links.append(lab.controller_link)
    for s in settings:
        assert inv is not None
        names += [s.netns_prefix + n for n in (*(h.name for h in inv.hosts), inv.client.name)]
        bridge_nss.append(s.bridge_netns)
        ctl_links.append(s.controller_link)
    if not settings and lab is None:
        d = LabSettings()
        bridge_nss.append(d.bridge_netns)
        ctl_links.append(d.controller_link)
    for bns in bridge_nss:
        names += _bridge_peers(bns)
    names = [n for n in dict.fromkeys([*names, *bridge_nss]) if netns_exists(n)]

    # 1. Processes: the recorded agents (a SIGTERM they may act on), then anything else living
    # in those namespaces, the hosts' inits among them (each takes its PID namespace down).
    agents: list[psutil.Process] = []
    if lab is not None:
        for h in lab.hosts:
            if h.agent_pid is not None and h.agent_alive():
                with contextlib.suppress(psutil.Error):
                    agents.append(psutil.Process(h.agent_pid))
    _stop(agents, report)
    _stop([p for p in _processes_in(names) if p.pid not in report.killed], report)
    _remove_cgroups(report)
    _remove_sync_groups(report)

    # 2. Network locks some test or migration may have left in those namespaces.
    subnets = [x.subnet for x in (lab, inv) if x is not None]
    _xdp_release(subnets, report)

    # 3. Links: the bridge side of every veth (the peer goes with it), the bridge, and the
    # controller veth in this namespace if it carries the lab's alias.
    for bns in dict.fromkeys(bridge_nss):
        if netns_exists(bns):
            _delete_links(bns, report, only_alias=False)
    for link in dict.fromkeys(ctl_links):
        _delete_links(None, report, only_alias=True, ifname=link)

    # 4. Namespaces.
    for n in names:
        try:
            remove_netns(n)
            report.namespaces.append(n)
        except OSError as err:
            report.warnings.append(f"cannot remove namespace {n}: {err}")

    # 5. The state directory, if the lab made it (its marker says so), and the agents'
    # scratch roots (one lab at a time on a machine).
    if LAB_SCRATCH.is_dir() and not LAB_SCRATCH.is_symlink():
        shutil.rmtree(LAB_SCRATCH, ignore_errors=True)
    for sdir in dict.fromkeys([state_dir, *(s.state_dir for s in settings)]):
        if (sdir / MARKER).exists():
            shutil.rmtree(sdir, ignore_errors=True)
            if sdir.exists():
                report.warnings.append(f"could not remove all of {sdir}")
            else:
                report.state_dir = str(sdir)
        elif (sdir / STATE_FILE).exists():
            report.warnings.append(f"{sdir} has a state file but no {MARKER}: left in place")

    left = [n for n in names if netns_exists(n)]
    if left:
        raise OrthrosError(f"namespaces left behind: {', '.join(left)}", stage="lab down",
                           hint="; ".join(report.warnings) or None)


def cgroup_root(host: str) -> str:
    """Where lab host ``host`` keeps its containers' cgroups (its agent's --cgroup-root)."""
    return f"{CGROUP_ROOT}/{host}"


def _remove_cgroups(report: DownReport) -> None:
    """Kill what still sits in the lab's cgroups (containers of its hosts), then remove them."""
    from orthros_py.cgroup.fs import mounts, remove_dirs, wait_empty

    dirs = [m / CGROUP_ROOT.lstrip("/") for m in mounts().values()]
    dirs = [d for d in dirs if d.is_dir()]
    if not dirs:
        return
    procs: dict[int, psutil.Process] = {}
    for d in dirs:
        for f in d.rglob("cgroup.procs"):
            for pid in f.read_text().split():
                with contextlib.suppress(psutil.Error):
                    procs.setdefault(int(pid), psutil.Process(int(pid)))
    _stop(list(procs.values()), report)
    wait_empty([Path(p) for d in dirs for p, _, _ in os.walk(d)])
    for why in remove_dirs(dirs):
        report.warnings.append(f"cgroup left: {why}")


def _remove_sync_groups(report: DownReport) -> None:
    """The freezer groups ``orthros sync`` gave the lab's trees (``orthros-sync-*``, next to
    the trees' own groups), now that those trees are gone: the empty ones are removed; one that
    still holds a process belongs to something outside the lab and is left."""
    from orthros_py.cgroup.fs import mounts

    for m in mounts().values():
        for d in sorted(m.glob("**/orthros-sync-*"), key=lambda p: -len(p.parts)):
            if not d.is_dir() or (d / "cgroup.procs").read_text().strip():
                continue
            try:
                d.rmdir()
            except OSError as err:
                report.warnings.append(f"cgroup left: {d}: {err.strerror}")


def _bridge_peers(bridge_netns: str) -> list[str]:
    """Namespaces at the far end of the bridge's ports, read from the lab's aliases."""
    if not netns_exists(bridge_netns):
        return []
    found = []
    with contextlib.suppress(OrthrosError, NetlinkError, OSError), iproute(bridge_netns) as ipr:
        for link in ipr.get_links():
            alias = str(link.get("IFLA_IFALIAS") or "")
            if alias.startswith(ALIAS):
                name = alias[len(ALIAS):]
                if name not in ("bridge", "controller"):
                    found.append(name)
    return found


def _processes_in(names: Sequence[str]) -> list[psutil.Process]:
    """Every process whose network namespace is one of ``names`` (but never this one)."""
    keys = set()
    for n in names:
        with contextlib.suppress(OSError):
            st = os.stat(netns_path(n))
            keys.add((st.st_dev, st.st_ino))
    if not keys:
        return []
    found = []
    for pid in psutil.pids():
        if pid == os.getpid():
            continue
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
        except OSError:  # gone, a kernel thread, or not ours to see
            continue
        if (st.st_dev, st.st_ino) in keys:
            with contextlib.suppress(psutil.Error):
                found.append(psutil.Process(pid))
    return found


def _stop(procs: list[psutil.Process], report: DownReport) -> None:
    """SIGTERM, a grace period, SIGKILL; reap the ones that are our children."""
    if not procs:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _, alive = psutil.wait_procs(alive, timeout=STOP_GRACE)
    for p in procs:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(p.pid, os.WNOHANG)
    report.killed += [p.pid for p in procs if p not in alive]
    for p in alive:
        report.warnings.append(f"process {p.pid} survived SIGKILL")


def _xdp_release(subnets: Sequence[ipaddress.IPv4Network],
                 report: DownReport) -> None:
    """Unlock the XDP lock's connections of the lab's subnets while the lab's interfaces still
    exist (no lock file is taken, which ``_locked`` holds). Its programs came off the lab's
    interfaces before (``_xdp_detach``); the pins stay."""
    try:
        from orthros_py.netlock.xdp import XdpNetLock
    except Exception:
        return
    lock = XdpNetLock()
    if not lock.pinned:
        return
    try:
        lock.release_subnets(subnets)
    except Exception as err:
        report.warnings.append(f"could not release the XDP lock of the lab: {err}")
    finally:
        lock.close()


def _delete_links(netns: str | None, report: DownReport, *, only_alias: bool,
                  ifname: str | None = None) -> None:
    try:
        with iproute(netns) as ipr:
            for link in ipr.get_links():
                name = str(link.get("IFLA_IFNAME"))
                if name == "lo" or (ifname is not None and name != ifname):
                    continue
                if only_alias and not str(link.get("IFLA_IFALIAS") or "").startswith(ALIAS):
                    continue
                try:
                    ipr.link("del", index=link["index"])
                    report.links.append(f"{name}@{netns}" if netns else name)
                except NetlinkError as err:
                    if err.code != errno.ENODEV:  # gone with its peer meanwhile
                        report.warnings.append(f"cannot delete {name}: {err}")
    except OrthrosError as err:
        report.warnings.append(str(err))
