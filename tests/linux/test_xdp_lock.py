"""The XDP lock inside a real dump and restore: it is what keeps connections alive.

A server with 100 connections, traffic on every one at once, and a two-second window between
the dump (which kills the server) and the restore. Without a lock the clients' packets meet a
port with no socket and are answered with resets: the control run must break. With the xdp lock
the packets are dropped, retransmitted after the restore, and every reply arrives.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import Spawner, dump_cli, restore_cli, run_orthros, wait_for

from orthros_py.workloads.echo import ClientPool

CLIENTS = 100
WINDOW_S = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(spawner: Spawner, port: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "orthros_py.workloads.echo", "--port", str(port),
                             *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    spawner.track(proc.pid)

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, what="the echo server to listen")
    return proc


def netlock_status() -> dict[str, Any]:
    res = run_orthros("netlock", "status", "--json")
    assert res.returncode == 0, res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    return data


# The dumps here pin the lock: it goes again afterwards if it was not pinned before.
pytestmark = pytest.mark.usefixtures("xdp_pins_as_found")


@pytest.fixture(autouse=True)
def no_lock_left() -> Any:
    yield
    # Every path of dump/restore must leave none of this test's connections (all on loopback)
    # in the map and no program on lo. The map is host-wide: other locks are not ours to judge.
    status = netlock_status()
    ours = [c for c in status["conns"] if "127.0.0.1" in (c["local"][0], c["remote"][0])]
    on_lo = [a for a in status["attachments"] if a["iface"] == "lo"]
    if ours or on_lo:
        # Undo exactly what this test left: its own connections and lo, never the host's lock.
        conns = [f"{c['local'][0]}:{c['local'][1]},{c['remote'][0]}:{c['remote'][1]}"
                 for c in ours]
        run_orthros("netlock", "unlock", "--iface", "lo",
                    *[arg for c in conns for arg in ("--conn", c)])
    assert ours == [], status
    assert on_lo == [], status


def migrate_locally(spawner: Spawner, images: Path, lock: str) -> tuple[ClientPool, dict[str, Any],
                                                                         dict[str, Any]]:
    port = free_port()
    server = start_server(spawner, port)
    pool = ClientPool("127.0.0.1", port, CLIENTS, timeout=15)
    pool.round()  # every connection established and answered once
    dumped = dump_cli(server.pid, images, "--tcp-established", "--network-lock", lock)
    server.wait()  # CRIU killed it; reap so that its PID is free for the restore
    # The service is gone: every client sends now, into the window.
    for i, s in enumerate(pool.socks):
        try:
            s.sendall(f"{i}:window;".encode())
        except OSError as err:
            pool.stats.errors += 1
            pool.stats.error_samples.append(f"send during window: {err}")
    time.sleep(WINDOW_S)  # the window itself is what is measured: a fixed length on purpose
    restored = restore_cli(spawner, images, "--tcp-established", "--network-lock", lock)
    for i, s in enumerate(pool.socks):
        want = f"{i}:window;".encode()
        try:
            got = b""
            while len(got) < len(want):
                chunk = s.recv(len(want) - len(got))
                if not chunk:
                    raise ConnectionResetError("closed")
                got += chunk
            if got != want:
                raise AssertionError(f"wrong echo {got!r}")
        except (OSError, AssertionError) as err:
            pool.stats.errors += 1
            pool.stats.error_samples.append(f"conn {i}: {err}")
    return pool, dumped, restored


def test_control_without_lock_breaks(spawner: Spawner, images: Path) -> None:
    pool, _, _ = migrate_locally(spawner, images, "skip")
    try:
        assert pool.stats.errors > CLIENTS // 2, (
            "without a lock the clients should have been reset; the control proves nothing")
    finally:
        pool.close()


def test_xdp_lock_keeps_every_connection(spawner: Spawner, images: Path) -> None:
    pool, dumped, restored = migrate_locally(spawner, images, "xdp")
    try:
        assert pool.stats.errors == 0, pool.stats.error_samples
        pool.round()  # and the connections go on carrying traffic
        assert pool.stats.errors == 0, pool.stats.error_samples
    finally:
        pool.close()
    assert dumped["lock"]["method"] == "xdp"
    assert dumped["lock"]["conns"] == CLIENTS
    assert dumped["lock"]["held"] is True  # the tree is gone: its connections wait, locked
    assert restored["lock"]["conns"] == CLIENTS
    assert restored["lock"]["held"] is False
    print(f"\nxdp lock of {CLIENTS} conns: {dumped['lock']['lock_ms']} ms, "
          f"unlock {restored['lock']['unlock_ms']} ms")


def test_leave_running_dump_unlocks_at_once(spawner: Spawner, images: Path) -> None:
    port = free_port()
    server = start_server(spawner, port)
    pool = ClientPool("127.0.0.1", port, 20, timeout=10)
    try:
        pool.round()
        dumped = dump_cli(server.pid, images, "--tcp-established", "--leave-running",
                          "--network-lock", "xdp")
        assert dumped["lock"]["conns"] == 20 and dumped["lock"]["held"] is False
        pool.round()
        assert pool.stats.errors == 0, pool.stats.error_samples
    finally:
        pool.close()


def test_sigkill_mid_dump_leaves_a_lock_that_unlock_clears(spawner: Spawner,
                                                            tmp_path: Path) -> None:
    port = free_port()
    # Enough memory that the dump takes a while: time to kill orthros while it holds the lock.
    server = start_server(spawner, port, "--ballast-mb", "1500")
    pool = ClientPool("127.0.0.1", port, 10, timeout=5)
    exe = str(Path(sys.executable).parent / "orthros")
    dumper = subprocess.Popen([exe, "dump", str(server.pid), "-D", str(tmp_path / "img"),
                               "--tcp-established", "--leave-running", "--network-lock", "xdp"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        pool.round()
        wait_for(lambda: len(netlock_status()["conns"]) == 10, timeout=60,
                 what="the dump to lock the connections")
        dumper.send_signal(signal.SIGKILL)
        dumper.wait()
        # CRIU's own worker may still be finishing: wait for it to let go of the tree.
        wait_for(lambda: not any(p.isdigit() and _is_criu(int(p)) for p in os.listdir("/proc")),
                 timeout=60, what="CRIU to finish")
        status = netlock_status()
        assert len(status["conns"]) == 10, "the lock must outlive a crashed orthros"
        # The operator's way out: unlock that tree's connections (the server still runs: the
        # dump was --leave-running), with the same arguments 'lock' would take.
        unlocked = run_orthros("netlock", "unlock", "--pid", str(server.pid), "--iface", "lo")
        assert unlocked.returncode == 0, unlocked.stderr
        assert [c for c in netlock_status()["conns"]
                if port in (c["local"][1], c["remote"][1])] == []
        pool.round()  # traffic flows again
        assert pool.stats.errors == 0, pool.stats.error_samples
    finally:
        if dumper.poll() is None:
            dumper.kill()
            dumper.wait()
        pool.close()


def _is_criu(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "criu"
    except OSError:
        return False


# Runs its arguments (two orthros commands) in a private mount namespace with an empty BPF
# filesystem: no pinned program is visible there, so the lock would have to compile, and the
# host's own pins (an operator's locks) are neither seen nor touched.
_EMPTY_BPFFS = """
import ctypes, json, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 0x4000, 1 << 18
for rc in (libc.unshare(CLONE_NEWNS), libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None),
           libc.mount(b"bpf", b"/sys/fs/bpf", b"bpf", 0, None)):
    if rc != 0:
        raise OSError(ctypes.get_errno(), "mount namespace with an empty bpffs")
out = []
for argv in json.loads(sys.argv[1]):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    out.append({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr})
print(json.dumps(out))
"""


def test_bcc_missing_is_one_sentence_and_loads_nothing(tmp_path: Path) -> None:
    fake = tmp_path / "bcc"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise ImportError("libbcc.so.0: cannot open shared object")\n')
    exe = str(Path(sys.executable).parent / "orthros")
    runs = subprocess.run(
        [sys.executable, "-c", _EMPTY_BPFFS,
         json.dumps([[exe, "netlock", "prepare"], [exe, "netlock", "status", "--json"]])],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)},
        timeout=150, stdin=subprocess.DEVNULL)
    assert runs.returncode == 0, runs.stderr
    prepare, status = json.loads(runs.stdout)
    assert prepare["rc"] == 4, prepare["stderr"]
    assert "BCC" in prepare["stderr"] and "Traceback" not in prepare["stderr"]
    assert status["rc"] == 0, status["stderr"]
    assert json.loads(status["stdout"])["loaded"] is False


def test_no_bpf_permission_is_one_sentence_and_attaches_nothing() -> None:
    exe = str(Path(sys.executable).parent / "orthros")
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", exe,
                          "netlock", "lock", "--iface", "lo", "--conn", "127.0.0.1:1,127.0.0.1:2"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 8, res.stderr
    assert "no permission" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1
