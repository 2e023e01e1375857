"""The network lock benchmark's host side: the client network namespace and veth pair, nginx,
being the child subreaper, what a failed CRIU leaves behind (iptables rules, nft tables, our
part of the XDP lock), the XDP map micro-benchmark and the environment.

Interfaces: pyroute2 (network namespace, veth, addresses), nsenter (ab inside the namespace, no
mount namespace of its own), nginx, prctl(2), iptables-save/iptables and nft, the XDP lock's
pinned map. Needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from orthros_py.bench.netlock.model import MicroResult
from orthros_py.errors import MissingFeatureError, OrthrosError
from orthros_py.net.conn import Conn
from orthros_py.proc.tree import alive, reap
from orthros_py.run import run

# --- the host side: namespace, nginx, ab, cleanup ------------------------------------------------

NS_PREFIX = "orthros-bench-"
IF_PREFIX = "obn"
SOCCR_MARK = "0xc114"  # the mark CRIU's own packets carry; its iptables lock rules name it
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def _tool(name: str) -> str:
    exe = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if exe is None:
        raise MissingFeatureError(f"{name} is not installed (the benchmark needs it)",
                                  hint="run scripts/setup.sh")
    return exe


def pick_subnet(taken: Sequence[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A 10.99.x.0/24 that overlaps nothing in ``taken``."""
    for x in range(200, 256):
        net = ipaddress.IPv4Network(f"10.99.{x}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise OrthrosError("no free 10.99.x.0/24 for the benchmark's veth pair",
                       hint="give one with --subnet")


def _host_networks() -> list[ipaddress.IPv4Network]:
    from orthros_py.net.addr import iproute

    with iproute(None) as ipr:
        return [ipaddress.IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}").network
                for a in ipr.get_addr(family=socket.AF_INET)]


class ClientNet:
    """A client network namespace joined to this one by a veth pair on a private /24: the
    server's address on this side, the client's inside. ``close`` removes both (the peer goes
    with the link); a namespace left by a benchmark whose process died is removed on start."""

    def __init__(self, subnet: ipaddress.IPv4Network | None = None) -> None:
        tag = str(os.getpid())
        self.name = NS_PREFIX + tag
        self.host_if = (IF_PREFIX + tag)[:15]
        self.subnet = subnet
        self.server_ip = ""
        self.client_ip = ""
        self.made = False

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def __enter__(self) -> ClientNet:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        from orthros_py.net.addr import in_netns
        from orthros_py.net.links import add_veth, create_netns, link_up, loopback_up

        remove_stale_namespaces()
        if self.subnet is None:
            self.subnet = pick_subnet(_host_networks())
        elif any(self.subnet.overlaps(n) for n in _host_networks()):
            raise OrthrosError(f"{self.subnet} overlaps an address of this host",
                               hint="choose another --subnet")
        hosts = list(self.subnet.hosts())
        self.server_ip, self.client_ip = str(hosts[0]), str(hosts[1])
        prefix = self.subnet.prefixlen
        create_netns(self.name)
        self.made = True
        add_veth(None, self.host_if, peer="eth0", peer_netns=self.name)
        link_up(None, self.host_if, address=ipaddress.IPv4Interface(f"{self.server_ip}/{prefix}"),
                alias=f"orthros bench {self.name}")
        loopback_up(self.name)
        link_up(self.name, "eth0", address=ipaddress.IPv4Interface(f"{self.client_ip}/{prefix}"))
        # Many runs of many connections from one client: a wide port range, so that the
        # TIME_WAITs of earlier runs never run it dry. This namespace's own setting.
        with in_netns(self.name), open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
            f.write("10000 65000\n")

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace: network only (``ip netns exec`` would also
        remount /sys in a mount namespace of its own)."""
        return [_tool("nsenter"), f"--net={self.path}", *argv]

    def close(self) -> None:
        _remove_net(self.name, self.host_if)


def _remove_net(name: str, host_if: str) -> None:
    from pyroute2 import NetlinkError

    from orthros_py.net.links import delete_link, remove_netns

    with contextlib.suppress(NetlinkError, OSError, OrthrosError):
        delete_link(None, host_if)
    remove_netns(name)


def remove_stale_namespaces() -> list[str]:
    """Namespaces (and veths) of earlier benchmarks whose process is gone."""
    removed = []
    base = Path("/run/netns")
    for p in base.glob(NS_PREFIX + "*") if base.is_dir() else []:
        tag = p.name[len(NS_PREFIX):]
        if tag.isdigit() and not psutil.pid_exists(int(tag)):
            _remove_net(p.name, (IF_PREFIX + tag)[:15])
            removed.append(p.name)
    return removed


NGINX_CONF = """\
user root;
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    keepalive_timeout 600s;
    keepalive_requests 1000000000;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen {ip}:{port} backlog=4096;
        location / {{
            root {dir}/www;
        }}
    }}
}}
"""


class Nginx:
    """One nginx (master + one worker, as root: CRIU here cannot read the rlimits of another
    uid), its files in ``workdir``, started as a session leader like a daemon."""

    def __init__(self, workdir: Path, ip: str, port: int) -> None:
        self.dir = workdir
        self.ip, self.port = ip, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        (self.dir / "www").mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        (self.dir / "www" / "index.html").write_text("orthros netlock benchmark\n")
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, ip=self.ip, port=self.port))
        self.proc = subprocess.Popen(
            [_tool("nginx"), "-p", f"{self.dir}/", "-c", str(conf), "-e",
             str(self.dir / "error.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
        deadline = time.monotonic() + timeout
        while not self.listening():
            if self.proc.poll() is not None:
                raise OrthrosError(f"nginx exited with {self.proc.returncode}: "
                                   f"{self.log_tail() or 'no message'}", stage="nginx")
            if time.monotonic() > deadline:
                raise OrthrosError(f"nginx did not listen on {self.ip}:{self.port} within "
                                   f"{timeout:g} s: {self.log_tail()}", stage="nginx")
            time.sleep(0.02)

    @property
    def master(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def workers(self) -> list[psutil.Process]:
        try:
            return list(psutil.Process(self.master).children())
        except psutil.NoSuchProcess:
            return []

    def pids(self) -> list[int]:
        return [self.master, *(p.pid for p in self.workers())]

    def _sockets(self) -> list[Any]:
        out: list[Any] = []
        for w in self.workers():
            with contextlib.suppress(psutil.Error):
                out += [c for c in w.net_connections(kind="tcp4")
                        if c.laddr and c.laddr.port == self.port]
        return out

    def listening(self) -> bool:
        return any(c.status == psutil.CONN_LISTEN for c in self._sockets())

    def established(self) -> int:
        return sum(1 for c in self._sockets() if c.status == psutil.CONN_ESTABLISHED)

    def masters(self) -> list[int]:
        """Every live master of this nginx, started or restored: its title names our files."""
        mark = f"{self.dir}/"
        found = []
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(mark in arg for arg in p.info["cmdline"] or []):
                    found.append(p.pid)
        return found

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = (self.dir / "error.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(ln.strip() for ln in text[-lines:])


def wait_gone(pids: Sequence[int], timeout: float = 10.0) -> None:
    """Until ``pids`` are free: as the subreaper we collect the orphaned worker ourselves
    instead of waiting for PID 1 (which took ~1.2 s here)."""
    deadline = time.monotonic() + timeout
    while True:
        reap(pids)
        left = [p for p in pids if alive(p)]
        if not left:
            return
        if time.monotonic() > deadline:
            raise OrthrosError(f"the dumped processes {left} are still there after "
                               f"{timeout:g} s", stage="restore")
        time.sleep(0.005)


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Be the child subreaper while the benchmark runs: the dumped (and the restored) nginx
    worker is orphaned when its master dies, and comes to us to be reaped at once."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(before), 0, 0, 0)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, before.value, 0, 0, 0)


def criu_iptables_rules(addresses: Sequence[str]) -> list[str]:
    """CRIU's per-connection lock rules (they accept its own mark, drop the rest) that name
    one of ``addresses``, as iptables-save prints them."""
    out = run([_tool("iptables-save"), "-t", "filter"], timeout=120).stdout
    wanted = [f"{a}/32" for a in addresses]
    return [ln for ln in out.splitlines()
            if ln.startswith("-A ") and SOCCR_MARK in ln.lower()
            and any(w in ln for w in wanted)]


def remove_iptables_rules(rules: Sequence[str]) -> list[str]:
    removed = []
    ipt = _tool("iptables")
    for rule in rules:
        spec = shlex.split(rule)  # iptables-save's own quoting; never run through a shell
        res = run([ipt, "-w", "-t", "filter", "-D", *spec[1:]], timeout=60, check=False)
        if res.returncode == 0:
            removed.append(f"iptables: {rule}")
    return removed


def criu_nft_tables() -> set[str]:
    """CRIU's nftables lock tables (``inet CRIU-<run id>``)."""
    out = run([_tool("nft"), "list", "tables"], timeout=60).stdout
    return {ln.split(None, 1)[1].strip() for ln in out.splitlines()
            if ln.startswith("table ") and " CRIU-" in ln}


def remove_nft_tables(tables: Sequence[str]) -> list[str]:
    removed = []
    for t in tables:
        family, name = t.split(None, 1)
        res = run([_tool("nft"), "delete", "table", family, name], timeout=60, check=False)
        if res.returncode == 0:
            removed.append(f"nft: table {t}")
    return removed


def xdp_release(net: ClientNet) -> list[str]:
    """Our part of the shared XDP lock, gone: the benchmark's connections unlocked and the
    programs off our veth. A restore leaves the programs attached while anyone else (a lab, a
    test) has connections locked; this takes off only ours."""
    from orthros_py.netlock.xdp import XdpNetLock

    done: list[str] = []
    ours = {net.server_ip, net.client_ip}
    lock = XdpNetLock()
    try:
        stuck = [lc.conn for lc in lock.locked()
                 if lc.conn.local_ip in ours or lc.conn.remote_ip in ours]
        if stuck:
            lock.unlock(stuck)
            done.append(f"xdp: unlocked {len(stuck)} connections")
        res = lock.detach([net.host_if], netns=None)
        done += [f"xdp: detached from {a.iface} (kept attached while others held locks)"
                 for a in res.detached]
    except OrthrosError as err:
        done.append(f"xdp: could not check the lock: {err.msg}")
    finally:
        lock.close()
    return done


def synthetic_conns(n: int) -> list[Conn]:
    """``n`` distinct connections in documentation address space (RFC 5737): no packet on any
    network matches them."""
    return [Conn(socket.AF_INET, "203.0.113.1", 80, f"198.51.100.{1 + i // 50000}",
                 1024 + i % 50000) for i in range(n)]


def micro_xdp(conns: int = 1000, reps: int = 7) -> MicroResult:
    """Lock and unlock ``conns`` synthetic connections in the pinned map, ``reps`` times."""
    from orthros_py.netlock.xdp import XdpNetLock

    lock = XdpNetLock()
    try:
        info = lock.prepare()  # a compile, if any, happens here and is not timed
        todo = synthetic_conns(conns)
        locks, unlocks = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            lock.lock(todo)
            t1 = time.perf_counter()
            lock.unlock(todo)
            t2 = time.perf_counter()
            locks.append((t1 - t0) * 1000)
            unlocks.append((t2 - t1) * 1000)
    finally:
        with contextlib.suppress(OrthrosError):
            lock.release()
        lock.unload()
    return MicroResult(conns, reps, statistics.median(locks), statistics.median(unlocks),
                       locks, unlocks, info.get("compile_seconds"))


def environment() -> dict[str, Any]:
    def first(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            return "?"
        text = (p.stdout + p.stderr).strip().splitlines()
        return text[0].strip() if text else "?"

    from orthros_py.criu.binary import find_criu

    return {
        "kernel": f"Linux {platform.release()}",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "criu": find_criu().version_str,
        "nginx": first([_tool("nginx"), "-v"]).replace("nginx version: ", ""),
        "ab": first([_tool("ab"), "-V"]),
        "iptables": first([_tool("iptables"), "-V"]),
        "nft": first([_tool("nft"), "-v"]),
    }
