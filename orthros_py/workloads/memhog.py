"""A process whose memory can be checked page by page: the workload of the post-copy (lazy) and
pre-copy migrations and of the paging standby.

``python -m orthros_py.workloads.memhog --mib 1024 --port P --hot-fraction 0.3`` maps N MiB of
private anonymous memory and fills every 4 KiB page with a pattern derived from (seed, page
index, version): a 16-byte header ``<page u32><version u32><mix u64>`` repeated 256 times, so
that any byte of a page that comes back wrong is caught. The versions live in an ``array`` of
the same process, so they migrate with it.

A worker thread keeps reading and writing the *hot set*: each step picks a hot page at random
(seeded), checks it against its version (a mismatch is counted, never repaired silently), and
unless ``--read-only-hot`` bumps the version and rewrites the page. The hot set is laid out as
``--hot-layout first`` (pages ``[0, hot)``, the default) or ``spread`` (``hot`` pages evenly
spaced over the region: page ``i * pages // hot``), so that a migration that sends pages in
address order is not flattered by a hot set at the front.

A TCP server (a thread per connection, many requests per connection) speaks lines:

- ``PING`` -> ``PONG <n>``: ``n`` counts the PINGs this process answered (it survives a
  migration, being memory);
- ``STAT`` -> one line of JSON (pages, hot pages, versions' sum, mismatches, uptime, ...);
- ``VERIFY`` -> walks every page, answers ``OK <pages>`` or ``BAD <n> <first bad page>``;
- ``TOUCH <from> <to>`` -> reads one byte of each page in ``[from, to)`` (faults them in),
  answers ``OK <n>``;
- anything else -> ``ERR <why>``.

Once the memory is filled and the server listens it prints ``READY <pid> <port>`` on stdout.

``MemConn`` (one connection, one request at a time) and ``MemClient`` (a PING loop in a thread
that records every reply's send and receive times and every error) are its clients; the
connection is made by a function handed in (``connect``), so that a caller can make it in
another network namespace. ``ClientLog`` holds what a client saw and computes from it the
longest gap between replies, the first reply after an instant and errors per connection.

Only the standard library: no privileges needed, except what the caller's ``connect`` needs.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import itertools
import json
import mmap
import os
import random
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE = 4096
_HEADER = struct.Struct("<IIQ")
_REPEAT = PAGE // _HEADER.size
_M64 = (1 << 64) - 1
# Pages built or compared per slice: one slice of the mapping per 1 MiB, not per page.
CHUNK_PAGES = 256
HOT_LAYOUTS = ("first", "spread")


# What the region's pages live in: the mapping, or a bytearray in tests.
Buffer = mmap.mmap | bytearray


# --- the pattern (pure) ---------------------------------------------------------------------------


def mix(seed: int, page: int, version: int) -> int:
    """A cheap 64-bit mix of the three (splitmix64's finaliser): different for neighbours,
    so a page copied to the wrong place or a stale version does not pass."""
    x = (seed * 0x9E3779B97F4A7C15 + page * 0xBF58476D1CE4E5B9 + version * 0x94D049BB133111EB
         + 1) & _M64
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 29
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 32)


def page_bytes(seed: int, page: int, version: int) -> bytes:
    """The 4 KiB that page ``page`` holds at ``version``."""
    return _HEADER.pack(page & 0xFFFFFFFF, version & 0xFFFFFFFF,
                        mix(seed, page, version)) * _REPEAT


def read_header(data: bytes | bytearray) -> tuple[int, int]:
    """(page, version) as a page's first 16 bytes say: where a bad page claims to come from."""
    p, v, _ = _HEADER.unpack_from(data)
    return p, v


def hot_pages(pages: int, fraction: float, layout: str = "first") -> int:
    """How many pages the hot set has: ``fraction`` of them, at least one if fraction > 0."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("the hot fraction is between 0 and 1")
    if layout not in HOT_LAYOUTS:
        raise ValueError(f"hot layout is one of {', '.join(HOT_LAYOUTS)}")
    n = round(pages * fraction)
    return max(1, n) if fraction > 0 and pages else min(n, pages)


def hot_page(i: int, pages: int, hot: int, layout: str) -> int:
    """The ``i``-th page of the hot set (``0 <= i < hot``)."""
    return i if layout == "first" else i * pages // hot


@dataclass(frozen=True)
class VerifyResult:
    pages: int
    bad: int = 0
    first_bad: int | None = None

    @property
    def ok(self) -> bool:
        return self.bad == 0

    def line(self) -> str:
        return f"OK {self.pages}" if self.ok else f"BAD {self.bad} {self.first_bad}"

    @classmethod
    def parse(cls, line: str) -> VerifyResult:
        """The server's answer to VERIFY; ValueError if it is not one."""
        words = line.split()
        if len(words) == 2 and words[0] == "OK":
            return cls(int(words[1]))
        if len(words) == 3 and words[0] == "BAD":
            return cls(-1, int(words[1]), int(words[2]))
        raise ValueError(f"not an answer to VERIFY: {line!r}")


# --- the region -----------------------------------------------------------------------------------


class Region:
    """``buf`` as pages of the pattern, with their versions. Every read-check-write of a page
    holds ``lock``, so VERIFY never sees a page half rewritten by the worker."""

    def __init__(self, buf: Buffer, seed: int = 0) -> None:
        if len(buf) % PAGE:
            raise ValueError("the buffer is not a whole number of pages")
        self.buf = buf
        self.seed = seed
        self.pages = len(buf) // PAGE
        self.versions = array.array("I", bytes(4 * self.pages))
        self.lock = threading.Lock()

    @classmethod
    def anonymous(cls, mib: int, seed: int = 0) -> Region:
        """``mib`` MiB of private anonymous memory (not yet filled)."""
        size = mib << 20
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return cls(buf, seed)

    def expected(self, p: int) -> bytes:
        return page_bytes(self.seed, p, self.versions[p])

    def fill(self) -> None:
        """Every page at its version (0 at the start), a chunk of pages per slice."""
        for start in range(0, self.pages, CHUNK_PAGES):
            end = min(start + CHUNK_PAGES, self.pages)
            self.buf[start * PAGE:end * PAGE] = b"".join(self.expected(p)
                                                         for p in range(start, end))

    def check(self, p: int) -> bool:
        """Page ``p`` holds what its version says (the caller holds ``lock``)."""
        return self.buf[p * PAGE:(p + 1) * PAGE] == self.expected(p)

    def bump(self, p: int) -> None:
        """Next version of page ``p``, written (the caller holds ``lock``)."""
        v = (self.versions[p] + 1) & 0xFFFFFFFF
        self.versions[p] = v
        self.buf[p * PAGE:(p + 1) * PAGE] = page_bytes(self.seed, p, v)

    def verify(self, start: int = 0, end: int | None = None) -> VerifyResult:
        """Pages ``[start, end)`` checked against their versions, a chunk under the lock at a
        time (the worker waits for a chunk, not for the whole walk)."""
        end = self.pages if end is None else min(end, self.pages)
        bad, first = 0, None
        for a in range(start, end, CHUNK_PAGES):
            b = min(a + CHUNK_PAGES, end)
            with self.lock:
                got = self.buf[a * PAGE:b * PAGE]
                want = b"".join(self.expected(p) for p in range(a, b))
            if got == want:
                continue
            for p in range(a, b):  # the rare chunk that differs: which pages
                off = (p - a) * PAGE
                if got[off:off + PAGE] != want[off:off + PAGE]:
                    bad += 1
                    first = p if first is None else first
        return VerifyResult(end - start, bad, first)

    def touch(self, start: int, end: int) -> int:
        """One byte of each page in ``[start, end)`` read: faults the pages in."""
        start, end = max(0, start), min(end, self.pages)
        total = 0
        for p in range(start, end):
            total += self.buf[p * PAGE:p * PAGE + 1][0]
        del total
        return max(0, end - start)

    def versions_sum(self) -> int:
        return sum(self.versions)

    def address(self) -> int | None:
        """The mapping's address (for a test that writes into it from outside)."""
        if not isinstance(self.buf, mmap.mmap):
            return None
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self.buf))


# --- the worker -----------------------------------------------------------------------------------


@dataclass
class WorkerStats:
    steps: int = 0
    writes: int = 0
    mismatches: int = 0
    first_mismatch: int | None = None  # page
    first_mismatch_header: tuple[int, int] | None = None  # (page, version) it held instead


class Worker:
    """Reads (and unless ``read_only``, rewrites) random pages of the hot set at ``rate`` pages
    a second (0: as fast as it can), in a daemon thread."""

    TICK = 0.01  # the rate is kept per 10 ms: a burst of rate/100 steps, then a sleep

    def __init__(self, region: Region, hot: int, *, layout: str = "first",
                 rate: float = 2000.0, read_only: bool = False, seed: int = 0) -> None:
        self.region, self.hot, self.layout = region, hot, layout
        self.rate, self.read_only = rate, read_only
        self.rng = random.Random(seed)
        self.stats = WorkerStats()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="memhog-worker")

    def start(self) -> Worker:
        if self.hot > 0:
            self.thread.start()
        return self

    def step(self) -> None:
        r = self.region
        p = hot_page(self.rng.randrange(self.hot), r.pages, self.hot, self.layout)
        with r.lock:
            if not r.check(p):
                s = self.stats
                s.mismatches += 1
                if s.first_mismatch is None:
                    s.first_mismatch = p
                    s.first_mismatch_header = read_header(r.buf[p * PAGE:p * PAGE + 16])
            if not self.read_only:
                r.bump(p)
                self.stats.writes += 1
        self.stats.steps += 1

    def _run(self) -> None:
        per_tick = max(1, round(self.rate * self.TICK)) if self.rate > 0 else CHUNK_PAGES
        next_tick = time.monotonic()
        while not self.stop_event.is_set():
            for _ in range(per_tick):
                self.step()
            if self.rate <= 0:
                continue
            next_tick += self.TICK
            delay = next_tick - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)
            elif delay < -1.0:
                # Frozen (a dump) or starved: start again from now rather than catch up in a
                # burst that would dirty a second's worth of pages at once.
                next_tick = time.monotonic()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(5)


# --- the server -----------------------------------------------------------------------------------


class MemHog:
    """The region, its worker and what the server answers."""

    def __init__(self, region: Region, worker: Worker, *, hot_fraction: float,
                 started: float | None = None) -> None:
        self.region, self.worker = region, worker
        self.hot_fraction = hot_fraction
        self.started = time.time() if started is None else started
        self.pings = 0
        self.verifies = 0
        self.last_verify: VerifyResult | None = None
        self._lock = threading.Lock()

    def stat(self) -> dict[str, Any]:
        r, w = self.region, self.worker
        return {
            "pid": os.getpid(), "pages": r.pages, "page_size": PAGE,
            "mib": r.pages * PAGE >> 20, "hot_pages": w.hot, "hot_fraction": self.hot_fraction,
            "hot_layout": w.layout, "read_only_hot": w.read_only, "rate": w.rate,
            "versions_sum": r.versions_sum(), "steps": w.stats.steps,
            "writes": w.stats.writes, "mismatches": w.stats.mismatches,
            "first_mismatch": w.stats.first_mismatch, "pings": self.pings,
            "verifies": self.verifies,
            "last_verify": None if self.last_verify is None else self.last_verify.line(),
            "uptime_s": round(time.time() - self.started, 3), "addr": r.address(),
            "seed": r.seed,
        }

    def answer(self, line: str) -> str:
        """The reply to one request line (without its newline)."""
        words = line.split()
        if not words:
            return "ERR empty request"
        cmd = words[0].upper()
        if cmd == "PING":
            with self._lock:
                self.pings += 1
                return f"PONG {self.pings}"
        if cmd == "STAT":
            return json.dumps(self.stat(), separators=(",", ":"))
        if cmd == "VERIFY":
            res = self.region.verify()
            with self._lock:
                self.verifies += 1
                self.last_verify = res
            return res.line()
        if cmd == "TOUCH":
            try:
                a, b = int(words[1]), int(words[2])
            except (IndexError, ValueError):
                return "ERR usage: TOUCH <from> <to>"
            return f"OK {self.region.touch(a, b)}"
        return f"ERR unknown command {cmd[:32]!r}"


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):
            for raw in self.rfile:
                reply = self.server.hog.answer(raw.decode(errors="replace").strip())
                self.wfile.write(reply.encode() + b"\n")


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], hog: MemHog) -> None:
        self.hog = hog
        super().__init__(addr, _Handler)


def serve(hog: MemHog, host: str, port: int) -> _Server:
    """Bind and listen (serving starts with ``serve_forever``)."""
    return _Server((host, port), hog)


def parse_ready(line: str) -> tuple[int, int] | None:
    """(pid, port) from the ``READY <pid> <port>`` line; None for any other line."""
    words = line.split()
    if len(words) == 3 and words[0] == "READY" and words[1].isdigit() and words[2].isdigit():
        return int(words[1]), int(words[2])
    return None


def wait_ready(log: Path, timeout: float = 60.0,
               alive: Callable[[], bool] = lambda: True) -> tuple[int, int]:
    """Waits for the READY line in ``log`` (the process's stdout); (pid, port). TimeoutError
    if it does not come, or ``alive`` says the process is gone (the log's tail in the
    message)."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            got = parse_ready(line)
            if got is not None:
                return got
        if time.monotonic() > deadline or not alive():
            why = "exited" if not alive() else f"not ready after {timeout:g} s"
            raise TimeoutError(f"memhog {why}: {text[-500:]!r}")
        time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m orthros_py.workloads.memhog",
                                 description="Memory that can be checked page by page.")
    ap.add_argument("--mib", type=int, default=64, help="Size of the region in MiB.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: the kernel chooses (see READY).")
    ap.add_argument("--hot-fraction", type=float, default=0.3)
    ap.add_argument("--hot-layout", choices=HOT_LAYOUTS, default="first")
    ap.add_argument("--rate", type=float, default=2000.0,
                    help="Hot pages the worker visits a second (0: no limit).")
    ap.add_argument("--read-only-hot", action="store_true",
                    help="The worker only reads and checks the hot set, never writes it.")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--thp", action="store_true",
                    help="Ask for transparent huge pages (madvise); default: plain pages.")
    args = ap.parse_args(argv)
    if args.mib < 1:
        ap.error("--mib must be at least 1")
    started = time.time()
    region = Region.anonymous(args.mib, args.seed)
    if isinstance(region.buf, mmap.mmap):
        with contextlib.suppress(OSError, AttributeError):
            region.buf.madvise(mmap.MADV_HUGEPAGE if args.thp else mmap.MADV_NOHUGEPAGE)
    region.fill()
    try:
        hot = hot_pages(region.pages, args.hot_fraction, args.hot_layout)
    except ValueError as err:
        ap.error(str(err))
    worker = Worker(region, hot, layout=args.hot_layout, rate=args.rate,
                    read_only=args.read_only_hot, seed=args.seed)
    hog = MemHog(region, worker, hot_fraction=args.hot_fraction, started=started)
    srv = serve(hog, args.host, args.port)
    worker.start()
    sys.stdout.write(f"READY {os.getpid()} {srv.server_address[1]}\n")
    sys.stdout.flush()
    srv.serve_forever()


# --- clients --------------------------------------------------------------------------------------


Connect = Callable[[], socket.socket]


def tcp(address: tuple[str, int], timeout: float = 10.0) -> Connect:
    """A ``connect`` that makes a plain connection from this namespace."""
    return lambda: socket.create_connection(address, timeout=timeout)


class MemConn:
    """One connection, one request at a time."""

    def __init__(self, connect: Connect, timeout: float = 60.0) -> None:
        self.sock = connect()
        self.sock.settimeout(timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def call(self, line: str, timeout: float | None = None) -> str:
        """Sends ``line``, returns the reply's line; EOFError if the server closed."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        self.sock.sendall(line.encode() + b"\n")
        reply = self.file.readline()
        if not reply.endswith(b"\n"):
            raise EOFError("the server closed the connection")
        return reply.decode().rstrip("\n")

    def ping(self) -> int:
        words = self.call("PING").split()
        if len(words) != 2 or words[0] != "PONG":
            raise ValueError(f"not a PONG: {' '.join(words)!r}")
        return int(words[1])

    def stat(self) -> dict[str, Any]:
        got: dict[str, Any] = json.loads(self.call("STAT"))
        return got

    def verify(self, timeout: float = 300.0) -> VerifyResult:
        return VerifyResult.parse(self.call("VERIFY", timeout))

    def touch(self, start: int, end: int, timeout: float = 300.0) -> int:
        words = self.call(f"TOUCH {start} {end}", timeout).split()
        if len(words) != 2 or words[0] != "OK":
            raise ValueError(f"not an answer to TOUCH: {' '.join(words)!r}")
        return int(words[1])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> MemConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Reply:
    """One PING answered: when it was sent and when its PONG came (the client's clock)."""

    sent: float
    got: float
    conn: int  # which connection of the client (a new one after each error)

    @property
    def latency(self) -> float:
        return self.got - self.sent


@dataclass(frozen=True)
class ClientError:
    at: float
    conn: int
    what: str


@dataclass
class ClientLog:
    """What a PING client saw. Times are the client's clock (``time.monotonic`` unless it was
    given another); windows are ``[start, end]`` in that clock, None for unbounded."""

    replies: list[Reply] = field(default_factory=list)
    errors: list[ClientError] = field(default_factory=list)
    connections: int = 0

    def _in(self, t: float, start: float | None, end: float | None) -> bool:
        return (start is None or t >= start) and (end is None or t <= end)

    def window(self, start: float | None = None, end: float | None = None) -> ClientLog:
        """The replies received and the errors raised in the window."""
        return ClientLog([r for r in self.replies if self._in(r.got, start, end)],
                         [e for e in self.errors if self._in(e.at, start, end)],
                         self.connections)

    def longest_gap(self, start: float | None = None, end: float | None = None) -> float | None:
        """The longest time without a reply in the window, in seconds: between consecutive
        replies, and from ``start`` to the first and from the last to ``end`` when they are
        given (a service that never answered again shows as the whole window). None when the
        window is unbounded and holds fewer than two replies."""
        points = sorted(r.got for r in self.replies if self._in(r.got, start, end))
        if start is not None:
            points.insert(0, start)
        if end is not None:
            points.append(end)
        if len(points) < 2:
            return None
        return max(b - a for a, b in itertools.pairwise(points))

    def first_reply_after(self, t: float) -> float | None:
        """When the first reply to a PING sent at or after ``t`` came; None if none did."""
        return min((r.got for r in self.replies if r.sent >= t), default=None)

    def time_to_first_reply(self, t: float) -> float | None:
        """Seconds from ``t`` to ``first_reply_after(t)``."""
        got = self.first_reply_after(t)
        return None if got is None else got - t

    def max_latency(self, start: float | None = None, end: float | None = None) -> float | None:
        """The longest wait of a PING sent in the window for its PONG, in seconds."""
        lat = [r.latency for r in self.replies if self._in(r.sent, start, end)]
        return max(lat) if lat else None

    def errors_per_connection(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for e in self.errors:
            out[e.conn] = out.get(e.conn, 0) + 1
        return out


class MemClient:
    """PINGs on one connection at ``rate`` a second, in a thread, one request in flight; every
    reply and every error (timeout, reset, EOF, a wrong answer) recorded with its time. After
    an error it connects again (``reconnect``), as a new connection number."""

    MAX_ERRORS = 10_000  # a service away for minutes with reconnects every 50 ms stays bounded

    def __init__(self, connect: Connect, *, rate: float = 100.0, timeout: float = 60.0,
                 reconnect: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.connect, self.rate, self.timeout = connect, rate, timeout
        self.reconnect, self.clock = reconnect, clock
        self.log = ClientLog()
        self.dropped_errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: MemConn | None = None

    def start(self) -> MemClient:
        """Connects (in the caller's thread, so a refused connection raises here) and starts
        the loop."""
        self._conn = self._open()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memclient")
        self._thread.start()
        return self

    def _open(self) -> MemConn:
        conn = MemConn(self.connect, self.timeout)
        with self._lock:
            self.log.connections += 1
        return conn

    def _error(self, what: str) -> None:
        with self._lock:
            if len(self.log.errors) < self.MAX_ERRORS:
                self.log.errors.append(ClientError(self.clock(), self.log.connections - 1,
                                                   what))
            else:
                self.dropped_errors += 1

    def _run(self) -> None:
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        next_send = self.clock()
        while not self._stop.is_set():
            if self._conn is None:
                try:
                    self._conn = self._open()
                except OSError as err:
                    self._error(f"connect: {type(err).__name__}: {err}")
                    self._stop.wait(0.05)
                    continue
            conn = self._conn
            sent = self.clock()
            try:
                conn.ping()
            except (OSError, EOFError, ValueError) as err:
                if self._stop.is_set():  # ``stop`` cut the PING in flight short
                    break
                self._error(f"{type(err).__name__}: {err}")
                conn.close()
                self._conn = None
                if not self.reconnect:
                    return
                continue
            got = self.clock()
            with self._lock:
                self.log.replies.append(Reply(sent, got, self.log.connections - 1))
            next_send = max(next_send + interval, got)
            delay = next_send - self.clock()
            if delay > 0:
                self._stop.wait(delay)

    def snapshot(self) -> ClientLog:
        """A copy of what was seen so far (the loop goes on)."""
        with self._lock:
            return ClientLog(list(self.log.replies), list(self.log.errors),
                             self.log.connections)

    def clear(self) -> None:
        """Forget the replies and errors so far (between two measured windows)."""
        with self._lock:
            self.log.replies.clear()
            self.log.errors.clear()

    def stop(self) -> ClientLog:
        self._stop.set()
        if self._thread is not None:
            # A PING in flight waits for its reply up to ``timeout``; closing the socket
            # ends the wait at once.
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.sock.shutdown(socket.SHUT_RDWR)
            self._thread.join(self.timeout + 5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        return self.snapshot()

    def __enter__(self) -> MemClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
