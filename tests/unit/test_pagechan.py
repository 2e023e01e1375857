"""The page channel without CRIU: the handshake over real sockets (pairs and loopback TCP), the
certificate derived from the cluster key, the listener that refuses impostors, the agents'
AES-GCM records, and the loopback relay and the joint that carry them. No root needed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from orthros_py.agent import pagechan
from orthros_py.agent.pagechan import PageChannelError, RecordError

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
NONCE = b"\x07" * pagechan.NONCE_BYTES


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def _serve(sock: socket.socket, key: bytes = KEY, image: str = "img",
           timeout: float = 2.0) -> PageChannelError | tuple[bytes, bool]:
    try:
        return pagechan.serve_handshake(sock, key, image, NONCE, timeout=timeout)
    except PageChannelError as err:
        return err


def test_a_client_with_the_key_passes_and_learns_the_server_holds_it_too() -> None:
    client, server = _pair()
    client_nonce = b"\x01" * 32
    client.sendall(pagechan.client_hello(KEY, "img", NONCE, client_nonce))
    assert _serve(server) == (client_nonce, True)
    answer = client.recv(64)
    assert answer == pagechan.proof(KEY, b"server", "img", NONCE, client_nonce)
    # A client's proof is not a server's: reflecting it back proves nothing.
    assert answer != pagechan.proof(KEY, b"client", "img", NONCE, client_nonce)


@pytest.mark.parametrize("hello,reason", [
    (pagechan.client_hello(OTHER, "img", NONCE, b"\x01" * 32), "does not verify"),
    (pagechan.client_hello(KEY, "other-img", NONCE, b"\x01" * 32), "does not verify"),
    (pagechan.client_hello(KEY, "img", b"\x08" * 32, b"\x01" * 32), "does not verify"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 100, "garbage"),
    (pagechan.MAGIC + b"\x00" * 10, "closed the connection"),
    (pagechan.MAGIC + b"\x07" + b"\x00" * 70, "garbage"),
    # The TLS flag flipped on the path: the proof no longer verifies.
    (b"\x00".join([pagechan.client_hello(KEY, "img", NONCE, b"\x01" * 32)[:8],
                   pagechan.client_hello(KEY, "img", NONCE, b"\x01" * 32)[9:]]),
     "does not verify"),
])
def test_a_peer_without_a_valid_proof_is_refused_and_told_nothing(hello: bytes,
                                                                  reason: str) -> None:
    client, server = _pair()
    client.sendall(hello)
    client.shutdown(socket.SHUT_WR)
    err = _serve(server)
    assert isinstance(err, PageChannelError) and reason in err.msg
    server.close()
    with contextlib.suppress(ConnectionResetError):  # a reset: our bytes were left unread
        assert client.recv(64) == b""


def test_a_silent_peer_is_refused_at_the_deadline_even_if_it_drips() -> None:
    client, server = _pair()

    def drip() -> None:
        with contextlib.suppress(OSError):  # until the server hangs up
            for b in pagechan.MAGIC:
                time.sleep(0.1)
                client.send(bytes([b]))

    threading.Thread(target=drip, daemon=True).start()
    start = time.monotonic()
    err = _serve(server, timeout=0.5)
    assert isinstance(err, PageChannelError) and "within 0.5 s" in err.msg
    assert time.monotonic() - start < 1.0


def test_the_certificate_is_derived_from_the_key_byte_for_byte() -> None:
    one, again, other = (pagechan.derive_credentials(k) for k in (KEY, KEY, OTHER))
    assert one == again
    assert one.cert_pem != other.cert_pem and one.key_pem != other.key_pem
    cert = x509.load_pem_x509_certificate(one.cert_pem)
    assert cert.subject == cert.issuer and cert.serial_number == 1
    assert isinstance(cert.public_key(), Ed25519PublicKey)
    cert.verify_directly_issued_by(cert)  # self-signed: its own CA
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert b"BEGIN PRIVATE KEY" in one.key_pem


def test_the_credentials_are_written_private_and_rewritten_after_a_key_change(
        tmp_path: Path) -> None:
    d = tmp_path / "tls"
    files = pagechan.write_credentials(KEY, d)
    assert files.cacert == files.cert
    assert d.stat().st_mode & 0o777 == 0o700
    for f in (files.cert, files.key):
        assert Path(f).stat().st_mode & 0o777 == 0o600
    before = Path(files.cert).read_bytes()
    assert pagechan.write_credentials(KEY, d) == files
    assert Path(files.cert).read_bytes() == before
    pagechan.write_credentials(OTHER, d)
    assert Path(files.cert).read_bytes() == pagechan.derive_credentials(OTHER).cert_pem
    assert sorted(p.name for p in d.iterdir()) == [pagechan.CERT_FILE, pagechan.KEY_FILE]


def test_the_listener_refuses_impostors_and_hands_over_the_one_that_proves_itself() -> None:
    got: list[tuple[socket.socket, str]] = []
    done = threading.Event()

    def on_channel(ch: pagechan.Channel) -> None:
        got.append((ch.sock, ch.peer))
        done.set()

    lst = pagechan.Listener(KEY, "img", "127.0.0.1", 0, on_channel, wait=30,
                            handshake_timeout=1.0).start()
    try:
        addr = ("127.0.0.1", lst.port)
        silent = socket.create_connection(addr)  # holds its slot while the genuine one passes
        with socket.create_connection(addr) as garbage:
            garbage.sendall(b"hello?" * 20)
        with socket.create_connection(addr) as forger:
            forger.sendall(pagechan.client_hello(OTHER, "img", lst.nonce, b"\x02" * 32))
        chan = pagechan.connect("127.0.0.1", lst.port, KEY, "img", lst.nonce).sock
        assert done.wait(5)
        assert chan.gettimeout() is None and got[0][0].gettimeout() is None  # blocking, for CRIU
        chan.sendall(b"pages")
        assert got[0][0].recv(5) == b"pages"
        # The port is closed now: nobody else gets in.
        with pytest.raises(OSError):
            socket.create_connection(addr, timeout=1)
        time.sleep(1.3)
        silent.close()
        info = lst.to_dict()
        assert info["state"] == "connected" and info["refused"] == 3, info
        reasons = [r["reason"] for r in info["refusals"]]
        assert any("garbage" in r for r in reasons)
        assert any("does not verify" in r for r in reasons)
        assert any("within 1 s" in r for r in reasons)
        chan.close()
        got[0][0].close()
    finally:
        lst.close()


def test_a_sender_refuses_a_destination_without_the_key() -> None:
    def on_channel(ch: pagechan.Channel) -> None:
        ch.sock.close()

    lst = pagechan.Listener(OTHER, "img", "127.0.0.1", 0, on_channel, wait=30,
                            handshake_timeout=1.0).start()
    try:
        with pytest.raises(PageChannelError, match="refused our proof"):
            pagechan.connect("127.0.0.1", lst.port, KEY, "img", lst.nonce, timeout=2)
    finally:
        lst.close()


def test_the_listener_gives_up_at_its_deadline() -> None:
    lst = pagechan.Listener(KEY, "img", "127.0.0.1", 0, lambda ch: None, wait=0.3).start()
    deadline = time.monotonic() + 5
    while lst.waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lst.to_dict()["state"] == "expired"


def test_the_relay_joins_a_local_connection_to_the_channel() -> None:
    up_here, up_there = socket.socketpair()
    relay = pagechan.Relay(up_here, wait=10)
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as local:
            local.sendall(b"x" * 100_000)
            got = b""
            up_there.settimeout(5)
            while len(got) < 100_000:
                got += up_there.recv(65536)
            up_there.sendall(b"status")
            assert local.recv(6) == b"status"
        assert relay.bytes_up == 100_000 and relay.bytes_down == 6 and relay.refused == 0
    finally:
        relay.close()
        up_there.close()


# --- the agents' records (when CRIU runs no TLS) ------------------------------------------------


CLIENT_NONCE = b"\x09" * pagechan.NONCE_BYTES


def _records_pair(image: str = "img") -> tuple[pagechan.Records, pagechan.Records]:
    """(the source's records, the destination's), as each side derives them."""
    keys = pagechan.session_keys(KEY, image, NONCE, CLIENT_NONCE)
    return (pagechan.Records(keys.to_dest, keys.to_source),
            pagechan.Records(keys.to_source, keys.to_dest))


def _open(records: pagechan.Records, wire: bytes) -> bytes | None:
    n = pagechan.Records.HEADER_BYTES
    return records.open(wire[:n], wire[n:])


def test_records_round_trip_both_ways_and_end_with_an_end_record() -> None:
    src, dst = _records_pair()
    pages = bytes(range(256)) * 1024
    sealed = src.seal(pages)
    assert pages not in sealed  # encrypted
    assert len(sealed) == pagechan.Records.HEADER_BYTES + len(pages) + pagechan.TAG_BYTES
    assert _open(dst, sealed) == pages
    assert _open(dst, src.seal(b"")) == b""  # an empty record is data, not the end
    assert _open(src, dst.seal(b"ack")) == b"ack"
    assert _open(dst, src.seal_end()) is None and dst.ended
    with pytest.raises(PageChannelError, match="after the peer's end record"):
        _open(dst, src.seal(b"more"))


def test_the_largest_record_passes_and_a_larger_one_is_refused() -> None:
    src, dst = _records_pair()
    big = b"\xaa" * pagechan.RECORD_BYTES
    assert _open(dst, src.seal(big)) == big
    with pytest.raises(ValueError):
        src.seal(big + b"x")
    # A header claiming more than a record can hold is refused before anything is read.
    header = struct.pack(">IQ", pagechan.RECORD_BYTES + pagechan.TAG_BYTES + 1, 1)
    with pytest.raises(RecordError, match="claims"):
        dst.body_bytes(header)


@pytest.mark.parametrize("where", ["length", "number", "end flag", "body", "tag"])
def test_a_record_changed_anywhere_is_refused(where: str) -> None:
    src, dst = _records_pair()
    wire = bytearray(src.seal(b"memory" * 1000))
    at = {"length": 3, "number": 11, "end flag": 0, "body": 100, "tag": len(wire) - 1}[where]
    wire[at] ^= 0x80 if where == "end flag" else 0x01
    with pytest.raises(RecordError):
        _open(dst, bytes(wire))
    assert dst.received == 0


def test_a_replayed_reordered_or_dropped_record_is_refused_by_its_number() -> None:
    src, dst = _records_pair()
    first, second, third = (src.seal(bytes([i]) * 10) for i in range(3))
    assert _open(dst, first) == b"\x00" * 10
    with pytest.raises(RecordError, match="record 0 arrived where record 1 was due"):
        _open(dst, first)  # replayed
    with pytest.raises(RecordError, match="record 2 arrived where record 1 was due"):
        _open(dst, third)  # reordered, or the second dropped
    # A forged number does not help: the record's nonce is its real number.
    forged = struct.pack(">IQ", *struct.unpack(">IQ", third[:12])[:1], 1) + third[12:]
    with pytest.raises(RecordError, match="does not authenticate"):
        _open(dst, forged)
    assert _open(dst, second) == b"\x01" * 10


def test_the_keys_differ_per_direction_and_per_channel() -> None:
    keys = pagechan.session_keys(KEY, "img", NONCE, CLIENT_NONCE)
    assert keys.to_dest != keys.to_source and len(keys.to_dest) == 32
    others = [pagechan.session_keys(OTHER, "img", NONCE, CLIENT_NONCE),
              pagechan.session_keys(KEY, "img", b"\x01" * 32, CLIENT_NONCE),
              pagechan.session_keys(KEY, "img", NONCE, b"\x01" * 32),
              pagechan.session_keys(KEY, "other", NONCE, CLIENT_NONCE)]
    for other in others:
        assert {other.to_dest, other.to_source}.isdisjoint({keys.to_dest, keys.to_source})
    assert pagechan.session_keys(KEY, "img", NONCE, CLIENT_NONCE) == keys
    src, dst = _records_pair()
    # A record reflected back to its sender does not open: the other direction's key.
    with pytest.raises(RecordError, match="does not authenticate"):
        _open(src, src.seal(b"x"))
    # Nor does one from another channel.
    stranger = pagechan.Records(others[1].to_dest, others[1].to_source)
    with pytest.raises(RecordError, match="does not authenticate"):
        _open(dst, stranger.seal(b"x"))


def test_the_handshake_agrees_on_the_records_and_binds_the_choice() -> None:
    got: list[pagechan.Channel] = []
    done = threading.Event()

    def on_channel(ch: pagechan.Channel) -> None:
        got.append(ch)
        done.set()

    lst = pagechan.Listener(KEY, "img", "127.0.0.1", 0, on_channel, wait=30).start()
    try:
        src = pagechan.connect("127.0.0.1", lst.port, KEY, "img", lst.nonce, tls=False)
        assert done.wait(5)
        (dst,) = got
        assert src.protection == dst.protection == "aes-gcm" and not src.tls
        assert src.records is not None and dst.records is not None
        src.sock.sendall(src.records.seal(b"over the wire"))
        assert pagechan.recv_record(dst.sock, dst.records) == b"over the wire"
        src.sock.close()
        dst.sock.close()
    finally:
        lst.close()
    # The hello's flag changed on the path (records asked, TLS claimed): refused.
    client, server = _pair()
    hello = bytearray(pagechan.client_hello(KEY, "img", NONCE, CLIENT_NONCE, tls=False))
    hello[len(pagechan.MAGIC)] = 1
    client.sendall(bytes(hello))
    err = _serve(server)
    assert isinstance(err, PageChannelError) and "does not verify" in err.msg


class _Path:
    """Source relay -> a man in the middle -> destination joint -> a socket standing for the
    destination's CRIU; ``local`` stands for the source's CRIU. ``tamper`` changes what the
    middle forwards from the source."""

    def __init__(self, tamper: Callable[[bytes], bytes] | None = None,
                 records: bool = True) -> None:
        src_recs, dst_recs = _records_pair() if records else (None, None)
        src_net, mid_a = socket.socketpair()
        mid_b, dst_net = socket.socketpair()
        self.relay = pagechan.Relay(src_net, src_recs, wait=10, label="test")
        self.mid = [mid_a, mid_b]
        threading.Thread(target=self._forward, args=(mid_a, mid_b, tamper), daemon=True).start()
        threading.Thread(target=self._forward, args=(mid_b, mid_a, None), daemon=True).start()
        criu, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.joint = pagechan.Joint(ours, dst_net, dst_recs, "test").start()
        self.criu = criu
        self.local = socket.create_connection(("127.0.0.1", self.relay.port), timeout=10)
        self.criu.settimeout(10)

    @staticmethod
    def _forward(a: socket.socket, b: socket.socket,
                 tamper: Callable[[bytes], bytes] | None) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(1 << 16):
                b.sendall(tamper(data) if tamper else data)
        # As a TCP path does: an end (or a reset) on one side reaches the other as its end.
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.local.close()
        self.criu.close()
        self.relay.close()
        self.joint.close()
        for s in self.mid:
            s.close()


def _read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(1 << 18):
        out += data
    return bytes(out)


@pytest.mark.parametrize("records", [True, False])
def test_relay_and_joint_carry_both_ways_and_pass_on_each_end_in_order(records: bool) -> None:
    path = _Path(records=records)
    try:
        pages = os.urandom(3 * pagechan.RECORD_BYTES + 12345)
        sender = threading.Thread(target=path.local.sendall, args=(pages,))
        sender.start()
        got = bytearray()
        while len(got) < len(pages):
            got += path.criu.recv(1 << 18)
        sender.join()
        assert bytes(got) == pages
        path.criu.sendall(b"ack")  # the page server's answer
        assert path.local.recv(3) == b"ack"
        # The source's CRIU ends: the destination's reads to EOF, then answers and ends too.
        path.local.shutdown(socket.SHUT_WR)
        assert _read_all(path.criu) == b""
        path.criu.sendall(b"final")
        path.criu.close()
        assert _read_all(path.local) == b"final"
        assert path.joint.join(5) and path.joint.error is None
        assert path.relay.error is None and not path.relay.upstream_closed
        assert path.relay.bytes_up > len(pages) if records else path.relay.bytes_up == len(pages)
    finally:
        path.close()


def test_a_byte_flipped_on_the_path_aborts_both_ends_with_the_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    flipped: list[int] = []

    def flip(data: bytes) -> bytes:
        if not flipped and len(data) > 1000:
            flipped.append(1)
            return data[:500] + bytes([data[500] ^ 1]) + data[501:]
        return data

    path = _Path(flip)
    try:
        with contextlib.suppress(OSError):  # the source's side is cut while it sends
            path.local.sendall(os.urandom(pagechan.RECORD_BYTES))
        # The destination's CRIU sees its stream end, without a byte of the damaged record.
        assert _read_all(path.criu) == b""
        assert path.joint.join(5)
        assert path.joint.error is not None and "does not authenticate" in path.joint.error
        # The source's CRIU sees its connection end too, and the relay says why.
        with contextlib.suppress(ConnectionResetError):
            assert _read_all(path.local) == b""
        deadline = time.monotonic() + 5
        while path.relay.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.relay.error is not None and "end record" in path.relay.error
    finally:
        path.close()
    assert "does not authenticate: damaged or forged on the path" in caplog.text
    assert flipped


def test_a_stream_cut_on_a_record_boundary_is_not_taken_for_its_end() -> None:
    src, dst = _records_pair()
    a, b = socket.socketpair()
    criu, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    joint = pagechan.Joint(ours, b, dst, "test").start()
    try:
        a.sendall(src.seal(b"half of the pages"))
        a.shutdown(socket.SHUT_WR)  # no end record
        criu.settimeout(5)
        assert criu.recv(100) == b"half of the pages"
        assert joint.join(5)
        assert joint.error is not None and "without the peer's end record" in joint.error
    finally:
        joint.close()
        for s in (a, criu):
            s.close()


def _send(sock: socket.socket, chunk: bytes, times: int) -> None:
    for _ in range(times):
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)


def test_relay_carries_a_large_stream_intact() -> None:
    """64 MiB through relay and joint in AES-GCM records arrive whole and in order (the
    relay's throughput is a benchmark figure, not a test's)."""
    total, chunk = 64 << 20, os.urandom(1 << 20)
    path = _Path()
    try:
        t = threading.Thread(target=_send, args=(path.local, chunk, total // len(chunk)))
        t.start()
        digest, got = hashlib.sha256(), 0
        while data := path.criu.recv(1 << 20):
            digest.update(data)
            got += len(data)
        t.join()
        assert got == total
        assert digest.digest() == hashlib.sha256(chunk * (total // len(chunk))).digest()
    finally:
        path.close()
