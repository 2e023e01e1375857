"""The agent as users run it: ``orthros agent`` as a real process on 127.0.0.1, called through
AgentClient and through raw sockets (real CRIU, root).

Each test starts its own agents with a fresh key and images root and kills them at the end, also
when the test fails. The workload is tests/workloads/counter.py (see test_dump_restore.py): a
restored counter that goes on with the same token and the next number has its memory back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import Spawner, read_lines, wait_for

from orthros_py.agent import pagechan
from orthros_py.agent.auth import parse_key
from orthros_py.agent.client import AgentClient
from orthros_py.agent.errors import AgentRefused
from orthros_py.agent.protocol import build_request, encode_request, read_frame
from orthros_py.agent.server import AUTH_TIMEOUT
from orthros_py.criu.request import DumpOptions
from orthros_py.errors import BadImageError, CriuError, NoSuchProcessError, OrthrosError
from orthros_py.workloads import unixpair

TICK = "0.02"
ORTHROS = str(Path(sys.executable).parent / "orthros")


@dataclass
class AgentProc:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    key: bytes
    images_root: Path
    log: Path

    def client(self, key: bytes | None = None, **kw: Any) -> AgentClient:
        return AgentClient("127.0.0.1", self.port, self.key if key is None else key,
                           name=self.name, **kw)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def raw(self, data: bytes) -> dict[str, Any] | None:
        """Send raw bytes on a new connection; the header of the frame that comes back."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(data)
            raw = read_frame(s)
        return None if raw is None else dict(json.loads(raw))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[[str], AgentProc]]:
    """Starts ``orthros agent`` processes sharing one key; kills every one of them after."""
    key_file = tmp_path / "authkey"
    subprocess.run([ORTHROS, "keygen", "--out", str(key_file)], check=True,
                   capture_output=True, timeout=30)
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> AgentProc:
        images = tmp_path / name / "images"
        log = tmp_path / name / "agent.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [ORTHROS, "agent", "--listen", "127.0.0.1:0", "--key", str(key_file),
                 "--images-root", str(images), "--name", name,
                 # The test's own, not the machine's /dev/shm/orthros-images/NAME.
                 "--scratch-root", str(tmp_path / name / "scratch")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        started.append(proc)
        found: list[int] = []

        def listening() -> bool:
            assert proc.poll() is None, f"the agent exited: {log.read_text()}"
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
            if m:
                found.append(int(m.group(1)))
            return bool(m)

        wait_for(listening, timeout=30, what=f"agent {name} to listen")
        return AgentProc(name, proc, found[0], key_file.read_bytes(), images, log)

    try:
        yield start
    finally:
        for proc in started:
            _stop(proc)


def counts(path: Path) -> list[tuple[str, int]]:
    out = []
    for line in read_lines(path):
        parts = line.split()
        if len(parts) == 3:
            assert parts[2] == "ok", f"the counter found its memory damaged: {line!r}"
            out.append((parts[0], int(parts[1])))
    return out


def test_ping_with_the_right_key(start_agent: Callable[[str], AgentProc]) -> None:
    a = start_agent("alpha")
    ping = a.client().ping()
    assert ping.name == "alpha" and ping.protocol == 1
    status = a.client().status()
    assert status["criu"]["version"] and status["images_root"] == str(a.images_root.resolve())
    report = a.client().check(quick=True)  # orthros_py.host.probe, run by the agent
    assert report["host"] == "alpha" and report["ok"] is True, report["missing_required"]


def test_a_wrong_key_is_refused_and_the_agent_keeps_serving(
        start_agent: Callable[[str], AgentProc]) -> None:
    a = start_agent("alpha")
    with pytest.raises(AgentRefused, match="does not verify with this host's cluster key") as exc:
        a.client(key=bytes(32)).ping()
    assert exc.value.host == "alpha" and exc.value.code == "auth"
    assert a.client().ping().name == "alpha"
    assert a.proc.poll() is None
    wait_for(lambda: "refused a frame (auth)" in a.log_text(), timeout=5,
             what="the refusal in the agent's log")


def test_a_replayed_request_is_refused(start_agent: Callable[[str], AgentProc]) -> None:
    a = start_agent("alpha")
    captured = encode_request(a.key, build_request("status"))  # raw bytes, as a sniffer sees
    first = a.raw(captured)
    assert first is not None and first["kind"] == "resp" and first["ok"] is True
    again = a.raw(captured)
    assert again is not None and again["kind"] == "refusal" and again["code"] == "replay"
    assert "replayed" in again["reason"]
    assert a.client().ping().name == "alpha"
    wait_for(lambda: "refused a frame (replay)" in a.log_text(), timeout=5,
             what="the refusal in the agent's log")


def test_malformed_messages_are_refused(start_agent: Callable[[str], AgentProc]) -> None:
    a = start_agent("alpha")
    not_json = a.raw(struct.pack("!I", 9) + b"not json!")
    assert not_json is not None and not_json["code"] == "malformed"
    http = a.raw(b"GET / HTTP/1.1\r\nHost: alpha\r\n\r\n")
    assert http is not None and http["code"] == "oversize"
    unsigned = a.raw(struct.pack("!I", 9) + b'{"v":1}  ')
    assert unsigned is not None and unsigned["code"] == "auth"
    with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
        s.sendall(struct.pack("!I", 100) + b"{")  # then nothing: a truncated frame
        s.shutdown(socket.SHUT_WR)
        raw = read_frame(s)
        assert raw is not None and json.loads(raw)["code"] == "malformed"
    assert a.proc.poll() is None
    assert a.client().ping().name == "alpha"


def test_remote_dump_listing_restore_and_kill(
        start_agent: Callable[[str], AgentProc], spawner: Spawner, tmp_path: Path) -> None:
    a = start_agent("alpha")
    c = a.client()
    out = tmp_path / "counter.out"
    proc = spawner.workload("counter", TICK, stdout=out)
    wait_for(lambda: len(counts(out)) >= 10, what="the counter to count")

    dumped = c.dump(proc.pid, "counter1")
    # CRIU killed the dumped tree; it is this test's child, so reap it to free its PID.
    assert proc.wait(timeout=10) < 0
    assert dumped.pid == proc.pid and dumped.pids == (proc.pid,)
    assert dumped.stats is not None and dumped.stats["pages_written"] > 0
    token, last = counts(out)[-1]
    out.write_bytes(b"")  # from here on only the restored memory knows where the count stood

    (image,) = c.list_images("counter1")
    assert image.checkpoint
    assert {"inventory.img", "pstree.img", "dump.log"} <= set(image.filenames)
    assert any(n.startswith("pages-") for n in image.filenames)
    assert (a.images_root / "counter1" / "inventory.img").is_file()

    restored = c.restore("counter1")
    spawner.track(restored.pid)  # killed by the fixture whatever happens next
    assert restored.pid == proc.pid and restored.pids == (proc.pid,)
    # The restored root is the agent's child (rst_sibling), not ours.
    assert psutil.Process(restored.pid).ppid() == a.proc.pid
    wait_for(lambda: len(counts(out)) >= 10, what="the restored counter to count")
    after = counts(out)
    assert after[0] == (token, last + 1), f"expected {token} {last + 1}, got {after[0]}"

    held = c.status()["restored"]
    assert [(t["pid"], t["image"], t["running"]) for t in held] == [
        (restored.pid, "counter1", True)]
    with pytest.raises(NoSuchProcessError, match="not restored by this agent"):
        c.kill(a.proc.pid)  # any pid it did not restore is refused, even its own
    killed = c.kill(restored.pid)
    assert killed.exited and killed.exit_status == -9 and killed.signaled == (restored.pid,)
    assert not psutil.pid_exists(restored.pid) or \
        psutil.Process(restored.pid).status() != psutil.STATUS_ZOMBIE  # reaped by the agent


def test_migration_between_two_agents_through_a_page_server(
        start_agent: Callable[[str], AgentProc], spawner: Spawner, tmp_path: Path) -> None:
    """alpha dumps with its memory sent straight to beta's page server, pushes the other
    images to beta, and beta restores: nothing passes through this caller or a shared
    directory (each agent has its own images root)."""
    alpha, beta = start_agent("alpha"), start_agent("beta")
    src, dst = alpha.client(), beta.client()
    out = tmp_path / "counter.out"
    proc = spawner.workload("counter", TICK, stdout=out)
    wait_for(lambda: len(counts(out)) >= 10, what="the counter to count")

    ps = dst.page_server("mig1", address="127.0.0.1", log_level=3)  # 3: TLS is logged
    assert ps.running and ps.port > 0 and ps.state == "waiting" and len(ps.nonce) == 64
    dumped = src.dump(proc.pid, "mig1", DumpOptions(page_server=("127.0.0.1", ps.port)),
                      page_nonce=ps.nonce)
    chan = dumped.raw["page_channel"]
    assert chan["channel"] == "tls" and chan["bytes_sent"] > 0 and chan["refused_local"] == 0
    assert proc.wait(timeout=10) < 0
    token, last = counts(out)[-1]
    out.write_bytes(b"")
    (on_alpha,) = src.list_images("mig1")
    assert not any(n.startswith("pages-") for n in on_alpha.filenames)  # memory went to beta
    sent = src.push_images("mig1", "127.0.0.1", beta.port, dest_name="beta")
    assert {f.filename for f in sent} == set(on_alpha.filenames)

    restored = dst.restore("mig1")
    spawner.track(restored.pid)
    wait_for(lambda: len(counts(out)) >= 10, what="the counter restored on beta to count")
    assert counts(out)[0] == (token, last + 1)
    with pytest.raises(NoSuchProcessError):
        src.kill(restored.pid)  # alpha did not restore it
    assert dst.kill(restored.pid).exited
    wait_for(lambda: not _page_server(dst, "mig1")["running"], timeout=10,
             what="the page server to exit after its dump")
    assert _page_server(dst, "mig1")["state"] == "connected"
    assert "TLS handshake completed" in (beta.images_root / "mig1" / "page-server.log").read_text()
    dst.page_server_stop("mig1")


def test_page_servers_are_stopped_on_request_and_with_their_agent(
        start_agent: Callable[[str], AgentProc]) -> None:
    a = start_agent("alpha")
    c = a.client()
    first = c.page_server("one", address="127.0.0.1")
    with pytest.raises(BadImageError, match="already receives"):
        c.page_server("one")
    stopped = c.page_server_stop("one")
    assert stopped["was_running"] and stopped["state"] == "stopped"
    wait_for(lambda: not _listening(first.port), timeout=10, what="the page channel to close")
    second = c.page_server("two", address="127.0.0.1")
    assert [s["image"] for s in c.status()["page_servers"]] == ["two"]
    _stop(a.proc)  # SIGTERM: the agent stops what would otherwise wait for a dump forever
    assert a.proc.returncode == 0
    wait_for(lambda: not _listening(second.port), timeout=10, what="the page channel to close")
    assert "stopping page server" in a.log_text()


def test_an_unauthenticated_connection_that_sends_nothing_is_dropped(
        start_agent: Callable[[str], AgentProc]) -> None:
    """A silent connection (or one that drips bytes) cannot hold one of the agent's slots for
    longer than AUTH_TIMEOUT; an authenticated one may stay idle between requests."""
    a = start_agent("alpha")
    with socket.create_connection(("127.0.0.1", a.port), timeout=20) as silent, \
            socket.create_connection(("127.0.0.1", a.port), timeout=20) as drip:
        start = time.monotonic()
        drip.sendall(b"\x00")  # the first byte of a length, then nothing more
        assert silent.recv(1) == b""
        assert drip.recv(1) == b""
        took = time.monotonic() - start
    assert took < AUTH_TIMEOUT + 3, took
    assert "sent no authenticated request" in a.log_text()
    with socket.create_connection(("127.0.0.1", a.port), timeout=20) as s:
        s.sendall(encode_request(a.key, build_request("ping")))
        assert read_frame(s) is not None
        time.sleep(AUTH_TIMEOUT + 1)  # authenticated: idle between requests is allowed
        s.sendall(encode_request(a.key, build_request("ping")))
        again = read_frame(s)
    assert again is not None and json.loads(again)["ok"] is True


def test_a_dump_to_a_page_server_without_the_channel_nonce_is_refused(
        start_agent: Callable[[str], AgentProc], spawner: Spawner) -> None:
    a = start_agent("alpha")
    proc = spawner.workload("counter", TICK)
    with pytest.raises(OrthrosError, match="page_nonce"):
        a.client().dump(proc.pid, "x", DumpOptions(page_server=("127.0.0.1", 9)))
    assert proc.poll() is None


def _dropped(sock: socket.socket) -> bool:
    """The peer closed the connection without a word (a reset: it left our bytes unread)."""
    try:
        return sock.recv(64) == b""
    except ConnectionResetError:
        return True


def _impostor_hello(key: bytes, image: str, nonce_hex: str) -> bytes:
    return pagechan.client_hello(key, image, bytes.fromhex(nonce_hex), b"\x01" * 32)


def test_page_channel_refuses_impostors_and_serves_the_genuine_sender(
        start_agent: Callable[[str], AgentProc], spawner: Spawner, tmp_path: Path) -> None:
    """Impostors connect to beta's page port before alpha's dump: one sends garbage, one stays
    silent (and is still connected while the dump runs), one speaks the handshake with another
    key, one with the right key's proof for another image. Each is refused and logged, and the
    dump that follows gets its memory to beta intact."""
    alpha, beta = start_agent("alpha"), start_agent("beta")
    src, dst = alpha.client(), beta.client()
    out = tmp_path / "counter.out"
    proc = spawner.workload("counter", TICK, stdout=out)
    wait_for(lambda: len(counts(out)) >= 10, what="the counter to count")
    ps = dst.page_server("mig2", address="127.0.0.1")
    addr = ("127.0.0.1", ps.port)
    key = parse_key(beta.key)

    silent = socket.create_connection(addr, timeout=20)
    try:
        with socket.create_connection(addr, timeout=20) as garbage:
            garbage.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)) * 4)
            assert _dropped(garbage)  # closed at once, nothing said
        with socket.create_connection(addr, timeout=20) as forger:
            forger.sendall(_impostor_hello(b"k" * 32, "mig2", ps.nonce))
            assert _dropped(forger)
        with socket.create_connection(addr, timeout=20) as other:
            other.sendall(_impostor_hello(key, "another-image", ps.nonce))
            assert _dropped(other)
        assert _page_server(dst, "mig2")["refused"] == 3

        dumped = src.dump(proc.pid, "mig2", DumpOptions(page_server=addr),
                          page_nonce=ps.nonce)
        assert dumped.raw["page_channel"]["channel"] == "tls"
        assert proc.wait(timeout=10) < 0
        assert _dropped(silent)  # once it had been silent too long
    finally:
        silent.close()
    token, last = counts(out)[-1]
    out.write_bytes(b"")
    src.push_images("mig2", "127.0.0.1", beta.port, dest_name="beta")
    restored = dst.restore("mig2")
    spawner.track(restored.pid)
    wait_for(lambda: len(counts(out)) >= 10, what="the counter restored on beta to count")
    assert counts(out)[0] == (token, last + 1)  # its memory arrived intact
    dst.kill(restored.pid)
    info = _page_server(dst, "mig2")
    assert info["refused"] == 4 and info["state"] == "connected", info
    reasons = " | ".join(r["reason"] for r in info["refusals"])
    assert "garbage" in reasons and "does not verify" in reasons and "within" in reasons
    log = beta.log_text()
    assert log.count("page channel of image mig2: refused") == 4
    assert "proved itself" in log


class _FlippingRelay:
    """A man in the middle on the page channel: forwards both ways, and flips one bit of the
    byte at ``offset`` of the sender's stream (well past the handshake, inside TLS)."""

    def __init__(self, upstream: tuple[str, int], offset: int) -> None:
        self.upstream, self.offset = upstream, offset
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.flipped = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        up = socket.create_connection(self.upstream)
        threading.Thread(target=self._pipe, args=(up, conn, False), daemon=True).start()
        self._pipe(conn, up, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, flip: bool) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if flip and not self.flipped and seen <= self.offset < seen + len(data):
                    buf = bytearray(data)
                    buf[self.offset - seen] ^= 0x01
                    data, self.flipped = bytes(buf), True
                seen += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def test_a_byte_flipped_on_the_page_channel_fails_the_dump_and_the_tree_runs_on(
        start_agent: Callable[[str], AgentProc], spawner: Spawner, tmp_path: Path) -> None:
    alpha, beta = start_agent("alpha"), start_agent("beta")
    src, dst = alpha.client(), beta.client()
    out = tmp_path / "counter.out"
    proc = spawner.workload("counter", TICK, stdout=out)
    wait_for(lambda: len(counts(out)) >= 10, what="the counter to count")
    ps = dst.page_server("mig3", address="127.0.0.1")
    relay = _FlippingRelay(("127.0.0.1", ps.port), offset=pagechan.HELLO_BYTES + 64 * 1024)
    try:
        with pytest.raises(CriuError) as exc:
            src.dump(proc.pid, "mig3", DumpOptions(page_server=("127.0.0.1", relay.port)),
                     page_nonce=ps.nonce)
    finally:
        relay.close()
    assert relay.flipped
    print(f"\n{exc.value}")
    assert "page" in str(exc.value).lower()
    before = len(counts(out))
    wait_for(lambda: len(counts(out)) >= before + 10, what="the counter to count on on alpha")
    assert proc.poll() is None
    wait_for(lambda: not _page_server(dst, "mig3")["running"], timeout=10,
             what="beta's page server to give up")
    assert "Error" in (beta.images_root / "mig3" / "page-server.log").read_text()


@pytest.fixture
def container(tmp_path: Path) -> Iterator[unixpair.Container]:
    """A small container of tests/linux/test_unixpair.py's kind: its own PID, UTS, IPC (a SysV
    shm segment holding a magic) and mount namespaces; killed, wherever it runs, at the end."""
    c = unixpair.start(tmp_path / "ctr", sockets=5, hostname="orthros-pagechan")
    try:
        c.wait_ready(timeout=60)
        c.wait_progress(5)
        yield c
    finally:
        c.stop()


def test_a_tree_with_its_own_ipc_namespace_crosses_sealed_by_the_agents(
        start_agent: Callable[[str], AgentProc], spawner: Spawner,
        container: unixpair.Container) -> None:
    """CRIU's TLS cannot carry such a tree (its SysV shm is dumped by a forked child): the
    agents seal the stream in AES-GCM records instead, and the shm arrives intact."""
    assert os.stat(f"/proc/{container.init_pid}/ns/ipc").st_ino != \
        os.stat("/proc/self/ns/ipc").st_ino
    alpha, beta = start_agent("alpha"), start_agent("beta")
    src, dst = alpha.client(), beta.client()
    before = container.status()
    ps = dst.page_server("ipc1", address="127.0.0.1", log_level=4)
    dumped = src.dump(container.init_pid, "ipc1",
                      DumpOptions(page_server=("127.0.0.1", ps.port)), page_nonce=ps.nonce)
    chan = dumped.raw["page_channel"]
    assert chan["channel"] == "aes-gcm" and chan["bytes_sent"] > 0, chan
    assert chan["bytes_received"] > 0, chan  # the page server's answers came back, sealed
    assert container.host_pids() == []
    (on_alpha,) = src.list_images("ipc1")
    assert not any(n.startswith("pages-") for n in on_alpha.filenames)
    src.push_images("ipc1", "127.0.0.1", beta.port, dest_name="beta")
    wait_for(lambda: not _page_server(dst, "ipc1")["running"], timeout=10,
             what="the page server to exit after its dump")
    info = _page_server(dst, "ipc1")
    assert info["channel"] == "aes-gcm" and info["channel_error"] is None, info

    restored = dst.restore("ipc1")
    spawner.track(restored.pid)
    container.adopt(restored.pid)
    after = container.wait_progress(10, timeout=60)
    for role in unixpair.ROLES:
        st = after[role]
        assert st["errors"] == 0 and st["ipc_magic_ok"] is True, st
        assert st["rounds"] > before[role]["rounds"], (before[role], st)  # memory came back
    assert "AES-256-GCM" in beta.log_text() and "AES-256-GCM" in alpha.log_text()
    assert "not encrypted" not in alpha.log_text()
    assert "aborting" not in alpha.log_text() + beta.log_text()  # both ends ended in order
    ps_log = (beta.images_root / "ipc1" / "page-server.log").read_text()
    assert "TLS handshake" not in ps_log
    assert dst.kill(restored.pid).exited
    dst.page_server_stop("ipc1")


def test_a_byte_flipped_in_the_agents_records_fails_the_dump_and_the_tree_runs_on(
        start_agent: Callable[[str], AgentProc], container: unixpair.Container) -> None:
    alpha, beta = start_agent("alpha"), start_agent("beta")
    src, dst = alpha.client(), beta.client()
    ps = dst.page_server("ipc2", address="127.0.0.1")
    relay = _FlippingRelay(("127.0.0.1", ps.port), offset=pagechan.HELLO_BYTES + 64 * 1024)
    try:
        with pytest.raises(CriuError) as exc:
            src.dump(container.init_pid, "ipc2",
                     DumpOptions(page_server=("127.0.0.1", relay.port)), page_nonce=ps.nonce)
    finally:
        relay.close()
    assert relay.flipped
    print(f"\n{exc.value}")
    assert "page channel" in str(exc.value) and "aes-gcm" in str(exc.value)
    wait_for(lambda: not _page_server(dst, "ipc2")["running"], timeout=10,
             what="beta's page server to give up")
    info = _page_server(dst, "ipc2")
    assert "does not authenticate" in (info["channel_error"] or ""), info
    assert "does not authenticate: damaged or forged on the path" in beta.log_text()
    container.wait_progress(10)  # the tree runs on at the source, its shm intact
    assert all(s["ipc_magic_ok"] for s in container.status().values())
    dst.page_server_stop("ipc2")


def _page_server(c: AgentClient, image: str) -> dict[str, Any]:
    (ps,) = [s for s in c.status()["page_servers"] if s["image"] == image]
    return dict(ps)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
