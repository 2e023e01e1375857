"""`orthros pair --failover` across the VMs: the active VM is powered off hard (`virsh destroy`,
no shutdown, its kernel gone at once) and the standby VM takes over the service and its address.

The witness, the third vote a standby needs before it takes over, is an agent on this machine
(inventory host gamma's address on the cluster network's bridge): the cluster's third machine.
Runs last in the tier, as alpha does not come back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from test_vm_migrate import ECHO_PATTERN, PORT, SERVICE_IP, echo_pid, start_echo
from vmkit import GUEST_PY, KEY, Cluster

WITNESS = "gamma"
WITNESS_IP = "10.77.0.13"


def cluster_bridge() -> str:
    out = subprocess.run(["virsh", "-q", "net-info", "orthros-cluster"], capture_output=True,
                         text=True, check=True).stdout
    return next(line.split()[1] for line in out.splitlines() if line.startswith("Bridge"))


@pytest.fixture
def witness(tmp_path: Path) -> Iterator[str]:
    bridge = cluster_bridge()
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=bridge)[0]
        ipr.addr("add", index=idx, address=WITNESS_IP, prefixlen=24)
    log = (tmp_path / "witness.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "orthros"), "agent", "--name", WITNESS,
                             "--listen", f"{WITNESS_IP}:7070", "--key", str(KEY),
                             "--images-root", str(tmp_path / "images"), "--scratch-root", "none"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        yield WITNESS
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        with IPRoute() as ipr:
            ipr.addr("del", index=idx, address=WITNESS_IP, prefixlen=24)


def echo_answers(cluster: Cluster) -> bool:
    """A new connection from the client VM to the service address gets its echo."""
    probe = (f"import socket; s = socket.create_connection(({SERVICE_IP!r}, {PORT}), timeout=3); "
             "s.sendall(b'ping;'); assert s.recv(16) == b'ping;'")
    return cluster.ssh("client", f"{GUEST_PY} -c {probe!r}", check=False, timeout=60).returncode == 0


def test_the_active_vm_powered_off_hard_and_the_standby_vm_serves(
        cluster: Cluster, witness: str) -> None:
    holder = next(h for h in ("alpha", "beta") if SERVICE_IP in cluster.addresses(h))
    standby = "beta" if holder == "alpha" else "alpha"
    start_echo(cluster, holder)
    name = None
    try:
        cluster.wait_for("the echo server", lambda: echo_pid(cluster, holder) is not None, 60)
        assert echo_answers(cluster)
        pid = echo_pid(cluster, holder)
        # Checkpoints and heartbeats spaced for guests under software emulation.
        rec = cluster.orthros_json("pair", "start", str(pid), "--from", holder, "--to", standby,
                                   "--failover", "--witness", witness, "--interval", "2s",
                                   "--heartbeat", "500ms", "--misses", "4")
        name = str(rec["config"]["name"])  # type: ignore[index]

        def generation() -> int:
            views = cluster.orthros_json("pair", "status", name)
            return int(views[0]["generation"])  # type: ignore[index]
        cluster.wait_for("two committed generations on the standby", lambda: generation() >= 2, 180)

        died = time.monotonic()
        subprocess.run(["virsh", "-q", "destroy", cluster.domain(holder)], check=True,
                       capture_output=True)
        cluster.wait_for(f"{standby} to serve at {SERVICE_IP}", lambda: echo_answers(cluster), 300)
        took = time.monotonic() - died
        assert SERVICE_IP in cluster.addresses(standby)
        view = cluster.orthros_json("pair", "status", name)[0]  # type: ignore[index]
        assert view["state"] == "failed over" and view["serving"] == standby, view
        print(f"\nVM failover: {holder} destroyed -> {standby} answering in {took:.1f} s; "
              f"{json.dumps(view.get('events', [])[-1:])}")
    finally:
        if name is not None:
            cluster.orthros("pair", "stop", name, timeout=120)
        cluster.ssh(standby, f"pkill -9 -f {ECHO_PATTERN!r} || true", check=False)
