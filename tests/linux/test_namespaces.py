"""A tree in its own PID and UTS namespaces keeps its PIDs and hostname across a dump and a
restore (real CRIU, root).

tests/workloads/ns_worker.py runs under ``unshare --pid --uts --fork``: it is the namespace's
init (pid 1), sets the hostname and forks a child (pid 2); both keep printing what they see from
inside. The tree dumped is rooted at that init, the child of unshare: CRIU refuses to dump
unshare itself ("Can't dump nested pid namespace"), which the last test pins down.

With ``--mount-proc`` the tree also has a mount namespace of its own, a copy of the host's.
CRIU 4.2.1 can rebuild it only given a root filesystem (without one it crashes: "mnt: BUG at
criu/mount.c:48"); orthros passes the host's / when the namespace's root mount is the host's
root filesystem. Mounts that other software on this host adds and CRIU cannot dump (bpffs,
nsfs) are detached from the workload's private copy by the workload itself.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import psutil
import pytest
from helpers import Spawner, dump_cli, read_lines, restore_cli, run_orthros, wait_for

HOSTNAME = "orthros-ns-test"
TICK = "0.05"
LINE = re.compile(r"^(init|child) pid=(\d+)(?: ppid=(\d+))? host=(\S+) n=(\d+)$")


def reports(path: Path) -> list[dict[str, str]]:
    out = []
    for line in read_lines(path):
        m = LINE.match(line)
        if m:
            out.append({"role": m[1], "pid": m[2], "ppid": m[3] or "", "host": m[4], "n": m[5]})
    return out


def seen_both(path: Path, since: int, count: int) -> bool:
    rs = reports(path)[since:]
    return all(sum(r["role"] == role for r in rs) >= count for role in ("init", "child"))


def ns_inode(pid: int | str, ns: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{ns}").st_ino


def nspid(pid: int) -> list[int]:
    """The pid of a process in each PID namespace it belongs to, outermost first."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no NSpid line for {pid}")


def start(spawner: Spawner, out: Path, mount_proc: bool) -> tuple[subprocess.Popen[bytes], int]:
    """Start the workload under unshare; return unshare and the namespace's init (host pid)."""
    prefix = ["unshare", "--pid", "--uts", "--fork", *(["--mount-proc"] if mount_proc else [])]
    proc = spawner.workload("ns_worker", HOSTNAME, TICK, str(ns_inode("self", "mnt")),
                            stdout=out, prefix=prefix)
    wait_for(lambda: seen_both(out, 0, 3), what="the namespace's init and child to report")
    init = psutil.Process(proc.pid).children()[0].pid
    return proc, init


@pytest.mark.parametrize("mount_proc", [True, False], ids=["mount-proc", "host-proc"])
def test_pid_and_uts_namespaces_survive_dump_and_restore(
    spawner: Spawner, images: Path, tmp_path: Path, mount_proc: bool
) -> None:
    our_hostname = socket.gethostname()
    out = tmp_path / "ns.out"
    unshare, init = start(spawner, out, mount_proc)
    assert ns_inode(init, "pid") != ns_inode("self", "pid")
    assert ns_inode(init, "uts") != ns_inode("self", "uts")
    assert (ns_inode(init, "mnt") != ns_inode("self", "mnt")) == mount_proc

    dumped = dump_cli(init, images)
    assert unshare.wait(timeout=10) != 0  # unshare goes when its child, the init, is killed
    assert len(dumped["processes"]) == 2
    before = reports(out)
    last_n = max(int(r["n"]) for r in before if r["role"] == "init")

    restored = restore_cli(spawner, images)
    root = int(restored["pid"])
    wait_for(lambda: seen_both(out, len(before), 5), what="the restored tree to report")
    after = reports(out)[len(before):]
    for r in after:
        assert r["host"] == HOSTNAME, r
        if r["role"] == "init":
            assert r["pid"] == "1", r
        else:
            assert (r["pid"], r["ppid"]) == ("2", "1"), r
    # The init's count goes on from its memory.
    assert next(int(r["n"]) for r in after if r["role"] == "init") == last_n + 1

    # Seen from the host: a new PID namespace in which the root is 1 and its child 2, and a UTS
    # namespace of its own that holds the hostname while ours keeps ours.
    assert nspid(root)[-1] == 1
    child = psutil.Process(root).children()[0].pid
    assert nspid(child)[-1] == 2
    # orthros reports the PIDs the host can signal, not the namespace's 1 and 2.
    assert restored["pids"] == [root, child]
    assert ns_inode(root, "pid") != ns_inode("self", "pid")
    assert ns_inode(root, "uts") != ns_inode("self", "uts")
    assert (ns_inode(root, "mnt") != ns_inode("self", "mnt")) == mount_proc
    inside = subprocess.run(["nsenter", "-t", str(root), "--uts", "hostname"],
                            capture_output=True, text=True, timeout=10, check=True)
    assert inside.stdout.strip() == HOSTNAME
    assert socket.gethostname() == our_hostname


def test_dumping_unshare_above_the_pid_namespace_is_refused(
    spawner: Spawner, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ns.out"
    unshare, _ = start(spawner, out, mount_proc=False)
    res = run_orthros("dump", str(unshare.pid), "-D", str(images))
    assert res.returncode == 7, res.stderr
    assert "Can't dump nested pid namespace" in res.stderr
    # The refused dump left the tree running.
    n = len(reports(out))
    wait_for(lambda: len(reports(out)) >= n + 4, what="the tree to go on after the refusal")
    assert unshare.poll() is None
