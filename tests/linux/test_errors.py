"""The ``orthros`` command's failures: exact exit statuses (errors.ExitStatus), one plain
sentence on stderr and no traceback; a failed dump leaves its process running as it was."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from helpers import Spawner, dump_cli, read_lines, run_orthros, wait_for

from orthros_py.errors import ExitStatus

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def assert_one_sentence(res: subprocess.CompletedProcess[str], status: ExitStatus,
                        *fragments: str) -> str:
    """The command exited with ``status`` and said why in one line, with no traceback."""
    err = res.stderr.strip()
    assert res.returncode == status, f"exit {res.returncode}, wanted {status}: {err}"
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("orthros: "), err
    for f in fragments:
        assert f in err, f"{f!r} not in {err!r}"
    assert res.stdout == ""
    return err


def free_pid() -> int:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return next(p for p in range(pid_max - 1, 300, -1) if not psutil.pid_exists(p))


def lines(path: Path) -> int:
    return len(read_lines(path))


def assert_still_counting(proc: subprocess.Popen[bytes], out: Path) -> None:
    n = lines(out)
    wait_for(lambda: lines(out) >= n + 5, what="the process to go on after the failed dump")
    assert proc.poll() is None


@pytest.mark.parametrize(
    ("pid", "fragment"),
    [(None, "no process with pid"), (1, "pid 1 is this host's init"),
     (2, "is a kernel thread")],
    ids=["nonexistent", "init", "kthreadd"],
)
def test_dump_of_a_process_that_cannot_be_dumped(
    tmp_path: Path, pid: int | None, fragment: str
) -> None:
    target = free_pid() if pid is None else pid
    res = run_orthros("dump", str(target), "-D", str(tmp_path / "img"))
    assert_one_sentence(res, ExitStatus.NO_SUCH_PROCESS, fragment)
    assert not (tmp_path / "img").exists()  # nothing is created for a dump refused up front


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real checkpoint of a counter (the counter itself is gone again)."""
    tmp = tmp_path_factory.mktemp("checkpoint")
    spawner = Spawner(tmp)
    try:
        proc = spawner.workload("counter", "0.05")
        wait_for(lambda: lines(tmp / "counter.out") >= 2, what="the counter to count")
        dump_cli(proc.pid, tmp / "images", "--leave-running")
    finally:
        spawner.cleanup()
    yield tmp / "images"


def test_restore_from_a_missing_directory(tmp_path: Path) -> None:
    res = run_orthros("restore", "-D", str(tmp_path / "nothing-here"))
    assert_one_sentence(res, ExitStatus.BAD_IMAGE, "does not exist")


def test_restore_from_an_empty_directory(tmp_path: Path) -> None:
    res = run_orthros("restore", "-D", str(tmp_path))
    assert_one_sentence(res, ExitStatus.BAD_IMAGE, "holds no checkpoint")


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p: Path) -> None:
    p.write_bytes(bytes(range(7, 250, 3)) * 3)


def _garbage_after_magic(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:8] + b"\xff\x00\x13\x37" * 16)


@pytest.mark.parametrize(
    ("image", "damage"),
    [("pstree.img", _truncate), ("pstree.img", lambda p: p.write_bytes(b"")),
     ("pstree.img", _garbage), ("pstree.img", _garbage_after_magic),
     ("inventory.img", _garbage)],
    ids=["pstree-truncated", "pstree-empty", "pstree-garbage", "pstree-bad-body",
         "inventory-garbage"],
)
def test_restore_from_a_corrupt_image(
    checkpoint: Path, tmp_path: Path, image: str, damage: Callable[[Path], object]
) -> None:
    images = tmp_path / "images"
    shutil.copytree(checkpoint, images)
    damage(images / image)
    res = run_orthros("restore", "-D", str(images), "--detach")
    assert_one_sentence(res, ExitStatus.BAD_IMAGE, "is corrupt", image)


def test_criu_refusal_keeps_criu_reason_and_the_process_running(
    spawner: Spawner, tmp_path: Path
) -> None:
    # The counter runs under a shell that leads the session: the counter is no session leader,
    # and CRIU will not dump a session whose leader stays behind unless told --shell-job.
    out = tmp_path / "counter.out"
    shell = spawner.workload("counter", "0.02", stdout=out,
                             prefix=["sh", "-c", '"$@" & wait', "sh"])
    wait_for(lambda: lines(out) >= 3, what="the counter to count")
    counter = psutil.Process(shell.pid).children()[0].pid

    res = run_orthros("dump", str(counter), "-D", str(tmp_path / "img"))
    err = assert_one_sentence(res, ExitStatus.CRIU_FAILED, f"CRIU refused the dump of pid {counter}",
                              f"The root process {counter} is not a session leader")
    assert "dump.log" in err  # where CRIU's whole story is
    assert (tmp_path / "img" / "dump.log").exists()
    assert_still_counting(shell, out)
    assert psutil.Process(counter).status() != psutil.STATUS_STOPPED


def test_non_root_is_refused_and_the_process_left_alone(
    spawner: Spawner, tmp_path: Path, checkpoint: Path
) -> None:
    orthros = str(Path(sys.executable).parent / "orthros")  # as run_orthros runs it
    out = tmp_path / "counter.out"
    proc = spawner.workload("counter", "0.02", stdout=out)
    wait_for(lambda: lines(out) >= 3, what="the counter to count")

    for args, what in (
        (["dump", str(proc.pid), "-D", str(tmp_path / "img")], "dump needs root"),
        (["restore", "-D", str(checkpoint)], "restore needs root"),
    ):
        res = subprocess.run([*NOBODY, orthros, *args], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
        assert_one_sentence(res, ExitStatus.NOT_ROOT, what)
    assert not (tmp_path / "img").exists()
    assert_still_counting(proc, out)


def test_refusal_after_the_freeze_leaves_the_server_serving(
    spawner: Spawner, tmp_path: Path
) -> None:
    # CRIU finds the established connection only while it dumps the frozen tree's files, well
    # after the freeze: the refusal must thaw the server, and its client must not notice.
    out = tmp_path / "server.out"
    server = spawner.workload("echo_server", "127.0.0.1", "0", stdout=out)
    wait_for(lambda: any(ln.startswith("listening ") for ln in read_lines(out)),
             what="the echo server to listen")
    port = int(read_lines(out)[0].split()[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        client.sendall(b"before\n")
        assert client.recv(64) == b"before\n"
        res = run_orthros("dump", str(server.pid), "-D", str(tmp_path / "img"))
        assert_one_sentence(res, ExitStatus.CRIU_FAILED,
                            "Connected TCP socket, consider using --tcp-established")
        client.sendall(b"after\n")
        assert client.recv(64) == b"after\n"
    assert server.poll() is None
