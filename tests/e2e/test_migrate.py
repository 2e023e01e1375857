"""``orthros migrate`` on the lab, as users run it, under real clients that check every answer:
a TCP echo service with 200 connections moved alpha -> beta -> alpha ten times; nginx under
wrk; redis under a writer that reads back every key it wrote. Each test ends with nothing of
the migrations left: no lock, no stray address, no stray process, no image. Also
``vagrant validate`` on the Vagrantfile that defines the same hosts as VMs.

Run with ``pytest -s`` to see each migration's phase timings.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import orthros_json, run_orthros, wait_for
from migrate_kit import (
    SERVICE_IP,
    Service,
    StreamClients,
    answers,
    assert_nothing_left,
    at_stage,
    echo_server,
    established,
    host,
    migrate_cli,
    print_timings,
)

from orthros_py.lab import Lab
from orthros_py.netlock.method import NetworkLock
from orthros_py.policies.migrate import MigrateConfig, Migration, MigrationError, Stage
from orthros_py.workloads.echo import ClientPool

ROOT = Path(__file__).resolve().parents[2]


def test_echo_service_with_200_clients_moves_back_and_forth_ten_times(lab: Lab) -> None:
    port = 7000
    svc = echo_server(lab, "alpha", port)
    with lab.in_netns("client"):
        pool = ClientPool(SERVICE_IP, port, 200, timeout=30)
    try:
        pool.start(interval=0.005)  # a request on every connection, round after round
        wait_for(lambda: established(lab, "alpha", svc.pid) == 200, timeout=20,
                 what="200 established connections on alpha")
        wait_for(lambda: pool.stats.requests >= 2000, what="traffic on every connection")
        rows = []
        where = "alpha"
        for _ in range(10):
            for dest in ("beta", "alpha"):
                out = migrate_cli(svc.pid, where, dest)
                # The baseline after the migration: its dump froze the service, so rounds
                # answered before that say nothing about the restored one.
                before = pool.answered()
                rows.append(out)
                assert out["new_pid"] == svc.pid  # CRIU gives the tree its pids again on the new host
                assert out["counts"]["connections"] == 200
                assert out["counts"]["established_after"] == 200
                assert out["warnings"] == []
                assert lab.holder(SERVICE_IP) == lab.host(dest)
                assert answers(lab, port), f"{SERVICE_IP}:{port} does not answer on {dest}"
                where = dest
                # The clients go on: two more answers on every single connection.
                wait_for(lambda b=before: all(
                    now >= then + 2 for now, then in zip(pool.answered(), b, strict=True)),
                    timeout=30, what=f"every connection to get answers from {dest}")
                assert pool.stats.errors == 0, pool.stats.error_samples
        stats = pool.stop()
        print_timings("echo service, 200 clients (ms)", rows)
        print(f"clients: {stats.requests} requests, {stats.errors} errors, longest wait "
              f"{stats.max_gap_s * 1000:.0f} ms")
        assert stats.errors == 0, stats.error_samples
        assert established(lab, "alpha", svc.pid) == 200
        assert_nothing_left(lab, holder="alpha", service=svc)
    finally:
        pool.close()


@pytest.mark.parametrize("method", ["skip", "xdp"])
def test_the_lock_is_what_keeps_clients_through_a_slow_restore(lab: Lab, method: str) -> None:
    """Two seconds between moving the address and restoring, 100 connections sending all the
    time: with no lock the destination's kernel resets them (the control: every connection
    must break); with the lock on both hosts, every connection goes on and nothing it sent is
    left unanswered. Counted per connection: a global count of echoes would pass with a
    couple of live connections and the rest silently stalled."""
    conns = 100
    port = 7200
    svc = echo_server(lab, "alpha", port)
    clients = StreamClients(lab, port, conns)
    try:
        start = clients.snapshot()
        wait_for(lambda: not clients.stalled(start, min_bytes=200) or clients.errors,
                 what="traffic on every connection")
        assert not clients.errors, clients.errors[:5]
        for attempt in range(3):
            job = Migration(svc.pid, host(lab, "alpha"), host(lab, "beta"),
                            MigrateConfig(network_lock=NetworkLock(method)),
                            observer=at_stage(Stage.RESTORE, lambda: time.sleep(2.0)))
            try:
                result = job.run()
                break
            except MigrationError as err:
                # The control has no lock at all: CRIU may find a busy socket's queue
                # changing while it copies it ("recv failed (0, want N)") and refuse; the
                # migration then rolls back, and the control is tried again. With a lock
                # this never happens: it fails the test.
                if method != "skip" or "recv failed" not in str(err) or attempt == 2:
                    raise
                print(f"\ncontrol, attempt {attempt + 1}: {err}")
        assert result.connections == conns
        # The baseline is taken after the migration (the dump froze the service long before):
        # only what beta echoes counts.
        after = clients.snapshot()
        # Until each connection's fate is known: it failed, or beta echoes on it again. One
        # still silent when the time is up counts as broken (stalled to the end).
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not clients.stalled(after, min_bytes=200), timeout=40,
                     what="every connection to fail or to get answers from beta")
        broken = clients.broken(after)
        unanswered = clients.drain()
    finally:
        clients.close()
    print(f"\n{method}: {len(broken)} of {conns} connections broken, {len(clients.errors)} "
          f"client errors, e.g. {clients.errors[:2]}")
    if method == "skip":
        # The control: not one connection came through (a reset, or silence to the end).
        assert broken == list(range(conns)), f"survived: {set(range(conns)) - set(broken)}"
    else:
        assert not clients.errors, clients.errors[:5]
        assert broken == [], f"connections without progress after the migration: {broken}"
        assert unanswered == {}, f"bytes never echoed, per connection: {unanswered}"
        assert_nothing_left(lab, holder="beta", service=svc)


NGINX_CONF = """
user root;
worker_processes 2;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {ip}:8080;
        location / {{ return 200 "served by orthros\\n"; }}
    }}
}}
"""


def test_nginx_under_wrk(lab: Lab, tmp_path: Path) -> None:
    # Set-up installs nginx and wrk: missing, they fail the test (FileNotFoundError), not skip.
    # Workers as root: CRIU cannot read another uid's rlimits here (no CAP_SYS_RESOURCE).
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp_path, ip=SERVICE_IP))
    svc = Service(lab, "alpha", ["nginx", "-p", str(tmp_path), "-c", str(conf)])

    def http_ok() -> bool:
        try:
            with lab.connect((SERVICE_IP, 8080), timeout=2) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return b"served by orthros" in s.recv(4096)
        except OSError:
            return False

    wait_for(http_ok, timeout=20, what="nginx to answer")
    conns, seconds = 64, 12
    wrk = lab.popen("client", ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--timeout", "20s",
                               f"http://{SERVICE_IP}:8080/"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows = []
    try:
        wait_for(lambda: established(lab, "alpha", svc.pid) >= conns, timeout=20,
                 what=f"wrk's {conns} connections on alpha")
        time.sleep(1)
        rows.append(migrate_cli(svc.pid, "alpha", "beta"))
        assert http_ok()
        time.sleep(1)
        rows.append(migrate_cli(svc.pid, "beta", "alpha"))
        assert http_ok()
        out, _ = wrk.communicate(timeout=seconds + 60)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    print_timings(f"nginx (master + 2 workers) under wrk -c{conns} (ms)", rows)
    print(out)
    assert wrk.returncode == 0, out
    assert "Socket errors" not in out, out  # connect, read, write or timeout errors
    assert "Non-2xx" not in out, out
    m = re.search(r"(\d+) requests in", out)
    assert m and int(m.group(1)) > 1000, out
    for r in rows:
        assert r["counts"]["processes"] == 3 and r["counts"]["connections"] >= conns
    assert_nothing_left(lab, holder="alpha", service=svc)


class RedisWriter:
    """SETs unique keys on several connections at once and remembers each one redis
    acknowledged; any error, reset or timeout is counted."""

    def __init__(self, lab: Lab, port: int, n: int) -> None:
        self.socks = []
        for _ in range(n):
            self.socks.append(lab.connect((SERVICE_IP, port), timeout=30))
        self.acked: dict[str, str] = {}
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._write, args=(i, s), daemon=True)
                        for i, s in enumerate(self.socks)]
        for t in self.threads:
            t.start()

    @staticmethod
    def command(*words: str) -> bytes:
        out = f"*{len(words)}\r\n".encode()
        for w in words:
            b = w.encode()
            out += f"${len(b)}\r\n".encode() + b + b"\r\n"
        return out

    def _write(self, i: int, s: socket.socket) -> None:
        f = s.makefile("rb")
        seq = 0
        while not self.stop.is_set():
            seq += 1
            key, value = f"k:{i}:{seq}", f"v:{i}:{seq}:{'x' * (seq % 50)}"
            try:
                s.sendall(self.command("SET", key, value))
                line = f.readline()
            except OSError as err:
                self.errors.append(f"conn {i}: {err}")
                return
            if line != b"+OK\r\n":
                self.errors.append(f"conn {i}: SET {key} answered {line!r}")
                return
            with self.lock:
                self.acked[key] = value

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        for s in self.socks:
            s.close()


def redis_read_all(lab: Lab, port: int, keys: list[str]) -> dict[str, str | None]:
    got: dict[str, str | None] = {}
    with lab.connect((SERVICE_IP, port), timeout=30) as s:
        f = s.makefile("rb")
        for start in range(0, len(keys), 500):
            batch = keys[start:start + 500]
            s.sendall(b"".join(RedisWriter.command("GET", k) for k in batch))
            for k in batch:
                head = f.readline()
                if head.startswith(b"$-1"):
                    got[k] = None
                    continue
                assert head.startswith(b"$"), head
                n = int(head[1:])
                got[k] = f.read(n + 2)[:-2].decode()
    return got


def test_redis_under_a_writer_keeps_every_key(lab: Lab, tmp_path: Path) -> None:
    # Set-up installs redis-server: missing, it fails the test, not skip.
    port = 6379
    svc = Service(lab, "alpha", ["redis-server", "--bind", SERVICE_IP, "--port", str(port),
                                 "--save", "", "--appendonly", "no", "--protected-mode", "no",
                                 "--daemonize", "no", "--dir", str(tmp_path)])

    def pong() -> bool:
        try:
            with lab.connect((SERVICE_IP, port), timeout=2) as s:
                s.sendall(RedisWriter.command("PING"))
                return s.recv(64) == b"+PONG\r\n"
        except OSError:
            return False

    wait_for(pong, timeout=20, what="redis to answer")
    writer = RedisWriter(lab, port, 16)
    rows = []
    try:
        wait_for(lambda: len(writer.acked) > 2000, what="the writer to write")
        for src, dest in (("alpha", "beta"), ("beta", "alpha")):
            rows.append(migrate_cli(svc.pid, src, dest))
            done = len(writer.acked)
            wait_for(lambda n=done: len(writer.acked) > n + 2000, what=f"writes on {dest}")
    finally:
        writer.close()
    print_timings("redis-server under 16 writers (ms)", rows)
    assert writer.errors == [], writer.errors[:5]
    keys = sorted(writer.acked)
    stored = redis_read_all(lab, port, keys)
    lost = [k for k in keys if stored[k] != writer.acked[k]]
    assert not lost, f"{len(lost)} of {len(keys)} acknowledged keys lost or wrong, e.g. {lost[:3]}"
    print(f"redis: {len(keys)} acknowledged keys, every one read back")
    assert_nothing_left(lab, holder="alpha", service=svc)


@pytest.mark.lab(hosts=2, agents=False)
def test_the_cli_refuses_what_cannot_work(lab: Lab) -> None:

    res = run_orthros("migrate", "4242", "--from", "alpha", "--to", "nowhere")
    assert res.returncode == 2 and "no host named 'nowhere'" in res.stderr
    res = run_orthros("migrate", "4242", "--from", "alpha", "--to", "beta",
                      "--service-ip", "10.77.0.200")
    assert res.returncode == 2 and "does not let beta hold 10.77.0.200" in res.stderr
    res = run_orthros("migrate", "4242", "--from", "alpha", "--to", "beta")
    assert res.returncode != 0 and "not reachable" in res.stderr  # no agents in this lab


def test_hosts_shows_every_inventory_host(lab: Lab) -> None:

    data = orthros_json("hosts", timeout=180)
    rows = {r["name"]: r for r in data["hosts"]}
    assert {"alpha", "beta", "gamma", "delta"} <= set(rows)
    assert rows["alpha"]["reachable"] and rows["beta"]["reachable"]
    assert not rows["gamma"]["reachable"]  # not in a two-host lab
    assert rows["alpha"]["services"] == ["web"] and rows["beta"]["services"] == []
    assert rows["alpha"]["criu"] and rows["alpha"]["check"]["ok"]


def test_vagrantfile_validates() -> None:
    # Test set-up installs vagrant and vagrant-libvirt: a host without them fails here.
    vagrant = shutil.which("vagrant")
    assert vagrant is not None, "vagrant is not installed: run 'make setup-tests'"
    # The Vagrantfile names libvirt itself; a provider chosen by the caller's environment
    # would hide a Vagrantfile that no longer does.
    env = {k: v for k, v in os.environ.items() if k != "VAGRANT_DEFAULT_PROVIDER"}
    res = subprocess.run([vagrant, "validate"], cwd=ROOT / "vagrant", capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout
