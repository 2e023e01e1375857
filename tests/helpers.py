"""Helpers for tests that run real processes: spawn, wait for a condition, kill and reap."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from orthros_py.proc.tree import ProcessRef, kill_tree

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
    every one of them, and whatever they forked or were restored as, at the end of the test.

    Each is held by pid *and* creation time: a process that exited and whose pid went to
    someone else by the end of the test is left alone."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.refs: list[ProcessRef] = []

    @property
    def pids(self) -> list[int]:
        return [r.pid for r in self.refs]

    def workload(self, name: str, *args: str, stdout: Path | None = None,
                 prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
        out = open(stdout or self.tmp / f"{name}.out", "ab")  # noqa: SIM115 - kept by the child
        argv = [*(prefix or []), sys.executable, str(WORKLOADS / f"{name}.py"), *args]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True)
        out.close()
        self.track(proc.pid)  # our unreaped child: its pid cannot have been reused yet
        return proc

    def track(self, pid: int) -> int:
        """Kill ``pid``'s tree at the end, if it is still the process that has it now."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self.refs.append(ProcessRef(pid, psutil.Process(pid).create_time()))
        return pid

    def cleanup(self) -> None:
        for ref in reversed(self.refs):
            kill_tree(ref)


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


def host_cgroups() -> tuple[dict[str, Path], Path | None]:
    """The cgroup hierarchies this host mounts, read from /proc/self/mounts without orthros:
    ({v1 controller or name=X: mount point}, the cgroup2 mount point or None). The hybrid
    development VM and a pure cgroup v2 host give different answers; tests derive from this."""
    # The kernel's controllers, which a v1 mount names among its options.
    known = {line.split()[0] for line in Path("/proc/cgroups").read_text().splitlines()
             if line and not line.startswith("#")}
    v1: dict[str, Path] = {}
    v2: list[Path] = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, target, fstype, opts, *_ = line.split()
        if fstype == "cgroup":
            for opt in opts.split(","):
                if opt in known or opt.startswith("name="):
                    v1.setdefault(opt, Path(target))
        elif fstype == "cgroup2":
            v2.append(Path(target))
    # The canonical place wins when cgroup2 is mounted more than once.
    canonical = Path("/sys/fs/cgroup")
    return v1, canonical if canonical in v2 else (v2[0] if v2 else None)


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


SOCCR_MARK = "0xc114"  # CRIU's own packets carry this mark; its lock rules let them through


class CriuNetfilter:
    """The rules CRIU's own network lock (``--network-lock iptables|nftables``) makes in this
    network namespace, found and removed for one test's connections only.

    CRIU's iptables method inserts ``... -m mark ! --mark 0xc114 --source A --sport P
    --destination B --dport Q -j DROP`` into filter INPUT and OUTPUT per connection (and a
    ``CRIU`` chain when it locks a whole namespace); its nftables method makes a table
    ``inet CRIU-<id>``. A dump that fails, or a test that fails between dump and restore,
    leaves them: they would drop the next test's packets. Only rules naming one of ``ports``,
    a CRIU chain and CRIU tables that were not there before the test, are touched."""

    def __init__(self) -> None:
        self.ports: set[int] = set()
        self.chain_before = {cmd: self._has_chain(cmd) for cmd in ("iptables", "ip6tables")}
        self.tables_before = set(self._tables())

    @staticmethod
    def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)

    def _has_chain(self, cmd: str) -> bool:
        return self._run([cmd, "-w", "-t", "filter", "-S", "CRIU"]).returncode == 0

    def _tables(self) -> list[str]:
        out = self._run(["nft", "list", "tables"]).stdout
        return [ln.split()[-1] for ln in out.splitlines()
                if ln.startswith("table inet CRIU-")]

    def _rules(self, cmd: str) -> list[list[str]]:
        """CRIU's per-connection DROP rules naming one of our ports, as ``-A CHAIN ...``."""
        found = []
        for chain in ("INPUT", "OUTPUT"):
            out = self._run([cmd, "-w", "-t", "filter", "-S", chain]).stdout
            for line in out.splitlines():
                words = shlex.split(line)
                if SOCCR_MARK not in words or words[-2:] != ["-j", "DROP"]:
                    continue
                named = {int(words[k + 1]) for k, w in enumerate(words[:-1])
                         if w in ("--sport", "--dport") and words[k + 1].isdigit()}
                if named & self.ports:
                    found.append(words)
        return found

    def cleanup(self) -> list[str]:
        """Remove what CRIU left for this test; returns what was found (and removed)."""
        left: list[str] = []
        for cmd in ("iptables", "ip6tables"):
            for words in self._rules(cmd):
                left.append(f"{cmd} {' '.join(words)}")
                self._run([cmd, "-w", "-t", "filter", "-D", *words[1:]])
            if not self.chain_before[cmd] and self._has_chain(cmd):
                left.append(f"{cmd} chain CRIU")
                for argv in (["-D", "INPUT", "-j", "CRIU"], ["-D", "OUTPUT", "-j", "CRIU"],
                             ["-F", "CRIU"], ["-X", "CRIU"]):
                    self._run([cmd, "-w", "-t", "filter", *argv])
        for table in set(self._tables()) - self.tables_before:
            left.append(f"nft table inet {table}")
            self._run(["nft", "delete", "table", "inet", table])
        return left


@dataclass
class VethPair:
    """Two scratch network namespaces joined by a veth: side "a" the client, side "b" the one
    that carries the lock; addresses NET4.SUB.1/.2 (and NET6:SUB::1/::2 when NET6 is given)."""
    a: str
    b: str
    a_if: str
    b_if: str
    sub: int
    net4: str
    net6: str | None = None

    def ip(self, side: str, family: int = socket.AF_INET) -> str:
        host = 1 if side == "a" else 2
        if family == socket.AF_INET6:
            assert self.net6 is not None, "this pair has no IPv6 addresses"
            return f"{self.net6}:{self.sub}::{host}"
        return f"{self.net4}.{self.sub}.{host}"

    def path(self, side: str) -> str:
        return f"/run/netns/{self.a if side == 'a' else self.b}"


@contextlib.contextmanager
def veth_pair(prefix: str, ifnames: tuple[str, str], net4: str,
              net6: str | None = None) -> Iterator[VethPair]:
    """A VethPair, removed at the end with whatever the XDP lock attached there."""
    from pyroute2 import IPRoute, netns

    from orthros_py.net.addr import in_netns
    from orthros_py.netlock.xdp import XdpNetLock

    tag = secrets.token_hex(3)
    p = VethPair(f"{prefix}-{tag}-a", f"{prefix}-{tag}-b", *ifnames, int(tag[:2], 16), net4, net6)
    netns.create(p.a)
    try:
        netns.create(p.b)
        try:
            with in_netns(p.path("a")), IPRoute() as ipr:
                ipr.link("add", ifname=p.a_if, kind="veth",
                         peer={"ifname": p.b_if, "net_ns_fd": p.path("b")})
            for side, ifname in (("a", p.a_if), ("b", p.b_if)):
                with in_netns(p.path(side)), IPRoute() as ipr:
                    idx = ipr.link_lookup(ifname=ifname)[0]
                    ipr.addr("add", index=idx, address=p.ip(side), prefixlen=24)
                    if net6 is not None:
                        # nodad: usable at once, no wait for duplicate address detection
                        ipr.addr("add", index=idx, address=p.ip(side, socket.AF_INET6),
                                 prefixlen=64, flags=0x02)
                    ipr.link("set", index=idx, state="up")
                    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            yield p
        finally:
            # Take orthros's programs off first, so the state file keeps no dead records.
            for side in ("a", "b"):
                with contextlib.suppress(Exception):
                    XdpNetLock().detach(netns=p.path(side))
            netns.remove(p.b)
    finally:
        netns.remove(p.a)
