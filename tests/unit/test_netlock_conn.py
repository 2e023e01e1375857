"""Conn values: parsing "SRC:PORT,DST:PORT", normalization, and the context-manager contract."""

from __future__ import annotations

import io
import socket
from collections.abc import Sequence

import pytest

from orthros_py.netlock import Attachment, Conn, FlushResult, LockStatus, NetLock, backend


def test_parse_ipv4() -> None:
    c = Conn.parse("10.0.0.1:80,10.0.0.2:51234")
    assert c == Conn(socket.AF_INET, "10.0.0.1", 80, "10.0.0.2", 51234)
    assert c.local == ("10.0.0.1", 80) and c.remote == ("10.0.0.2", 51234)
    assert str(c) == "10.0.0.1:80,10.0.0.2:51234"


def test_parse_ipv6_brackets_and_normalizes() -> None:
    c = Conn.parse("[fd00:0::1]:443, [FD00::2]:5000")
    assert c.family == socket.AF_INET6
    assert c.local_ip == "fd00::1" and c.remote_ip == "fd00::2"
    assert str(c) == "[fd00::1]:443,[fd00::2]:5000"
    assert Conn.parse(str(c)) == c


def test_ipv4_mapped_becomes_ipv4() -> None:
    # What a dual-stack socket reports for an IPv4 peer: its packets on the wire are IPv4.
    c = Conn.parse("[::ffff:10.0.0.1]:80,[::ffff:10.0.0.2]:9")
    assert c == Conn.parse("10.0.0.1:80,10.0.0.2:9")
    assert Conn.of(("::ffff:127.0.0.1", 1), ("::ffff:127.0.0.1", 2)).family == socket.AF_INET


@pytest.mark.parametrize("text, fragment", [
    ("10.0.0.1:80", "SRC:PORT,DST:PORT"),
    ("10.0.0.1,10.0.0.2:80", "IP:PORT"),
    ("10.0.0.1:0,10.0.0.2:80", "TCP port"),
    ("10.0.0.1:70000,10.0.0.2:80", "TCP port"),
    ("10.0.0.1:x,10.0.0.2:80", "TCP port"),
    ("nohost:1,10.0.0.2:80", "not an IP address"),
    ("fd00::1:80,10.0.0.2:80", "[ADDRESS]:PORT"),
    ("[fd00::1]:80,10.0.0.2:80", "mixes IPv4 and IPv6"),
    ("[fd00::1:80,[fd00::2]:80", "[IPv6]:PORT"),
])
def test_parse_rejects_with_reason(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        Conn.parse(text)
    assert fragment in str(info.value)


def test_mixed_families_rejected_by_constructor() -> None:
    with pytest.raises(ValueError, match="same IP version"):
        Conn(socket.AF_INET, "10.0.0.1", 1, "fd00::1", 2)


def test_reversed_dict_roundtrip_order_hash() -> None:
    c = Conn.parse("10.0.0.1:80,10.0.0.2:51234")
    assert c.reversed() == Conn.parse("10.0.0.2:51234,10.0.0.1:80")
    assert Conn.from_dict(c.to_dict()) == c
    assert c.to_dict() == {"family": "ipv4", "local": ["10.0.0.1", 80],
                           "remote": ["10.0.0.2", 51234]}
    assert len({c, Conn.parse("10.0.0.1:80,10.0.0.2:51234")}) == 1
    assert sorted([c.reversed(), c])[0] == c


def test_attachment_roundtrip() -> None:
    a = Attachment("veth0", "/run/netns/x", (4, 123), 7, True, True, True)
    assert Attachment.from_dict(a.to_dict()) == a
    assert a.where == "veth0 in /run/netns/x"
    assert "host namespace" in Attachment("lo").where


class _Recorder(NetLock):
    backend = "test"

    def __init__(self) -> None:
        super().__init__()
        self.locked: set[Conn] = set()
        self.closed = False

    def _add(self, conns: Sequence[Conn]) -> None:
        self.locked.update(conns)

    def _remove(self, conns: Sequence[Conn]) -> None:
        self.locked.difference_update(conns)

    def status(self) -> LockStatus:
        return LockStatus(self.backend, True)

    def flush(self) -> FlushResult:
        return FlushResult(self.backend)

    def close(self) -> None:
        self.closed = True


def test_context_manager_unlocks_on_error() -> None:
    a, b = Conn.parse("10.0.0.1:1,10.0.0.2:2"), Conn.parse("10.0.0.1:3,10.0.0.2:4")
    lock = _Recorder()
    with pytest.raises(RuntimeError), lock:
        lock.lock([a, b, a])
        assert lock.locked == {a, b} and lock.held == {a, b}
        lock.unlock([b])
        raise RuntimeError("dump failed")
    assert lock.locked == set() and lock.held == frozenset() and lock.closed


def test_lock_taken_outside_with_is_kept() -> None:
    a = Conn.parse("10.0.0.1:1,10.0.0.2:2")
    lock = _Recorder()
    lock.lock([a])
    with _Recorder():
        pass
    assert lock.locked == {a}


def test_backend_factory() -> None:
    assert backend("iptables").backend == "iptables"
    assert backend("nftables", netns="x").backend == "nftables"
    with pytest.raises(ValueError, match="unknown network lock backend"):
        backend("pf")


def test_cli_rejects_bad_conn_without_traceback() -> None:
    from orthros_py.cli import main
    from orthros_py.cli.context import Env

    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exc:
        main(["netlock", "lock", "--iface", "lo", "--conn", "10.0.0.1:80"],
             env=Env(stdout=out, stderr=err))
    assert exc.value.code == 2
    assert "is not SRC:PORT,DST:PORT" in err.getvalue()
    assert "Traceback" not in err.getvalue()


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.1:80", ("10.0.0.1", 80)), ("[fd00::1]:443", ("fd00::1", 443)),
])
def test_one_endpoint_parser_for_connection_ends(text: str, expected: tuple[str, int]) -> None:
    from orthros_py.net.conn import format_endpoint, parse_endpoint
    assert parse_endpoint(text) == expected
    assert parse_endpoint(format_endpoint(*expected)) == expected


@pytest.mark.parametrize("text", [":7070", "alpha:0", "10.0.0.1:0"])
def test_listen_addresses_allow_what_connection_ends_do_not(text: str) -> None:
    from orthros_py.net.conn import parse_endpoint
    parse_endpoint(text, listen=True)
    with pytest.raises(ValueError):
        parse_endpoint(text)


def test_the_network_lock_choice_tells_criu_what_to_do() -> None:
    from orthros_py.netlock.method import NetworkLock
    assert [m.criu for m in NetworkLock] == [NetworkLock.SKIP, NetworkLock.IPTABLES,
                                             NetworkLock.NFTABLES, NetworkLock.SKIP]
    assert NetworkLock.SKIP.backend is None and NetworkLock.XDP.backend == "xdp"
