"""CRIU's lazy-pages daemon: the process that feeds a lazily restored tree its memory.

A restore with ``lazy_pages`` leaves the tree's private anonymous memory (the pagemap entries
marked PE_LAZY) out, registers it with a userfaultfd, and hands those userfaultfds to the
``criu lazy-pages`` daemon through ``lazy-pages.socket`` in its work directory. CRIU's RPC has no
request type for that daemon, so it runs as a process of its own beside the restore (``start``
before the restore, ``wait`` after). The daemon answers every page fault first and pushes the
rest in the background until every lazy page is in, then exits. It reads the pages either

- from the images themselves (``page_socket=None``: a local, e.g. standby's, image chain; the
  pages behind ``parent`` links are found as a restore finds them), or
- from the source's lazy dump, which has turned into a page server, over ``page_socket``, a
  connection the caller opened and authenticated itself (the daemon's ``--ps-socket``; CRIU's
  own TLS is skipped on a socket it is handed, so the caller protects the stream).

With orthros's CRIU patch 0004 the daemon logs, per process, how many pages crossed and how many
of them a page fault asked for (``LazyStats``).

Needs root (userfaultfd on another process, CRIU). Interfaces: the ``criu`` binary, a UNIX
socket it makes in the image directory, its log file.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orthros_py.criu.binary import CriuBinary, find_criu
from orthros_py.criu.log import log_tail, main_reason, read_lines
from orthros_py.errors import CriuError

LOG = "lazy-pages.log"
SOCKET = "lazy-pages.socket"  # CRIU's LAZY_PAGES_SOCK_NAME, in the work directory
START_TIMEOUT = 10.0  # reading a few small images; seconds mean something is wrong
# "PID-UFFD: UFFD transferred pages: (COPIED/TOTAL), N on fault" (patch 0004; info level)
_SUMMARY = re.compile(r"uffd: (\d+)-\d+: UFFD transferred pages: \((\d+)/(\d+)\)"
                      r"(?:, (\d+) on fault)?")


@dataclass(frozen=True)
class LazyStats:
    """What crossed: pages copied into the tree, of the lazy total, and those asked for by a
    page fault (the rest were pushed in the background)."""

    copied: int = 0
    total: int = 0
    faulted: int = 0
    processes: int = 0

    @property
    def pushed(self) -> int:
        return max(self.copied - self.faulted, 0)

    @property
    def complete(self) -> bool:
        return self.copied >= self.total

    def to_dict(self) -> dict[str, Any]:
        return {"pages_copied": self.copied, "pages_total": self.total,
                "pages_faulted": self.faulted, "pages_pushed": self.pushed,
                "processes": self.processes}


def parse_stats(lines: list[str]) -> LazyStats:
    """Sum the daemon's per-process summaries (pure)."""
    copied = total = faulted = n = 0
    for line in lines:
        m = _SUMMARY.search(line)
        if m:
            n += 1
            copied += int(m.group(2))
            total += int(m.group(3))
            faulted += int(m.group(4) or 0)
    return LazyStats(copied, total, faulted, n)


@dataclass(frozen=True)
class LazyResult:
    stats: LazyStats
    # From the daemon's start to its exit: when the last page was in.
    elapsed_ms: float
    finished_at: float  # time.time() at the exit, for the caller's own clock


class LazyPagesDaemon:
    """One ``criu lazy-pages`` for one restore of ``images_dir``."""

    def __init__(self, images_dir: Path, *, page_socket: socket.socket | None = None,
                 log_level: int = 2, binary: CriuBinary | None = None) -> None:
        self.images_dir = Path(images_dir)
        self.page_socket = page_socket
        self.log_level = log_level
        self.binary = binary or find_criu()
        self.proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0

    @property
    def log_path(self) -> Path:
        return self.images_dir / LOG

    def argv(self) -> list[str]:
        argv = [self.binary.path, "lazy-pages", "-D", str(self.images_dir), "-o", LOG,
                f"-v{max(self.log_level, 3)}"]  # info level: its summary line (patch 0004)
        if self.page_socket is not None:
            argv += ["--page-server", "--ps-socket", str(self.page_socket.fileno())]
        return argv

    def start(self, timeout: float = START_TIMEOUT) -> LazyPagesDaemon:
        """Start the daemon and return once it listens for the restore; CriuError with its
        log's reason if it exits first."""
        sock = self.images_dir / SOCKET
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # a stale one from a daemon that died would fool the wait below
        fds = (self.page_socket.fileno(),) if self.page_socket is not None else ()
        self._started = time.perf_counter()
        self.proc = subprocess.Popen(self.argv(), pass_fds=fds, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if self.proc.poll() is not None:
                raise self._error(f"CRIU's lazy-pages daemon exited ({self.proc.returncode}) "
                                  "before the restore could reach it")
            if time.monotonic() > deadline:
                self.stop()
                raise self._error(f"CRIU's lazy-pages daemon did not listen within {timeout:g} s")
            time.sleep(0.002)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> LazyResult:
        """Wait until every lazy page is in (the daemon exits); CriuError if it failed, or
        OperationTimeout-like CriuError if it is still at work after ``timeout``."""
        assert self.proc is not None, "start() first"
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self._error(f"the lazy pages were still crossing after {timeout:g} s") from None
        elapsed = (time.perf_counter() - self._started) * 1000
        stats = self.stats()
        if rc != 0:
            raise self._error(f"CRIU's lazy-pages daemon failed ({rc}) after "
                              f"{stats.copied} of {stats.total} pages")
        return LazyResult(stats, elapsed, time.time())

    def stats(self) -> LazyStats:
        return parse_stats(read_lines(self.log_path))

    def stop(self) -> None:
        """Kill the daemon (a restore that failed, or a transfer given up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            (self.images_dir / SOCKET).unlink()

    def _error(self, msg: str) -> CriuError:
        tail = log_tail(self.log_path)
        why = main_reason(tail) if tail else ""
        return CriuError(f"{msg}: {why}" if why else msg, log_tail=tail,
                         log_path=str(self.log_path), stage="lazy pages")

    def __enter__(self) -> LazyPagesDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
