"""The page channel: the connection on which a dump's memory crosses from one host to another.

CRIU's page server accepts the first TCP connection from anyone and then trusts what it reads:
whoever connects first breaks the migration, and whoever sits on the path can rewrite memory.
So the agents open the connection themselves. The destination's agent listens (``Listener``);
each connection must prove within ``HANDSHAKE_TIMEOUT`` that it holds the cluster key (a mutual
HMAC-SHA256 challenge-response bound to the image and to both sides' fresh nonces); any other
is refused, logged and counted, and the agent keeps waiting. The connection that passes goes to
CRIU's page server as ``ps.fd``. The source's agent connects (``connect``) and hands the same
connection to its CRIU dump. On it CRIU runs TLS (gnutls, mutual, TLS 1.3) with a certificate
every agent derives from the cluster key (``derive_credentials``): encrypted, and a byte
changed in transit fails the transfer instead of landing in memory.

Why the source goes through a loopback ``Relay``: CRIU 4.2.1's dump skips TLS on a socket it
is handed (``connect_to_page_server`` jumps over ``tls_x509_init`` when ``ps_socket`` is set;
its page server does run TLS on one). So the dump connects, with TLS, to a loopback port of
its agent, which copies the (encrypted) bytes to and from the authenticated connection. That
works with an unpatched CRIU (setup may use a system CRIU, which orthros does not patch).

When TLS is off: CRIU 4.2.1 dumps a tree's own IPC namespace (SysV shared memory) in a forked
child that sends its pages on the same connection with a copy of the parent's TLS state, so
the peer's records go out of sequence and the dump fails ("Decryption has failed"). For such a
tree the sender asks, inside the authenticated hello, for no TLS: the channel is still
authenticated (nobody else gets in), but not encrypted nor protected on the path.

Interfaces: TCP sockets (any port), /proc/net/tcp{,6} (who owns a loopback peer), the
filesystem (the PEM files, mode 0600, in a directory of mode 0700 the agent owns), threads.
No privileges of its own; the CRIU it feeds needs root.
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
MAX_PENDING = 16  # connections proving themselves at once; more are refused at the door
KEEP_REFUSALS = 32  # refusals kept for status (all are counted)
CERT_INFO = b"orthros page channel v1"
_HANDSHAKE_INFO = b"orthros page channel handshake v1"
CERT_NAME = "orthros page channel"
CERT_FILE = "page-channel.crt"
KEY_FILE = "page-channel.key"


class PageChannelError(AgentError):
    """The page channel could not be opened: the peer failed the handshake, or went silent."""


# --- the handshake (pure but for the socket) ----------------------------------------------------


def _handshake_key(key: bytes) -> bytes:
    # Its own key: a MAC made here is never a valid agent RPC frame MAC, and the reverse.
    return hmac.new(key, _HANDSHAKE_INFO, hashlib.sha256).digest()


def proof(key: bytes, role: bytes, image: str, server_nonce: bytes, client_nonce: bytes,
          tls: bool = True) -> bytes:
    """The MAC one side sends: bound to its role (so a proof cannot be reflected back), to the
    image (a proof for one migration opens no other), to both nonces (none replays) and to
    whether CRIU runs TLS next (nobody on the path can switch it off)."""
    msg = b"\x00".join((role, image.encode(), server_nonce, client_nonce,
                        b"tls" if tls else b"plain"))
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
            timeout: float = HANDSHAKE_TIMEOUT, tls: bool = True) -> socket.socket:
    """The source's half: connect to the destination's page port, prove ourselves, check its
    proof. Returns the connected socket, blocking (ready for CRIU)."""
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
        return sock
    except BaseException:
        sock.close()
        raise


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


OnChannel = Callable[[socket.socket, str, bool], None]  # (connection, peer, TLS asked)


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
                conn.close()
                self._refuse(peer, f"{MAX_PENDING} connections are already proving themselves")
                continue
            # A thread each: a silent peer must not delay the genuine one behind it.
            threading.Thread(target=self._vet, args=(conn, peer), daemon=True,
                             name=f"page-chan-vet-{peer}").start()

    def _vet(self, conn: socket.socket, peer: str) -> None:
        try:
            try:
                _, tls = serve_handshake(conn, self.key, self.image, self.nonce,
                                         timeout=self.handshake_timeout)
            except PageChannelError as err:
                conn.close()
                self._refuse(peer, err.msg)
                return
            with self._lock:
                won = self.state == "waiting"
                if won:
                    self.state, self.peer = "connected", peer
            if not won:
                conn.close()
                self._refuse(peer, f"proved itself, but the channel is {self.state}")
                return
            self.close("connected")
            log.info("page channel of image %s: %s proved itself", self.image, peer)
            conn.settimeout(None)  # blocking again: CRIU gets the fd as it is
            self._on_channel(conn, peer, tls)
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


class Relay:
    """A loopback port that CRIU's dump connects to (with TLS), joined byte for byte to the
    authenticated ``upstream`` connection. Only a connection owned by root (the uid CRIU runs
    as) is joined: another local user's is refused and the relay keeps waiting for CRIU's."""

    def __init__(self, upstream: socket.socket, *, wait: float = 600.0) -> None:
        self.upstream = upstream
        self.wait = wait
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(4)
        self.port = int(self._sock.getsockname()[1])
        self.refused = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.error: str | None = None
        self.upstream_closed = False  # the destination ended the stream before CRIU did
        self._local_done = False
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._local: socket.socket | None = None
        t = threading.Thread(target=self._run, name="page-relay", daemon=True)
        self._threads.append(t)
        t.start()

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
            self._local = conn
            self._sock.close()
            up = threading.Thread(target=self._pipe, args=(conn, self.upstream, "up"),
                                  name="page-relay-up", daemon=True)
            down = threading.Thread(target=self._pipe, args=(self.upstream, conn, "down"),
                                    name="page-relay-down", daemon=True)
            self._threads += [up, down]
            up.start()
            down.start()
            return

    def _pipe(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while True:
                data = src.recv(1 << 18)
                if not data:
                    if way == "up":
                        self._local_done = True
                    elif not self._local_done and not self._closed.is_set():
                        self.upstream_closed = True
                    break
                dst.sendall(data)
                if way == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
        except OSError as err:
            if not self._closed.is_set() and self.error is None:
                self.error = f"{way}: {err.strerror or err}"
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed.set()
        for s in (self._sock, self._local, self.upstream):
            if s is None:
                continue
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
