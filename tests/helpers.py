"""Helpers for tests that run real processes: spawn, wait for a condition, kill and reap."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orthros_py.proc.tree import kill_tree

WORKLOADS = Path(__file__).resolve().parent / "workloads"


def reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is our child (restored trees are, via
    rst_sibling), so that its PID is free again for the next restore."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def wait_for(cond: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Spawner:
    """Starts real workload processes in their own session (as a daemon would be) and kills
    every one of them, and whatever they forked or were restored as, at the end of the test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pids: list[int] = []

    def workload(self, name: str, *args: str, stdout: Path | None = None,
                 prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
        out = open(stdout or self.tmp / f"{name}.out", "ab")  # noqa: SIM115 - kept by the child
        argv = [*(prefix or []), sys.executable, str(WORKLOADS / f"{name}.py"), *args]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True)
        out.close()
        self.pids.append(proc.pid)
        return proc

    def track(self, pid: int) -> int:
        self.pids.append(pid)
        return pid

    def cleanup(self) -> None:
        for pid in reversed(self.pids):
            kill_tree(pid)


def run_orthros(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run the real ``orthros`` command as a user would, capturing its output."""
    exe = str(Path(sys.executable).parent / "orthros")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def orthros_json(*args: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run ``orthros ARGS --json``, insist that it succeeded, and return what it printed."""
    res = run_orthros(*args, "--json", timeout=timeout)
    assert res.returncode == 0, (
        f"orthros {' '.join(args)} exited with {res.returncode}: {res.stderr.strip()}")
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def dump_cli(pid: int, images_dir: Path, *opts: str) -> dict[str, Any]:
    """``orthros dump PID -D DIR --json`` through the real command."""
    return orthros_json("dump", str(pid), "-D", str(images_dir), *opts)


def restore_cli(spawner: Spawner, images_dir: Path, *opts: str) -> dict[str, Any]:
    """``orthros restore -D DIR --detach --json``; the restored root is handed to ``spawner`` so
    that the test kills it whatever happens next (detached, it is PID 1's child by now)."""
    data = orthros_json("restore", "-D", str(images_dir), "--detach", *opts)
    spawner.track(int(data["pid"]))
    return data


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
