"""What the migration tests share: services started on a lab host as its daemons (inside its
namespaces, children of its init, known by the pid the host sees), clients that check every answer, the migration through the real CLI or through the policy
with a hook, and the check that nothing of a migration is left anywhere."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from helpers import orthros_json, wait_for

from orthros_py.agent.client import AgentClient
from orthros_py.cluster import Cluster
from orthros_py.lab import Lab
from orthros_py.net.addr import iproute, netns_path
from orthros_py.policies.migrate import Event, Host, Stage

SERVICE_IP = "10.77.0.100"
LAB_NET = ipaddress.ip_network("10.77.0.0/24")


def client(lab: Lab, name: str) -> AgentClient:
    return Cluster.of_lab(lab).client(name)


def host(lab: Lab, name: str) -> Host:
    return Host.of(Cluster.of_lab(lab), name)


class Service:
    """A process tree started inside a lab host as a daemon of that host (its init reaps it).
    ``pid`` is the pid the hosts see: what ``orthros migrate`` takes, kept by every migration;
    this machine knows it by another pid on each host it has lived on."""

    def __init__(self, lab: Lab, on: str, argv: Sequence[str], *,
                 log: Path | None = None) -> None:
        self.lab = lab
        started = lab.spawn(on, argv, log=log)
        self.pid = started.host_pid

    def machine_pid(self) -> int | None:
        """The tree's root on this machine, on whichever host runs it (not a stopped one)."""
        found = []
        for h in self.lab.hosts:
            pid = self.lab.machine_pid(h, self.pid)
            if pid is None:
                continue
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE,
                                                        psutil.STATUS_STOPPED):
                    found.append(pid)
        return found[0] if found else None

    def alive(self) -> bool:
        return self.machine_pid() is not None

    def tree_pids(self) -> set[int]:
        """Machine pids of the tree."""
        pid = self.machine_pid()
        if pid is None:
            return set()
        try:
            return {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        pid = self.machine_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def echo_server(lab: Lab, on: str, port: int) -> Service:
    svc = Service(lab, on, [sys.executable, "-m", "orthros_py.workloads.echo", "--host", SERVICE_IP,
                            "--port", str(port)])
    wait_for(lambda: answers(lab, port), timeout=20, what="the echo server to answer")
    return svc


def answers(lab: Lab, port: int, payload: bytes = b"ping?") -> bool:
    """A fresh connection from the client host to the service address gets its echo."""
    try:
        with lab.connect((SERVICE_IP, port), timeout=5) as s:
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(64)
                if not chunk:
                    return False
                got += chunk
            return got == payload
    except OSError:
        return False


def established(lab: Lab, on: str, pid: int) -> int:
    """How many established connections the tree of ``pid`` holds on ``on``."""
    return len(client(lab, on).tree(pid)["established"])


def migrate_cli(pid: int, src: str, dst: str, *extra: str) -> dict[str, Any]:
    """``orthros migrate PID --from SRC --to DST --json`` as a user runs it."""
    out: dict[str, Any] = orthros_json("migrate", str(pid), "--from", src, "--to", dst, *extra,
                                       timeout=180)
    return out


def at_stage(stage: Stage, action: Callable[[], None]) -> Callable[[Event], None]:
    """An observer that runs ``action`` once, when ``stage`` starts: how faults are injected."""
    fired: list[bool] = []

    def observe(ev: Event) -> None:
        if ev.stage == stage and ev.kind == "start" and not fired:
            fired.append(True)
            action()

    return observe


def set_link(lab: Lab, on: str, up: bool) -> None:
    with iproute(lab.host(on).netns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0], state="up" if up else "down")


# --- nothing left behind -------------------------------------------------------------------------


def _netns_ids(lab: Lab) -> dict[tuple[int, int], str]:
    out = {}
    for h in lab.all_hosts:
        st = os.stat(netns_path(h.netns))
        out[(st.st_dev, st.st_ino)] = h.name
    return out


def lab_processes(lab: Lab) -> dict[int, str]:
    """{pid: host} of every live (non-zombie) process inside the lab's namespaces."""
    ids = _netns_ids(lab)
    found = {}
    for pid in psutil.pids():
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
            if (st.st_dev, st.st_ino) in ids and \
                    psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found[pid] = ids[(st.st_dev, st.st_ino)]
        except (OSError, psutil.Error):
            continue
    return found


@dataclass
class Leftovers:
    problems: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.problems)


def leftovers(lab: Lab, *, holder: str, service: Service,
              dead_agents: Sequence[str] = (), images_ok: Sequence[str] = ()) -> Leftovers:
    """Everything a migration (or its rollback) may have left: locks (XDP map entries and
    attachments, iptables and nftables rules), the service address anywhere but ``holder``,
    processes in the lab besides the agents and the service's tree, images, held trees,
    running page servers."""
    out = Leftovers()
    # Addresses.
    holders = [h.name for h in lab.hosts
               if any(str(a.ip) == SERVICE_IP for a in h.link.addresses())]
    if holders != [holder]:
        out.problems.append(f"{SERVICE_IP} is held by {holders}, not just {holder}")
    # XDP: the map and the state file are machine-wide (other users may lock their own
    # connections): only the lab's subnet and namespaces count.
    from orthros_py.netlock.xdp import XdpNetLock

    xdp = XdpNetLock()
    try:
        mine = [lc for lc in xdp.locked()
                if ipaddress.ip_address(lc.conn.local_ip) in LAB_NET
                or ipaddress.ip_address(lc.conn.remote_ip) in LAB_NET]
        if mine:
            out.problems.append(f"{len(mine)} lab connections still locked, e.g. {mine[0].conn}")
        ids = _netns_ids(lab)
        atts = [a for a in xdp.status().attachments if a.netns_id in ids]
        if atts:
            out.problems.append("lock programs still attached: "
                                + ", ".join(f"{a.iface}@{ids[a.netns_id]}"  # type: ignore[index]
                                            for a in atts))
    finally:
        xdp.close()
    for h in lab.hosts:
        for argv in (["iptables-save"], ["nft", "list", "ruleset"]):
            res = lab.run(h, argv, check=False)
            if "orthros" in res.stdout:
                out.problems.append(f"{argv[0]} rules of orthros left on {h.name}")
    # Processes.
    agents = {h.agent_pid for h in lab.hosts} | {h.init_pid for h in lab.all_hosts}
    tree = service.tree_pids()
    strays = {pid: on for pid, on in lab_processes(lab).items()
              if pid not in agents and pid not in tree}
    for pid, on in strays.items():
        with contextlib.suppress(psutil.Error):
            out.problems.append(f"stray process {pid} ({psutil.Process(pid).name()}) on {on}")
    # What the agents hold.
    for h in lab.hosts:
        if h.name in dead_agents:
            continue
        st = client(lab, h.name).status()
        if st["held"]:
            out.problems.append(f"{h.name} holds stopped trees {st['held']}")
        running = [s for s in st["page_servers"] if s["running"]]
        if running:
            out.problems.append(f"{h.name} runs page servers {running}")
        if st["images"] and h.name not in images_ok:
            out.problems.append(f"{h.name} keeps images {st['images']}")
        if st.get("lazy"):
            out.problems.append(f"{h.name} keeps lazy migrations {sorted(st['lazy'])}")
        if st.get("trackers"):
            out.problems.append(f"{h.name} keeps memory trackers {st['trackers']}")
        others = [t["pid"] for t in st["restored"] if t["running"] and t["pid"] != service.pid]
        if others:
            out.problems.append(f"{h.name} runs restored trees {others}")
    return out


def assert_nothing_left(lab: Lab, *, holder: str, service: Service,
                        dead_agents: Sequence[str] = (), images_ok: Sequence[str] = (),
                        timeout: float = 5.0) -> None:
    """``leftovers`` is empty (waited for a little: a page server exits on its own time)."""
    last: list[Leftovers] = []

    def clean() -> bool:
        last[:] = [leftovers(lab, holder=holder, service=service, dead_agents=dead_agents,
                             images_ok=images_ok)]
        return not last[0]

    deadline = time.monotonic() + timeout
    while not clean():
        if time.monotonic() > deadline:
            raise AssertionError("left behind: " + "; ".join(last[0].problems))
        time.sleep(0.2)


def print_timings(title: str, rows: list[dict[str, Any]]) -> None:
    """A plain table of migrations' phase timings (shown with pytest -s)."""
    cols = ("lock", "dump", "transfer", "address move", "restore", "unlock", "total",
            "downtime", "release source", "criu restore")
    print(f"\n{title}")
    print(f"{'#':>3} {'from->to':<12}" + "".join(f"{c:>15}" for c in cols)
          + f"{'procs':>7}{'conns':>7}{'pages':>8}")
    for i, r in enumerate(rows, 1):
        t = r["timings_ms"]
        c = r["counts"]
        print(f"{i:>3} {r['source'] + '->' + r['dest']:<12}"
              + "".join(f"{t.get(k, 0.0):>15.1f}" for k in cols)
              + f"{c['processes']:>7}{c['connections']:>7}{c['pages']:>8}")
    if rows:
        print(f"{'med':>3} {'':<12}" + "".join(
            f"{sorted(r['timings_ms'].get(k, 0.0) for r in rows)[len(rows) // 2]:>15.1f}"
            for k in cols))


class StreamClients:
    """Connections that send all the time, whether or not the echo came back (unlike
    ClientPool, which waits for each answer): packets keep arriving wherever the service
    address points, also while the service is away. Every byte echoed is checked, and counted
    per connection, so that a test can ask whether *every* connection went on (a global count
    is satisfied by two live connections while the other 98 are silently stalled)."""

    def __init__(self, lab: Lab, port: int, n: int, interval: float = 0.02) -> None:
        self.socks = [lab.connect((SERVICE_IP, port), timeout=30) for _ in range(n)]
        self.pending = [bytearray() for _ in self.socks]
        self.echoed_by = [0] * n  # bytes echoed back, per connection
        self.errors: list[str] = []
        self.dead: set[int] = set()  # connections that failed once: not counted again
        self.interval = interval
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.stop_sending = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._recv, daemon=True)]
        for t in self.threads:
            t.start()

    @property
    def echoed(self) -> int:
        return sum(self.echoed_by)

    def snapshot(self) -> list[int]:
        """Bytes echoed so far on each connection: a baseline for ``stalled``."""
        return list(self.echoed_by)

    def stalled(self, since: list[int], min_bytes: int = 1) -> list[int]:
        """Connections that neither failed nor got ``min_bytes`` more echoed since ``since``."""
        return [i for i, (now, then) in enumerate(zip(self.echoed_by, since, strict=True))
                if i not in self.dead and now - then < min_bytes]

    def broken(self, since: list[int]) -> list[int]:
        """Connections that failed, or got nothing back since ``since`` (silently stalled)."""
        return sorted(self.dead | set(self.stalled(since)))

    def unanswered(self) -> dict[int, int]:
        """{connection: bytes sent and never echoed}, for the connections still alive."""
        with self.lock:
            return {i: len(p) for i, p in enumerate(self.pending) if p and i not in self.dead}

    def drain(self, timeout: float = 20.0) -> dict[int, int]:
        """Stop sending, wait for what is in flight to come back; returns ``unanswered()``
        after that (every entry is a connection that lost or held back data)."""
        self.stop_sending.set()
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not self.unanswered(), timeout=timeout,
                     what="every connection's echoes")
        return self.unanswered()

    def _send(self) -> None:
        seq = 0
        while not self.stop_event.is_set() and not self.stop_sending.is_set():
            seq += 1
            for i, s in enumerate(self.socks):
                if i in self.dead:
                    continue
                msg = f"{i}:{seq};".encode()
                with self.lock:
                    self.pending[i] += msg
                try:
                    s.sendall(msg)
                except OSError as err:
                    self._fail(i, f"send: {err}")
            self.stop_event.wait(self.interval)

    def _recv(self) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        for i, s in enumerate(self.socks):
            sel.register(s, selectors.EVENT_READ, i)
        while not self.stop_event.is_set():
            for key, _ in sel.select(timeout=0.2):
                i = int(key.data)
                s = self.socks[i]
                try:
                    data = s.recv(65536)
                except OSError as err:
                    data = b""
                    self._fail(i, f"recv: {err}")
                if not data:
                    self._fail(i, "closed by the peer")
                    sel.unregister(s)
                    continue
                with self.lock:
                    want = bytes(self.pending[i][:len(data)])
                    del self.pending[i][:len(data)]
                if data != want:
                    self._fail(i, f"got {data[:20]!r}, expected {want[:20]!r}")
                self.echoed_by[i] += len(data)

    def _fail(self, i: int, what: str) -> None:
        if i not in self.dead:
            self.dead.add(i)
            self.errors.append(f"conn {i}: {what}")

    def close(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(10)
        for s in self.socks:
            s.close()
