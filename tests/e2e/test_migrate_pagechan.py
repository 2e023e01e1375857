"""The page channel on the lab: impostors on the cluster's network reach the destination's page
port before the source's dump does (one sends garbage, one stays silent, one speaks the
handshake with another key); each is refused and logged by beta's agent, and the migration goes
on and succeeds, its clients answered throughout. The tampering case (a byte flipped on the
page stream: TLS, or the agents' AES-GCM records for a tree with its own IPC namespace,
fail the dump, the tree runs on) is in tests/linux/test_agent.py.
"""

from __future__ import annotations

import socket
import statistics
from typing import Any

from helpers import wait_for
from migrate_kit import (
    SERVICE_IP,
    answers,
    assert_nothing_left,
    at_stage,
    client,
    echo_server,
    established,
    host,
)

from orthros_py.agent import pagechan
from orthros_py.lab import Lab
from orthros_py.policies.migrate import MigrateConfig, Migration, Stage
from orthros_py.workloads.echo import ClientPool

PORT = 7200
CLIENTS = 20


def _dropped(sock: socket.socket) -> bool:
    try:
        return sock.recv(64) == b""
    except ConnectionResetError:
        return True


def test_impostors_on_the_page_port_are_refused_and_the_migration_succeeds(lab: Lab) -> None:
    beta = client(lab, "beta")
    beta_addr = lab.host("beta").address
    seen: dict[str, Any] = {}
    silent: list[socket.socket] = []

    def impostors() -> None:  # PREPARE has opened beta's page channel; alpha has not dumped
        (ps,) = [s for s in beta.status()["page_servers"] if s["state"] == "waiting"]
        addr = (beta_addr, int(ps["port"]))
        with lab.in_netns("client"):  # another machine on the cluster's network
            silent.append(socket.create_connection(addr, timeout=20))
            with socket.create_connection(addr, timeout=20) as garbage:
                garbage.sendall(b"\x16\x03\x01\x02\x00" + bytes(range(256)) * 8)
                assert _dropped(garbage)
            with socket.create_connection(addr, timeout=20) as forger:
                forger.sendall(pagechan.client_hello(b"not the key" * 3, ps["image"],
                                                     b"\x00" * 32, b"\x01" * 32))
                assert _dropped(forger)
        (now,) = [s for s in beta.status()["page_servers"] if s["image"] == ps["image"]]
        seen.update(now)

    svc = echo_server(lab, "alpha", PORT)
    with lab.in_netns("client"):
        pool = ClientPool(SERVICE_IP, PORT, CLIENTS, timeout=60)
    try:
        pool.start(interval=0.01)
        wait_for(lambda: established(lab, "alpha", svc.pid) == CLIENTS, timeout=20,
                 what="the clients' connections on alpha")
        job = Migration(svc.pid, host(lab, "alpha"), host(lab, "beta"), MigrateConfig(),
                        observer=at_stage(Stage.LOCK, impostors))
        result = job.run()
        assert seen["refused"] == 2 and seen["state"] == "waiting", seen
        assert lab.holder(SERVICE_IP) == lab.host("beta")
        assert answers(lab, PORT)
        before = pool.stats.requests
        wait_for(lambda: pool.stats.requests >= before + 3 * CLIENTS, timeout=30,
                 what="the clients to get answers from beta")
        assert pool.stats.errors == 0, pool.stats.error_samples
        assert established(lab, "beta", result.new_pid) == CLIENTS
        assert _dropped(silent[0])  # refused once silent for too long
    finally:
        pool.close()
        for s in silent:
            s.close()
    log = lab.host("beta").agent_log
    assert log is not None
    text = log.read_text(errors="replace")
    wait_for(lambda: log.read_text(errors="replace").count("page channel of image") >= 4,
             timeout=10, what="beta's log of the refusals")
    text = log.read_text(errors="replace")
    assert "garbage" in text and "does not verify" in text and "did not prove itself" in text
    assert "proved itself" in text
    kill = client(lab, "beta").kill(result.new_pid)
    assert kill.exited
    wait_for(lambda: not svc.alive(), timeout=5, what="the service to go")
    assert_nothing_left(lab, holder="beta", service=svc)


def test_the_cost_of_the_page_channel(lab: Lab) -> None:
    """How long the channel's handshake takes within migrations (median of 5), and what the
    dump with memory over TLS costs in all; printed for the report."""
    svc = echo_server(lab, "alpha", PORT)
    timings: list[dict[str, float]] = []
    here, there = "alpha", "beta"
    with lab.in_netns("client"):
        pool = ClientPool(SERVICE_IP, PORT, CLIENTS, timeout=60)
    try:
        pool.start(interval=0.01)
        wait_for(lambda: established(lab, "alpha", svc.pid) == CLIENTS, timeout=20,
                 what="the clients' connections on alpha")
        for _ in range(5):
            job = Migration(svc.pid, host(lab, here), host(lab, there), MigrateConfig())
            result = job.run()
            chan = job._dumped.raw["page_channel"]
            assert chan["channel"] == "tls"
            timings.append({**result.timings_ms, "frozen": result.frozen_ms or 0.0,
                            "handshake": chan["handshake_ms"]})
            wait_for(lambda: answers(lab, PORT), timeout=20, what="the service to answer")
            here, there = there, here
        assert pool.stats.errors == 0, pool.stats.error_samples
    finally:
        pool.close()
    medians = {k: statistics.median(t[k] for t in timings) for k in timings[0]}
    print("\npage channel, median of 5 migrations (ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in medians.items()))
    client(lab, here).kill(svc.pid)
