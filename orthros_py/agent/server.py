"""The agent daemon: a threaded TCP server speaking the agent RPC (``protocol``) to callers that
hold the cluster key (``auth``), running their requests through the operation table (``ops``).

Interfaces: a listening TCP socket (any port; below 1024 needs CAP_NET_BIND_SERVICE) and the
``logging`` module (the CLI sends it to stderr, which journald or a log file collects). The
operations themselves need root (see ``ops``).

One thread per connection; a connection may carry several requests, one after another. A frame
that fails any check (size, JSON, version, MAC, replay window) is answered with a refusal frame
and the connection is closed; the agent logs it and keeps serving. A handler's OrthrosError
goes back to the caller as an authenticated error response; any other exception is a bug,
logged with its stack and reported as an internal error, and the agent keeps serving too.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
import time
from typing import Any

from orthros_py.agent import ops  # noqa: F401  (registers the operations in the table)
from orthros_py.agent.auth import REPLAY_WINDOW, ReplayGuard
from orthros_py.agent.errors import ProtocolError, Refusal
from orthros_py.agent.protocol import (
    PayloadReader,
    Request,
    build_response,
    decode_header,
    encode_refusal,
    encode_response,
    open_request,
    read_frame,
    refusal_for,
    send_payload,
)
from orthros_py.agent.state import Agent
from orthros_py.agent.table import Reply, dispatch
from orthros_py.errors import OrthrosError
from orthros_py.net.conn import format_endpoint

log = logging.getLogger("orthros.agent")

MAX_CONNECTIONS = 256  # each is a thread; RLIMIT_NOFILE here is 20,000
IDLE_TIMEOUT = 120.0  # a connection silent this long between or within frames is dropped
# Until its first frame has authenticated, a connection has this long in all to send it: an
# unauthenticated peer, silent or dripping a byte at a time, cannot hold a slot for long.
AUTH_TIMEOUT = 5.0
# Requests too frequent to log at INFO (health checks).
QUIET_OPS = frozenset({"ping"})


class AgentServer(socketserver.ThreadingTCPServer):
    daemon_threads = True  # a stuck connection must not keep the process alive at exit
    allow_reuse_address = True  # restart at once on the same port after a stop
    block_on_close = False
    request_queue_size = 128

    def __init__(self, agent: Agent, listen: tuple[str, int], *,
                 replay_window: float = REPLAY_WINDOW, max_connections: int = MAX_CONNECTIONS,
                 idle_timeout: float = IDLE_TIMEOUT, auth_timeout: float = AUTH_TIMEOUT) -> None:
        host, port = listen
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.agent = agent
        self.guard = ReplayGuard(replay_window)
        self.idle_timeout = idle_timeout
        self.auth_timeout = auth_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._in_flight = 0
        self._idle = threading.Condition()
        self.stopping = False
        bind_host = host or ("::" if self.address_family == socket.AF_INET6 else "0.0.0.0")
        try:
            super().__init__((bind_host, port), _Connection)
        except OSError as err:
            raise OrthrosError(
                f"cannot listen on {format_endpoint(bind_host, port)}: "
                f"{err.strerror or err}",
                host=agent.name, hint="is another agent running there?") from err

    @property
    def endpoint(self) -> tuple[str, int]:
        """The address and port actually bound (the port the kernel chose, for port 0)."""
        addr = self.server_address
        return str(addr[0]), int(addr[1])

    def serve(self, stop: threading.Event, *, grace: float = 30.0) -> None:
        """Serve until ``stop`` is set; then stop accepting and give requests in flight up to
        ``grace`` seconds to finish (a dump cut short would leave its tree frozen or killed)."""
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="accept", daemon=True)
        thread.start()
        try:
            while not stop.wait(1.0):
                pass
        finally:
            self.stopping = True
            self.shutdown()
            thread.join()
            with self._idle:
                if self._in_flight:
                    log.info("waiting up to %g s for %d request(s) in flight", grace,
                             self._in_flight)
                self._idle.wait_for(lambda: self._in_flight == 0, timeout=grace)
            self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print the stack to stderr and move on; log it instead.
        log.exception("unexpected error on the connection from %s", client_address)

    # -- one connection -------------------------------------------------------------------

    def serve_connection(self, sock: socket.socket, peer: str) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(sock, peer, ProtocolError(
                "too many connections", code=Refusal.BUSY, hint="retry in a moment"))
            return
        try:
            sock.settimeout(self.idle_timeout)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # Answers and payloads are written whole: no Nagle wait for the peer's ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            first: _Deadline | None = _Deadline(sock, time.monotonic() + self.auth_timeout)
            while not self.stopping:
                try:
                    raw = read_frame(first or sock)
                    if raw is None:
                        return
                    req = open_request(self.agent.key, decode_header(raw), self.guard)
                except ProtocolError as err:
                    self._refuse(sock, peer, err)
                    return
                except TimeoutError:
                    if first is not None:
                        log.warning("%s: sent no authenticated request within %g s, closing",
                                    peer, self.auth_timeout)
                    else:
                        log.debug("%s: idle for %g s, closing", peer, self.idle_timeout)
                    return
                except OSError as err:
                    log.debug("%s: connection lost: %s", peer, err)
                    return
                if first is not None:
                    first = None
                    sock.settimeout(self.idle_timeout)
                if not self._run(sock, peer, req):
                    return
        finally:
            self._slots.release()

    def _refuse(self, sock: socket.socket, peer: str, err: ProtocolError) -> None:
        """Tell the peer why, unauthenticated, then close. Logged: it is either a
        misconfigured host (another key, another version) or someone probing."""
        log.warning("%s: refused a frame (%s): %s", peer, err.code, err.msg)
        frame = encode_refusal(refusal_for(err))
        with contextlib.suppress(OSError):
            sock.settimeout(2.0)
            sock.sendall(frame)
            # Half-close, then drain what the peer still sends: closing with unread data
            # would reset the connection and could destroy the refusal before it is read.
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 2.0
            drained = 0
            while time.monotonic() < deadline and drained < (16 << 20):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)

    def _run(self, sock: socket.socket, peer: str, req: Request) -> bool:
        """Run one authenticated request and answer it; False if the connection must close."""
        with self._idle:
            self._in_flight += 1
        try:
            return self._answer(sock, peer, req)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _answer(self, sock: socket.socket, peer: str, req: Request) -> bool:
        agent = self.agent
        start = time.perf_counter()
        payload = PayloadReader(sock, req.payload_len, req.payload_sha256)
        reply: Reply | None = None
        try:
            reply = dispatch(agent, req, payload, peer)
            resp = build_response(req, agent.name, result=reply.result,
                                  payload_len=reply.payload_len,
                                  payload_sha256=reply.payload_sha256)
            frame = encode_response(agent.key, resp)
        except OrthrosError as err:
            if not err.host:
                err.host = agent.name
            resp = build_response(req, agent.name, error=err.to_dict())
            frame = encode_response(agent.key, resp)
            if isinstance(err, ProtocolError) and err.code == Refusal.BAD_REQUEST:
                log.warning("%s: refused %s request %s: %s", peer, req.op, req.id, err.msg)
            else:
                log.warning("%s: %s request %s failed: %s", peer, req.op, req.id, err)
        except Exception as err:  # a bug in a handler: report it, keep serving
            log.exception("%s: internal error in %s request %s", peer, req.op, req.id)
            bug = OrthrosError(f"internal error in the agent while running {req.op}: "
                               f"{type(err).__name__}: {err}", host=agent.name, stage=req.op)
            resp = build_response(req, agent.name, error=bug.to_dict())
            frame = encode_response(agent.key, resp)
            if reply is not None and reply.payload is not None:
                reply.payload.close()
            reply = None
        else:
            ms = (time.perf_counter() - start) * 1000
            level = logging.DEBUG if req.op in QUIET_OPS else logging.INFO
            log.log(level, "%s: %s request %s done in %.1f ms", peer, req.op, req.id, ms)
        try:
            if not payload.consumed:
                # The handler failed before reading the payload. The caller is authenticated,
                # so reading the rest is only bandwidth, and it keeps the stream in step: the
                # caller sends everything before it reads our answer.
                payload.discard()
            sock.sendall(frame)
            if reply is not None and reply.payload is not None and resp.ok:
                send_payload(sock, reply.payload, reply.payload_len)
        except (OSError, ProtocolError) as err:
            log.warning("%s: could not answer %s request %s: %s", peer, req.op, req.id, err)
            return False
        finally:
            if reply is not None and reply.payload is not None:
                reply.payload.close()
        return True


class _Deadline:
    """A socket whose reads must all be done by ``deadline`` (monotonic): the budget of an
    unauthenticated peer's first frame, however it spreads its bytes."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, /) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer, nbytes)

    def sendall(self, data: bytes, /) -> None:
        self.sock.sendall(data)


class _Connection(socketserver.BaseRequestHandler):
    server: AgentServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        peer = format_endpoint(str(self.client_address[0]), int(self.client_address[1]))
        self.server.serve_connection(sock, peer)
