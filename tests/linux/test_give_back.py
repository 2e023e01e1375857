"""What the XDP lock caught is given to the restored tree at the unlock, so that no client
waits out a retransmission backoff.

An echo server with 40 connections is dumped (xdp lock, the server killed); every client then
sends one request into the lock, which drops it and every retransmission of it; the restore
comes after a fixed window placed between two of the clients' retransmission timeouts (on a
veth: about 0.2, 0.6, 1.4, 3.0, 6.2 s after the send). Asserted per connection, from the
client's own TCP_INFO: with the give-back every request is answered without the client
retransmitting once more (its next timeout comes long after the restore); the control (the same
restore with ``--no-give-back``) must show every client retransmitting at that timeout, which is
the backoff the feature removes. No duration is compared with a limit: only who sent what,
counted by the kernel.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Spawner, dump_cli, restore_cli, wait_for

from orthros_py.bench.netlock.host import ClientNet, xdp_release
from orthros_py.net.addr import in_netns
from orthros_py.workloads.echo import ClientPool

CLIENTS = 40
PORT = 7411
# From the clients' send to the restore: past their fourth timeout (about 3.0 s), well before
# the fifth (about 6.2 s), with room for a restore slowed down by a busy machine.
WINDOW_S = 3.6
TCP_INFO_LEN = 104
TOTAL_RETRANS_AT = 100  # struct tcp_info: 8 bytes of u8 fields, then u32s; tcpi_total_retrans

pytestmark = pytest.mark.usefixtures("xdp_pins_as_found")


@pytest.fixture
def net() -> Iterator[ClientNet]:
    """The clients in a namespace of their own, behind a veth: their segments arrive through
    an interface, where the lock's XDP program drops (and catches) them. On loopback the lock
    drops at tc egress instead, which the sender sees as not sent at all."""
    with ClientNet() as n:
        yield n
        # Nothing of the lock is left on our veth or for our addresses.
        assert xdp_release(n) == []


def total_retrans(s: socket.socket) -> int:
    raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    return int(struct.unpack_from("=I", raw, TOTAL_RETRANS_AT)[0])


def echo_back(s: socket.socket, want: bytes) -> bytes:
    got = b""
    while len(got) < len(want):
        chunk = s.recv(len(want) - len(got))
        if not chunk:
            raise ConnectionResetError("closed")
        got += chunk
    return got


def lock_window(spawner: Spawner, images: Path, net: ClientNet, *restore_opts: str
                ) -> tuple[list[int], list[int], dict[str, Any]]:
    """(retransmissions per client while locked, from the restore on, restore's JSON)."""
    server = subprocess.Popen([sys.executable, "-m", "orthros_py.workloads.echo", "--host",
                               net.server_ip, "--port", str(PORT)], stdin=subprocess.DEVNULL,
                              start_new_session=True)
    spawner.track(server.pid)

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex((net.server_ip, PORT)) == 0

    wait_for(listening, what="the echo server to listen")
    with in_netns(net.path):  # the sockets stay in the clients' namespace
        pool = ClientPool(net.server_ip, PORT, CLIENTS, timeout=15)
    try:
        pool.round()
        assert pool.stats.errors == 0, pool.stats.error_samples
        dump_cli(server.pid, images, "--tcp-established", "--network-lock", "xdp")
        server.wait()
        before = [total_retrans(s) for s in pool.socks]
        wants = [f"{i}:locked;".encode() for i in range(CLIENTS)]
        for s, want in zip(pool.socks, wants, strict=True):
            s.sendall(want)
        time.sleep(WINDOW_S)  # a fixed window on purpose: where it ends is the experiment
        # Counted before the restore, which ends well before the clients' next timeout (about
        # 6.2 s after their send): any retransmission after this one is that timeout's.
        at_restore = [total_retrans(s) for s in pool.socks]
        restored = restore_cli(spawner, images, "--tcp-established", "--network-lock", "xdp",
                               *restore_opts)
        for s, want in zip(pool.socks, wants, strict=True):
            assert echo_back(s, want) == want
        after = [total_retrans(s) for s in pool.socks]
        pool.round()  # the connections go on
        assert pool.stats.errors == 0, pool.stats.error_samples
    finally:
        pool.close()
    locked = [b - a for a, b in zip(before, at_restore, strict=True)]
    late = [b - a for a, b in zip(at_restore, after, strict=True)]
    return locked, late, restored


def test_caught_requests_are_answered_without_waiting_for_a_retransmission(
        spawner: Spawner, images: Path, net: ClientNet) -> None:
    locked, late, restored = lock_window(spawner, images, net)
    # The lock dropped every client's retransmissions (the window passed their timeouts) ...
    assert all(n >= 2 for n in locked), locked
    # ... and each got its answer from the segment given back, not from a retransmission.
    assert late == [0] * CLIENTS, late
    lock = restored["lock"]
    assert lock["caught"] == CLIENTS and lock["given_back"] == CLIENTS, lock
    assert lock["refused"] == [], lock


def test_control_without_give_back_waits_for_the_clients_retransmissions(
        spawner: Spawner, images: Path, net: ClientNet) -> None:
    locked, late, restored = lock_window(spawner, images, net, "--no-give-back")
    assert all(n >= 2 for n in locked), locked
    # Every client had to retransmit once more, at its timeout: the backoff removed above.
    assert all(n >= 1 for n in late), late
    assert restored["lock"]["given_back"] == 0
