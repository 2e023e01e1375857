"""Service addresses: add, remove and move an IPv4 address between interfaces that may live in
different network namespaces, then announce the move with a gratuitous ARP.

Interfaces: rtnetlink through pyroute2 (RTM_NEWADDR/RTM_DELADDR), setns(2) on a named
namespace (``/run/netns/NAME``, as ``ip netns`` and ``pyroute2.netns`` create them), and an
AF_PACKET raw socket for the ARP frame, so that nothing forks. Needs CAP_NET_ADMIN (addresses),
CAP_NET_RAW (the ARP frame) and CAP_SYS_ADMIN (setns): in practice, root.

Entering a namespace changes only the calling thread (``in_netns``), or a short-lived thread
(``call_in_netns``); sockets made inside stay in that namespace after leaving it, which is how
the netlink and packet sockets here reach the right interfaces.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, NetlinkError

from orthros_py.errors import MissingFeatureError, NotRootError, OrthrosError

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
ETH_P_ARP = 0x0806
ARPOP_REQUEST = 1
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


class AddressError(OrthrosError):
    """An address could not be added, removed or announced."""


# --- network namespaces ------------------------------------------------------------------------

def netns_path(netns: str) -> Path:
    """Where the namespace called ``netns`` is bound; a path (``/proc/PID/ns/net``) is kept."""
    return Path(netns) if "/" in netns else NETNS_RUN_DIR / netns


def netns_exists(netns: str) -> bool:
    return netns_path(netns).exists()


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        if code == errno.EPERM:
            raise NotRootError(f"cannot enter the network namespace {what}: not permitted",
                               hint="run as root (setns needs CAP_SYS_ADMIN)")
        raise OrthrosError(f"cannot enter the network namespace {what}: {os.strerror(code)}")


@contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with the calling thread in network namespace ``netns`` (None: stay).

    Only this thread moves; it is moved back on every path out of the body.
    """
    if netns is None:
        yield
        return
    path = netns_path(netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise OrthrosError(f"no network namespace {netns} ({path} does not exist)",
                           host=netns, hint="is the lab up? (orthros lab status)") from err
    try:
        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(target)
        raise
    try:
        _setns(target, netns)
        try:
            yield
        finally:
            # Leaving the thread in the wrong namespace would be worse than any error: if even
            # this fails, the OSError from _setns propagates.
            _setns(saved, "of the caller")
    finally:
        os.close(saved)
        os.close(target)


def call_in_netns(netns: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a fresh thread inside ``netns``: the caller never moves."""
    if netns is None:
        return fn(*args, **kwargs)
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            with in_netns(netns):
                result.append(fn(*args, **kwargs))
        except BaseException as err:  # handed to the caller's thread
            failure.append(err)

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


@contextmanager
def iproute(netns: str | None) -> Iterator[Any]:
    """An rtnetlink socket (pyroute2 IPRoute) bound to ``netns``; closed on exit.

    Made inside the namespace through setns rather than ``IPRoute(netns=...)``, which forks a
    helper and would create a missing namespace instead of failing.
    """
    with in_netns(netns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


# --- addresses -------------------------------------------------------------------------------

def parse_address(address: str | ipaddress.IPv4Interface,
                  default_prefix: int = 32) -> ipaddress.IPv4Interface:
    """``10.0.0.5`` -> 10.0.0.5/32 (a service address moves alone), ``10.0.0.5/24`` kept."""
    if isinstance(address, ipaddress.IPv4Interface):
        return address
    text = address if "/" in address else f"{address}/{default_prefix}"
    try:
        return ipaddress.IPv4Interface(text)
    except ValueError as err:
        raise AddressError(f"{address!r} is not an IPv4 address: {err}") from err


@dataclass(frozen=True)
class Link:
    """An interface ``ifname`` in network namespace ``netns`` (None: the caller's)."""

    netns: str | None
    ifname: str

    def __str__(self) -> str:
        return f"{self.ifname}@{self.netns}" if self.netns else self.ifname

    def to_dict(self) -> dict[str, Any]:
        return {"netns": self.netns, "ifname": self.ifname}

    def _index(self, ipr: Any) -> int:
        found = ipr.link_lookup(ifname=self.ifname)
        if not found:
            raise AddressError(f"no interface {self.ifname}"
                               + (f" in namespace {self.netns}" if self.netns else ""),
                               host=self.netns)
        return int(found[0])

    def addresses(self) -> list[ipaddress.IPv4Interface]:
        """The IPv4 addresses on this interface, as address/prefix."""
        with iproute(self.netns) as ipr:
            idx = self._index(ipr)
            return [ipaddress.IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
                    for a in ipr.get_addr(family=socket.AF_INET, index=idx)]

    def has(self, address: str | ipaddress.IPv4Interface) -> bool:
        ip = parse_address(address).ip
        return any(a.ip == ip for a in self.addresses())

    def mac(self) -> bytes:
        with iproute(self.netns) as ipr:
            link = ipr.get_links(self._index(ipr))[0]
        text = link.get("IFLA_ADDRESS")
        if not text:
            raise AddressError(f"{self} has no hardware address", host=self.netns)
        return bytes.fromhex(str(text).replace(":", ""))

    def add(self, address: str | ipaddress.IPv4Interface) -> bool:
        """Put ``address`` on this interface; False if it was there already."""
        iface = parse_address(address)
        with iproute(self.netns) as ipr:
            idx = self._index(ipr)
            try:
                ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            except NetlinkError as err:
                if err.code == errno.EEXIST:
                    return False
                raise self._error("add", iface, err) from err
        return True

    def remove(self, address: str | ipaddress.IPv4Interface) -> bool:
        """Take ``address`` (any prefix) off this interface; False if it was not there."""
        ip = parse_address(address).ip
        with iproute(self.netns) as ipr:
            idx = self._index(ipr)
            for a in ipr.get_addr(family=socket.AF_INET, index=idx):
                if ipaddress.IPv4Address(a.get("IFA_ADDRESS")) != ip:
                    continue
                try:
                    ipr.addr("del", index=idx, address=str(ip), prefixlen=a["prefixlen"])
                except NetlinkError as err:
                    if err.code == errno.EADDRNOTAVAIL:  # gone meanwhile
                        return False
                    raise self._error("remove", parse_address(address), err) from err
                return True
        return False

    def gratuitous_arp(self, address: str | ipaddress.IPv4Interface, count: int = 1,
                       interval: float = 0.05) -> int:
        """Broadcast ``count`` gratuitous ARP requests (sender = target = ``address``) so that
        neighbours and bridges learn that ``address`` is now at this interface's MAC.

        Linux overrides an existing neighbour entry on such a request even within its
        locktime; it creates none where there was none (arp_accept=0), which is what we want.
        Returns the number of frames sent.
        """
        ip = parse_address(address).ip.packed
        mac = self.mac()
        frame = (b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
                 + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, ARPOP_REQUEST,
                               mac, ip, b"\x00" * 6, ip))
        frame = frame.ljust(60, b"\x00")  # the Ethernet minimum, as a NIC would pad it
        try:
            with in_netns(self.netns):
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError as err:
            raise NotRootError("cannot open a raw packet socket for the gratuitous ARP",
                               host=self.netns, hint="run as root (needs CAP_NET_RAW)") from err
        except OSError as err:
            if err.errno == errno.EAFNOSUPPORT:
                raise MissingFeatureError("this kernel has no AF_PACKET sockets",
                                          host=self.netns) from err
            raise
        sent = 0
        with sock:
            try:
                sock.bind((self.ifname, 0))
                for i in range(count):
                    if i:
                        time.sleep(interval)  # spaced as arping spaces them
                    sock.send(frame)
                    sent += 1
            except OSError as err:
                raise AddressError(f"cannot send a gratuitous ARP for {address} on {self}: "
                                   f"{err.strerror}", host=self.netns,
                                   stage="gratuitous ARP") from err
        return sent

    def _error(self, verb: str, iface: ipaddress.IPv4Interface,
               err: NetlinkError) -> OrthrosError:
        if err.code == errno.EPERM:
            return NotRootError(f"cannot {verb} {iface} on {self}: not permitted",
                                host=self.netns, hint="run as root (needs CAP_NET_ADMIN)")
        return AddressError(f"cannot {verb} {iface} on {self}: {os.strerror(err.code)}",
                            host=self.netns, stage=f"address {verb}")


def add_address(netns: str | None, ifname: str,
                address: str | ipaddress.IPv4Interface) -> bool:
    """Add ``address`` (``ip`` meaning ``ip/32``, or ``ip/prefix``); False if present."""
    return Link(netns, ifname).add(address)


def remove_address(netns: str | None, ifname: str,
                   address: str | ipaddress.IPv4Interface) -> bool:
    """Remove ``address`` whatever its prefix; False if it was not there."""
    return Link(netns, ifname).remove(address)


@dataclass(frozen=True)
class AddressMove:
    """What ``move_address`` did, and how long the service had no address."""

    address: ipaddress.IPv4Interface
    src: Link
    dst: Link
    removed: bool  # False: it was not on src (a repeated move)
    added: bool  # False: it was on dst already
    arp_sent: int
    gap_ms: float  # from taking it off src to having it on dst
    elapsed_ms: float  # the whole move, announcement included

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address.with_prefixlen,
            "src": self.src.to_dict(),
            "dst": self.dst.to_dict(),
            "removed": self.removed,
            "added": self.added,
            "arp_sent": self.arp_sent,
            "gap_ms": round(self.gap_ms, 3),
            "elapsed_ms": round(self.elapsed_ms, 3),
        }


def _link(value: Link | tuple[str | None, str]) -> Link:
    return value if isinstance(value, Link) else Link(value[0], value[1])


def move_address(address: str | ipaddress.IPv4Interface, src: Link | tuple[str | None, str],
                 dst: Link | tuple[str | None, str], *, arp_count: int = 1) -> AddressMove:
    """Move ``address`` from ``src`` to ``dst`` (``(netns, ifname)`` pairs or Links), then
    announce it from ``dst`` with ``arp_count`` gratuitous ARPs.

    Off src first, then on dst: never two holders at once. Repeating a move that already
    happened only announces it again. The address keeps the prefix it had on src (or the one
    given, if src did not hold it).
    """
    src_link, dst_link = _link(src), _link(dst)
    if src_link == dst_link:
        raise AddressError(f"cannot move {address} from {src_link} to itself")
    wanted = parse_address(address)
    start = time.perf_counter()
    held = [a for a in src_link.addresses() if a.ip == wanted.ip]
    iface = held[0] if held and "/" not in str(address) else wanted
    off = time.perf_counter()
    removed = src_link.remove(iface) if held else False
    try:
        added = dst_link.add(iface)
    except BaseException:
        if removed:  # give it back rather than leave the service without an address
            src_link.add(iface)
        raise
    on = time.perf_counter()
    sent = dst_link.gratuitous_arp(iface, count=arp_count) if arp_count > 0 else 0
    end = time.perf_counter()
    return AddressMove(address=iface, src=src_link, dst=dst_link, removed=removed, added=added,
                       arp_sent=sent, gap_ms=(on - off) * 1000 if removed else 0.0,
                       elapsed_ms=(end - start) * 1000)


def find_holder(address: str | ipaddress.IPv4Interface, links: list[Link]) -> Link | None:
    """The first of ``links`` that holds ``address``, or None."""
    ip = parse_address(address).ip
    for link in links:
        if netns_exists(link.netns) if link.netns else True:
            try:
                if any(a.ip == ip for a in link.addresses()):
                    return link
            except AddressError:
                continue  # that interface is gone: it holds nothing
    return None
