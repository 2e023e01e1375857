"""A TCP echo service and a pool of clients that check every reply.

``python -m orthros_py.workloads.echo --host H --port P`` runs the server (one thread per client, so
that a checkpoint holds one process with many established sockets). ``ClientPool`` keeps N
connections open and sends numbered requests on all of them; any reset, timeout or wrong echo is
counted, which is how the demo and the tests prove that a checkpoint lost nothing.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from dataclasses import dataclass, field


def serve(host: str, port: int) -> None:
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(4096)

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


@dataclass
class PoolStats:
    requests: int = 0
    errors: int = 0
    # Longest time any single request waited for its echo: the gap a client saw.
    max_gap_s: float = 0.0
    # The connection whose reply that longest round waited for longest, and when it ended.
    slowest_conn: int | None = None
    slowest_at: float = 0.0
    error_samples: list[str] = field(default_factory=list)


class ClientPool:
    """N persistent connections to an echo server; ``round()`` sends one request on each."""

    def __init__(self, host: str, port: int, n: int, *, timeout: float = 30.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.stats = PoolStats()
        self._answered = [0] * n  # correct echoes per connection
        self._seq = 0
        self.socks: list[socket.socket] = []
        for _ in range(n):
            s = socket.create_connection((host, port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks.append(s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _error(self, msg: str) -> None:
        self.stats.errors += 1
        if len(self.stats.error_samples) < 10:
            self.stats.error_samples.append(msg)

    def round(self) -> None:
        """One request on every connection at once, then every reply checked."""
        with self._lock:
            self._seq += 1
            start = time.monotonic()
            live = []
            for i, s in enumerate(self.socks):
                msg = f"{i}:{self._seq};".encode()
                try:
                    s.sendall(msg)
                    live.append((i, s, msg))
                except OSError as err:
                    self._error(f"conn {i}: send: {err}")
            last, longest, prev = None, -1.0, time.monotonic()
            for i, s, msg in live:
                got = b""
                try:
                    while len(got) < len(msg):
                        chunk = s.recv(len(msg) - len(got))
                        if not chunk:
                            raise ConnectionResetError("closed by peer")
                        got += chunk
                except OSError as err:
                    self._error(f"{msg!r}: {err}")
                    continue
                if got != msg:
                    self._error(f"sent {msg!r}, got {got!r}")
                else:
                    self._answered[i] += 1
                self.stats.requests += 1
                now = time.monotonic()
                if now - prev > longest:  # the reply this round waited longest for
                    last, longest = i, now - prev
                prev = now
            gap = time.monotonic() - start
            if gap > self.stats.max_gap_s:
                self.stats.max_gap_s = gap
                self.stats.slowest_conn, self.stats.slowest_at = last, time.monotonic()

    def answered(self) -> list[int]:
        """Correct echoes so far, per connection (index as in ``socks``): a test asks that
        every connection goes on, which a total cannot tell."""
        return list(self._answered)

    def start(self, interval: float = 0.01) -> None:
        """Keep traffic flowing on every connection in the background."""
        def loop() -> None:
            while not self._stop.is_set():
                self.round()
                self._stop.wait(interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> PoolStats:
        self._stop.set()
        if self._thread:
            self._thread.join(self.timeout * 2)
        return self.stats

    def close(self) -> None:
        self.stop()
        for s in self.socks:
            s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description="TCP echo server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ballast-mb", type=int, default=0,
                    help="Hold this much touched memory, to make a checkpoint heavier.")
    args = ap.parse_args()
    # Touched page by page so that every page is really resident and dumped.
    ballast = bytearray(args.ballast_mb << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
