"""Network namespaces and the links between them: veth pairs, bridges, addresses, links up.

Interfaces: pyroute2.netns (namespaces bound under /run/netns) and rtnetlink (RTM_NEWLINK,
RTM_NEWADDR, RTM_DELLINK) through ``addr.iproute``, never the ``ip`` command. What the lab and
the benchmarks build their networks from. Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN).
"""

from __future__ import annotations

import errno
import ipaddress
from typing import Any

from pyroute2 import NetlinkError
from pyroute2 import netns as pyroute2_netns

from orthros_py.errors import OrthrosError
from orthros_py.net.addr import in_netns, iproute, netns_exists, netns_path


def create_netns(name: str) -> None:
    """A new network namespace bound at /run/netns/NAME."""
    pyroute2_netns.create(name)


def remove_netns(name: str) -> bool:
    """Unbind /run/netns/NAME (the namespace goes with its last user); False if it was not."""
    if not netns_exists(name):
        return False
    pyroute2_netns.remove(name)
    return True


def link_index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise OrthrosError(f"no interface {ifname}")
    return int(found[0])


def add_veth(netns: str | None, ifname: str, peer: str, peer_netns: str) -> None:
    """A veth pair: ``ifname`` in ``netns`` (None: ours), ``peer`` in ``peer_netns``."""
    with iproute(netns) as ipr:
        ipr.link("add", ifname=ifname, kind="veth",
                 peer={"ifname": peer, "net_ns_fd": str(netns_path(peer_netns))})


def add_bridge(netns: str | None, name: str) -> None:
    with iproute(netns) as ipr:
        ipr.link("add", ifname=name, kind="bridge")


def link_up(netns: str | None, ifname: str, *,
            address: ipaddress.IPv4Interface | None = None, master: str | None = None,
            alias: str | None = None) -> None:
    """Give ``ifname`` its address, bridge (``master``) and alias, then bring it up."""
    with iproute(netns) as ipr:
        idx = link_index(ipr, ifname)
        if address is not None:
            ipr.addr("add", index=idx, address=str(address.ip),
                     prefixlen=address.network.prefixlen)
        attrs: dict[str, Any] = {"state": "up"}
        if master is not None:
            attrs["master"] = link_index(ipr, master)
        if alias is not None:
            attrs["ifalias"] = alias
        ipr.link("set", index=idx, **attrs)


def loopback_up(netns: str | None) -> None:
    """``lo`` up: a fresh namespace's loopback is down, so even 127.0.0.1 fails."""
    link_up(netns, "lo")


def no_forwarding(netns: str) -> None:
    """Make namespace ``netns`` a host, not a router: no IPv4 or IPv6 forwarding. A new namespace
    takes its IPv4 settings from the caller's (``net.core.devconf_inherit_init_net``), where
    libvirt, Docker and the like turn forwarding on: a host that forwarded would pass on packets
    for an address it no longer holds instead of dropping them, as a real host does."""
    with in_netns(netns):
        for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"):
            try:
                with open(path, "w") as f:
                    f.write("0")
            except FileNotFoundError:
                continue  # no IPv6 in this kernel


def delete_link(netns: str | None, ifname: str) -> bool:
    """Delete ``ifname`` (a veth's peer goes with it); False if there is no such link."""
    with iproute(netns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as err:
            if err.code != errno.ENODEV:  # gone with its peer meanwhile
                raise
            return False
    return True
