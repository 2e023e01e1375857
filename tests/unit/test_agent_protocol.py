"""The agent RPC without root: framing, MACs, the replay window, argument checking, name
validation, key files, and an in-process agent serving the operations that need no root
(ping, status, file transfer) plus its refusals."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orthros_py.agent import auth
from orthros_py.agent.client import AgentClient
from orthros_py.agent.errors import (
    AgentRefused,
    AgentUnreachable,
    AuthError,
    KeyFileError,
    ProtocolError,
    Refusal,
    ReplayError,
    VersionError,
)
from orthros_py.agent.ops.criu import page_server_request
from orthros_py.agent.protocol import (
    EMPTY_SHA256,
    MAX_HEADER,
    PayloadReader,
    RefusalFrame,
    build_request,
    build_response,
    canonical,
    check_type,
    decode_header,
    encode_refusal,
    encode_request,
    encode_response,
    open_request,
    open_response,
    options_from_args,
    options_to_args,
    read_frame,
)
from orthros_py.agent.server import AgentServer
from orthros_py.agent.state import Agent
from orthros_py.agent.table import OPS, dispatch
from orthros_py.criu.request import CgroupMode, CriuNetworkLock, DumpOptions, RestoreOptions
from orthros_py.errors import BadImageError, CriuError, NoSuchProcessError
from orthros_py.net.conn import parse_endpoint
from orthros_py.policies.hosts import TreeFacts

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_800_000_000.0


def frame_header(frame: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("!I", frame[:4])
    assert len(frame) == 4 + n
    return decode_header(frame[4:])


def reframe(header: dict[str, Any]) -> bytes:
    data = canonical(header)
    return struct.pack("!I", len(data)) + data


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def signed_request(op: str = "ping", args: dict[str, Any] | None = None, *, ts: float = NOW,
                   key: bytes = KEY, nonce: str | None = None) -> dict[str, Any]:
    return frame_header(encode_request(key, build_request(op, args, ts=ts, nonce=nonce)))


# --- frames and MACs ---------------------------------------------------------------------------


def test_request_round_trip() -> None:
    req = build_request("dump", {"pid": 42, "image": "web1"}, ts=NOW)
    frame = encode_request(KEY, req)
    header = frame_header(frame)
    assert header["v"] == 1 and header["kind"] == "req" and len(header["mac"]) == 64
    assert header["payload_len"] == 0 and header["payload_sha256"] == EMPTY_SHA256
    got = open_request(KEY, header, auth.ReplayGuard(clock=Clock()))
    assert got == req


def test_canonical_encoding_is_deterministic() -> None:
    a = canonical({"b": 1, "a": [1.5, "é"], "c": {"y": None, "x": True}})
    assert a == b'{"a":[1.5,"\\u00e9"],"b":1,"c":{"x":true,"y":null}}'
    with pytest.raises(ValueError):
        canonical({"x": float("nan")})


def test_wrong_key_is_refused() -> None:
    with pytest.raises(AuthError) as exc:
        open_request(OTHER_KEY, signed_request(), None)
    assert exc.value.code == Refusal.AUTH
    assert "cluster key" in str(exc.value)


@pytest.mark.parametrize("field,value", [
    ("op", "restore"), ("args", {"pid": 1}), ("ts", NOW + 1), ("nonce", "0" * 32),
    ("payload_len", 5), ("id", "other"), ("kind", "resp"),
])
def test_any_change_to_a_signed_header_breaks_its_mac(field: str, value: Any) -> None:
    header = signed_request()
    header[field] = value
    with pytest.raises(AuthError):
        open_request(KEY, header, None)


def test_unsigned_or_badly_signed_frames_are_refused() -> None:
    header = signed_request()
    del header["mac"]
    with pytest.raises(AuthError, match="not signed"):
        open_request(KEY, header, None)
    header["mac"] = "zz"
    with pytest.raises(AuthError):
        open_request(KEY, header, None)


def test_a_response_is_refused_as_a_request() -> None:
    req = build_request("ping", ts=NOW)
    resp = frame_header(encode_response(KEY, build_response(req, "alpha", result={})))
    with pytest.raises(ProtocolError, match="expected a request"):
        open_request(KEY, resp, None)


def test_response_must_answer_this_request() -> None:
    req = build_request("ping")
    other = build_request("ping")
    frame = encode_response(KEY, build_response(req, "alpha", result={"x": 1}))
    resp = open_response(KEY, frame_header(frame), req)
    assert resp.ok and resp.result == {"x": 1} and resp.agent == "alpha" and resp.re == req.nonce
    with pytest.raises(AuthError, match="does not answer"):
        open_response(KEY, frame_header(frame), other)
    with pytest.raises(AuthError):
        open_response(OTHER_KEY, frame_header(frame), req)


def test_error_responses_carry_the_error() -> None:
    req = build_request("dump")
    err = CriuError("CRIU refused the dump", errno=5, log_tail=["Error (x): y"], pid=9)
    frame = encode_response(KEY, build_response(req, "alpha", error=err.to_dict()))
    resp = open_response(KEY, frame_header(frame), req)
    assert not resp.ok and resp.result is None
    assert resp.error is not None and resp.error["type"] == "CriuError"


def test_refusal_becomes_agent_refused() -> None:
    req = build_request("ping")
    frame = encode_refusal(RefusalFrame("replay", "the request was replayed", "sign afresh"))
    with pytest.raises(AgentRefused) as exc:
        open_response(KEY, frame_header(frame), req)
    assert exc.value.code == "replay"
    assert "replayed" in str(exc.value) and exc.value.hint == "sign afresh"


# --- the replay window -------------------------------------------------------------------------


def test_a_nonce_is_accepted_once() -> None:
    guard = auth.ReplayGuard(30.0, clock=Clock())
    header = signed_request()
    open_request(KEY, header, guard)
    with pytest.raises(ReplayError, match="replayed") as exc:
        open_request(KEY, header, guard)
    assert exc.value.code == Refusal.REPLAY


@pytest.mark.parametrize("offset,accepted", [
    (0.0, True), (-29.9, True), (29.9, True), (-30.1, False), (30.1, False), (-3600, False),
])
def test_timestamps_outside_the_window_are_refused(offset: float, accepted: bool) -> None:
    guard = auth.ReplayGuard(30.0, clock=Clock())
    header = signed_request(ts=NOW + offset)
    if accepted:
        open_request(KEY, header, guard)
    else:
        with pytest.raises(ReplayError, match=r"old|future"):
            open_request(KEY, header, guard)
        assert len(guard) == 0  # a refused request is not remembered


def test_nonce_cache_forgets_what_the_window_refuses_anyway() -> None:
    clock = Clock()
    guard = auth.ReplayGuard(30.0, clock=clock)
    for i in range(5):
        guard.check(NOW + i, f"{i:032x}")
    assert len(guard) == 5
    clock.t = NOW + 32.5  # nonces 0, 1 and 2 are past their window now
    guard.check(NOW + 32, "f" * 32)
    assert len(guard) == 3
    with pytest.raises(ReplayError, match="old"):
        guard.check(NOW, f"{0:032x}")  # forgotten, but too old anyway
    with pytest.raises(ReplayError, match="replayed"):
        guard.check(NOW + 4, f"{4:032x}")  # still inside: still remembered


def test_a_full_nonce_cache_refuses_rather_than_forgets() -> None:
    guard = auth.ReplayGuard(30.0, max_nonces=3, clock=Clock())
    for i in range(3):
        guard.check(NOW, f"{i:032x}")
    with pytest.raises(ReplayError) as exc:
        guard.check(NOW, f"{9:032x}")
    assert exc.value.code == Refusal.BUSY


def test_forged_frames_never_reach_the_nonce_cache() -> None:
    guard = auth.ReplayGuard(30.0, clock=Clock())
    with pytest.raises(AuthError):
        open_request(OTHER_KEY, signed_request(), guard)
    assert len(guard) == 0


# --- malformed frames --------------------------------------------------------------------------


@pytest.mark.parametrize("raw,match", [
    (b"hello", "not JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"v": 1, "v": 1}', "repeats the key"),
    (b'{"v": 1, "ts": NaN}', "NaN"),
    (b'{"kind": "req"}', "no protocol version"),
    (b'{"v": true}', "no protocol version"),
    (b"[" * 100_000 + b"]" * 100_000, "nests too deeply|not JSON"),
])
def test_malformed_headers(raw: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as exc:
        decode_header(raw)
    assert exc.value.code == Refusal.MALFORMED


def test_unknown_protocol_version_is_refused_before_the_mac() -> None:
    header = signed_request()
    header["v"] = 2
    with pytest.raises(VersionError, match="version 2 is not supported") as exc:
        decode_header(canonical(header))
    assert exc.value.code == Refusal.VERSION


@pytest.mark.parametrize("field,value,match", [
    ("op", "Drop Table", "not an operation"),
    ("id", "", "request id"),
    ("nonce", "abc", "nonce"),
    ("ts", "yesterday", "'ts' must be float"),
    ("args", [1], "'args' must be dict"),
    ("payload_len", -1, "out of range"),
    ("payload_sha256", "x", "SHA-256"),
])
def test_mistyped_fields_of_a_signed_request(field: str, value: Any, match: str) -> None:
    header = signed_request()
    del header["mac"]
    header[field] = value
    header["mac"] = auth.sign(KEY, canonical(header))
    with pytest.raises(ProtocolError, match=match):
        open_request(KEY, header, None)


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def test_read_frame_handles_clean_close_truncation_and_size() -> None:
    a, b = _pair()
    with a, b:
        frame = encode_request(KEY, build_request("ping"))
        a.sendall(frame + frame[:10])
        a.shutdown(socket.SHUT_WR)
        assert read_frame(b) == frame[4:]
        with pytest.raises(ProtocolError, match="closed in the middle"):
            read_frame(b)
    a, b = _pair()
    with a, b:
        a.close()
        assert read_frame(b) is None
    a, b = _pair()
    with a, b:
        a.sendall(struct.pack("!I", MAX_HEADER + 1))
        with pytest.raises(ProtocolError) as exc:
            read_frame(b)
        assert exc.value.code == Refusal.OVERSIZE
    a, b = _pair()
    with a, b:
        a.sendall(struct.pack("!I", 0))
        with pytest.raises(ProtocolError, match="empty frame"):
            read_frame(b)


def _send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    # More than a socketpair buffers: the reader must run while this writes.
    t = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    t.start()
    return t


def test_payload_reader_checks_the_digest() -> None:
    data = os.urandom(3 << 20)
    a, b = _pair()
    with a, b:
        writer = _send_in_background(a, data)
        out = io.BytesIO()
        assert PayloadReader(b, len(data), hashlib.sha256(data).hexdigest()).copy_to(out) == len(data)
        assert out.getvalue() == data
        writer.join(5)
    a, b = _pair()
    with a, b:
        writer = _send_in_background(a, data)
        reader = PayloadReader(b, len(data), EMPTY_SHA256)
        with pytest.raises(AuthError, match="does not match"):
            reader.discard()
        assert reader.consumed
        writer.join(5)


# --- names, endpoints, arguments ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["web1", "pages-1.img", "stats-dump", "a", "A_b+c-1.2",
                                  "x" * 128])
def test_valid_names(name: str) -> None:
    from orthros_py.agent.protocol import validate_name
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../etc", "a/b", "/etc", ".hidden", "a..b",
                                  "-rf", "x" * 129, "sp ace", "nul\x00", "é", 7, None])
def test_invalid_names(name: Any) -> None:
    from orthros_py.agent.protocol import validate_name
    with pytest.raises(ProtocolError, match="not allowed") as exc:
        validate_name(name)
    assert exc.value.code == Refusal.BAD_REQUEST


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:7070", ("127.0.0.1", 7070)), (":7070", ("", 7070)),
    ("[::1]:7070", ("::1", 7070)), ("alpha:0", ("alpha", 0)),
])
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text, listen=True) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", "::1:7070", "[::1]7070", "h:99999", "h:x",
                                  "a b:1"])
def test_parse_endpoint_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text, listen=True)


@pytest.mark.parametrize("value,tp,expected", [
    (3, int, 3), (3, float, 3.0), (True, bool, True), ("x", str, "x"), (None, str | None, None),
    (["a", "b"], tuple[str, ...], ("a", "b")), (["h", 1], tuple[str, int], ("h", 1)),
    ({"a": "b"}, dict[str, str], {"a": "b"}), ("soft", CgroupMode, CgroupMode.SOFT),
    ([1, 2], list[int], [1, 2]), ({"k": [1]}, dict[str, Any], {"k": [1]}),
])
def test_check_type_accepts(value: Any, tp: Any, expected: Any) -> None:
    assert check_type(value, tp, "x") == expected


@pytest.mark.parametrize("value,tp", [
    (True, int), ("3", int), (1.5, int), (True, float), (1, str), (1, bool), ("maybe", CgroupMode),
    (["h"], tuple[str, int]), (["h", "1"], tuple[str, int]), ([1, "a"], list[int]),
    ({"a": 1}, dict[str, str]), ([], str | None), ("a", tuple[str, ...]),
])
def test_check_type_refuses(value: Any, tp: Any) -> None:
    with pytest.raises(ProtocolError, match=r"argument z\S* must be"):
        check_type(value, tp, "argument z")


def test_dump_options_cross_the_wire_intact() -> None:
    opts = DumpOptions(pid=0, leave_running=True, tcp_established=True,
                       manage_cgroups=CgroupMode.FULL, network_lock=CriuNetworkLock.SKIP,
                       page_server=("10.77.0.12", 27000), external=("mnt[/data]:data",),
                       parent_img="../pre1", log_level=4)
    args = json.loads(json.dumps(options_to_args(opts, exclude=("pid", "notify"))))
    assert "pid" not in args and args["page_server"] == ["10.77.0.12", 27000]
    back = options_from_args(DumpOptions, args, where="dump", exclude=("pid", "notify"))
    assert back == opts


def test_restore_options_cross_the_wire_intact() -> None:
    opts = RestoreOptions(tcp_established=True, cgroup_roots={"": "/orthros", "cpu": "/x"},
                          lazy_pages=True)
    args = json.loads(json.dumps(options_to_args(opts, exclude=("notify", "sibling"))))
    assert options_from_args(RestoreOptions, args, where="restore",
                             exclude=("notify", "sibling")) == opts


@pytest.mark.parametrize("args,match", [
    ({"notify": True}, "notify"), ({"pid": 3}, "pid"), ({"bogus": 1}, "bogus"),
    ({"log_level": "high"}, "option log_level must be int"),
    ({"manage_cgroups": "lots"}, "one of 'none'"),
])
def test_bad_dump_options_are_refused(args: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        options_from_args(DumpOptions, args, where="dump", exclude=("pid", "notify"))


def test_op_table_binds_arguments_by_the_handlers_signatures() -> None:
    dump = OPS["dump"]
    assert [p.name for p in dump.params] == ["pid", "image", "options", "page_nonce",
                                             "dirty_track", "scratch"]
    assert dump.bind({"pid": 5, "image": "w"}) == {"pid": 5, "image": "w", "options": None,
                                                   "page_nonce": None, "dirty_track": None,
                                                   "scratch": False}
    with pytest.raises(ProtocolError, match="needs the argument pid"):
        dump.bind({"image": "w"})
    with pytest.raises(ProtocolError, match=r"takes no argument.*shell"):
        dump.bind({"pid": 5, "image": "w", "shell": "rm -rf /"})
    with pytest.raises(ProtocolError, match="argument pid of dump must be int"):
        dump.bind({"pid": "5", "image": "w"})
    assert OPS["recv_file"].payload and not OPS["send_file"].payload


def test_the_table_holds_the_operations_of_a_migration() -> None:
    assert {"ping", "status", "check", "dump", "restore", "recv_file", "send_file",
            "list_images", "page_server", "page_server_stop", "kill", "netlock_lock",
            "netlock_unlock", "addr_add", "addr_del", "garp", "push_images",
            "pids_in_use"} <= set(OPS)


def test_page_server_request() -> None:
    from pycriu import rpc_pb2 as rpc

    req = page_server_request("10.77.0.12", 0, 3)
    assert req.type == rpc.PAGE_SERVER_CHLD
    assert req.opts.HasField("ps") and req.opts.ps.address == "10.77.0.12"
    assert req.opts.ps.port == 0 and req.opts.log_file == "page-server.log"
    assert not page_server_request("", 27000, 2).opts.ps.HasField("address")
    assert not req.opts.ps.HasField("fd") and not req.opts.tls
    # On a connection the agent accepted and vetted itself: CRIU listens nowhere.
    assert page_server_request("", 0, 2, fd=7).opts.ps.fd == 7


# --- key files ---------------------------------------------------------------------------------


def test_key_file_formats(tmp_path: Path) -> None:
    raw = os.urandom(32)
    assert auth.parse_key(raw) == raw
    assert auth.parse_key(raw.hex().encode() + b"\n") == raw
    with pytest.raises(KeyFileError, match="at least 32"):
        auth.parse_key(b"short")


def test_keygen_writes_0600_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "authkey"
    auth.write_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    first = auth.load_key(path)
    assert len(first) == 32
    with pytest.raises(KeyFileError, match="already exists"):
        auth.write_key(path)
    assert auth.load_key(path) == first
    auth.write_key(path, force=True)
    assert auth.load_key(path) != first
    assert [p.name for p in path.parent.iterdir()] == ["authkey"]  # no temporaries left


def test_a_key_open_to_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(os.urandom(32))
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="open to others"):
        auth.load_key(path)
    with pytest.raises(KeyFileError, match="no cluster key"):
        auth.load_key(tmp_path / "missing")


# --- an in-process agent (no root: no CRIU operations) -----------------------------------------


@dataclass
class Running:
    server: AgentServer
    agent: Agent
    port: int

    def client(self, key: bytes = KEY, **kw: Any) -> AgentClient:
        return AgentClient("127.0.0.1", self.port, key, name="alpha", **kw)

    def raw(self, data: bytes) -> dict[str, Any] | None:
        """Send raw bytes on a new connection; the header of the one frame that comes back."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(data)
            raw = read_frame(s)
            return None if raw is None else json.loads(raw)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    agent = Agent("alpha", tmp_path / "images", KEY)
    server = AgentServer(agent, ("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), kwargs={"grace": 5.0})
    thread.start()
    try:
        yield Running(server, agent, server.endpoint[1])
    finally:
        stop.set()
        thread.join(10)


def test_ping_and_status(running: Running) -> None:
    c = running.client()
    ping = c.ping()
    assert ping.name == "alpha" and ping.protocol == 1
    status = c.status()
    assert status["name"] == "alpha" and status["images"] == [] and "dump" in status["ops"]


def test_refusals_over_tcp_and_the_agent_keeps_serving(running: Running) -> None:
    with pytest.raises(AgentRefused, match="does not verify") as exc:
        running.client(OTHER_KEY).ping()
    assert exc.value.code == "auth" and exc.value.host == "alpha"
    frame = encode_request(KEY, build_request("ping"))
    first = running.raw(frame)
    assert first is not None and first["kind"] == "resp" and first["ok"] is True
    again = running.raw(frame)
    assert again is not None and again["kind"] == "refusal" and again["code"] == "replay"
    bad = running.raw(struct.pack("!I", 5) + b"hello")
    assert bad is not None and bad["code"] == "malformed"
    huge = running.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert huge is not None and huge["code"] == "oversize"
    header = signed_request(ts=time.time())
    header["v"] = 9
    old = running.raw(reframe(header))
    assert old is not None and old["code"] == "version" and old["supported"] == [1]
    assert running.client().ping().name == "alpha"


def test_several_requests_on_one_connection(running: Running) -> None:
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as s:
        for _ in range(3):
            req = build_request("ping")
            s.sendall(encode_request(KEY, req))
            raw = read_frame(s)
            assert raw is not None
            assert open_response(KEY, decode_header(raw), req).ok


def test_unknown_op_and_bad_args_are_authenticated_errors(running: Running) -> None:
    c = running.client()
    with pytest.raises(ProtocolError, match="unknown operation 'format_disk'") as exc:
        c.call("format_disk")
    assert exc.value.host == "alpha"
    with pytest.raises(ProtocolError, match="argument pid of kill must be int"):
        c.call("kill", {"pid": "1; rm -rf /"})
    with pytest.raises(NoSuchProcessError, match="not restored by this agent"):
        c.kill(1)
    assert c.ping().name == "alpha"


def test_file_transfer_and_listing(running: Running, tmp_path: Path) -> None:
    c = running.client()
    src = tmp_path / "pages-1.img"
    src.write_bytes(os.urandom(3 << 20))
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    info = c.upload_file("web1", src)
    assert info.size == 3 << 20 and info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    c.upload_file("web1", empty)
    with pytest.raises(BadImageError, match=r"already has a file pages-1\.img"):
        c.upload_file("web1", src)
    c.upload_file("web1", src, overwrite=True)
    (image,) = c.list_images("web1", sha256=True)
    assert image.filenames == ["empty.img", "pages-1.img"] and not image.checkpoint
    assert image.files[1].sha256 == info.sha256
    back = tmp_path / "back.img"
    got = c.download_file("web1", "pages-1.img", back)
    assert back.read_bytes() == src.read_bytes() and got.sha256 == info.sha256
    with pytest.raises(BadImageError, match=r"no file nope\.img"):
        c.download_file("web1", "nope.img", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    with pytest.raises(ProtocolError, match="not allowed"):
        c.call("send_file", {"image": "..", "filename": "passwd"})
    with pytest.raises(ProtocolError, match="not allowed"):
        c.call("send_file", {"image": "web1", "filename": "../../etc/passwd"})
    assert not list((running.agent.images_root / "web1").glob(".*"))  # no partial files left
    assert c.remove_image("web1") and c.list_images() == []


def test_push_images_between_two_agents(running: Running, tmp_path: Path) -> None:
    other = Agent("beta", tmp_path / "beta", KEY)
    server = AgentServer(other, ("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), kwargs={"grace": 5.0})
    thread.start()
    try:
        a = running.client()
        for i in range(3):
            f = tmp_path / f"core-{i}.img"
            f.write_bytes(os.urandom(1000 * (i + 1)))
            a.upload_file("web1", f)
        sent = a.push_images("web1", "127.0.0.1", server.endpoint[1], dest_name="beta")
        assert [f.filename for f in sent] == ["core-0.img", "core-1.img", "core-2.img"]
        b = AgentClient("127.0.0.1", server.endpoint[1], KEY, name="beta")
        (image,) = b.list_images("web1", sha256=True)
        assert [f.sha256 for f in image.files] == [f.sha256 for f in sent]
    finally:
        stop.set()
        thread.join(10)


def test_a_tampered_payload_is_refused(running: Running, tmp_path: Path) -> None:
    req = build_request("recv_file", {"image": "w", "filename": "f.img"}, payload_len=4,
                        payload_sha256=hashlib.sha256(b"good").hexdigest())
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as s:
        s.sendall(encode_request(KEY, req) + b"evil")
        raw = read_frame(s)
    assert raw is not None
    resp = open_response(KEY, decode_header(raw), req)
    assert not resp.ok and resp.error is not None and "does not match" in resp.error["msg"]
    assert not (running.agent.images_root / "w" / "f.img").exists()


def test_remote_errors_keep_their_type_and_context(running: Running) -> None:
    c = running.client()
    err = c._remote_error(CriuError("CRIU refused the dump", errno=17, log_tail=["a"],
                                    log_path="/x/dump.log", pid=4).to_dict())
    assert isinstance(err, CriuError) and err.host == "alpha" and err.pid == 4
    assert (err.errno, err.log_tail, err.log_path) == (17, ["a"], "/x/dump.log")


def test_unreachable_agent_names_host_and_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(AgentUnreachable) as exc:
            AgentClient("127.0.0.1", port, KEY, name="gamma").ping()
    assert str(exc.value).startswith(
        f"[on gamma] agent on gamma at 127.0.0.1:{port} is not reachable: connection refused")


def test_dispatch_refuses_a_payload_for_ops_without_one(tmp_path: Path) -> None:
    agent = Agent("alpha", tmp_path / "i", KEY)
    req = build_request("ping", payload_len=3, payload_sha256="0" * 64)
    with pytest.raises(ProtocolError, match="takes no payload"):
        dispatch(agent, req, None, "test")


def test_many_concurrent_callers_and_idle_connections(running: Running) -> None:
    idle = [socket.create_connection(("127.0.0.1", running.port), timeout=5) for _ in range(20)]
    try:
        c = running.client()
        results: list[str] = []
        errors: list[BaseException] = []

        def call() -> None:
            try:
                results.append(c.ping().name)
            except BaseException as err:  # collected: the assertion below names it
                errors.append(err)

        threads = [threading.Thread(target=call) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors[0]
        assert results == ["alpha"] * 64
    finally:
        for s in idle:
            s.close()


def test_too_many_connections_are_refused_as_busy(tmp_path: Path) -> None:
    agent = Agent("alpha", tmp_path / "images", KEY)
    server = AgentServer(agent, ("127.0.0.1", 0), max_connections=2)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), kwargs={"grace": 5.0})
    thread.start()
    port = server.endpoint[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.2)  # both accepted and holding their slots
        with pytest.raises(AgentRefused, match="too many connections") as exc:
            AgentClient("127.0.0.1", port, KEY, name="alpha").ping()
        assert exc.value.code == "busy"
        idle.pop().close()
        wait_for_ping = time.monotonic() + 5
        while True:
            try:
                assert AgentClient("127.0.0.1", port, KEY).ping().name == "alpha"
                break
            except AgentRefused:
                assert time.monotonic() < wait_for_ping, "a freed slot was not reused"
                time.sleep(0.05)
    finally:
        for s in idle:
            s.close()
        stop.set()
        thread.join(10)


def test_transient_images_live_in_the_scratch_root(tmp_path: Path) -> None:
    images, scratch = tmp_path / "images", tmp_path / "scratch"
    a = Agent("alpha", images, b"k" * 32, scratch_root=scratch)
    path = a.image_path("mig-1", create=True, scratch=True)
    assert path.is_symlink() and path.resolve() == (scratch / "mig-1").resolve()
    (path / "core-1.img").write_bytes(b"x")
    assert (scratch / "mig-1" / "core-1.img").read_bytes() == b"x"
    assert a.image_path("mig-1", must_exist=True) == path  # found again through its link
    a.image_path("disk-1", create=True)  # without scratch: a plain directory
    assert a.image_names() == ["disk-1", "mig-1"]
    a.remove_image_dir(path)
    assert not path.exists() and not path.is_symlink() and not (scratch / "mig-1").exists()


def test_a_link_out_of_the_images_root_is_no_image(tmp_path: Path) -> None:
    a = Agent("alpha", tmp_path / "images", b"k" * 32, scratch_root=tmp_path / "scratch")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "images" / "evil").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BadImageError, match="not an image directory"):
        a.image_path("evil")
    assert a.image_names() == []


def test_background_removal_takes_the_image_out_of_the_way_at_once(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    a = Agent("alpha", tmp_path / "images", b"k" * 32, scratch_root=scratch)
    path = a.image_path("mig-2", create=True, scratch=True)
    (path / "pages-1.img").write_bytes(b"y" * 4096)
    a.remove_image_dir(path, later=True)
    assert not path.is_symlink() and not (scratch / "mig-2").exists()
    assert a.image_names() == []


def _free_pid() -> int:
    """A PID nothing holds now (the counter moves upwards: one just below a fresh child's is
    most likely free, but any will do)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 300, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise AssertionError("no free PID")


def test_pids_in_use_names_live_processes_and_threads_not_zombies(running: Running) -> None:
    c = running.client()
    stop = threading.Event()
    tids: list[int] = []
    thread = threading.Thread(target=lambda: (tids.append(threading.get_native_id()),
                                              stop.wait(30)))
    thread.start()
    zombie = os.fork()
    if zombie == 0:
        os._exit(0)
    try:
        wait_until = time.monotonic() + 10
        while Path(f"/proc/{zombie}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < wait_until, "the child did not exit"
            time.sleep(0.01)
        while not tids:
            time.sleep(0.01)
        me = Path("/proc/self/status").read_text().split("\n", 1)[0].split(":", 1)[1].strip()
        free = _free_pid()
        held = c.pids_in_use([free, tids[0], zombie, os.getpid(), os.getpid()])
        assert held == sorted([(os.getpid(), me),
                               (tids[0], f"{me} (a thread of pid {os.getpid()})")])
        assert c.pids_in_use([free, zombie]) == []
        assert c.pids_in_use([]) == []
    finally:
        stop.set()
        thread.join(10)
        os.waitpid(zombie, 0)


@pytest.mark.parametrize(("pids", "match"), [
    ([0], "0 is not a PID"), ([-5], "-5 is not a PID"), ([1 << 23], "is not a PID"),
    (["12"], r"argument pids of pids_in_use\[0\] must be int"),
    (list(range(1, 65538)), "at most 65536 PIDs, not 65537")])
def test_pids_in_use_refuses_what_is_no_list_of_pids(running: Running, pids: list[Any],
                                                     match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        running.client().call("pids_in_use", {"pids": pids})


def test_tree_reports_every_task_id_and_the_pid_namespace(running: Running) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, args=(30,))
    thread.start()
    try:
        tree = running.client().tree(os.getpid())
        tids = sorted(int(t) for t in os.listdir("/proc/self/task"))
    finally:
        stop.set()
        thread.join(10)
    (me,) = [p for p in tree["processes"] if p["pid"] == os.getpid()]
    assert me["tids"][0] == os.getpid() and sorted(me["tids"]) == tids and len(tids) >= 2
    assert tree["agent_pidns"] is True  # the agent's own PID namespace: restored as it is
    facts = TreeFacts.from_agent(tree)
    assert facts.in_agent_pidns is True and set(tids) <= set(facts.tids)
