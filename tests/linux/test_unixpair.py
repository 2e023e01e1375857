"""The paper's container workload survives a dump and a restore (real CRIU, root).

orthros_py.workloads.unixpair runs two processes in PID, UTS, IPC and mount namespaces of their own,
each holding N accepted and N connected UNIX stream sockets to the other and its bound listener,
exchanging counters on every socket in lockstep. After the restore the counters must go on with
no error on any socket, the peers must still be PIDs 1 and 2 with their hostname, and their SysV
shared memory segment must still be found by its key and hold its magic.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Spawner, dump_cli, restore_cli

from orthros_py.errors import OrthrosError
from orthros_py.workloads import unixpair

HOSTNAME = "orthros-ctr-test"
OWN_NAMESPACES = ("pid", "uts", "ipc", "mnt")


def ns_inode(pid: int | str, ns: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{ns}").st_ino


def host_shm_keys() -> set[int]:
    """The SysV shm keys of our own IPC namespace."""
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {int(line.split()[0]) for line in lines}


@pytest.fixture
def containers() -> Iterator[list[unixpair.Container]]:
    """Every container a test starts is killed and its files removed, also on failure."""
    made: list[unixpair.Container] = []
    try:
        yield made
    finally:
        for c in made:
            c.stop()


@pytest.mark.parametrize("sockets", [50, 500])
def test_container_keeps_talking_after_dump_and_restore(
    spawner: Spawner, images: Path, tmp_path: Path, containers: list[unixpair.Container],
    sockets: int,
) -> None:
    c = unixpair.start(tmp_path / "ctr", sockets=sockets, hostname=HOSTNAME)
    containers.append(c)
    c.wait_ready(timeout=60)
    before = c.wait_progress(5)
    for ns in OWN_NAMESPACES:
        assert ns_inode(c.init_pid, ns) != ns_inode("self", ns), ns
    assert unixpair.SHM_KEY not in host_shm_keys()  # the segment lives in the container's IPC ns

    pids = c.host_pids()
    assert len(pids) == 2
    dumped = dump_cli(c.init_pid, images)
    assert sorted(p["pid"] for p in dumped["processes"]) == sorted(pids)
    # Each process: N accepted, N connected and its listener.
    assert len(dumped["unix"]) == 2 * (2 * sockets + 1)
    assert c.host_pids() == []  # the dump killed the tree

    restored = restore_cli(spawner, images)
    root = int(restored["pid"])
    c.adopt(root)
    print(f"\nunixpair {sockets} sockets: dump {dumped['elapsed_ms']:.0f} ms "
          f"{json.dumps(dumped['stats'])}; restore {restored['elapsed_ms']:.0f} ms "
          f"{json.dumps(restored['stats'])}")

    after = c.wait_progress(20, timeout=60)
    for nspid, role in enumerate(unixpair.ROLES, start=1):
        st = after[role]
        assert st["errors"] == 0, st
        assert st["nspid"] == nspid, st
        assert st["hostname"] == HOSTNAME, st
        assert st["ipc_magic_ok"] is True, st
        assert st["sockets"] == 2 * sockets, st
        # Counters went on from memory: no peer started over.
        assert st["rounds"] >= before[role]["rounds"] + 20, (before[role], st)
    assert len(c.host_pids()) == 2
    for ns in OWN_NAMESPACES:
        assert ns_inode(root, ns) != ns_inode("self", ns), ns
    assert unixpair.SHM_KEY not in host_shm_keys()


def test_a_dead_peer_is_counted_as_errors(
    tmp_path: Path, containers: list[unixpair.Container]
) -> None:
    """The check is not vacuous: when P2 dies, P1 reports its sockets broken."""
    c = unixpair.start(tmp_path / "ctr", sockets=50, hostname=HOSTNAME)
    containers.append(c)
    c.wait_ready(timeout=60)
    p2 = c.host_pids()[1]
    os.kill(p2, signal.SIGKILL)
    with pytest.raises(OrthrosError, match=r"unixpair p1 counted \d+ errors .*(EOF|Broken pipe|Connection reset)"):
        c.wait_progress(50, timeout=20)
    assert c.host_pids() == [c.init_pid]  # P1, the init, reaped P2 and goes on


def test_restorable_socket_count_under_our_limit() -> None:
    # Found by hand under RLIMIT_NOFILE 20,000: 4980 restores, 4990 and 5000 are refused.
    assert unixpair.max_restorable_sockets(20000) == 4980
