"""``orthros pair`` and ``orthros failover`` on the lab, with real services and real faults.

redis-server on alpha under a writer on the client host that records every acknowledged key;
paired to beta, gamma the witness. The active dies (its agent and redis SIGKILLed and its link
taken down at one instant), is cut off while alive (a partition), the standby dies and comes
back, checkpoints fail; a planned failover runs under 200 clients. Every test ends with
nothing of the pair left on any host.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import orthros_json, run_orthros, wait_for
from migrate_kit import (
    SERVICE_IP,
    Service,
    StreamClients,
    assert_nothing_left,
    client,
    echo_server,
    set_link,
)

from orthros_py.lab import Lab
from orthros_py.net.fence import LabFence

PORT = 6379

pytestmark = pytest.mark.lab(hosts=3)


def redis_cmd(*words: str) -> bytes:
    out = f"*{len(words)}\r\n".encode()
    for w in words:
        b = w.encode()
        out += f"${len(b)}\r\n".encode() + b + b"\r\n"
    return out


def start_redis(lab: Lab, tmp_path: Path, on: str = "alpha") -> Service:
    svc = Service(lab, on, ["redis-server", "--bind", SERVICE_IP, "--port", str(PORT),
                            "--save", "", "--appendonly", "no", "--protected-mode", "no",
                            "--daemonize", "no", "--dir", str(tmp_path)])
    wait_for(lambda: pong(lab), timeout=20, what="redis to answer")
    return svc


def pong(lab: Lab, via: str | None = None) -> bool:
    try:
        with lab.connect((SERVICE_IP, PORT), timeout=1, via=via) as s:
            s.sendall(redis_cmd("PING"))
            return s.recv(64) == b"+PONG\r\n"
    except OSError:
        return False


class Writer:
    """SETs unique keys on ``n`` connections from the client host; remembers when redis
    acknowledged each; counts resets, and reconnects after one when ``reconnect``."""

    def __init__(self, lab: Lab, n: int = 2, *, reconnect: bool = False) -> None:
        self.lab = lab
        self.reconnect = reconnect
        self.acked: dict[str, tuple[str, float]] = {}  # key -> (value, when acknowledged)
        self.resets: dict[int, int] = {i: 0 for i in range(n)}
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def _connect(self) -> socket.socket:
        return self.lab.connect((SERVICE_IP, PORT), timeout=30)

    def _run(self, i: int) -> None:
        seq = 0
        try:
            s = self._connect()
        except OSError as err:
            self.errors.append(f"conn {i}: {err}")
            return
        f = s.makefile("rb")
        while not self.stop.is_set():
            seq += 1
            key, value = f"k:{i}:{seq}", f"v:{i}:{seq}"
            try:
                s.sendall(redis_cmd("SET", key, value))
                line = f.readline()
                if not line:
                    raise ConnectionResetError("closed by the server")
            except OSError as err:
                with self.lock:
                    self.resets[i] += 1
                if not self.reconnect:
                    self.errors.append(f"conn {i}: {err}")
                    return
                with contextlib.suppress(OSError):
                    s.close()
                while not self.stop.is_set():
                    try:
                        s = self._connect()
                        f = s.makefile("rb")
                        break
                    except OSError:
                        time.sleep(0.05)
                continue
            if line != b"+OK\r\n":
                self.errors.append(f"conn {i}: SET {key} answered {line!r}")
                return
            with self.lock:
                self.acked[key] = (value, time.time())
        with contextlib.suppress(OSError):
            s.close()

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def read_keys(lab: Lab, keys: list[str]) -> dict[str, str | None]:
    got: dict[str, str | None] = {}
    with lab.connect((SERVICE_IP, PORT), timeout=30) as s:
        f = s.makefile("rb")
        for start in range(0, len(keys), 500):
            batch = keys[start:start + 500]
            s.sendall(b"".join(redis_cmd("GET", k) for k in batch))
            for k in batch:
                head = f.readline()
                if head.startswith(b"$-1"):
                    got[k] = None
                    continue
                assert head.startswith(b"$"), head
                got[k] = f.read(int(head[1:]) + 2)[:-2].decode()
    return got


def pair_start(pid: int, *extra: str) -> dict[str, Any]:
    return orthros_json("pair", "start", str(pid), "--from", "alpha", "--to", "beta",
                        "--witness", "gamma", *extra, timeout=180)


def pair_status(name: str) -> dict[str, Any]:
    views = orthros_json("pair", "status", name)
    assert isinstance(views, list) and len(views) == 1, views
    out: dict[str, Any] = views[0]
    return out


def generation(name: str) -> int:
    return int(pair_status(name)["generation"])


def wait_generations(name: str, more: int, timeout: float = 60.0) -> int:
    start = generation(name)
    wait_for(lambda: generation(name) >= start + more, timeout=timeout,
             what=f"{more} more generations of pair {name}")
    return generation(name)


def kill_host(lab: Lab, svc: Service, on: str) -> None:
    """The host dies: its agent and the service SIGKILLed, its link down, at one instant."""
    set_link(lab, on, False)
    lab.stop_agent(on)
    svc.kill()


def unfence(lab: Lab, on: str) -> None:
    """What an operator does after a fence cut a host off: its link on the bridge goes up."""
    LabFence(lab.bridge_netns or "orthros-lab", f"b-{on}").on()


def revive(lab: Lab, name: str, on: str = "alpha") -> dict[str, Any]:
    """The dead host comes back (link up, agent started again): it must find the newer epoch
    and stand down before anything else; its record then says so."""
    set_link(lab, on, True)
    unfence(lab, on)
    lab.restart_agent(on)
    got: list[dict[str, Any]] = []

    def settled() -> bool:
        got[:] = [client(lab, on).request("pair_status", {"name": name})]
        return got[0]["state"] not in ("starting", "replicating")

    wait_for(settled, timeout=20, what=f"{on} to take up its part again and stand down")
    return got[0]


def pair_stop(name: str) -> None:
    res = run_orthros("pair", "stop", name)
    assert res.returncode == 0, res.stderr


def serving_hosts(lab: Lab) -> set[str]:
    """Which hosts answer at the service address themselves: each holds the address and its
    redis answers a connection made inside it (from elsewhere the packets would go to
    whichever host the address leads to)."""
    return {h.name for h in lab.hosts
            if any(str(a.ip) == SERVICE_IP for a in h.link.addresses())
            and pong(lab, via=h.name)}


class Prober:
    """Probes every host continuously; remembers every moment two of them answered."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.rounds = 0
        self.double: list[set[str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            seen = serving_hosts(self.lab)
            self.rounds += 1
            if len(seen) > 1:
                self.double.append(seen)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


def promoted_event(view: dict[str, Any]) -> dict[str, Any]:
    evs = [e for e in view["events"] if e.get("what") == "promoted"]
    assert evs, view["events"]
    return evs[-1]


def test_active_dies_with_output_commit_no_acknowledged_write_lost_no_reset(
        lab: Lab, tmp_path: Path) -> None:
    svc = start_redis(lab, tmp_path)
    writer = Writer(lab, 2)
    try:
        wait_for(lambda: writer.count() > 200, what="the writer to write")
        rec = pair_start(svc.pid, "--failover", "--output-commit", "--interval", "100ms")
        name = rec["config"]["name"]
        wait_generations(name, 3)
        before = writer.count()
        died = time.time()
        kill_host(lab, svc, "alpha")
        wait_for(lambda: writer.count() > before + 200, timeout=30,
                 what="the writer's connections to carry on at beta")
    finally:
        writer.close()
    assert writer.errors == [], writer.errors
    assert all(n == 0 for n in writer.resets.values()), writer.resets
    keys = sorted(writer.acked)
    stored = read_keys(lab, keys)
    lost = [k for k in keys if stored[k] != writer.acked[k][0]]
    assert not lost, f"{len(lost)} of {len(keys)} acknowledged keys lost, e.g. {lost[:3]}"
    view = pair_status(name)
    assert view["state"] == "failed over" and view["serving"] == "beta", view
    ev = promoted_event(view)
    print(f"output commit: death -> promoted {ev['at'] - died:.3f} s after the kill; "
          f"restore {ev.get('restore_ms')} ms; {len(keys)} keys, none lost, no reset")
    assert serving_hosts(lab) == {"beta"}
    back = revive(lab, name)
    assert back["state"] == "failed over" and back["epoch"] == view["epoch"], back
    assert serving_hosts(lab) == {"beta"}
    pair_stop(name)


def test_active_dies_without_output_commit_clients_reset_and_committed_keys_kept(
        lab: Lab, tmp_path: Path) -> None:
    svc = start_redis(lab, tmp_path)
    writer = Writer(lab, 2, reconnect=True)
    try:
        wait_for(lambda: writer.count() > 200, what="the writer to write")
        rec = pair_start(svc.pid, "--failover", "--interval", "100ms")
        name = rec["config"]["name"]
        wait_generations(name, 3)
        kill_host(lab, svc, "alpha")
        wait_for(lambda: all(n >= 1 for n in writer.resets.values()), timeout=30,
                 what="every writer connection to see its reset")
        after = writer.count()
        wait_for(lambda: writer.count() > after + 200, timeout=30,
                 what="the writer to write again on new connections")
    finally:
        writer.close()
    view = pair_status(name)
    ev = promoted_event(view)
    frozen_at = ev.get("generation_frozen_at")
    assert frozen_at, ev
    keys = sorted(k for k, (_, t) in writer.acked.items() if t < frozen_at)
    stored = read_keys(lab, keys)
    lost = [k for k in keys if stored[k] != writer.acked[k][0]]
    assert keys and not lost, f"{len(lost)} of {len(keys)} keys acknowledged before the " \
                              f"restored generation's freeze are lost, e.g. {lost[:3]}"
    print(f"no output commit: resets {writer.resets}; {len(keys)} keys acknowledged before "
          f"generation {ev['generation']} all there")
    back = revive(lab, name)
    assert back["state"] == "failed over", back
    pair_stop(name)


def test_a_partition_never_leaves_two_hosts_serving(lab: Lab, tmp_path: Path) -> None:
    svc = start_redis(lab, tmp_path)
    rec = pair_start(svc.pid, "--failover", "--interval", "100ms")
    name = rec["config"]["name"]
    wait_generations(name, 2)
    prober = Prober(lab)
    try:
        wait_for(lambda: prober.rounds > 3, what="the prober to run")
        set_link(lab, "alpha", False)
        time.sleep(3.0)  # the fault itself lasts 3 s (a timing of the scenario, not a check)
        set_link(lab, "alpha", True)
        wait_for(lambda: serving_hosts(lab) == {"beta"}, timeout=20,
                 what="exactly beta to serve after the partition")
        rounds = prober.rounds
        wait_for(lambda: prober.rounds > rounds + 5, what="more probes after the partition")
    finally:
        prober.close()
    assert prober.double == [], f"two hosts served at once: {prober.double[:3]}"
    # alpha stopped its copy: no redis of the tree runs there any more.
    assert lab.machine_pid("alpha", svc.pid) is None or not psutil.pid_exists(
        lab.machine_pid("alpha", svc.pid) or 0)
    unfence(lab, "alpha")
    alpha = client(lab, "alpha").request("pair_status", {"name": name})
    assert alpha["state"] in ("fenced", "failed over"), alpha
    print(f"partition: {prober.rounds} probe rounds, never two hosts; alpha {alpha['state']}")
    pair_stop(name)


def test_the_standby_dies_and_returns(lab: Lab, tmp_path: Path) -> None:
    svc = start_redis(lab, tmp_path)
    writer = Writer(lab, 2)
    try:
        rec = pair_start(svc.pid, "--interval", "100ms")
        name = rec["config"]["name"]
        wait_generations(name, 2)
        lab.stop_agent("beta")
        wait_for(lambda: client(lab, "alpha").request("pair_status", {"name": name})["state"]
                 == "degraded", timeout=20, what="the pair to be degraded")
        n = writer.count()
        wait_for(lambda: writer.count() > n + 100, what="the active to keep serving")
        lab.restart_agent("beta")
        wait_for(lambda: pair_status(name)["state"] == "replicating", timeout=30,
                 what="replication to resume")
        wait_generations(name, 2)
    finally:
        writer.close()
    assert writer.errors == [], writer.errors
    pair_stop(name)
    assert_nothing_left(lab, holder="alpha", service=svc)


def test_planned_failover_under_200_clients(lab: Lab) -> None:
    svc = echo_server(lab, "alpha", 7000)
    clients = StreamClients(lab, 7000, 200)
    try:
        wait_for(lambda: clients.echoed > 2000, what="the clients to talk")
        rec = pair_start(svc.pid, "--interval", "200ms")
        name = rec["config"]["name"]
        wait_generations(name, 2)
        before = clients.snapshot()
        out = orthros_json("failover", name, timeout=180)
        wait_for(lambda: not clients.stalled(before), timeout=30, what="every client to talk")
        assert clients.broken(before) == []
    finally:
        unanswered = clients.drain()
        clients.close()
    assert unanswered == {}, unanswered
    assert out["to"] == "beta"
    view = pair_status(name)
    assert view["state"] == "failed over" and view["serving"] == "beta"
    pair_stop(name)
    assert_nothing_left(lab, holder="beta", service=svc)


def test_pair_stop_leaves_nothing_and_the_service_runs_on(lab: Lab, tmp_path: Path) -> None:
    svc = start_redis(lab, tmp_path)
    rec = pair_start(svc.pid, "--failover", "--output-commit", "--interval", "100ms")
    name = rec["config"]["name"]
    wait_generations(name, 3)
    pair_stop(name)
    assert pong(lab)
    for h in ("alpha", "beta", "gamma"):
        assert client(lab, h).request("pair_list")["pairs"] == []
    assert_nothing_left(lab, holder="alpha", service=svc)
