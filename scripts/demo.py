#!/usr/bin/env python3
"""The main job, as a user would run it: move a live TCP service to another host and back
while its clients talk to it, and show that none of them noticed.

Runs the real ``orthros`` commands: ``orthros lab up`` (two hosts and a client as network
namespaces on this machine, an agent on each host), a TCP echo server on alpha holding 200
established connections from the client host with traffic on every one of them, ``orthros
migrate`` alpha -> beta and beta -> alpha, then ``orthros lab down``. Prints each migration's
phase timings and the clients' error count. Needs root. Leaves nothing behind, also when it
fails or is interrupted (the lab's teardown kills every process in its namespaces).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orthros_py.net.addr import in_netns
from orthros_py.workloads.echo import ClientPool

CLIENTS = 200
PORT = 7000
SERVICE_IP = "10.77.0.100"
ROWS = ("lock", "dump", "transfer", "address move", "restore", "unlock", "total")
console = Console(stderr=True)
ORTHROS = str(Path(sys.executable).parent / "orthros")


class DemoError(Exception):
    pass


def orthros(*args: str, data: bool = True, timeout: float = 300) -> dict[str, Any]:
    """Run ``orthros ARGS`` (with --json when ``data``), showing the command line."""
    console.print(f"[bold cyan]$ orthros {' '.join(args)}[/]")
    proc = subprocess.run([ORTHROS, *args, *(["--json"] if data else [])], text=True,
                          capture_output=data, stdin=subprocess.DEVNULL, timeout=timeout)
    if proc.returncode != 0:
        if data:
            console.print(proc.stderr.strip())
        raise DemoError(f"'orthros {args[0]}' failed (exit {proc.returncode})")
    return dict(json.loads(proc.stdout)) if data else {}


def wait(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out waiting for {what}")
        time.sleep(0.05)


def answers(client_netns: str) -> bool:
    """A fresh connection from the client host to the service gets its echo."""
    try:
        with in_netns(client_netns):
            s = socket.socket()
        with s:
            s.settimeout(2)
            s.connect((SERVICE_IP, PORT))
            s.sendall(b"hello")
            return bool(s.recv(16) == b"hello")
    except OSError:
        return False


def lab_exec_detached(host: str, argv: list[str]) -> int:
    """``orthros lab exec HOST --detach -- ARGV``: the pid HOST knows the daemon by."""
    args = ["lab", "exec", host, "--detach", "--", *argv]
    console.print(f"[bold cyan]$ orthros {' '.join(args)}[/]")
    proc = subprocess.run([ORTHROS, *args], text=True, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    if proc.returncode != 0:
        console.print(proc.stderr.strip())
        raise DemoError(f"'orthros lab exec' failed (exit {proc.returncode})")
    return int(proc.stdout.strip())


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (namespaces, CRIU, BPF)")
    status = orthros("lab", "status")
    if status.get("up"):
        raise SystemExit("demo: a lab is already up; the demo builds and removes its own: "
                         "run 'orthros lab down' first")
    pool: ClientPool | None = None
    try:
        lab = orthros("lab", "up", "--hosts", "2")
        client_netns = lab["client"]["netns"]
        # The service runs as a daemon of alpha (inside its network, PID and mount namespaces),
        # listening on the service address; its pid is the one alpha knows it by.
        pid = lab_exec_detached("alpha", [sys.executable, "-m", "orthros_py.workloads.echo",
                                          "--host", SERVICE_IP, "--port", str(PORT)])
        wait(lambda: answers(client_netns), "the echo server to answer")
        with in_netns(client_netns):
            pool = ClientPool(SERVICE_IP, PORT, CLIENTS, timeout=30)
        pool.start(interval=0.005)
        wait(lambda: pool is not None and pool.stats.requests >= 5 * CLIENTS,
             "traffic on every connection")
        console.print(f"echo server pid {pid} on alpha ({SERVICE_IP}:{PORT}), {CLIENTS} "
                      "clients on the client host, a request on every connection all the time")
        results = []
        for src, dst in (("alpha", "beta"), ("beta", "alpha")):
            time.sleep(1)
            before = pool.stats.requests
            out = orthros("migrate", str(pid), "--from", src, "--to", dst)
            pid = int(out["new_pid"])
            results.append(out)
            console.print(f"  pid {pid} runs on {dst}; {out['counts']['connections']} "
                          f"connections moved, {out['counts']['established_after']} "
                          "established there")
            wait(lambda b=before: pool is not None and pool.stats.requests > b + 2 * CLIENTS,
                 f"the clients to get answers from {dst}")
        time.sleep(1)
        stats = pool.stop()

        table = Table(title="orthros migrate, phase timings (ms)", title_justify="left")
        table.add_column("phase")
        for r in results:
            table.add_column(f"{r['source']} -> {r['dest']}", justify="right")
        for row in ROWS:
            if row == "total":
                table.add_section()
            table.add_row(row, *(f"{r['timings_ms'].get(row, 0.0):.1f}" for r in results))
        table.add_section()
        table.add_row("[dim]clients waited (lock to unlock)[/]",
                      *(f"[dim]{r['timings_ms'].get('downtime', 0.0):.1f}[/]"
                        for r in results))
        for name, key in (("processes", "processes"), ("connections", "connections"),
                          ("pages", "pages")):
            table.add_row(name, *(str(r["counts"][key]) for r in results))
        console.print(table)
        clients = Table(title="the clients", title_justify="left", show_header=False)
        clients.add_column(style="bold")
        clients.add_column(justify="right")
        clients.add_row("connections", str(CLIENTS))
        clients.add_row("requests answered", str(stats.requests))
        clients.add_row("longest wait for an answer", f"{stats.max_gap_s * 1000:.0f} ms")
        clients.add_row("errors (resets, timeouts, wrong answers)", str(stats.errors))
        console.print(clients)
        for sample in stats.error_samples:
            console.print(f"  [red]{sample}[/]")
        if stats.errors:
            console.print("[red]some clients saw errors[/]")
            return 1
        console.print("[green]no client noticed: every request answered, and answered right[/]")
        return 0
    except DemoError as err:
        console.print(f"[red]demo: {err}[/]")
        return 1
    finally:
        if pool is not None:
            pool.close()
        # Kills whatever runs in the lab (agents, the service wherever it went), removes the
        # namespaces, the bridge, the locks and the state.
        with contextlib.suppress(Exception):
            orthros("lab", "down", data=False, timeout=120)


if __name__ == "__main__":
    sys.exit(main())
