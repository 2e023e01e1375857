"""The memory workload as a real process: ``python -m orthros_py.workloads.memhog --mib 64``
fills its memory, says READY, answers PING, STAT and VERIFY over TCP (many requests on one
connection), and VERIFY finds a page that went bad behind its back (written from outside
through /proc/PID/mem, as a migration that restored a wrong page would leave it)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Spawner

from orthros_py.workloads.memhog import PAGE, MemClient, MemConn, tcp, wait_ready

MIB = 64


@pytest.fixture
def memhog(spawner: Spawner, tmp_path: Path) -> Iterator[tuple[int, int]]:
    log = tmp_path / "memhog.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orthros_py.workloads.memhog", "--mib", str(MIB),
             "--port", "0", "--hot-fraction", "0.25", "--rate", "1000"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    spawner.track(proc.pid)
    pid, port = wait_ready(log, timeout=60, alive=lambda: proc.poll() is None)
    assert pid == proc.pid
    yield pid, port
    proc.kill()
    proc.wait(10)


def test_memhog_answers_and_verifies(memhog: tuple[int, int]) -> None:
    _, port = memhog
    with MemConn(tcp(("127.0.0.1", port))) as c:
        first = c.ping()
        assert c.ping() == first + 1
        st = c.stat()
        assert st["pages"] == MIB * 256 and st["hot_pages"] == MIB * 64
        assert st["mismatches"] == 0
        time.sleep(0.3)
        res = c.verify()
        assert res.ok and res.pages == MIB * 256, res
        assert c.touch(0, 100) == 100
        later = c.stat()
        assert later["steps"] > st["steps"]  # the worker runs
        assert later["versions_sum"] > 0 and later["mismatches"] == 0
    with MemClient(tcp(("127.0.0.1", port)), rate=100) as client:
        time.sleep(0.3)
    log = client.snapshot()
    assert log.replies and not log.errors


def test_a_page_written_from_outside_is_caught(memhog: tuple[int, int]) -> None:
    pid, port = memhog
    with MemConn(tcp(("127.0.0.1", port))) as c:
        st = c.stat()
        bad_page = MIB * 256 - 3  # cold: the worker never touches it
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(int(st["addr"]) + bad_page * PAGE + 100)
            mem.write(b"\x00\xff")
        res = c.verify()
        assert (res.ok, res.bad, res.first_bad) == (False, 1, bad_page)
