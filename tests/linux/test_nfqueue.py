"""The output hold (NFQUEUE) on real packets: two fresh network namespaces joined by a veth,
a TCP echo server in A (a thread of this process, its sockets made inside A) whose replies are
held, clients in B, each on its own connection. Every namespace, socket, thread, rule and queue
is removed in finalizers, also when a test fails.

Nothing here asserts a duration: "not arrived" is a short poll of every client socket after the
server is known to have sent its reply; "arrived" is a read with a generous timeout.
"""

from __future__ import annotations

import contextlib
import secrets
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from helpers import wait_for

from orthros_py.errors import MissingFeatureError, OutputHoldError
from orthros_py.net import nfqueue
from orthros_py.net.addr import call_in_netns, netns_path
from orthros_py.net.links import add_veth, create_netns, link_up, loopback_up, remove_netns
from orthros_py.net.nfqueue import OutputHold, kernel_queues
from orthros_py.run import run

QUIET = 0.4  # seconds of polling in which a held reply must not show up
FLOW = 20.0  # seconds within which a released (or retransmitted) reply must arrive


@dataclass
class Pair:
    a: str  # the server's namespace (the hold is here) ...
    b: str  # ... and the clients'
    sub: int

    def ip(self, side: str) -> str:
        return f"10.214.{self.sub}.{1 if side == 'a' else 2}"


@pytest.fixture
def pair() -> Iterator[Pair]:
    import ipaddress

    tag = secrets.token_hex(3)
    p = Pair(f"otnq-{tag}-a", f"otnq-{tag}-b", int(tag[:2], 16))
    create_netns(p.a)
    try:
        create_netns(p.b)
        try:
            add_veth(p.a, "nqa", "nqb", p.b)
            for side, ifname in (("a", "nqa"), ("b", "nqb")):
                ns = p.a if side == "a" else p.b
                link_up(ns, ifname, address=ipaddress.IPv4Interface(f"{p.ip(side)}/24"))
                loopback_up(ns)
            yield p
        finally:
            with contextlib.suppress(Exception):
                nfqueue.flush(p.a)
            remove_netns(p.b)
    finally:
        remove_netns(p.a)


class EchoServer:
    """A TCP echo server in a namespace, one thread with a selector: whatever a connection
    sends comes straight back on it (TCP_NODELAY, so a reply never waits for an ACK that is
    held)."""

    def __init__(self, netns: str, ip: str) -> None:
        self.listener = call_in_netns(netns, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((ip, 0))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.echoed = 0  # bytes sent back
        self._stop_r, self._stop_w = socket.socketpair()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.listener, selectors.EVENT_READ)
        self._sel.register(self._stop_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, name="echo-server", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            for key, _ in self._sel.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._stop_r:
                    return
                if sock is self.listener:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = sock.accept()
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        self.conns.append(conn)
                        self._sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._sel.unregister(sock)
                    continue
                sock.setblocking(True)
                sock.sendall(data)
                self.echoed += len(data)

    def close(self) -> None:
        self._stop_w.send(b"x")
        self._thread.join(timeout=10)
        for s in [*self.conns, self.listener, self._stop_r, self._stop_w]:
            s.close()
        self._sel.close()


@pytest.fixture
def server(pair: Pair) -> Iterator[EchoServer]:
    srv = EchoServer(pair.a, pair.ip("a"))
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def clients(pair: Pair, server: EchoServer) -> Iterator[list[socket.socket]]:
    """Connect with ``clients.extend(connect(...))``; all are closed at the end."""
    made: list[socket.socket] = []
    try:
        yield made
    finally:
        for s in made:
            s.close()


@pytest.fixture
def holds() -> Iterator[list[OutputHold]]:
    made: list[OutputHold] = []
    try:
        yield made
    finally:
        for h in made:
            with contextlib.suppress(Exception):
                h.close()


def connect(pair: Pair, server: EchoServer, n: int) -> list[socket.socket]:
    """``n`` clients in B, each on its own connection to the server, all accepted."""
    before = len(server.conns)
    out = []
    for _ in range(n):
        c = call_in_netns(pair.b, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        out.append(c)
        c.settimeout(10)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.connect((pair.ip("a"), server.port))
    wait_for(lambda: len(server.conns) == before + n, what=f"the server to accept {n} clients")
    return out


def send_all(clients: list[socket.socket], round_: str) -> int:
    """Each client sends its own line; how many bytes in all."""
    total = 0
    for i, c in enumerate(clients):
        line = f"client {i} {round_}\n".encode()
        c.sendall(line)
        total += len(line)
    return total


def arrived(clients: list[socket.socket], window: float = QUIET) -> list[int]:
    """Which clients have something to read, polled (not read) for ``window`` seconds."""
    sel = selectors.DefaultSelector()
    try:
        for i, c in enumerate(clients):
            sel.register(c, selectors.EVENT_READ, i)
        return sorted(key.data for key, _ in sel.select(timeout=window))
    finally:
        sel.close()


def receive(c: socket.socket, want: bytes, timeout: float = FLOW) -> None:
    c.settimeout(timeout)
    got = b""
    while len(got) < len(want):
        chunk = c.recv(len(want) - len(got))
        assert chunk, "the connection was closed"
        got += chunk
    assert got == want


def expect_replies(clients: list[socket.socket], round_: str) -> None:
    for i, c in enumerate(clients):
        receive(c, f"client {i} {round_}\n".encode())


def our_rules(netns: str) -> list[str]:
    out = run(["nsenter", f"--net={netns_path(netns)}", "iptables-save", "-t", "filter"]).stdout
    return [line for line in out.splitlines() if nfqueue.COMMENT in line]


def hold_threads(queue: int) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"nfqueue-{queue}" and t.is_alive()]


# --- the wire format ----------------------------------------------------------------------------

def test_messages_and_rule_are_built_as_the_kernel_reads_them() -> None:
    msg = nfqueue.verdict_batch_message(7, 42, nfqueue.NF_ACCEPT, 1000)
    # nlmsghdr (len 32, type QUEUE<<8|VERDICT_BATCH, REQUEST|ACK, seq 42), nfgenmsg (queue 7
    # big-endian), NFQA_VERDICT_HDR (verdict 1, id 1000, both big-endian).
    assert msg == (bytes.fromhex("20000000" "0303" "0500" "2a000000" "00000000")
                   + bytes.fromhex("0000" "0007") + bytes.fromhex("0c00" "0200" "00000001"
                                                                  "000003e8"))
    assert nfqueue.id_after(5, 4) and not nfqueue.id_after(4, 4)
    assert nfqueue.id_after(1, 0xFFFFFFFF)  # the kernel's serial arithmetic across the wrap
    assert nfqueue.rule_spec("10.0.0.5", 8080, 3) == [
        "OUTPUT", "-s", "10.0.0.5/32", "-p", "tcp", "-m", "tcp", "--sport", "8080",
        "-m", "comment", "--comment", "orthros-hold-q3", "-j", "NFQUEUE", "--queue-num", "3"]
    assert nfqueue.rule_spec("fd00::5", None, 0)[:3] == ["OUTPUT", "-s", "fd00::5/128"]


# --- holding and releasing ----------------------------------------------------------------------

def test_replies_leave_only_in_the_batch_that_releases_them(
        pair: Pair, server: EchoServer, clients: list[socket.socket],
        holds: list[OutputHold]) -> None:
    clients.extend(connect(pair, server, 8))
    hold = OutputHold(pair.ip("a"), server.port, queue=11, netns=pair.a)
    holds.append(hold)
    hold.start()
    assert our_rules(pair.a) and hold_threads(11)

    first = send_all(clients, "one")
    wait_for(lambda: server.echoed == first, what="the server to send every first reply")
    m1 = hold.mark()
    assert hold.stats().held >= len(clients)
    # Sent after the mark: must stay held through the release of m1. Sent at once, as a
    # client would within one checkpoint interval: a client whose first request is not
    # acknowledged within its RTO (the server's ACK is held too) falls back to a window of one
    # segment and sends this only once the first batch is released.
    second = send_all(clients, "two")
    assert arrived(clients) == [], "a held reply reached its client"

    released = hold.release(m1)
    assert released >= len(clients)
    expect_replies(clients, "one")
    wait_for(lambda: server.echoed == first + second, what="every second reply")
    assert arrived(clients) == [], "a reply sent after the mark left with the earlier batch"

    m2 = hold.mark()
    assert nfqueue.id_after(m2, m1)
    assert hold.release(m2) >= len(clients)
    expect_replies(clients, "two")
    st = hold.stats()
    # Whatever is held now was queued after m2 (ACKs of requests a client sent again).
    assert st.released >= 2 * len(clients) and st.held == st.queued - st.released
    assert st.dropped == 0 and st.overruns == 0

    hold.close()
    assert our_rules(pair.a) == [] and not hold_threads(11)
    assert 11 not in kernel_queues(pair.a)
    # With the rule gone, replies flow as usual.
    send_all(clients, "three")
    expect_replies(clients, "three")


def test_dropped_replies_never_arrive_but_tcp_resends_once_the_rule_is_gone(
        pair: Pair, server: EchoServer, clients: list[socket.socket],
        holds: list[OutputHold]) -> None:
    clients.extend(connect(pair, server, 8))
    hold = OutputHold(pair.ip("a"), server.port, queue=12, netns=pair.a)
    holds.append(hold)
    hold.start()
    total = send_all(clients, "doomed")
    wait_for(lambda: server.echoed == total, what="the server to send every reply")
    assert hold.drop_all() >= len(clients)
    # The dropped replies are gone; TCP's retransmissions are held again while the rule stays.
    assert arrived(clients, 1.0) == [], "a dropped reply arrived"
    assert hold.stats().dropped >= len(clients)
    # Drop whatever was resent meanwhile too: what arrives next can only be TCP resending it
    # after the rule is gone.
    hold.close(verdict="drop")
    assert our_rules(pair.a) == []
    expect_replies(clients, "doomed")
    assert arrived(clients, 0.2) == [], "a reply arrived twice"
    # The connections are still usable.
    send_all(clients, "after")
    expect_replies(clients, "after")


def test_close_leaves_nothing_and_lets_go_of_what_it_held(
        pair: Pair, server: EchoServer, clients: list[socket.socket],
        holds: list[OutputHold]) -> None:
    clients.extend(connect(pair, server, 4))
    with OutputHold(pair.ip("a"), server.port, queue=13, netns=pair.a) as hold:
        holds.append(hold)
        assert len(our_rules(pair.a)) == 1 and 13 in kernel_queues(pair.a)
        total = send_all(clients, "held")
        wait_for(lambda: server.echoed == total, what="every reply")
        hold.mark()
        assert arrived(clients) == []
    # close() (by the with) took the rule out, then accepted what was held.
    expect_replies(clients, "held")
    assert our_rules(pair.a) == []
    assert 13 not in kernel_queues(pair.a)
    assert not hold_threads(13)
    hold.close()  # idempotent
    with pytest.raises(OutputHoldError, match="not running"):
        hold.mark()
    with pytest.raises(OutputHoldError, match="closed"):
        hold.start()
    # The queue number is free again.
    again = OutputHold(pair.ip("a"), server.port, queue=13, netns=pair.a)
    holds.append(again)
    again.start()
    assert kernel_queues(pair.a)[13].portid
    again.close()
    assert our_rules(pair.a) == [] and 13 not in kernel_queues(pair.a)


def test_a_queue_bound_by_another_hold_is_refused_plainly(
        pair: Pair, server: EchoServer, clients: list[socket.socket],
        holds: list[OutputHold]) -> None:
    clients.extend(connect(pair, server, 2))
    first = OutputHold(pair.ip("a"), server.port, queue=14, netns=pair.a)
    holds.append(first)
    first.start()
    second = OutputHold(pair.ip("a"), None, queue=14, netns=pair.a)
    holds.append(second)
    with pytest.raises(OutputHoldError, match=r"queue 14 .* is already bound by another"):
        second.start()
    assert second.closed and len(hold_threads(14)) == 1
    # The refused hold touched neither the first one's rule nor its queue.
    assert len(our_rules(pair.a)) == 1
    total = send_all(clients, "still")
    wait_for(lambda: server.echoed == total, what="every reply")
    assert arrived(clients) == []
    assert first.release(first.mark()) >= len(clients)
    expect_replies(clients, "still")


def test_a_missing_iptables_is_named(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    hold = OutputHold(pair.ip("a"), 80, queue=15, netns=pair.a)
    with pytest.raises(MissingFeatureError, match="iptables is not installed"):
        hold.start()
    monkeypatch.undo()
    assert 15 not in kernel_queues(pair.a)


def test_two_hundred_connections_released_in_one_batch(
        pair: Pair, server: EchoServer, clients: list[socket.socket],
        holds: list[OutputHold]) -> None:
    clients.extend(connect(pair, server, 200))
    hold = OutputHold(pair.ip("a"), server.port, queue=16, netns=pair.a)
    holds.append(hold)
    hold.start()
    total = send_all(clients, "many")
    wait_for(lambda: server.echoed == total, what="the server to send all 200 replies")
    mark = hold.mark()
    assert hold.stats().held >= 200
    assert arrived(clients) == []
    start = time.perf_counter()
    released = hold.release(mark)
    expect_replies(clients, "many")
    elapsed = time.perf_counter() - start
    assert released >= 200
    print(f"\nreleased {released} packets to 200 connections; last reply read after "
          f"{elapsed * 1000:.1f} ms")  # reported, never asserted
    hold.close()


def test_flush_removes_the_rule_of_a_holder_that_died(
        pair: Pair, server: EchoServer, clients: list[socket.socket]) -> None:
    clients.extend(connect(pair, server, 3))
    code = ("import sys, time\n"
            "from orthros_py.net.nfqueue import OutputHold\n"
            f"h = OutputHold({pair.ip('a')!r}, {server.port}, queue=17, netns={pair.a!r})\n"
            "h.start()\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        proc.kill()
        proc.wait(timeout=10)
        # Its queue went with its socket; its rule stays and silences the service.
        wait_for(lambda: 17 not in kernel_queues(pair.a), what="the dead holder's queue to go")
        assert len(our_rules(pair.a)) == 1
        total = send_all(clients, "orphan")
        wait_for(lambda: server.echoed == total, what="every reply")
        assert arrived(clients, 1.0) == []
        assert nfqueue.flush(pair.a) == 1
        assert our_rules(pair.a) == [] and nfqueue.flush(pair.a) == 0
        expect_replies(clients, "orphan")  # TCP resends once the rule is gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
