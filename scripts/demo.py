#!/usr/bin/env python3
"""The main job, as a user would run it: checkpoint a live TCP service while its clients talk to
it, restore it, and show that no client noticed.

Runs the real ``orthros`` commands (dump, inspect, restore) against a real echo server holding
50 established connections with traffic on all of them. Needs root. Leaves nothing running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orthros_py.bench.echo import ClientPool

CLIENTS = 50
PORT = 18_470
console = Console(stderr=True)
ORTHROS = str(Path(sys.executable).parent / "orthros")


def orthros(*args: str) -> dict[str, Any]:
    console.print(f"[bold cyan]$ orthros {' '.join(args)}[/]")
    proc = subprocess.run([ORTHROS, *args, "--json"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    if proc.returncode != 0:
        console.print(proc.stderr.strip())
        raise SystemExit(f"demo: 'orthros {args[0]}' failed (exit {proc.returncode})")
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def wait_listening(port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit("demo: the echo server did not start listening")


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (CRIU needs it)")
    workdir = Path(tempfile.mkdtemp(prefix="orthros-demo-"))
    images = workdir / "images"
    server = subprocess.Popen(
        [sys.executable, "-m", "orthros_py.bench.echo", "--port", str(PORT)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    restored: int | None = None
    pool: ClientPool | None = None
    try:
        wait_listening(PORT)
        pool = ClientPool("127.0.0.1", PORT, CLIENTS)
        pool.start()
        console.print(f"echo server pid {server.pid} with {CLIENTS} clients, traffic on every "
                      "connection")
        time.sleep(1)
        before = pool.stats.requests
        dumped = orthros("dump", str(server.pid), "-D", str(images), "--tcp-established")
        server.wait()  # CRIU killed the original; reap it so its PID is free for the restore
        console.print(f"  checkpoint holds {len(dumped['tcp'])} TCP connections "
                      f"({dumped['elapsed_ms']} ms)")
        inspected = orthros("inspect", str(images))
        console.print(f"  inspect: {len(inspected.get('tcp', []))} TCP connections in the images")
        time.sleep(0.5)  # the service is down: clients wait, nothing resets
        rest = orthros("restore", "-D", str(images), "--tcp-established", "--detach")
        restored = int(rest["pid"])
        time.sleep(1.5)
        stats = pool.stop()
        dstats = dumped.get("stats") or {}
        rstats = rest.get("stats") or {}
        table = Table(title="checkpoint/restore of a live TCP service", title_justify="left")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for name, value in [
            ("established connections", str(CLIENTS)),
            ("CRIU frozen time (dump)", f"{dstats.get('frozen_ms', 0):.1f} ms"),
            ("CRIU memory dump", f"{dstats.get('memdump_ms', 0):.1f} ms"),
            ("CRIU restore time", f"{rstats.get('restore_ms', 0):.1f} ms"),
            ("orthros dump wall time", f"{dumped['elapsed_ms']} ms"),
            ("orthros restore wall time", f"{rest['elapsed_ms']} ms"),
            ("requests before / after", f"{before} / {stats.requests}"),
            ("longest client wait", f"{stats.max_gap_s * 1000:.0f} ms"),
            ("client errors", str(stats.errors)),
        ]:
            table.add_row(name, value)
        console.print(table)
        for sample in stats.error_samples:
            console.print(f"  [red]{sample}[/]")
        return 0 if stats.errors == 0 and stats.requests > before else 1
    finally:
        if pool is not None:
            pool.close()
        for pid in (server.pid, restored):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        server.poll()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
