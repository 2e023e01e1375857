"""One TCP connection (``Conn``) and the ``IP:PORT`` endpoints it is written in.

Pure Python, no privileges: the value every network lock backend, the connection discovery
and the migration journal speak in.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any

_FAMILIES: dict[int, str] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
_HOSTNAME = re.compile(r"[A-Za-z0-9.-]{1,253}")


def parse_endpoint(text: str, *, listen: bool = False,
                   default_port: int | None = None) -> tuple[str, int]:
    """``IP:PORT`` or ``[IPv6]:PORT`` -> (address, port); ValueError saying what is wrong.

    ``listen``: the address a server binds, so also a host name, an empty address (``:PORT``,
    every address) and port 0 (the kernel picks); otherwise one end of a connection, which has
    neither. ``default_port`` is taken when the text names none.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
        port = rest[1:]
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, ""
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 endpoint as [ADDRESS]:PORT")
    if not port:
        if default_port is None:
            raise ValueError(f"{text!r} is not IP:PORT")
        port = str(default_port)
    low = 0 if listen else 1
    if not port.isdigit() or not low <= int(port) < 65536:
        raise ValueError(f"{port!r} in {text!r} is not a TCP port ({low}-65535)")
    if host or not listen:
        try:
            _normal_ip(host)
        except ValueError:
            if not listen or not _HOSTNAME.fullmatch(host):
                raise ValueError(f"{host!r} is not an IP address"
                                 + (" nor a host name" if listen else "")) from None
    return host, int(port)


def _unmapped(addr: ipaddress.IPv4Address | ipaddress.IPv6Address
              ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d, but its packets on the wire are
    # IPv4: the lock must match them as such.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=4096)
def _normal_ip(text: str) -> tuple[int, str]:
    """(IP version, compressed text) of an address, IPv4-mapped IPv6 as IPv4. Cached: a tree's
    thousands of connections share a handful of addresses, and ipaddress is slow."""
    addr = _unmapped(ipaddress.ip_address(text))
    return addr.version, addr.compressed


@dataclass(frozen=True, order=True, slots=True)
class Conn:
    """One TCP connection as seen from the host that owns the local end.

    Addresses are kept normalized (compressed text; IPv4-mapped IPv6 becomes IPv4), so that two
    Conn values for the same connection compare and hash equal.
    """

    family: int  # socket.AF_INET or socket.AF_INET6
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int

    def __post_init__(self) -> None:
        lver, local = _normal_ip(self.local_ip)
        rver, remote = _normal_ip(self.remote_ip)
        if lver != rver:
            raise ValueError(f"{local} and {remote} are not of the same IP version")
        family = int(socket.AF_INET if lver == 4 else socket.AF_INET6)
        for port in (self.local_port, self.remote_port):
            if not 0 < int(port) < 65536:
                raise ValueError(f"{port} is not a TCP port (1-65535)")
        # Frozen, so normalize through object.__setattr__ (the documented dataclass idiom).
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "local_ip", local)
        object.__setattr__(self, "remote_ip", remote)
        object.__setattr__(self, "local_port", int(self.local_port))
        object.__setattr__(self, "remote_port", int(self.remote_port))

    @classmethod
    def of(cls, local: tuple[str, int], remote: tuple[str, int]) -> Conn:
        """From two (ip, port) pairs; the family follows the addresses."""
        fam = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        return cls(fam, local[0], local[1], remote[0], remote[1])

    @classmethod
    def parse(cls, text: str) -> Conn:
        """``SRC:PORT,DST:PORT`` (local end first; ``[v6]:PORT`` for IPv6) -> Conn."""
        src, sep, dst = text.partition(",")
        if not sep:
            raise ValueError(f"{text!r} is not SRC:PORT,DST:PORT")
        (laddr, lport), (raddr, rport) = parse_endpoint(src), parse_endpoint(dst)
        if _normal_ip(laddr)[0] != _normal_ip(raddr)[0]:
            raise ValueError(f"{text!r} mixes IPv4 and IPv6")
        return cls(socket.AF_INET, laddr, lport, raddr, rport)  # the family follows the addresses

    @property
    def local(self) -> tuple[str, int]:
        return (self.local_ip, self.local_port)

    @property
    def remote(self) -> tuple[str, int]:
        return (self.remote_ip, self.remote_port)

    def reversed(self) -> Conn:
        """The same connection seen from the other end."""
        return Conn(self.family, self.remote_ip, self.remote_port, self.local_ip, self.local_port)

    def __str__(self) -> str:
        return f"{format_endpoint(*self.local)},{format_endpoint(*self.remote)}"

    def to_dict(self) -> dict[str, Any]:
        return {"family": _FAMILIES[self.family], "local": list(self.local),
                "remote": list(self.remote)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conn:
        return cls.of((str(data["local"][0]), int(data["local"][1])),
                      (str(data["remote"][0]), int(data["remote"][1])))


def format_endpoint(host: str, port: int) -> str:
    """The inverse of ``parse_endpoint``: IPv6 addresses in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
