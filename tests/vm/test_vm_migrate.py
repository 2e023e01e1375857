"""`orthros migrate` between the VMs: a TCP service under clients on the client VM, alpha -> beta
-> alpha, with the service address; and a container-like tree with cgroup v2 cpu and memory
limits, which this machine (cpu bound to cgroup v1) cannot show."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator

import pytest
from vmkit import GUEST_PY, GUEST_REPO, Cluster

SERVICE_IP = "10.77.0.100"  # the inventory's service "web", on alpha at start
PORT = 7000
CLIENTS = 50
CLIENT_DIR = "/run/orthros-vm-clients"
ECHO_MATCH = f"orthros_py.workloads.echo --host 0.0.0.0 --port {PORT}"
# For pgrep and pkill: the bracket keeps the pattern from matching the shell that runs them.
ECHO_PATTERN = "[o]" + ECHO_MATCH[1:]


def echo_pid(cluster: Cluster, host: str) -> int | None:
    r = cluster.ssh(host, f"pgrep -o -f {ECHO_PATTERN!r} || true")
    return int(r.stdout.split()[0]) if r.stdout.strip() else None


def start_echo(cluster: Cluster, host: str) -> None:
    """The echo server as a transient systemd unit, as a service runs on a user's host (the
    tree leaves the unit's cgroup when it is migrated, and comes back to one CRIU makes again).
    Its output goes nowhere: a unit's default, the journal's stream socket, is a connection to
    a process outside the tree that CRIU cannot carry to another host."""
    cluster.ssh(host, "systemd-run --quiet --unit=orthros-vm-echo --collect -p KillMode=process "
                      "-p StandardOutput=null -p StandardError=null "
                      f"{GUEST_PY} -m {ECHO_MATCH}")


def client_status(cluster: Cluster) -> dict[str, object]:
    r = cluster.ssh("client", f"cat {CLIENT_DIR}/status.json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else {}


def answered(cluster: Cluster) -> list[int]:
    return list(client_status(cluster).get("answered", []))  # type: ignore[call-overload]


@pytest.fixture
def echo_service(cluster: Cluster) -> Iterator[int]:
    """The echo server on the host holding the service address (alpha at start), under
    CLIENTS connections from the client VM; both stopped at the end wherever they run."""
    holder = next(h for h in ("alpha", "beta") if SERVICE_IP in cluster.addresses(h))
    start_echo(cluster, holder)
    cluster.wait_for("the echo server", lambda: echo_pid(cluster, holder) is not None, 60)
    pid = echo_pid(cluster, holder)
    assert pid is not None
    try:
        cluster.ssh("client", f"rm -rf {CLIENT_DIR}; systemd-run --quiet --unit=orthros-vm-clients "
                              f"--collect {GUEST_PY} {GUEST_REPO}/tests/vm/guest_clients.py "
                              f"{SERVICE_IP} {PORT} {CLIENTS} {CLIENT_DIR}")
        cluster.wait_for("every client connection to be answered",
                         lambda: len(answered(cluster)) == CLIENTS and min(answered(cluster)) > 0,
                         120)
        yield pid
    finally:
        cluster.ssh("client", f"touch {CLIENT_DIR}/stop; sleep 2; "
                              "systemctl stop orthros-vm-clients 2>/dev/null || true", check=False)
        for h in ("alpha", "beta"):
            cluster.ssh(h, f"systemctl stop orthros-vm-echo 2>/dev/null; "
                           f"pkill -9 -f {ECHO_PATTERN!r} || true", check=False)


def wait_all_progress(cluster: Cluster, before: list[int], timeout: float = 120) -> list[int]:
    """Every connection answered more than ``before``, one by one (not a total)."""
    def done() -> bool:
        now = answered(cluster)
        return len(now) == len(before) and all(a > b for a, b in zip(now, before, strict=True))
    cluster.wait_for("every client connection to be answered after the migration", done, timeout)
    return answered(cluster)


def test_a_tcp_service_migrates_alpha_beta_alpha_with_its_address_and_no_client_error(
        cluster: Cluster, echo_service: int) -> None:
    pid = echo_service
    # alpha holds the address at start (a test that failed half way may have left it on beta).
    first = "alpha" if echo_pid(cluster, "alpha") == pid else "beta"
    other = "beta" if first == "alpha" else "alpha"
    timings = []
    for src, dst in ((first, other), (other, first)):
        before = answered(cluster)
        result = cluster.orthros_json("migrate", str(pid), "--from", src, "--to", dst)
        timings.append((src, dst, result["timings_ms"]))
        pid = int(result["new_pid"])  # type: ignore[call-overload]
        assert SERVICE_IP in cluster.addresses(dst), f"{SERVICE_IP} did not move to {dst}"
        assert SERVICE_IP not in cluster.addresses(src), f"{src} still holds {SERVICE_IP}"
        assert echo_pid(cluster, src) is None, f"the service still runs on {src}"
        assert echo_pid(cluster, dst) == pid
        wait_all_progress(cluster, before)
    status = client_status(cluster)
    assert status["errors"] == 0, status["error_samples"]
    for src, dst, t in timings:
        print(f"\nVM migration {src} -> {dst}: {json.dumps(t)}")
    print(f"clients: {status['requests']} requests, longest wait {status['max_gap_s']:.3f} s")


# --- a container with cgroup v2 limits ------------------------------------------------------

CT_PARENT = "/sys/fs/cgroup/orthros-vm"
LIMITS = {"cpu.max": "50000 100000", "memory.max": "268435456"}


@pytest.fixture
def ct_name(cluster: Cluster) -> Iterator[str]:
    name = f"ct-{uuid.uuid4().hex[:6]}"
    yield name
    for h in ("alpha", "beta"):
        # The container's tree (wherever it runs by now), then its groups.
        cluster.ssh(h, f"for p in $(cat {CT_PARENT}/{name}/cgroup.procs 2>/dev/null); do "
                       f"kill -9 $p; done; sleep 0.5; rmdir {CT_PARENT}/{name} 2>/dev/null; "
                       f"rm -rf /var/tmp/{name}; true", check=False)


def ct_status(cluster: Cluster, host: str, name: str) -> dict[str, dict[str, object]]:
    r = cluster.ssh(host, f"{GUEST_PY} -m orthros_py.workloads.unixpair status --dir /var/tmp/{name}")
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_a_container_with_cgroup_v2_cpu_and_memory_limits_migrates_with_them(
        cluster: Cluster, ct_name: str) -> None:
    name = ct_name
    group = f"{CT_PARENT}/{name}"
    setup = (f"echo '+cpu +memory' > /sys/fs/cgroup/cgroup.subtree_control; mkdir -p {group}; "
             f"echo '+cpu +memory' > {CT_PARENT}/cgroup.subtree_control; "
             + "; ".join(f"echo {v!r} > {group}/{k}" for k, v in LIMITS.items()))
    cluster.ssh("alpha", setup)
    cluster.ssh("beta", "echo '+cpu +memory' > /sys/fs/cgroup/cgroup.subtree_control")
    out = cluster.ssh("alpha", f"{GUEST_PY} -m orthros_py.workloads.unixpair start --dir /var/tmp/{name} "
                               f"--sockets 50 --cgroup {group}", timeout=300).stdout
    started = json.loads(out.strip().splitlines()[-1])
    init_pid = int(started["init_pid"])
    before = ct_status(cluster, "alpha", name)
    # The container's directory holds its bound UNIX sockets and the log its output goes to
    # (written at start only): the destination must have them, as a real deployment's shared
    # storage would; the images carry neither directories nor regular files.
    log = cluster.ssh("alpha", f"base64 /var/tmp/{name}/unixpair.log").stdout
    cluster.ssh("beta", f"mkdir -p /var/tmp/{name} && base64 -d > /var/tmp/{name}/unixpair.log",
                input=log)

    result = cluster.orthros_json("migrate", str(init_pid), "--from", "alpha", "--to", "beta")
    new_pid = int(result["new_pid"])  # type: ignore[call-overload]
    print(f"\ncontainer migration: {json.dumps(result['timings_ms'])}")

    cg = cluster.ssh("beta", f"cat /proc/{new_pid}/cgroup").stdout.strip()
    assert cg == f"0::/orthros-vm/{name}", cg
    got = {k: cluster.ssh("beta", f"cat {group}/{k}").stdout.strip() for k in LIMITS}
    assert got == LIMITS, got
    assert cluster.ssh("alpha", f"test -d {group}", check=False).returncode != 0, \
        "alpha's group was left behind"
    # The container goes on: every socket carries messages, nothing lost, PIDs and names kept.
    deadline = time.monotonic() + 120
    while True:
        after = ct_status(cluster, "beta", name)
        if all(int(after[r]["rounds"]) > int(before[r]["rounds"]) + 5  # type: ignore[call-overload]
               for r in ("p1", "p2")) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for role, nspid in (("p1", 1), ("p2", 2)):
        s = after[role]
        assert s["errors"] == 0, s["first_error"]
        assert s["nspid"] == nspid and s["ipc_magic_ok"]
        assert int(s["rounds"]) > int(before[role]["rounds"]) + 5, (before[role], s)  # type: ignore[call-overload]
    with contextlib.suppress(KeyError):
        assert result["cgroups"]["restore"]["mismatches"] == []  # type: ignore[index]
