"""The cluster inventory: which hosts exist, where their agents listen, which service addresses
each may hold, and the client host that generates load.

One TOML file (``vagrant/inventory.toml``) describes the cluster for ``orthros lab`` (network
namespace hosts on one machine) and for ``vagrant/Vagrantfile`` (virtual machines). Python reads
it with ``tomllib``; the Vagrantfile reads the same file with a small parser of its own, so the
file keeps to a subset of TOML: tables, arrays of tables, and one-line ``key = value`` pairs whose
values are strings, integers, booleans or one-line arrays of strings. So a host's fence device is
a set of one-line keys, not a table: ``fence_agent`` (``"lab"``, or a fence-agents command such as
``"fence_virsh"``) and ``fence_OPTION`` for each of its options, an underscore in OPTION standing
for the dash of the command's option (``fence_password_script`` -> ``--password-script``).
``[cluster] witness`` names the host whose agent casts the third vote of protected pairs.

Pure parsing and validation: no privileges, no I/O but reading the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from orthros_py.errors import ExitStatus, OrthrosError, UsageError
from orthros_py.net.fence import check_fence_config

# The repository's inventory, shared with the Vagrantfile; ORTHROS_INVENTORY overrides it.
DEFAULT_INVENTORY = Path(__file__).resolve().parents[2] / "vagrant" / "inventory.toml"
INVENTORY_ENV = "ORTHROS_INVENTORY"

# Host names become parts of namespace and interface names (IFNAMSIZ is 16 with the NUL, and
# the lab names a host's bridge port "b-NAME"), so they stay short and plain.
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,11}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DEFAULT_AGENT_PORT = 7070


class InventoryError(OrthrosError):
    """The inventory file is missing, is not TOML, or describes an impossible cluster."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.USAGE


@dataclass(frozen=True)
class Host:
    """A host that runs an agent and may hold service addresses."""

    name: str
    interface: ipaddress.IPv4Interface  # its address and prefix on the cluster network
    agent_port: int
    # What fences it from outside (orthros_py.net.fence.fence_from_config): {"agent": "lab"} or
    # {"agent": "fence_virsh", "ip": ..., "plug": ...}; None: no fence device. Out of the hash
    # (a dict has none); treat it as read-only.
    fence: dict[str, str] | None = field(default=None, hash=False)

    @property
    def address(self) -> str:
        return str(self.interface.ip)

    @property
    def cidr(self) -> str:
        return self.interface.with_prefixlen

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "address": self.cidr,
                             "agent_port": self.agent_port}
        if self.fence is not None:
            d["fence"] = dict(self.fence)
        return d


@dataclass(frozen=True)
class ClientHost:
    """The host that generates load; it runs no agent and holds no service address."""

    name: str
    interface: ipaddress.IPv4Interface

    @property
    def address(self) -> str:
        return str(self.interface.ip)

    @property
    def cidr(self) -> str:
        return self.interface.with_prefixlen

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.cidr}


@dataclass(frozen=True)
class Group:
    """Processes saved and restored together (``orthros sync save --group NAME``): members as
    ``HOST:PID`` or ``HOST:NAME`` (a process name), data directories as ``HOST:PATH``."""

    name: str
    members: tuple[str, ...]
    data: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "members": list(self.members), "data": list(self.data)}


@dataclass(frozen=True)
class Service:
    """A service address and the hosts that may hold it; the first present one holds it at
    start."""

    name: str
    interface: ipaddress.IPv4Interface  # usually a /32: it moves alone, never as a subnet
    hosts: tuple[str, ...]

    @property
    def address(self) -> str:
        return str(self.interface.ip)

    @property
    def cidr(self) -> str:
        return self.interface.with_prefixlen

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.cidr, "hosts": list(self.hosts)}


@dataclass(frozen=True)
class LabSettings:
    """What only ``orthros lab`` uses: names of the namespaces, bridge and state directory."""

    bridge: str = "orthros-br0"
    netns_prefix: str = "orthros-"  # host NAME lives in namespace PREFIX + NAME
    bridge_netns: str = "orthros-lab"  # the bridge gets a namespace of its own
    state_dir: Path = Path("/run/orthros/lab")
    # The caller's namespace gets this address on a veth to the bridge, as a Vagrant host gets
    # the .1 of its private network; None leaves the caller's namespace untouched.
    controller: ipaddress.IPv4Interface | None = None
    controller_link: str = "orthros-lab0"

    def to_dict(self) -> dict[str, Any]:
        return {
            "bridge": self.bridge,
            "netns_prefix": self.netns_prefix,
            "bridge_netns": self.bridge_netns,
            "state_dir": str(self.state_dir),
            "controller": self.controller.with_prefixlen if self.controller else None,
            "controller_link": self.controller_link,
        }


@dataclass(frozen=True)
class Inventory:
    subnet: ipaddress.IPv4Network
    hosts: tuple[Host, ...]
    client: ClientHost
    services: tuple[Service, ...] = ()
    key_file: Path = Path("/etc/orthros/cluster.key")
    images_root: Path = Path("/var/lib/orthros/images")
    lab: LabSettings = field(default_factory=LabSettings)
    source: Path | None = None
    witness: str | None = None  # the host whose agent casts protected pairs' third vote
    groups: tuple[Group, ...] = ()

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        known = ", ".join(g.name for g in self.groups) or "none"
        raise InventoryError(f"no group named {name!r} in the inventory (groups: {known})")

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts)
        raise InventoryError(f"no host named {name!r} in the inventory (hosts: {known})")

    def services_of(self, host: str) -> tuple[Service, ...]:
        """The service addresses ``host`` may hold."""
        return tuple(s for s in self.services if host in s.hosts)

    def may_hold(self, host: str, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("/")[0])
        return any(s.interface.ip == ip for s in self.services_of(host))

    def first(self, n_hosts: int) -> Inventory:
        """The same cluster cut down to its first ``n_hosts`` hosts (services keep only those)."""
        if n_hosts < 1:
            raise InventoryError(f"a cluster needs at least one host, not {n_hosts}")
        if n_hosts > len(self.hosts):
            raise InventoryError(
                f"the inventory defines {len(self.hosts)} hosts; {n_hosts} were asked for",
                hint=f"add [[host]] entries to {self.source or 'the inventory'}")
        hosts = self.hosts[:n_hosts]
        names = {h.name for h in hosts}
        services = []
        for s in self.services:
            kept = tuple(h for h in s.hosts if h in names)
            if kept:
                services.append(Service(s.name, s.interface, kept))
        # A witness cut off with its host is no witness: pairs of this cluster have none.
        witness = self.witness if self.witness in names else None
        return Inventory(subnet=self.subnet, hosts=hosts, client=self.client,
                         services=tuple(services), key_file=self.key_file,
                         images_root=self.images_root, lab=self.lab, source=self.source,
                         witness=witness, groups=self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source) if self.source else None,
            "subnet": str(self.subnet),
            "key_file": str(self.key_file),
            "images_root": str(self.images_root),
            "hosts": [h.to_dict() for h in self.hosts],
            "client": self.client.to_dict(),
            "services": [s.to_dict() for s in self.services],
            "lab": self.lab.to_dict(),
            "witness": self.witness,
            "groups": [g.to_dict() for g in self.groups],
        }


def inventory_path(path: Path | str | None = None) -> Path:
    """The inventory to read: ``path``, else $ORTHROS_INVENTORY, else the repository's."""
    if path is not None:
        return Path(path)
    env = os.environ.get(INVENTORY_ENV)
    return Path(env) if env else DEFAULT_INVENTORY


def load_inventory(path: Path | str | None = None) -> Inventory:
    """Read and validate an inventory file (see ``inventory_path`` for which one)."""
    src = inventory_path(path)
    try:
        text = src.read_text()
    except FileNotFoundError as err:
        raise InventoryError(f"no inventory file at {src}",
                             hint="pass --inventory PATH or set ORTHROS_INVENTORY") from err
    except OSError as err:
        raise InventoryError(f"cannot read the inventory {src}: {err.strerror}") from err
    return parse_inventory(text, source=src)


def parse_inventory(text: str, source: Path | None = None) -> Inventory:
    """Parse inventory TOML text; every problem becomes one InventoryError naming the file."""
    where = str(source) if source else "the inventory"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InventoryError(f"{where} is not valid TOML: {err}") from err
    try:
        return _build(data, source)
    except InventoryError as err:
        if source is not None and not err.msg.startswith(where):
            err.msg = f"{where}: {err.msg}"
        raise


# --- validation ---------------------------------------------------------------------------------

def _table(data: Mapping[str, Any], key: str, *, required: bool = True) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        if required:
            raise InventoryError(f"missing [{key}] table")
        return {}
    if not isinstance(value, dict):
        raise InventoryError(f"[{key}] must be a table")
    return value


def _unknown(table: Mapping[str, Any], known: set[str], what: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise InventoryError(f"unknown key{'s' if len(extra) > 1 else ''} in {what}: "
                             f"{', '.join(extra)} (known: {', '.join(sorted(known))})")


def _str(table: Mapping[str, Any], key: str, what: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if value is None:
        raise InventoryError(f"{what} has no {key}")
    if not isinstance(value, str) or not value:
        raise InventoryError(f"{what}: {key} must be a non-empty string, not {value!r}")
    return value


def _port(value: object, what: str) -> int:
    # bool is an int in Python; `port = true` is a mistake, not port 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InventoryError(f"{what}: agent_port must be an integer, not {value!r}")
    if not 1 <= value <= 65535:
        raise InventoryError(f"{what}: agent_port {value} is outside 1-65535")
    return value


def _name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise InventoryError(
            f"{what}: name {value!r} must be 1-12 characters of a-z, 0-9 and '-', "
            "starting with a letter (it becomes part of namespace and interface names)")
    return value


def _path(value: str, what: str) -> Path:
    p = Path(value)
    if not p.is_absolute() or p == Path("/"):
        raise InventoryError(f"{what} must be an absolute path below /, not {value!r}")
    return p


def _iface(value: str, what: str, subnet: ipaddress.IPv4Network,
           default_prefix: int | None = None, *, on_net: bool = False) -> ipaddress.IPv4Interface:
    """``value`` as address/prefix inside ``subnet``; ``on_net``: its prefix must be the
    subnet's own, so that every host agrees on what is on the link."""
    text = value if "/" in value or default_prefix is None else f"{value}/{default_prefix}"
    if "/" not in text:
        raise InventoryError(f"{what}: address {value!r} needs a prefix length, as in "
                             f"{value}/{subnet.prefixlen}")
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError as err:
        raise InventoryError(f"{what}: {value!r} is not an IPv4 address/prefix: {err}") from err
    if iface.ip not in subnet:
        raise InventoryError(f"{what}: address {iface.ip} is outside the subnet {subnet}")
    if iface.ip in (subnet.network_address, subnet.broadcast_address):
        raise InventoryError(f"{what}: {iface.ip} is the network or broadcast address "
                             f"of {subnet}")
    if on_net and iface.network != subnet:
        raise InventoryError(f"{what}: {iface.with_prefixlen} is not on the subnet {subnet} "
                             f"(write {iface.ip}/{subnet.prefixlen} or just {iface.ip})")
    return iface


def _build(data: dict[str, Any], source: Path | None) -> Inventory:
    _unknown(data, {"cluster", "lab", "vagrant", "host", "client", "service", "group"},
             "the inventory")
    cluster = _table(data, "cluster")
    _unknown(cluster, {"subnet", "agent_port", "key_file", "images_root", "witness"},
             "[cluster]")
    try:
        subnet = ipaddress.IPv4Network(_str(cluster, "subnet", "[cluster]"))
    except ValueError as err:
        raise InventoryError(f"[cluster]: subnet is not an IPv4 network: {err}") from err
    default_port = _port(cluster.get("agent_port", _DEFAULT_AGENT_PORT), "[cluster]")
    key_file = _path(_str(cluster, "key_file", "[cluster]", "/etc/orthros/cluster.key"),
                     "[cluster] key_file")
    images_root = _path(_str(cluster, "images_root", "[cluster]", "/var/lib/orthros/images"),
                        "[cluster] images_root")

    taken: dict[ipaddress.IPv4Address, str] = {}  # address -> who has it

    def claim(ip: ipaddress.IPv4Address, who: str) -> None:
        if ip in taken:
            raise InventoryError(f"{who}: address {ip} is already used by {taken[ip]}")
        taken[ip] = who

    lab = _lab(_table(data, "lab", required=False), subnet)
    if lab.controller is not None:
        claim(lab.controller.ip, "[lab] controller")

    raw_hosts = data.get("host")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise InventoryError("no hosts: add at least one [[host]] table")
    hosts: list[Host] = []
    for name, what, raw in _named_tables(raw_hosts, "host", {"name", "address", "agent_port"},
                                         prefix=_FENCE_PREFIX):
        iface = _iface(_str(raw, "address", what), what, subnet, subnet.prefixlen, on_net=True)
        claim(iface.ip, what)
        hosts.append(Host(name, iface, _port(raw.get("agent_port", default_port), what),
                          fence=_fence(raw, what)))
    names = {h.name for h in hosts}
    witness = cluster.get("witness")
    if witness is not None:
        witness = _str(cluster, "witness", "[cluster]")
        if witness not in names:
            raise InventoryError(f"[cluster]: witness {witness!r} is not a host of the "
                                 f"inventory (hosts: {', '.join(h.name for h in hosts)})")

    raw_client = _table(data, "client")
    cname = _name(_str(raw_client, "name", "[client]", "client"), "[client]")
    _unknown(raw_client, {"name", "address"}, "[client]")
    if cname in names:
        raise InventoryError(f"[client]: name {cname!r} is also a host's")
    citface = _iface(_str(raw_client, "address", "[client]"), "[client]", subnet,
                     subnet.prefixlen, on_net=True)
    claim(citface.ip, "[client]")
    client = ClientHost(cname, citface)

    for n in (*names, cname):
        if lab.netns_prefix + n == lab.bridge_netns:
            raise InventoryError(f"name {n!r} would share the namespace {lab.bridge_netns} "
                                 "with the lab's bridge")

    services: list[Service] = []
    raw_services = data.get("service", [])
    if not isinstance(raw_services, list):
        raise InventoryError("service must be an array of tables ([[service]])")
    for sname, what, raw in _named_tables(raw_services, "service", {"name", "address", "hosts"}):
        siface = _iface(_str(raw, "address", what), what, subnet, default_prefix=32)
        claim(siface.ip, what)
        holders = raw.get("hosts")
        if (not isinstance(holders, list) or not holders
                or not all(isinstance(h, str) for h in holders)):
            raise InventoryError(f"{what}: hosts must be a non-empty list of host names")
        for h in holders:
            if h not in names:
                raise InventoryError(f"{what}: {h!r} is not a host of the inventory")
        if len(set(holders)) != len(holders):
            raise InventoryError(f"{what}: a host is listed twice in hosts")
        services.append(Service(sname, siface, tuple(holders)))

    groups: list[Group] = []
    raw_groups = data.get("group", [])
    if not isinstance(raw_groups, list):
        raise InventoryError("group must be an array of tables ([[group]])")
    for gname, what, raw in _named_tables(raw_groups, "group", {"name", "members", "data"}):
        lists: dict[str, tuple[str, ...]] = {}
        for key in ("members", "data"):
            items = raw.get(key, [])
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise InventoryError(f"{what}: {key} must be a list of \"HOST:...\" strings")
            for item in items:
                if item.partition(":")[0] not in names:
                    raise InventoryError(f"{what}: {item!r} names no host of the inventory")
            lists[key] = tuple(items)
        if not lists["members"]:
            raise InventoryError(f"{what}: members must not be empty")
        groups.append(Group(gname, lists["members"], lists["data"]))

    vagrant = _table(data, "vagrant", required=False)
    _unknown(vagrant, {"box", "memory", "cpus", "provider"}, "[vagrant]")

    return Inventory(subnet=subnet, hosts=tuple(hosts), client=client, services=tuple(services),
                     key_file=key_file, images_root=images_root, lab=lab, source=source,
                     witness=witness, groups=tuple(groups))


def _named_tables(raws: list[Any], kind: str, allowed: set[str], *, prefix: str | None = None
                  ) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(name, how errors name it, the table) of each ``[[kind]]``: a table, a valid name
    unique among them, no key outside ``allowed`` (but those starting with ``prefix``, which
    the caller checks)."""
    seen: set[str] = set()
    for i, raw in enumerate(raws, 1):
        if not isinstance(raw, dict):
            raise InventoryError(f"{kind} #{i} must be a table")
        name = _name(_str(raw, "name", f"{kind} #{i}"), f"{kind} #{i}")
        what = f"{kind} {name!r}"
        _unknown({k: v for k, v in raw.items() if not (prefix and k.startswith(prefix))},
                 allowed, what)
        if name in seen:
            raise InventoryError(f"duplicate {kind} name {name!r}")
        seen.add(name)
        yield name, what, raw


_FENCE_PREFIX = "fence_"


def _fence(raw: Mapping[str, Any], what: str) -> dict[str, str] | None:
    """A host's ``fence_*`` keys as fence settings (``fence_ssl_insecure = true`` ->
    ``{"ssl-insecure": "true"}``), validated by the fence module; None without any."""
    keys = {k: v for k, v in raw.items() if k.startswith(_FENCE_PREFIX)}
    if not keys:
        return None
    if "fence_agent" not in keys:
        raise InventoryError(f"{what}: fence settings ({', '.join(sorted(keys))}) need "
                             "fence_agent (lab, or a fence-agents command such as fence_virsh)")
    cfg: dict[str, str] = {}
    for key, value in keys.items():
        option = key.removeprefix(_FENCE_PREFIX).replace("_", "-")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int):
            value = str(value)  # fence_ipport = 16509
        if not isinstance(value, str):
            raise InventoryError(f"{what}: {key} must be a string, not {value!r}")
        cfg[option] = value
    try:
        return check_fence_config(cfg)
    except UsageError as err:
        raise InventoryError(f"{what}: {err.msg}") from err


def _lab(raw: dict[str, Any], subnet: ipaddress.IPv4Network) -> LabSettings:
    _unknown(raw, {"bridge", "netns_prefix", "bridge_netns", "state_dir", "controller",
                   "controller_link"}, "[lab]")
    d = LabSettings()
    bridge = _str(raw, "bridge", "[lab]", d.bridge)
    link = _str(raw, "controller_link", "[lab]", d.controller_link)
    for key, value in (("bridge", bridge), ("controller_link", link)):
        if not _IFNAME_RE.match(value):
            raise InventoryError(f"[lab]: {key} {value!r} is not a valid interface name "
                                 "(at most 15 characters)")
    prefix = _str(raw, "netns_prefix", "[lab]", d.netns_prefix)
    bridge_netns = _str(raw, "bridge_netns", "[lab]", d.bridge_netns)
    for key, value in (("netns_prefix", prefix + "x"), ("bridge_netns", bridge_netns)):
        if not _NETNS_RE.match(value):
            raise InventoryError(f"[lab]: {key} {value!r} is not a usable namespace name")
    controller = raw.get("controller")
    ctl = None
    if controller is not None:
        if not isinstance(controller, str):
            raise InventoryError(f"[lab]: controller must be a string, not {controller!r}")
        ctl = _iface(controller, "[lab] controller", subnet, subnet.prefixlen, on_net=True)
    return LabSettings(
        bridge=bridge, netns_prefix=prefix, bridge_netns=bridge_netns,
        state_dir=_path(_str(raw, "state_dir", "[lab]", str(d.state_dir)), "[lab] state_dir"),
        controller=ctl, controller_link=link)
