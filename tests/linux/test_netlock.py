"""The XDP network lock on real traffic (root, BCC, a kernel with XDP and clsact).

Each test gets two fresh network namespaces joined by a veth (10.213.N.0/24 and fd00:213:N::/64,
only inside those namespaces); sockets are made inside them from this process, so the test reads
both ends itself. The program is compiled once per session (``xdp`` fixture): later loads, the
CLI's included, reopen the pins. Every namespace, attachment, pin and process is removed in
finalizers, also when a test fails.

Set-up installs BCC and the headers: a lock that cannot be compiled or loaded fails every test
that needs it; nothing here skips. The tests share the host's one lock map with whoever else
uses it (an operator, an agent): they unlock and detach exactly what they locked and attached,
look only at their own connections and namespaces, and never flush the host's lock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Spawner, VethPair, orthros_json, run_orthros, veth_pair

from orthros_py.errors import NetlockError
from orthros_py.net.addr import in_netns
from orthros_py.net.conns import discover, discover_tree
from orthros_py.netlock import Conn
from orthros_py.netlock.bpf import bpffs_mounted
from orthros_py.netlock.xdp import PIN_DIR, XdpNetLock, conn_entries

QUIET = 0.6  # seconds a locked connection must stay silent
FLOW = 20.0  # seconds within which TCP's retransmission must deliver after unlocking


@pytest.fixture(scope="session")
def xdp() -> Iterator[XdpNetLock]:
    """The lock, compiled once for the whole session and kept by this process. A compile or
    verifier failure fails the tests (set-up installs what the lock needs)."""
    bpffs_before = bpffs_mounted()
    pinned_before = PIN_DIR.exists()
    lock = XdpNetLock()
    lock.prepare()
    try:
        yield lock
    finally:
        lock.release()  # whatever this object locked and a test left
        # The pins go only if this session made them and nobody else uses them now.
        st = lock.status()
        if not pinned_before and not st.attachments and not st.conns:
            lock.flush()
        lock.unload()
        # Leave the host as found: unmount the BPF filesystem if orthros mounted it and nothing
        # else is pinned there (its own preload iterators aside).
        bpffs = Path("/sys/fs/bpf")
        if not bpffs_before and bpffs_mounted() and \
                set(os.listdir(bpffs)) <= {"maps.debug", "progs.debug"}:
            subprocess.run(["umount", str(bpffs)], check=False)


def ours(conns: list[Any], mine: list[Conn]) -> list[Any]:
    """Of the locked connections a status lists (LockedConn or the CLI's dicts), those among
    ``mine``: the map may hold others' locks too."""
    wanted = {str(c) for c in mine}
    return [c for c in conns if str(getattr(c, "conn", None) or c["conn"]) in wanted]


Pair = VethPair


@pytest.fixture
def pair() -> Iterator[VethPair]:
    with veth_pair("otnl", ("nla", "nlb"), "10.213", "fd00:213") as p:
        yield p


def listen(pair: Pair, family: int, socks: list[socket.socket]) -> tuple[socket.socket, int]:
    with in_netns(pair.path("b")):
        srv = socket.socket(family, socket.SOCK_STREAM)
    socks.append(srv)
    srv.bind((pair.ip("b", family), 0))
    srv.listen(16)
    return srv, srv.getsockname()[1]


def connect(pair: Pair, srv: socket.socket, socks: list[socket.socket]
            ) -> tuple[socket.socket, socket.socket, Conn]:
    """A client in A connected to ``srv`` in B: (client, server end, Conn seen from B)."""
    family, port = srv.family, srv.getsockname()[1]
    with in_netns(pair.path("a")):
        cli = socket.socket(family, socket.SOCK_STREAM)
    socks.append(cli)
    cli.settimeout(10)
    cli.connect((pair.ip("b", family), port))
    end, _ = srv.accept()
    socks.append(end)
    return cli, end, Conn.of(end.getsockname()[:2], end.getpeername()[:2])


def silent(s: socket.socket, timeout: float = QUIET) -> bool:
    s.settimeout(timeout)
    try:
        data = s.recv(100)
    except TimeoutError:
        return True
    raise AssertionError(f"a locked connection received {data!r}")


def receive(s: socket.socket, want: bytes, timeout: float = FLOW) -> None:
    s.settimeout(timeout)
    got = b""
    while len(got) < len(want):
        chunk = s.recv(len(want) - len(got))
        assert chunk, "the connection was closed"
        got += chunk
    assert got == want


def roundtrip(cli: socket.socket, end: socket.socket, tag: bytes) -> None:
    cli.sendall(b"req " + tag)
    receive(end, b"req " + tag, timeout=5)
    end.sendall(b"rep " + tag)
    receive(cli, b"rep " + tag, timeout=5)


def xdp_attached(pair: Pair, side: str, ifname: str) -> bool:
    from pyroute2 import IPRoute

    with in_netns(pair.path(side)), IPRoute() as ipr:
        link = ipr.link("get", index=ipr.link_lookup(ifname=ifname)[0])[0]
        xdp = link.get_attr("IFLA_XDP")
        return bool(xdp is not None and xdp.get_attr("IFLA_XDP_PROG_ID"))


# --- the lock itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_lock_drops_both_directions_of_one_connection_only(
        xdp: XdpNetLock, pair: Pair, socks: list[socket.socket], family: int) -> None:
    srv, _ = listen(pair, family, socks)
    cli1, end1, conn1 = connect(pair, srv, socks)
    cli2, end2, conn2 = connect(pair, srv, socks)
    roundtrip(cli1, end1, b"warm-up")

    # On the server's side only: XDP must catch what arrives, tc egress what leaves.
    xdp.attach([pair.b_if], netns=pair.b)
    before = xdp.counters()
    xdp.lock([conn1])
    try:
        cli1.sendall(b"request")  # arrives on B's veth: XDP drops it
        end1.sendall(b"push")  # leaves by B's veth: tc egress drops it
        assert silent(end1) and silent(cli1)
        roundtrip(cli2, end2, b"other")  # same interface, another connection: untouched
        after = xdp.counters()
        assert after["xdp_dropped"] > before["xdp_dropped"]
        assert after["tc_dropped"] > before["tc_dropped"]
        assert after["xdp_passed"] > before["xdp_passed"]
        assert after["tc_passed"] > before["tc_passed"]
        (locked,) = ours(xdp.status().conns, [conn1, conn2])
        assert locked.conn == conn1 and locked.dropped and locked.dropped >= 2
    finally:
        xdp.unlock([conn1])
    # TCP retransmits what was dropped: nothing lost, nothing reset.
    receive(end1, b"request")
    receive(cli1, b"push")
    roundtrip(cli1, end1, b"after")
    assert ours(xdp.status().conns, [conn1, conn2]) == []


def test_with_block_unlocks_on_error(xdp: XdpNetLock, pair: Pair,
                                     socks: list[socket.socket]) -> None:
    srv, _ = listen(pair, socket.AF_INET, socks)
    cli, end, conn = connect(pair, srv, socks)
    xdp.attach([pair.b_if], netns=pair.b)
    with pytest.raises(RuntimeError), XdpNetLock() as lock:  # a second object: pins, no compile
        lock.lock([conn])
        cli.sendall(b"during")
        assert silent(end)
        raise RuntimeError("the dump failed")
    receive(end, b"during")
    assert ours(xdp.status().conns, [conn]) == []


def test_lock_and_unlock_of_1000_connections_writes_and_removes_every_entry(
        xdp: XdpNetLock, pair: Pair, socks: list[socket.socket]) -> None:
    """A thousand connections in one lock: all 2,000 map entries (both orientations) are
    written, a real one among them stops and then flows again, and every entry is removed.
    How long it takes is the benchmark's to report (``orthros bench netlock``, "XDP map
    alone"), not a limit for this test."""
    srv, _ = listen(pair, socket.AF_INET, socks)
    cli, end, real = connect(pair, srv, socks)
    xdp.attach([pair.b_if], netns=pair.b)
    conns = [real] + [Conn.of((f"10.99.{i // 250}.{i % 250 + 1}", 20000 + i), ("10.98.0.1", 443))
                      for i in range(999)]
    entries = [key for c in conns for key, _ in conn_entries(c)]
    assert len(set(entries)) == 2000

    def present() -> list[bytes]:
        objs = xdp._objects(create=False)
        assert objs is not None
        return [k for k in entries if objs.conns.lookup(k) is not None]

    xdp.lock(conns)
    try:
        assert len(present()) == 2000
        assert len(ours(xdp.status().conns, conns)) == 1000
        cli.sendall(b"blocked")
        assert silent(end)
    finally:
        xdp.unlock(conns)
    assert present() == []
    assert ours(xdp.status().conns, conns) == []
    receive(end, b"blocked")  # retransmitted once the entries are gone
    roundtrip(cli, end, b"flowing")


def test_attach_is_idempotent_and_detach_restores_the_interface(xdp: XdpNetLock,
                                                                 pair: Pair) -> None:
    xdp.attach([pair.b_if, "lo"], netns=pair.b)
    xdp.attach([pair.b_if], netns=pair.b)
    mine = [a for a in xdp.status().attachments if a.netns == pair.path("b")]
    assert sorted(a.iface for a in mine) == ["lo", pair.b_if]
    assert all(a.xdp and a.tc and a.clsact_created for a in mine)
    assert xdp_attached(pair, "b", pair.b_if)
    result = xdp.detach(netns=pair.b)
    assert len(result.detached) == 2 and not result.problems
    assert not xdp_attached(pair, "b", pair.b_if) and not xdp_attached(pair, "b", "lo")
    assert not [a for a in xdp.status().attachments if a.netns == pair.path("b")]


def test_unknown_interface_attaches_nothing(xdp: XdpNetLock, pair: Pair) -> None:
    with pytest.raises(NetlockError, match="no interface named nosuch0"):
        xdp.attach([pair.b_if, "nosuch0"], netns=pair.b)
    assert not xdp_attached(pair, "b", pair.b_if)
    assert not [a for a in xdp.status().attachments if a.netns == pair.path("b")]


# --- the CLI, and locks that outlive their process ----------------------------------------------

def test_cli_lock_outlives_the_command_and_unlock_undoes_it(
        xdp: XdpNetLock, pair: Pair, socks: list[socket.socket]) -> None:
    srv, _ = listen(pair, socket.AF_INET, socks)
    cli1, end1, conn1 = connect(pair, srv, socks)
    cli2, end2, conn2 = connect(pair, srv, socks)
    xdp.prepare()  # pinned: the CLI must not compile
    args = ("--netns", pair.b, "--iface", pair.b_if, "--conn", str(conn1))
    out = orthros_json("netlock", "lock", *args)
    assert out["locked"] == [str(conn1)] and not out["compile_seconds"]

    cli1.sendall(b"blocked")
    assert silent(end1)
    roundtrip(cli2, end2, b"free")
    st = orthros_json("netlock", "status")  # a fresh process reads the pins and the state file
    mine = ours(st["conns"], [conn1, conn2])
    assert [c["conn"] for c in mine] == [str(conn1)]
    assert mine[0]["dropped"] >= 1
    assert [a["iface"] for a in st["attachments"] if a["netns"] == pair.path("b")] == [pair.b_if]
    assert st["counters"]["xdp_dropped"] >= 1

    # The same arguments undo it: the connection and the interface, nothing else.
    undone = orthros_json("netlock", "unlock", *args)
    assert undone["unlocked"] == [str(conn1)] and len(undone["detached"]) == 1
    receive(end1, b"blocked")
    assert not xdp_attached(pair, "b", pair.b_if)
    st = orthros_json("netlock", "status")
    assert ours(st["conns"], [conn1]) == []
    assert not [a for a in st["attachments"] if a["netns"] == pair.path("b")]


HOLDER = """
import sys, time
from orthros_py.netlock import Conn
from orthros_py.netlock.xdp import XdpNetLock
lock = XdpNetLock()
lock.attach([sys.argv[1]], netns=sys.argv[2])
with lock:  # would unlock on any way out of Python, but SIGKILL is none
    lock.lock([Conn.parse(sys.argv[3])])
    print("locked", flush=True)
    time.sleep(300)
"""


def test_lock_survives_sigkill_of_its_holder(xdp: XdpNetLock, pair: Pair, spawner: Spawner,
                                             socks: list[socket.socket]) -> None:
    srv, _ = listen(pair, socket.AF_INET, socks)
    cli, end, conn = connect(pair, srv, socks)
    xdp.prepare()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, pair.b_if, pair.b, str(conn)],
                              stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    spawner.track(holder.pid)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    holder.stdout.close()

    cli.sendall(b"after the crash")
    assert silent(end)  # still locked: the map is pinned, the programs attached
    st = orthros_json("netlock", "status")
    assert [c["conn"] for c in ours(st["conns"], [conn])] == [str(conn)]
    # Another process lifts it, as the operator would after the crash.
    res = run_orthros("netlock", "unlock", "--netns", pair.b, "--iface", pair.b_if,
                      "--conn", str(conn))
    assert res.returncode == 0, res.stderr
    receive(end, b"after the crash")
    assert not xdp_attached(pair, "b", pair.b_if)


def test_cli_unknown_interface_is_one_sentence_and_attaches_nothing(xdp: XdpNetLock,
                                                                    pair: Pair) -> None:
    res = run_orthros("netlock", "lock", "--netns", pair.b, "--iface", "nosuch0",
                      "--conn", "10.213.0.2:80,10.213.0.1:5000")
    assert res.returncode == 8
    assert res.stderr.strip().splitlines() == [
        f"orthros: no interface named nosuch0 in network namespace {pair.b}"]
    assert not xdp_attached(pair, "b", pair.b_if)
    st = orthros_json("netlock", "status")
    assert not [a for a in st["attachments"] if a["netns"] == pair.path("b")]
    assert ours(st["conns"], [Conn.parse("10.213.0.2:80,10.213.0.1:5000")]) == []


def test_cli_unknown_netns(xdp: XdpNetLock) -> None:
    res = run_orthros("netlock", "lock", "--netns", "otnl-no-such-ns", "--iface", "lo",
                      "--conn", "10.213.0.2:80,10.213.0.1:5000")
    assert res.returncode == 8
    assert "no network namespace otnl-no-such-ns" in res.stderr
    assert not Path("/run/netns/otnl-no-such-ns").exists()  # looked up, never created


# --- connection discovery ----------------------------------------------------------------------

SERVER = """
import socket, sys, threading
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 0))
srv.listen(16)
port = srv.getsockname()[1]
held = [socket.create_connection(("127.0.0.1", port))]  # a connection to itself, over lo

def echo(c):
    while data := c.recv(1000):
        c.sendall(data)

print(port, flush=True)
while True:
    c, _ = srv.accept()
    held.append(c)
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"""


def test_discover_tree_connections_in_its_netns(xdp: XdpNetLock, pair: Pair, spawner: Spawner,
                                                socks: list[socket.socket]) -> None:
    server = subprocess.Popen(["nsenter", f"--net={pair.path('b')}", sys.executable, "-c",
                               SERVER], stdout=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL)
    spawner.track(server.pid)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    server.stdout.close()
    with in_netns(pair.path("a")):
        cli = socket.create_connection((pair.ip("b", socket.AF_INET), port), timeout=10)
    socks.append(cli)
    cli.sendall(b"hello")
    receive(cli, b"hello", timeout=5)

    found = discover([server.pid])
    assert found.netns == f"/proc/{server.pid}/ns/net"
    peer = Conn.of((pair.ip("b", socket.AF_INET), port), cli.getsockname())
    assert peer in found.conns
    loops = [c for c in found.conns if c.local_ip == "127.0.0.1"]
    assert len(loops) == 2  # both ends of the connection to itself belong to the tree
    assert found.routes[peer] == pair.b_if
    assert {found.routes[c] for c in loops} == {"lo"}
    assert found.interfaces == sorted(["lo", pair.b_if])
    assert discover_tree(server.pid).conns == found.conns

    # The scripting path: lock the whole tree, in its namespace, on the interfaces it uses.
    xdp.prepare()
    out = orthros_json("netlock", "lock", "--pid", str(server.pid))
    assert set(out["locked"]) == {str(c) for c in found.conns}
    cli.sendall(b"locked?")
    assert silent(cli, 1.0)
    orthros_json("netlock", "unlock", "--pid", str(server.pid))
    receive(cli, b"locked?")
    st: dict[str, Any] = orthros_json("netlock", "status")
    assert ours(st["conns"], found.conns) == []
    # The programs stay attached (unlock without --iface); in the tree's namespace only.
    nsid = [os.stat(found.netns).st_dev, os.stat(found.netns).st_ino]
    assert sorted(a["iface"] for a in st["attachments"] if a["netns_id"] == nsid) == \
        sorted(["lo", pair.b_if])
    json.dumps(st)  # plain data all the way down


# --- the rule-based backends (benchmark baselines), same contract -----------------------------

@pytest.mark.parametrize("name", ["iptables", "nftables"])
def test_rule_backends_lock_one_connection_only(name: str, pair: Pair,
                                                socks: list[socket.socket]) -> None:
    from orthros_py.netlock import backend

    srv, _ = listen(pair, socket.AF_INET, socks)
    cli1, end1, conn1 = connect(pair, srv, socks)
    cli2, end2, _ = connect(pair, srv, socks)
    srv6, _ = listen(pair, socket.AF_INET6, socks)
    cli6, end6, conn6 = connect(pair, srv6, socks)
    lock = backend(name, netns=pair.b)
    try:
        with lock:
            lock.lock([conn1, conn6])
            lock.lock([conn1])  # idempotent: no second rule pair
            assert [lc.conn for lc in lock.status().conns] == sorted([conn1, conn6])
            cli1.sendall(b"request")
            end6.sendall(b"push")
            assert silent(end1) and silent(cli6)
            roundtrip(cli2, end2, b"other")
        # Leaving the with block unlocked what it locked.
        receive(end1, b"request")
        receive(cli6, b"push")
        assert lock.status().conns == []
    finally:
        lock.flush()
