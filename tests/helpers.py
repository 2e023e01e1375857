"""Helpers for tests that run real processes: spawn, wait for a condition, kill and reap."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

WORKLOADS = Path(__file__).resolve().parent / "workloads"


def kill_tree(pid: int, timeout: float = 5.0) -> None:
    """SIGKILL a process and all its descendants, and reap those that are our children."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)
    reap(pid)


def reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is our child (restored trees are, via
    rst_sibling), so that its PID is free again for the next restore."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


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


