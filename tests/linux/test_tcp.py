"""Established TCP connections survive a dump and a restore on the same host (real CRIU, root).

The server is tests/workloads/echo_server.py; its 50 clients live in this test process, outside
the dumped tree, so they see exactly what a real client would: a pause, then the echo of their
next request, and never a reset. CRIU's statistics of the dump and the restore are printed (run
with ``pytest -s``) and logged (``pytest --log-cli-level=INFO``) for the record.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import CriuNetfilter, Spawner, dump_cli, read_lines, restore_cli, wait_for

CLIENTS = 50
log = logging.getLogger(__name__)


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def request(socks: list[socket.socket], rnd: int) -> dict[int, bytes]:
    """Send one request on every connection at once; return what each one should echo."""
    sent: dict[int, bytes] = {}
    for i, s in enumerate(socks):
        msg = f"client {i} request {rnd} ".encode() + b"x" * (i * 37 % 500) + b"\n"
        s.sendall(msg)
        sent[i] = msg
    return sent


def collect(socks: list[socket.socket], sent: dict[int, bytes]) -> None:
    """Read every connection's echo; a reset or an early close fails the test."""
    for i, s in enumerate(socks):
        want = sent[i]
        got = b""
        while len(got) < len(want):
            try:
                chunk = s.recv(len(want) - len(got))
            except ConnectionResetError as err:
                raise AssertionError(f"connection {i} was reset") from err
            assert chunk, f"connection {i} was closed by the server"
            got += chunk
        assert got == want, f"connection {i} echoed {got!r} instead of {want!r}"


@pytest.mark.parametrize("lock", ["xdp", "iptables", "nftables"])
def test_established_connections_survive_dump_and_restore(
    spawner: Spawner, images: Path, tmp_path: Path, clients: list[socket.socket], lock: str,
    criu_netfilter: CriuNetfilter
) -> None:
    out = tmp_path / "server.out"
    server = spawner.workload("echo_server", "127.0.0.1", "0", stdout=out)
    wait_for(lambda: any(ln.startswith("listening ") for ln in read_lines(out)),
             what="the echo server to listen")
    port = int(next(ln for ln in read_lines(out) if ln.startswith("listening ")).split()[1])
    criu_netfilter.ports.add(port)  # CRIU's iptables/nftables lock rules name it

    for _ in range(CLIENTS):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        clients.append(s)
    collect(clients, request(clients, 0))  # every connection is accepted and served

    dumped = dump_cli(server.pid, images, "--tcp-established", "--network-lock", lock)
    assert server.wait(timeout=10) < 0  # CRIU killed it; reap it so that its PID is free
    assert len(dumped["tcp"]) == CLIENTS
    # The next request goes out while the server is gone: CRIU's network lock drops it, and
    # the client's TCP sends it again once the restored server is back.
    sent = request(clients, 1)

    restored = restore_cli(spawner, images, "--tcp-established", "--network-lock", lock)
    assert restored["pid"] == server.pid
    collect(clients, sent)
    collect(clients, request(clients, 2))

    ds, rs = dumped["stats"], restored["stats"]
    print(f"\n{CLIENTS}-connection echo server, network lock {lock}:")
    print(f"  dump: orthros {dumped['elapsed_ms']:.1f} ms, frozen {ds['frozen_ms']:.1f} ms, "
          f"freezing {ds['freezing_ms']:.2f} ms, memdump {ds['memdump_ms']:.1f} ms, "
          f"memwrite {ds['memwrite_ms']:.1f} ms, pages written {ds['pages_written']}")
    print(f"  restore: orthros {restored['elapsed_ms']:.1f} ms, restore {rs['restore_ms']:.1f} ms,"
          f" forking {rs['forking_ms']:.2f} ms, pages restored {rs['pages_restored']}")
    print("  dump stats:", json.dumps(ds))
    print("  restore stats:", json.dumps(rs))
    log.info("%d connections, lock %s: dump %s", CLIENTS, lock,
             json.dumps({"elapsed_ms": dumped["elapsed_ms"], **ds}))
    log.info("%d connections, lock %s: restore %s", CLIENTS, lock,
             json.dumps({"elapsed_ms": restored["elapsed_ms"], **rs}))
