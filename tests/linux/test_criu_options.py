"""The CRIU options real services need, each on a real process that needs it (real CRIU, root).

tests/workloads/holder.py holds what the option is for: file locks (--file-locks), an inotify
watch on a file it unlinked while a hard link remains (--link-remap), a deleted-but-open file
above CRIU's 1 MiB ghost limit (--ghost-limit), a device hidden under a remounted directory
(--evasive-devices), connections not yet accepted (--skip-in-flight), a bind mount in its own
mount namespace (--external), memory whose image a restore can give back (--auto-dedup). Where
CRIU refuses without the option, orthros's one sentence must name it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import (
    Spawner,
    dump_cli,
    read_lines,
    restore_cli,
    run_orthros,
    wait_for,
)

from orthros_py.errors import ExitStatus

GHOST_SIZE = 3 << 20  # above CRIU's default ghost limit, 1 MiB


# The tcp-close runs with the xdp lock pin it: it goes again if it was not pinned before.
pytestmark = pytest.mark.usefixtures("xdp_pins_as_found")


def start(spawner: Spawner, out: Path, *args: str,
          prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
    proc = spawner.workload("holder", *args, stdout=out, prefix=prefix)
    wait_for(lambda: any(ln.startswith(("ready", "listening")) for ln in read_lines(out)),
             what=f"holder {args[0]} to be ready")
    return proc


def lines_after(out: Path, n: int, prefix: str) -> list[str]:
    return [ln for ln in read_lines(out)[n:] if ln.startswith(prefix)]


def assert_refused(pid: int, images: Path, fix: str, *opts: str) -> None:
    """A dump without the option fails with one sentence naming ``fix``; the tree runs on."""
    res = run_orthros("dump", str(pid), "-D", str(images), *opts)
    err = res.stderr.strip()
    assert res.returncode == ExitStatus.CRIU_FAILED, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert fix in err, f"{fix!r} not in {err!r}"
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def kill_restored(pid: int) -> None:
    """Kill a detached restored root (PID 1 reaps it) and wait until it is gone."""
    os.kill(pid, 9)
    wait_for(lambda: not psutil.pid_exists(pid)
             or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, what=f"pid {pid} to go")


def locks_free(d: Path) -> tuple[bool, bool]:
    """Whether this process could take (flock, POSIX) exclusive locks on the holder's files."""
    free = []
    for name, take in (("flock.lock", lambda f: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)),
                       ("posix.lock", lambda f: fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB))):
        with (d / name).open("a") as f:
            try:
                take(f)
            except OSError as err:
                assert err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES), err
                free.append(False)
            else:
                free.append(True)
    return free[0], free[1]


def test_file_locks_are_refused_without_the_option_and_held_again_after_restore(
    spawner: Spawner, tmp_path: Path
) -> None:
    d, out = tmp_path / "locks", tmp_path / "holder.out"
    d.mkdir()
    proc = start(spawner, out, "locks", str(d))
    assert locks_free(d) == (False, False)
    assert_refused(proc.pid, tmp_path / "refused", "pass --file-locks")

    images = tmp_path / "images"
    dump_cli(proc.pid, images, "--file-locks")
    proc.wait(timeout=10)
    assert locks_free(d) == (True, True)  # the dumped holder is gone, and its locks with it

    n = len(read_lines(out))
    restored = restore_cli(spawner, images, "--file-locks")
    assert restored["pid"] == proc.pid
    wait_for(lambda: len(lines_after(out, n, "holding")) >= 3, what="the restored holder")
    assert locks_free(d) == (False, False)  # both locks are the restored process's again
    kill_restored(restored["pid"])
    assert locks_free(d) == (True, True)


def test_inotify_watch_on_an_unlinked_file_needs_link_remap(
    spawner: Spawner, tmp_path: Path
) -> None:
    d, out = tmp_path / "watched", tmp_path / "holder.out"
    d.mkdir()
    proc = start(spawner, out, "inotify", str(d))
    wd = read_lines(out)[0].split()[1]
    assert_refused(proc.pid, tmp_path / "refused", "pass --link-remap")

    images = tmp_path / "images"
    dump_cli(proc.pid, images, "--link-remap")
    proc.wait(timeout=10)
    assert any(p.name.startswith("link_remap.") for p in d.iterdir())  # CRIU's hard link

    n = len(read_lines(out))
    restore_cli(spawner, images)
    # The restored watch still sees the file: a write through its other name is reported.
    with (d / "watched.hard").open("a") as f:
        f.write("after the restore\n")
    wait_for(lambda: any(ln.startswith(f"event {wd} ") and int(ln.split()[2], 16) & 0x2
                         for ln in lines_after(out, n, "event")),
             what="IN_MODIFY on the restored watch")
    assert sorted(p.name for p in d.iterdir()) == ["watched.hard"]  # the remap link is gone


def test_a_deleted_file_above_the_ghost_limit_needs_ghost_limit(
    spawner: Spawner, tmp_path: Path
) -> None:
    d, out = tmp_path / "scratch", tmp_path / "holder.out"
    d.mkdir()
    proc = start(spawner, out, "ghost", str(d), str(GHOST_SIZE))
    digest = read_lines(out)[0].split()[1]
    assert_refused(proc.pid, tmp_path / "refused", "raise --ghost-limit")

    images = tmp_path / "images"
    dump_cli(proc.pid, images, "--ghost-limit", "4M")
    proc.wait(timeout=10)
    ghosts = list(images.glob("ghost-file-*.img"))
    assert len(ghosts) == 1 and ghosts[0].stat().st_size >= GHOST_SIZE

    n = len(read_lines(out))
    restore_cli(spawner, images)
    wait_for(lambda: lines_after(out, n, "check"), what="the restored holder to read its file")
    assert lines_after(out, n, "check")[0] == f"check {digest} {GHOST_SIZE}"


@pytest.fixture
def hidden_device(tmp_path: Path) -> Iterator[Path]:
    """DIR/null (/dev/null's device), then a tmpfs over DIR holding another node for it."""
    d = tmp_path / "dev"
    d.mkdir()
    os.mknod(d / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    yield d
    subprocess.run(["umount", "--lazy", str(d)], capture_output=True)


def test_a_device_hidden_under_a_remount_needs_evasive_devices(
    spawner: Spawner, tmp_path: Path, hidden_device: Path
) -> None:
    out = tmp_path / "holder.out"
    path = hidden_device / "null"
    proc = start(spawner, out, "device", str(path))
    subprocess.run(["mount", "-t", "tmpfs", "orthros-test", str(hidden_device)], check=True)
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert_refused(proc.pid, tmp_path / "refused", "pass --evasive-devices")

    images = tmp_path / "images"
    dump_cli(proc.pid, images, "--evasive-devices")
    proc.wait(timeout=10)
    n = len(read_lines(out))
    restored = restore_cli(spawner, images)
    wait_for(lambda: len(lines_after(out, n, "wrote")) >= 3, what="the restored holder")
    st = os.stat(f"/proc/{restored['pid']}/fd/3")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_connections_not_yet_accepted_need_skip_in_flight(
    spawner: Spawner, tmp_path: Path
) -> None:
    out = tmp_path / "holder.out"
    proc = start(spawner, out, "listen")
    port = int(read_lines(out)[0].split()[1])
    waiting = socket.create_connection(("127.0.0.1", port), timeout=5)  # queued, never accepted
    try:
        assert_refused(proc.pid, tmp_path / "refused", "pass --skip-in-flight")
        images = tmp_path / "images"
        dump_cli(proc.pid, images, "--skip-in-flight")
        proc.wait(timeout=10)
        # The queued connection was dropped with its listener: its client is told so.
        with contextlib.suppress(ConnectionResetError):
            assert waiting.recv(1) == b""
    finally:
        waiting.close()
    restore_cli(spawner, images)
    # The restored listener takes new connections (the handshake is the kernel's).
    socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("lock", ["skip", "xdp", "iptables"])
def test_tcp_close_restores_the_listener_and_resets_the_old_connections(
    spawner: Spawner, tmp_path: Path, lock: str
) -> None:
    out = tmp_path / "server.out"
    spawner.workload("echo_server", "127.0.0.1", "0", stdout=out)
    wait_for(lambda: any(ln.startswith("listening ") for ln in read_lines(out)),
             what="the echo server to listen")
    server_pid = spawner.pids[-1]
    port = int(next(ln for ln in read_lines(out) if ln.startswith("listening ")).split()[1])
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
    try:
        for c in clients:
            c.sendall(b"hello\n")
            assert c.recv(6) == b"hello\n"
        images = tmp_path / "images"
        dump_cli(server_pid, images, "--tcp-established", "--network-lock", lock)
        restore_cli(spawner, images, "--tcp-close", "--network-lock", lock)
        for i, c in enumerate(clients):
            start_t = time.monotonic()
            c.sendall(b"again\n")
            try:
                got = c.recv(6)
            except ConnectionResetError:
                got = b""
            assert got == b"", f"connection {i} was restored: {got!r}"
            assert time.monotonic() - start_t < 2, f"connection {i} was not reset at once"
        fresh = socket.create_connection(("127.0.0.1", port), timeout=5)
        with fresh:
            fresh.sendall(b"new\n")
            assert fresh.recv(4) == b"new\n"
        # Nothing of the dump's lock stays behind (CRIU's iptables rules: orthros removes them).
        rules = subprocess.run(["iptables-save", "-t", "filter"], capture_output=True,
                               text=True, check=True).stdout
        assert f"--sport {port} " not in rules and f"--dport {port} " not in rules, rules
    finally:
        for c in clients:
            c.close()


def test_external_mount_is_bound_where_the_restore_says(
    spawner: Spawner, tmp_path: Path
) -> None:
    vol_a, vol_b, data = tmp_path / "vol_a", tmp_path / "vol_b", tmp_path / "data"
    for d, text in ((vol_a, "A"), (vol_b, "B"), (data, "host")):
        d.mkdir()
        (d / "marker").write_text(text)
    out = tmp_path / "holder.out"
    host_mntns = os.stat("/proc/self/ns/mnt").st_ino
    proc = start(spawner, out, "volume", str(vol_a), str(data), str(host_mntns),
                 prefix=["unshare", "--mount"])
    wait_for(lambda: lines_after(out, 0, "marker A"), what="the volume to be mounted")

    images = tmp_path / "images"
    dump_cli(proc.pid, images, "--external", f"mnt[{data}]:volume")
    proc.wait(timeout=10)
    n = len(read_lines(out))
    restore_cli(spawner, images, "--external", f"mnt[volume]:{vol_b}")
    wait_for(lambda: len(lines_after(out, n, "marker")) >= 3, what="the restored holder")
    assert set(lines_after(out, n, "marker")) == {"marker B"}  # the volume moved to vol_b
    assert (data / "marker").read_text() == "host"  # and the host's own view is untouched


def test_auto_dedup_gives_the_pages_image_back_as_it_restores(
    spawner: Spawner, tmp_path: Path
) -> None:
    out = tmp_path / "holder.out"
    proc = start(spawner, out, "memory", "64")
    images = tmp_path / "images"
    dump_cli(proc.pid, images)
    proc.wait(timeout=10)
    pages = max(images.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    before = pages.stat()
    assert before.st_blocks * 512 >= 64 << 20

    n = len(read_lines(out))
    restore_cli(spawner, images, "--auto-dedup")
    wait_for(lambda: len(lines_after(out, n, "memory")) >= 3, what="the restored holder")
    assert set(lines_after(out, n, "memory")) == {"memory ok"}
    after = pages.stat()
    # The file keeps its size; its pages are punched out (holes), so its blocks are freed.
    assert after.st_size == before.st_size
    assert after.st_blocks * 512 < (1 << 20), (before.st_blocks, after.st_blocks)


def test_a_root_that_leads_no_session_is_refused_with_setsid_or_shell_job(
    spawner: Spawner, tmp_path: Path
) -> None:
    out = tmp_path / "holder.out"
    # A job started from a shell: the shell leads a new session and the holder is its child.
    # (Not pytest's own session: under a CI runner its leader may lie outside our PID namespace.)
    shell = start(spawner, out, "memory", "1", prefix=["sh", "-c", '"$0" "$@" & wait'])
    proc = psutil.Process(shell.pid).children()[0]
    spawner.track(proc.pid)
    assert os.getsid(proc.pid) == shell.pid != proc.pid
    assert_refused(proc.pid, tmp_path / "refused", "start it with setsid, or pass --shell-job")
    images = tmp_path / "images"
    dump_cli(proc.pid, images, "--shell-job")  # the fix it names works
    shell.wait(timeout=10)


def test_a_session_leader_outside_the_pid_namespace_is_refused_with_setsid(
    spawner: Spawner, tmp_path: Path
) -> None:
    out = tmp_path / "holder.out"
    # unshare leads the session (Spawner's setsid) and stays outside the namespace it made.
    unshare = start(spawner, out, "memory", "1", prefix=["unshare", "--pid", "--fork"])
    init = psutil.Process(unshare.pid).children()[0].pid
    assert_refused(init, tmp_path / "refused", "start the namespace's init with setsid")
