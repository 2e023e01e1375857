"""The page channel without CRIU: the handshake over real sockets (pairs and loopback TCP), the
certificate derived from the cluster key, the listener that refuses impostors and the loopback
relay. No root needed."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from orthros_py.agent import pagechan
from orthros_py.agent.pagechan import PageChannelError

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

    def on_channel(conn: socket.socket, peer: str, tls: bool) -> None:
        got.append((conn, peer))
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
        chan = pagechan.connect("127.0.0.1", lst.port, KEY, "img", lst.nonce)
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
    def on_channel(conn: socket.socket, peer: str, tls: bool) -> None:
        conn.close()

    lst = pagechan.Listener(OTHER, "img", "127.0.0.1", 0, on_channel, wait=30,
                            handshake_timeout=1.0).start()
    try:
        with pytest.raises(PageChannelError, match="refused our proof"):
            pagechan.connect("127.0.0.1", lst.port, KEY, "img", lst.nonce, timeout=2)
    finally:
        lst.close()


def test_the_listener_gives_up_at_its_deadline() -> None:
    lst = pagechan.Listener(KEY, "img", "127.0.0.1", 0, lambda c, p, t: None, wait=0.3).start()
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
