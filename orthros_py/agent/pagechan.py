"""The page channel: the connection on which a dump's memory crosses from one host to another.

CRIU's page server accepts the first TCP connection from anyone and then trusts what it reads:
whoever connects first breaks the migration, and whoever sits on the path can rewrite memory.
So the agents open the connection themselves. The destination's agent listens (``Listener``);
each connection must prove within ``HANDSHAKE_TIMEOUT`` that it holds the cluster key (a mutual
HMAC-SHA256 challenge-response bound to the image, to both sides' fresh nonces and to how the
stream is protected next); any other is refused, logged and counted, and the agent keeps
waiting. The source's agent connects (``connect``). What follows the handshake is always
encrypted and integrity-protected, in one of two ways (``Channel.protection``):

``tls``: CRIU runs TLS (gnutls, mutual, TLS 1.3) with a certificate every agent derives from
the cluster key (``derive_credentials``). The destination hands the connection to CRIU's page
server as ``ps.fd``. The source goes through a loopback ``Relay``: CRIU 4.2.1's dump skips TLS
on a socket it is handed (``connect_to_page_server`` jumps over ``tls_x509_init`` when
``ps_socket`` is set; its page server does run TLS on one), so the dump connects, with TLS, to
a loopback port of its agent, which copies the (encrypted) bytes to and from the connection.
That works with an unpatched CRIU (setup may use a system CRIU, which orthros does not patch).

``aes-gcm``: CRIU 4.2.1 dumps a tree's own IPC namespace (SysV shared memory) in a forked child
that sends its pages on the same connection with a copy of the parent's TLS state, so the
peer's records go out of sequence and the dump fails ("Decryption has failed"). For such a tree
the sender asks, inside the authenticated hello, for no CRIU TLS, and the agents encrypt the
stream themselves (``Records``): a key per direction from HKDF-SHA256 over the cluster key and
both nonces, and AES-256-GCM records of up to ``RECORD_BYTES`` numbered per direction (the
number is the nonce and is checked, so a record damaged, forged, replayed, reordered or
dropped, or a stream cut short, aborts the channel and both CRIUs fail). The source's ``Relay``
seals what its CRIU sends and opens what comes back; the destination gives its page server one
end of a UNIX socketpair (CRIU splices from UNIX stream sockets too) and a ``Joint`` between
the other end and the connection does the same on that side.

Interfaces: TCP sockets (any port), UNIX socketpairs, /proc/net/tcp{,6} (who owns a loopback
peer), the filesystem (the PEM files, mode 0600, in a directory of mode 0700 the agent owns),
threads. No privileges of its own; the CRIU it feeds needs root.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orthros_py.agent.errors import AgentError
from orthros_py.criu.request import TlsFiles

log = logging.getLogger("orthros.agent")

HANDSHAKE_TIMEOUT = 5.0  # for a peer on the cluster's network, proving itself takes < 1 ms
NONCE_BYTES = 32
MAC_BYTES = 32
MAGIC = b"ORTHPS1\n"  # says "this is the page channel", so garbage is told apart from a bad key
HELLO_BYTES = len(MAGIC) + 1 + NONCE_BYTES + MAC_BYTES  # magic, TLS flag, nonce, proof
RECORD_BYTES = 256 * 1024  # plaintext per record: large, so the per-record Python cost is small
TAG_BYTES = 16  # AES-GCM's
_HEADER = struct.Struct(">IQ")  # sealed length (top bit: the end record), record number
_END = 0x8000_0000
_RECORDS_INFO = b"orthros page channel records v1"
MAX_PENDING = 16  # connections proving themselves at once; more are refused at the door
KEEP_REFUSALS = 32  # refusals kept for status (all are counted)
CERT_INFO = b"orthros page channel v1"
_HANDSHAKE_INFO = b"orthros page channel handshake v1"
CERT_NAME = "orthros page channel"
CERT_FILE = "page-channel.crt"
KEY_FILE = "page-channel.key"


class PageChannelError(AgentError):
    """The page channel could not be opened: the peer failed the handshake, or went silent."""


class RecordError(PageChannelError):
    """A record of the agents' encryption was damaged, forged, replayed, reordered, dropped or
    cut short on the path: the channel is aborted."""


# --- the handshake (pure but for the socket) ----------------------------------------------------


def _handshake_key(key: bytes) -> bytes:
    # Its own key: a MAC made here is never a valid agent RPC frame MAC, and the reverse.
    return hmac.new(key, _HANDSHAKE_INFO, hashlib.sha256).digest()


def proof(key: bytes, role: bytes, image: str, server_nonce: bytes, client_nonce: bytes,
          tls: bool = True) -> bytes:
    """The MAC one side sends: bound to its role (so a proof cannot be reflected back), to the
    image (a proof for one migration opens no other), to both nonces (none replays) and to
    how the stream is protected next (nobody on the path can switch CRIU's TLS off)."""
    msg = b"\x00".join((role, image.encode(), server_nonce, client_nonce,
                        b"tls" if tls else b"aes-gcm"))
    return hmac.new(_handshake_key(key), msg, hashlib.sha256).digest()


def client_hello(key: bytes, image: str, server_nonce: bytes, client_nonce: bytes,
                 tls: bool = True) -> bytes:
    return (MAGIC + (b"\x01" if tls else b"\x00") + client_nonce
            + proof(key, b"client", image, server_nonce, client_nonce, tls))


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise PageChannelError(f"the peer closed the connection after {len(buf)} of {n} "
                                   "bytes of the handshake")
        buf += chunk
        if len(buf) >= len(MAGIC) and not buf.startswith(MAGIC):
            raise PageChannelError("the peer does not speak the page channel (garbage)")
    return bytes(buf)


def serve_handshake(sock: socket.socket, key: bytes, image: str, server_nonce: bytes, *,
                    timeout: float = HANDSHAKE_TIMEOUT) -> tuple[bytes, bool]:
    """The destination's half: read the client's hello, check it, answer with our proof.
    Returns the client's nonce and whether it asks for TLS; PageChannelError saying why a
    peer failed."""
    deadline = time.monotonic() + timeout
    try:
        hello = _recv_exact(sock, HELLO_BYTES, deadline)
    except TimeoutError as err:
        raise PageChannelError(f"the peer did not prove itself within {timeout:g} s") from err
    except OSError as err:
        raise PageChannelError(f"the connection failed during the handshake: {err}") from err
    flag = hello[len(MAGIC)]
    if flag not in (0, 1):
        raise PageChannelError("the peer does not speak the page channel (garbage)")
    tls = flag == 1
    nonce = hello[len(MAGIC) + 1:len(MAGIC) + 1 + NONCE_BYTES]
    mac = hello[len(MAGIC) + 1 + NONCE_BYTES:]
    if not hmac.compare_digest(mac, proof(key, b"client", image, server_nonce, nonce, tls)):
        raise PageChannelError("the peer's proof does not verify: another cluster key, another "
                               "migration, or a forgery")
    try:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        sock.sendall(proof(key, b"server", image, server_nonce, nonce, tls))
    except OSError as err:
        raise PageChannelError(f"the connection failed during the handshake: {err}") from err
    return nonce, tls


def connect(host: str, port: int, key: bytes, image: str, server_nonce: bytes, *,
            timeout: float = HANDSHAKE_TIMEOUT, tls: bool = True) -> Channel:
    """The source's half: connect to the destination's page port, prove ourselves, check its
    proof. Returns the channel, its socket blocking (ready for CRIU or a ``Relay``)."""
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise PageChannelError(f"cannot connect to the page channel at {host}:{port}: "
                               f"{err.strerror or err}") from err
    try:
        client_nonce = secrets.token_bytes(NONCE_BYTES)
        sock.sendall(client_hello(key, image, server_nonce, client_nonce, tls))
        try:
            buf = bytearray()
            while len(buf) < MAC_BYTES:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(MAC_BYTES - len(buf))
                if not chunk:
                    raise PageChannelError(
                        f"the page channel at {host}:{port} closed the connection during the "
                        "handshake: it refused our proof (another cluster key?) or it already "
                        "serves another connection")
                buf += chunk
        except TimeoutError as err:
            raise PageChannelError(f"the page channel at {host}:{port} did not answer within "
                                   f"{timeout:g} s") from err
        want = proof(key, b"server", image, server_nonce, client_nonce, tls)
        if not hmac.compare_digest(bytes(buf), want):
            raise PageChannelError(f"the page channel at {host}:{port} failed to prove it holds "
                                   "the cluster key: not our destination")
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Channel.open(sock, f"{host}:{port}", key, image, server_nonce, client_nonce,
                            tls=tls, source=True)
    except BaseException:
        sock.close()
        raise


# --- the agents' records, when CRIU runs no TLS (pure) ------------------------------------------


@dataclass(frozen=True)
class SessionKeys:
    to_dest: bytes  # seals the source's stream
    to_source: bytes  # seals the destination's answers


def session_keys(key: bytes, image: str, server_nonce: bytes,
                 client_nonce: bytes) -> SessionKeys:
    """A key per direction, HKDF-SHA256 over the cluster key salted with both nonces: fresh for
    each channel (either side's nonce alone makes them new), and one direction's records never
    open as the other's."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def derive(direction: bytes) -> bytes:
        info = b"\x00".join((_RECORDS_INFO, direction, image.encode()))
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=server_nonce + client_nonce,
                    info=info).derive(key)

    return SessionKeys(derive(b"source->dest"), derive(b"dest->source"))


def _nonce(number: int) -> bytes:
    return b"\x00\x00\x00\x00" + number.to_bytes(8, "big")


class Records:
    """AES-256-GCM records on one connection: ``seal`` what this side sends, ``open`` what it
    receives, each direction with its own key and its own count. A record is a header (sealed
    length, end flag, record number), authenticated as associated data, and the sealed body;
    its nonce is its number, so under one key no nonce repeats. The receiver expects the next
    number: a record replayed, reordered or dropped is refused by number, one damaged or forged
    by its tag. The sender's last record is an empty one flagged as the end, so a stream cut
    short on the path is told apart from one that ended. One thread per direction."""

    HEADER_BYTES = _HEADER.size

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._seal = AESGCM(send_key)
        self._open = AESGCM(recv_key)
        self.sent = 0  # records sealed
        self.received = 0  # records opened
        self.ended = False  # the peer's end record has been opened

    def seal(self, data: bytes, *, end: bool = False) -> bytes:
        if len(data) > RECORD_BYTES:
            raise ValueError(f"a record holds at most {RECORD_BYTES} bytes, not {len(data)}")
        number = self.sent
        header = _HEADER.pack((len(data) + TAG_BYTES) | (_END if end else 0), number)
        self.sent += 1
        return header + self._seal.encrypt(_nonce(number), data, header)

    def seal_end(self) -> bytes:
        return self.seal(b"", end=True)

    def body_bytes(self, header: bytes) -> int:
        """How many bytes follow ``header``, once its number and length are plausible."""
        word, number = _HEADER.unpack(header)
        if self.ended:
            raise RecordError("a record arrived after the peer's end record")
        if number != self.received:
            raise RecordError(f"record {number} arrived where record {self.received} was due: "
                              "replayed, reordered or dropped on the path")
        size = int(word) & ~_END
        if not TAG_BYTES <= size <= RECORD_BYTES + TAG_BYTES:
            raise RecordError(f"record {number} claims {size} bytes: damaged on the path")
        return size

    def open(self, header: bytes, body: bytes | bytearray) -> bytes | None:
        """The plaintext of a received record; None for the peer's end record."""
        from cryptography.exceptions import InvalidTag

        if len(body) != self.body_bytes(header):
            raise RecordError(f"record {self.received} was cut short")
        word, number = _HEADER.unpack(header)
        try:
            data = self._open.decrypt(_nonce(number), body, header)
        except InvalidTag as err:
            raise RecordError(f"record {number} does not authenticate: damaged or forged on the "
                              "path, or sealed with another key") from err
        self.received += 1
        if word & _END:
            self.ended = True
            return None
        return data


def _read_exact(sock: socket.socket, n: int) -> bytearray | None:
    """``n`` bytes from ``sock``; None at end of stream before the first, RecordError after."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise RecordError(f"the stream ended inside a record ({got} of {n} bytes): cut on "
                              "the path")
        got += k
    return buf


def recv_record(sock: socket.socket, records: Records) -> bytes | None:
    """The next record's plaintext from ``sock``; None once the peer's end record is opened.
    RecordError for anything else, a stream that ends without its end record included."""
    header = _read_exact(sock, Records.HEADER_BYTES)
    if header is None:
        raise RecordError("the stream ended without the peer's end record: cut on the path")
    body = _read_exact(sock, records.body_bytes(bytes(header)))
    if body is None:
        raise RecordError(f"the stream ended inside record {records.received}: cut on the path")
    return records.open(bytes(header), body)


@dataclass
class Channel:
    """A connection that passed the handshake, and how its stream is protected: CRIU's TLS
    (``records`` None), or this side's ``Records`` (keys from both nonces)."""

    sock: socket.socket
    peer: str
    records: Records | None

    @property
    def tls(self) -> bool:
        return self.records is None

    @property
    def protection(self) -> str:
        return "tls" if self.records is None else "aes-gcm"

    @classmethod
    def open(cls, sock: socket.socket, peer: str, key: bytes, image: str, server_nonce: bytes,
             client_nonce: bytes, *, tls: bool, source: bool) -> Channel:
        if tls:
            return cls(sock, peer, None)
        keys = session_keys(key, image, server_nonce, client_nonce)
        return cls(sock, peer, Records(keys.to_dest, keys.to_source) if source
                   else Records(keys.to_source, keys.to_dest))


# --- the certificate (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    cert_pem: bytes
    key_pem: bytes


def derive_credentials(key: bytes) -> Credentials:
    """An Ed25519 key from HKDF(cluster key) and a self-signed certificate over it, with fixed
    serial, names and validity: every host derives byte-identical PEM (Ed25519 signatures are
    deterministic), so nothing new has to be distributed. The certificate is its own CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=CERT_INFO).derive(key)
    sk = Ed25519PrivateKey.from_private_bytes(seed)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "orthros cluster"),
                      x509.NameAttribute(NameOID.COMMON_NAME, CERT_NAME)])
    pub = sk.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(pub).serial_number(1)
        .not_valid_before(dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .sign(sk, None)
    )
    return Credentials(
        cert.public_bytes(serialization.Encoding.PEM),
        sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                         serialization.NoEncryption()))


def write_credentials(key: bytes, directory: Path) -> TlsFiles:
    """The derived PEM files in ``directory`` (created 0700; files 0600, replaced whole when
    they differ, e.g. after a key change). The certificate is both CA and leaf."""
    creds = derive_credentials(key)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.is_symlink() or not directory.is_dir():
        raise PageChannelError(f"{directory} is not a private directory")
    os.chmod(directory, 0o700)
    for name, data in ((CERT_FILE, creds.cert_pem), (KEY_FILE, creds.key_pem)):
        path = directory / name
        with contextlib.suppress(OSError):
            if path.read_bytes() == data and (path.stat().st_mode & 0o077) == 0:
                continue
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    cert = str(directory / CERT_FILE)
    return TlsFiles(cacert=cert, cert=cert, key=str(directory / KEY_FILE))


# --- the destination: a listener that hands over only a proven connection -------------------


def _listen(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    bind = address or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, port))
        sock.listen(MAX_PENDING)
    except OSError as err:
        sock.close()
        raise PageChannelError(f"cannot listen for the page channel on {bind}:{port}: "
                               f"{err.strerror or err}") from err
    return sock


OnChannel = Callable[[Channel], None]


class Listener:
    """Waits up to ``wait`` s for the one connection that proves itself, and hands it to
    ``on_channel`` (on its own thread; the callee owns the socket then). Every other connection
    is refused, logged and counted; the listener keeps waiting meanwhile. Thread-safe."""

    def __init__(self, key: bytes, image: str, address: str, port: int, on_channel: OnChannel,
                 *, wait: float = 600.0, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.key = key
        self.image = image
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.wait = wait
        self.handshake_timeout = handshake_timeout
        self._on_channel = on_channel
        self._sock = _listen(address, port)
        self.port = int(self._sock.getsockname()[1])
        self.refused = 0
        self.refusals: list[dict[str, Any]] = []
        self.peer: str | None = None  # the proven one
        self.state = "waiting"  # -> connected | expired | stopped
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=f"page-chan-{image}",
                                        daemon=True)

    def start(self) -> Listener:
        self._thread.start()
        return self

    @property
    def waiting(self) -> bool:
        return self.state == "waiting"

    def close(self, state: str = "stopped") -> None:
        with self._lock:
            if self.state == "waiting":
                self.state = state
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"state": self.state, "refused": self.refused,
                    "refusals": list(self.refusals), "peer": self.peer}

    def _refuse(self, peer: str, reason: str) -> None:
        with self._lock:
            self.refused += 1
            self.refusals.append({"peer": peer, "reason": reason, "at": time.time()})
            del self.refusals[:-KEEP_REFUSALS]
        log.warning("page channel of image %s: refused %s: %s", self.image, peer, reason)

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + self.wait
        self._sock.settimeout(0.25)
        while not self._closed.is_set():
            if time.monotonic() > deadline:
                log.warning("page channel of image %s: nobody proved itself within %g s",
                            self.image, self.wait)
                self.close("expired")
                return
            try:
                conn, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed under us
            peer = f"{addr[0]}:{addr[1]}"
            with self._lock:
                full = self._pending >= MAX_PENDING
                if not full:
                    self._pending += 1
            if full:
                # Counted before the peer sees the door shut: whoever notices the drop and
                # asks for status finds it counted.
                self._refuse(peer, f"{MAX_PENDING} connections are already proving themselves")
                conn.close()
                continue
            # A thread each: a silent peer must not delay the genuine one behind it.
            threading.Thread(target=self._vet, args=(conn, peer), daemon=True,
                             name=f"page-chan-vet-{peer}").start()

    def _vet(self, conn: socket.socket, peer: str) -> None:
        try:
            try:
                client_nonce, tls = serve_handshake(conn, self.key, self.image, self.nonce,
                                                    timeout=self.handshake_timeout)
            except PageChannelError as err:
                self._refuse(peer, err.msg)  # counted before the peer sees the drop
                conn.close()
                return
            with self._lock:
                won = self.state == "waiting"
                if won:
                    self.state, self.peer = "connected", peer
            if not won:
                self._refuse(peer, f"proved itself, but the channel is {self.state}")
                conn.close()
                return
            self.close("connected")
            log.info("page channel of image %s: %s proved itself", self.image, peer)
            conn.settimeout(None)  # blocking again: CRIU gets the fd as it is
            self._on_channel(Channel.open(conn, peer, self.key, self.image, self.nonce,
                                          client_nonce, tls=tls, source=False))
        finally:
            with self._lock:
                self._pending -= 1


# --- the source: a loopback port for CRIU's dump, relayed to the proven connection ----------


def _proc_net_uid(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The uid owning the TCP socket bound to ``local`` and connected to ``remote`` in this
    network namespace (/proc/net/tcp), None if not found."""
    def enc(addr: tuple[str, int]) -> str:
        packed = socket.inet_aton(addr[0])
        return f"{int.from_bytes(packed, 'little'):08X}:{addr[1]:04X}"

    want_local, want_remote = enc(local), enc(remote)
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if len(f) > 7 and f[1] == want_local and f[2] == want_remote:
            return int(f[7])
    return None


class Joint:
    """Joins ``local`` (CRIU's side) to ``net`` (the channel), both ways, on a thread each. With
    ``records``, what ``local`` sends goes out sealed and what ``net`` brings is opened before
    ``local`` sees it; without, bytes pass as they are (CRIU's TLS is on the wire).

    Ends: a side that ends its stream has the other side's writing end shut (after the end
    record, with ``records``), so each CRIU reads to the end of what was sent before its EOF.
    Anything wrong (a record that fails, a stream cut short, a socket error) aborts: both
    sockets are shut both ways, so both CRIUs fail rather than take half a stream, and the
    reason is logged and kept in ``error``. Sockets are closed when both directions are done."""

    def __init__(self, local: socket.socket, net: socket.socket, records: Records | None,
                 label: str) -> None:
        self.local, self.net, self.records, self.label = local, net, records, label
        self.bytes_out = 0  # to the network, as sent on the wire
        self.bytes_in = 0  # from the network, as received on the wire
        self.error: str | None = None
        self.local_done = False  # the local side ended its stream
        self.net_ended = False  # the network side ended its stream before the local side did
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._running = 2
        self._threads = [
            threading.Thread(target=self._run, args=(self._outbound, "to the peer"),
                             name=f"page-joint-out-{label}", daemon=True),
            threading.Thread(target=self._run, args=(self._inbound, "from the peer"),
                             name=f"page-joint-in-{label}", daemon=True)]

    def start(self) -> Joint:
        for t in self._threads:
            t.start()
        return self

    def _outbound(self) -> None:
        while data := self.local.recv(RECORD_BYTES):
            wire = data if self.records is None else self.records.seal(data)
            # Counted before it is sent: once the peer has it, the count must already say so.
            self.bytes_out += len(wire)
            self.net.sendall(wire)
        with self._lock:
            if self.error is not None or self._closed.is_set():
                # The local side ended because we aborted (or closed) it, not because CRIU
                # finished: no end record, or the peer would take a cut stream for a whole one.
                return
            self.local_done = True
        if self.records is not None:
            end = self.records.seal_end()
            self.bytes_out += len(end)
            self.net.sendall(end)
        _shut(self.net, socket.SHUT_WR)

    def _inbound(self) -> None:
        while True:
            if self.records is None:
                data: bytes | None = self.net.recv(RECORD_BYTES)
                self.bytes_in += len(data or b"")
            else:
                data = recv_record(self.net, self.records)
                self.bytes_in += Records.HEADER_BYTES + TAG_BYTES + len(data or b"")
            if not data:
                break
            self.local.sendall(data)
        if not self.local_done and not self._closed.is_set():
            self.net_ended = True
        _shut(self.local, socket.SHUT_WR)

    def _run(self, body: Callable[[], None], way: str) -> None:
        try:
            body()
        except (OSError, PageChannelError) as err:
            self._abort(way, err)
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self.local.close()
                self.net.close()

    def _abort(self, way: str, err: OSError | PageChannelError) -> None:
        why = err.msg if isinstance(err, PageChannelError) else (err.strerror or str(err))
        with self._lock:
            first = self.error is None and not self._closed.is_set()
            if first:
                self.error = f"{way}: {why}"
        if first:
            log.error("page channel of %s (%s): %s: aborting the transfer", self.label,
                      self.protection, self.error)
        # The network first: nothing more may leave once the local side sees its end.
        _shut(self.net, socket.SHUT_RDWR)
        _shut(self.local, socket.SHUT_RDWR)

    @property
    def protection(self) -> str:
        return "tls" if self.records is None else "aes-gcm"

    def join(self, timeout: float | None = None) -> bool:
        """Wait for both directions to end; whether they did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def close(self) -> None:
        self._closed.set()
        for s in (self.net, self.local):
            _shut(s, socket.SHUT_RDWR)
        if any(t.ident is not None for t in self._threads):
            self.join(timeout=5)
        self.local.close()
        self.net.close()


def _shut(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)


def criu_end(chan: Channel, label: str) -> tuple[socket.socket, Joint | None]:
    """The destination's socket for CRIU's page server (``ps.fd``): with CRIU's TLS, the
    channel's own; with the agents' records, one end of a UNIX socketpair whose other end a
    ``Joint`` (not started: start it once CRIU holds its end) joins to the channel. The caller
    closes its copy of the returned socket once CRIU has it."""
    if chan.records is None:
        return chan.sock, None
    theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return theirs, Joint(ours, chan.sock, chan.records, label)


class Relay:
    """A loopback port that CRIU's dump connects to, joined (``Joint``) to the authenticated
    ``upstream`` connection: byte for byte under CRIU's TLS, or sealed into ``records``. Only
    a connection owned by root (the uid CRIU runs as) is joined: another local user's is
    refused and the relay keeps waiting for CRIU's."""

    def __init__(self, upstream: socket.socket, records: Records | None = None, *,
                 wait: float = 600.0, label: str = "a dump") -> None:
        self.upstream = upstream
        self.records = records
        self.label = label
        self.wait = wait
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(4)
        self.port = int(self._sock.getsockname()[1])
        self.refused = 0
        self.joint: Joint | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="page-relay", daemon=True)
        self._thread.start()

    @property
    def bytes_up(self) -> int:
        return self.joint.bytes_out if self.joint is not None else 0

    @property
    def bytes_down(self) -> int:
        return self.joint.bytes_in if self.joint is not None else 0

    @property
    def error(self) -> str | None:
        return self.joint.error if self.joint is not None else None

    @property
    def upstream_closed(self) -> bool:
        """The destination ended the stream before CRIU did."""
        return self.joint is not None and self.joint.net_ended

    def _run(self) -> None:
        deadline = time.monotonic() + self.wait
        self._sock.settimeout(0.25)
        while not self._closed.is_set() and time.monotonic() < deadline:
            try:
                conn, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            uid = _proc_net_uid((str(addr[0]), int(addr[1])), ("127.0.0.1", self.port))
            if uid != os.geteuid():
                self.refused += 1
                log.warning("page relay: refused a local connection from %s:%s (uid %s)",
                            addr[0], addr[1], uid)
                conn.close()
                continue
            conn.settimeout(None)
            self._sock.close()
            if self._closed.is_set():
                conn.close()
                return
            # Set before it starts: its counters and error are read as soon as bytes flow.
            self.joint = Joint(conn, self.upstream, self.records, self.label)
            self.joint.start()
            return

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.joint is not None:
            self.joint.close()
        else:
            _shut(self.upstream, socket.SHUT_RDWR)
            self.upstream.close()
