"""Memory dirty tracking for incremental dumps on kernels without soft-dirty bits.

orthros's patched CRIU (``scripts/criu-patches/0002-uffd-wp-dirty-tracking.patch``) tracks the
pages a process writes with a userfaultfd made in that process and registered for asynchronous
write-protection, and a ``PAGEMAP_SCAN`` at each dump that reports the pages written since the
previous one and protects them again. The tracking lasts as long as the userfaultfd stays open,
and CRIU exits after each dump: so CRIU sends each one (SCM_RIGHTS, the process's pid as data)
over a UNIX socket orthros hands it (``criu_opts.dirty_track_sk``), and a ``DirtyTracker`` holds
them for as long as the tree is protected. Whatever is not tracked counts as dirty: a tracker that
was closed, or lost, only makes the next dump a full one.

Interfaces: a SOCK_SEQPACKET socketpair (SCM_RIGHTS); ``userfaultfd(2)`` with ``UFFDIO_API`` and
``UFFDIO_REGISTER`` and the ``PAGEMAP_SCAN`` ioctl of ``/proc/self/pagemap`` for the kernel probe;
``/proc/PID/fd`` links. The userfaultfd probe needs root (or vm.unprivileged_userfaultfd=1), and
reading another process's fd links needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import platform
import socket
import struct
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from orthros_py.criu.binary import CriuBinary
from orthros_py.proc.tree import ProcessRef

# --- the kernel's interface (Linux 6.7 include/uapi/linux/userfaultfd.h and fs.h); Debian 12's
# headers (6.1) lack most of it.
_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "riscv64": 282, "s390x": 355, "ppc64le": 364}
UFFD_API = 0xAA
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_WP = 1 << 1
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1
# What /proc/PID/fd shows for a userfaultfd.
UFFD_LINK = "anon_inode:[userfaultfd]"
# What CRIU sends with each userfaultfd: the pid of the process it tracks.
_PID = struct.Struct("=i")


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


class _PmScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


UFFDIO_API = _iowr(UFFD_API, 0x3F, ctypes.sizeof(_UffdioApi))
UFFDIO_REGISTER = _iowr(UFFD_API, 0x00, ctypes.sizeof(_UffdioRegister))
PAGEMAP_SCAN = _iowr(ord("f"), 16, ctypes.sizeof(_PmScanArg))


def _written(pagemap: int, addr: int) -> int:
    """Pages of the page at ``addr`` written since the last scan (0 or 1); protects it again."""
    region = _PageRegion()
    arg = _PmScanArg(size=ctypes.sizeof(_PmScanArg),
                     flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, start=addr,
                     end=addr + mmap.PAGESIZE, vec=ctypes.addressof(region), vec_len=1,
                     category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)
    return int(fcntl.ioctl(pagemap, PAGEMAP_SCAN, arg))


PM_SOFT_DIRTY = 1 << 55  # of a /proc/PID/pagemap entry
PM_PRESENT = 1 << 63


def soft_dirty_available() -> bool:
    """Whether this kernel keeps soft-dirty bits (CONFIG_MEM_SOFT_DIRTY): a page just written
    is soft-dirty exactly then."""
    with mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE) as page:
        page[0:1] = b"x"
        cell = ctypes.c_char.from_buffer(page)
        try:
            with open("/proc/self/pagemap", "rb") as pagemap:
                pagemap.seek(ctypes.addressof(cell) // mmap.PAGESIZE * 8)
                entry = int.from_bytes(pagemap.read(8), "little")
        finally:
            del cell  # the buffer export must end before the mapping can close
    return bool(entry & PM_PRESENT and entry & PM_SOFT_DIRTY)


def uffd_wp_async_available() -> bool:
    """Whether this kernel tracks writes through an asynchronous write-protect userfaultfd and
    PAGEMAP_SCAN (Linux 6.7+, CONFIG_USERFAULTFD, CONFIG_PTE_MARKER_UFFD_WP): tried on one page
    of our own, which must show as written, then clean, then written again after a write."""
    nr = _NR_USERFAULTFD.get(platform.machine())
    if nr is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    uffd = libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
    if uffd < 0:
        return False
    try:
        with mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE) as page:
            page[0:1] = b"x"
            cell = ctypes.c_char.from_buffer(page)
            try:
                addr = ctypes.addressof(cell)
                fcntl.ioctl(uffd, UFFDIO_API, _UffdioApi(
                    api=UFFD_API, features=UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED))
                fcntl.ioctl(uffd, UFFDIO_REGISTER, _UffdioRegister(
                    start=addr, len=mmap.PAGESIZE, mode=UFFDIO_REGISTER_MODE_WP))
                pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    first, clean = _written(pagemap, addr), _written(pagemap, addr)
                    page[0:1] = b"y"
                    again = _written(pagemap, addr)
                finally:
                    os.close(pagemap)
            finally:
                del cell  # the buffer export must end before the mapping can close
    except OSError:  # no such feature, ioctl or permission: no tracking
        return False
    finally:
        os.close(uffd)
    return (first, clean, again) == (1, 0, 1)


def criu_tracks_dirty(binary: CriuBinary | None = None) -> bool:
    """Whether CRIU can dump incrementally here (``dump --track-mem``): its RPC feature check
    answers ``mem_track`` for soft-dirty bits or, patched by orthros, for userfaultfd
    write-protection. False when CRIU cannot be asked."""
    from orthros_py.criu.request import feature_request
    from orthros_py.criu.session import CriuSession
    from orthros_py.errors import OrthrosError

    try:
        resp = CriuSession(binary, timeout=60).call(feature_request())
    except OrthrosError:
        return False
    return bool(resp.features.mem_track)


def tracking_available(binary: CriuBinary | None = None) -> bool:
    """Whether a dump with ``track_mem`` and a parent writes only the pages written since that
    parent: CRIU tracks memory here, with soft-dirty bits or (orthros's patch) a userfaultfd.
    A ``DirtyTracker`` is what keeps the latter alive between dumps (with soft-dirty it stays
    empty, and harmless)."""
    return criu_tracks_dirty(binary)


def tree_uses_userfaultfd(pids: Iterable[int]) -> int | None:
    """The first of ``pids`` holding a userfaultfd of its own, or None. Such a process cannot be
    tracked: its registrations take the VMAs that CRIU's tracking would register."""
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        with contextlib.suppress(OSError):  # gone, or not ours to read: nothing to say
            for entry in os.scandir(fd_dir):
                with contextlib.suppress(OSError):  # closed in between
                    if os.readlink(entry.path) == UFFD_LINK:
                        return pid
    return None


class DirtyTracker:
    """The userfaultfds that keep one protected tree's memory tracked between its dumps.

    Give ``socket_for_criu()`` to each dump (``dump_tree(..., dirty_track=tracker)`` does), then
    ``collect()`` what CRIU sent. ``forget()`` ends the tracking (after a failed dump the
    tracking may have been re-armed for pages no image holds: the next dump must write
    everything); ``close()`` also closes the socket, for good.
    """

    def __init__(self) -> None:
        self._ours: socket.socket | None = None
        self._theirs: socket.socket | None = None
        self._uffds: dict[ProcessRef | int, list[int]] = {}
        self._closed = False

    def socket_for_criu(self) -> socket.socket:
        """The end of the socket CRIU sends the userfaultfds over (pass it into ``criu swrk``)."""
        if self._closed:
            raise ValueError("the dirty tracker is closed")
        if self._theirs is None:
            self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self._ours.setblocking(False)
            # CRIU takes its own copy; ours stays for the next dump, never inherited elsewhere.
            self._ours.set_inheritable(False)
        return self._theirs

    def collect(self) -> dict[int, int]:
        """Take the userfaultfds CRIU has sent (without waiting: call it after the dump returned);
        drop those of processes that have exited. Returns {pid: userfaultfds held for it}."""
        while self._ours is not None:
            try:
                msg, fds, flags, _ = socket.recv_fds(self._ours, _PID.size, 4)
            except BlockingIOError:
                break
            if flags & socket.MSG_CTRUNC or len(msg) != _PID.size:
                for fd in fds:  # not a message CRIU sends: take nothing from it
                    os.close(fd)
                continue
            (pid,) = _PID.unpack(msg)
            # By pid and start time: a pid reused later is not taken for the tracked process.
            key: ProcessRef | int = ProcessRef.find(pid) or pid
            self._uffds.setdefault(key, []).extend(fds)
        self._drop_exited()
        return self.held

    @property
    def held(self) -> dict[int, int]:
        """{pid: userfaultfds held for it}."""
        return {_pid(key): len(fds) for key, fds in self._uffds.items()}

    @property
    def pids(self) -> list[int]:
        """The processes whose memory is tracked now."""
        return sorted(_pid(key) for key in self._uffds)

    @property
    def tracking(self) -> bool:
        return bool(self._uffds)

    def forget(self) -> None:
        """Close every userfaultfd: the tracking ends and the next dump writes all memory."""
        uffds, self._uffds = self._uffds, {}
        for fds in uffds.values():
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        """``forget`` and close the socket; the tracker cannot be used again."""
        self.forget()
        for sk in (self._ours, self._theirs):
            if sk is not None:
                sk.close()
        self._ours = self._theirs = None
        self._closed = True

    def __enter__(self) -> DirtyTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _drop_exited(self) -> None:
        for key in list(self._uffds):
            if isinstance(key, int) or not key.alive():
                for fd in self._uffds.pop(key):
                    os.close(fd)


def _pid(key: ProcessRef | int) -> int:
    return key if isinstance(key, int) else key.pid
