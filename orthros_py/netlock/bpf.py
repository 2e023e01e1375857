"""The bpf(2) system call through ctypes: map element and batch commands, object pin/get and
object info, and the capabilities they need.

No BCC here: compiling is the XDP lock's business (``orthros_py.netlock.xdp``); this module only
talks to objects the kernel already holds. Needs CAP_BPF and CAP_SYS_ADMIN (CAP_NET_ADMIN too
for attaching programs, which ``require_caps(attach=True)`` checks).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Sequence
from pathlib import Path

from orthros_py.errors import MissingFeatureError, NetlockError
from orthros_py.host.caps import CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, effective_caps

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "i386": 357, "i686": 357,
            "armv7l": 386, "ppc64le": 361, "s390x": 351}
BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 1, 2, 3, 4
BPF_OBJ_PIN, BPF_OBJ_GET, BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 6, 7, 13, 15
BPF_MAP_UPDATE_BATCH, BPF_MAP_DELETE_BATCH = 26, 27
BPF_MAP_LOOKUP_BATCH = 24
BPF_ANY = 0
ENOTSUPP = 524  # the kernel-internal "not supported" that bpf(2) leaks to userspace

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64),
                ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


class _IdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise MissingFeatureError(f"orthros does not know the bpf syscall number on "
                                  f"{platform.machine()}")
    ret = int(_libc.syscall(ctypes.c_long(nr), ctypes.c_long(cmd), ctypes.byref(attr),
                            ctypes.c_long(ctypes.sizeof(attr))))
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code) if code != ENOTSUPP else "not supported")
    return ret


def bpf_error(err: OSError, what: str) -> NetlockError:
    """One sentence for a failed bpf(2) call (or file operation on the lock's files)."""
    if err.errno in (errno.EPERM, errno.EACCES):
        return NetlockError(f"no permission to {what}",
                            hint="run as root: the XDP lock needs CAP_BPF, CAP_SYS_ADMIN and "
                                 "CAP_NET_ADMIN")
    return NetlockError(f"cannot {what}: {err.strerror}")


def obj_get(path: Path) -> int:
    """A new fd for the BPF object pinned at ``path``."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(p)))


def obj_pin(fd: int, path: Path) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(p), bpf_fd=fd))


def _obj_info(fd: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=size, info=ctypes.addressof(buf)))
    return buf.raw


def prog_info(fd: int) -> tuple[int, str]:
    """(id, name) of a loaded program (struct bpf_prog_info: id at 4, name at 64)."""
    raw = _obj_info(fd, 80)
    return struct.unpack_from("=I", raw, 4)[0], raw[64:80].split(b"\0")[0].decode()


def prog_name_by_id(prog_id: int) -> str | None:
    """The name of the program with this id, or None if it is gone."""
    try:
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id))
    except OSError:
        return None
    try:
        return prog_info(fd)[1]
    finally:
        os.close(fd)


def require_caps(*, attach: bool = False) -> None:
    """Fail early, with the fix, where libbcc would only print an error and give up."""
    caps = effective_caps()
    missing = []
    if not caps & (1 << CAP_BPF | 1 << CAP_SYS_ADMIN):
        missing.append("CAP_BPF")
    if attach and not caps & (1 << CAP_NET_ADMIN):
        missing.append("CAP_NET_ADMIN")
    if missing:
        raise NetlockError(f"no permission to {'attach' if attach else 'load'} BPF programs "
                           f"(missing {' and '.join(missing)})", hint="run as root")


def possible_cpus() -> int:
    # Per-CPU map values hold one slot per *possible* CPU ("0-1", "0-3,8-11").
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class BpfMap:
    """A BPF map behind an fd: element and batch operations on raw bytes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, name[16]
        raw = _obj_info(fd, 40)
        (self.type, self.id, self.key_size, self.value_size, self.max_entries,
         _flags) = struct.unpack_from("=6I", raw)
        self.name = raw[24:40].split(b"\0")[0].decode()
        self._batch = True  # batch commands (kernel 5.6+) until the kernel says otherwise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lookup(self, key: bytes, value_size: int | None = None) -> bytes | None:
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value_size or self.value_size)
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=self.fd, key=ctypes.addressof(k),
                                                value=ctypes.addressof(v)))
        except OSError as err:
            if err.errno == errno.ENOENT:
                return None
            raise
        return v.raw

    def list_keys(self) -> list[bytes]:
        out: list[bytes] = []
        nxt = ctypes.create_string_buffer(self.key_size)
        prev: ctypes.Array[ctypes.c_char] | None = None
        while True:
            attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(prev) if prev else 0,
                             value=ctypes.addressof(nxt))
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as err:
                if err.errno == errno.ENOENT:
                    return out
                raise
            out.append(nxt.raw)
            prev = ctypes.create_string_buffer(nxt.raw, self.key_size)

    def items(self, chunk: int = 4096) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of a hash map: a few batch syscalls where the kernel has them
        (a walk with one GET_NEXT_KEY and one lookup per entry otherwise, which thousands of
        entries made the slow part of an unlock)."""
        if self._batch:
            try:
                return self._items_batch(chunk)
            except OSError as err:
                if err.errno not in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP):
                    raise
                self._batch = False
        out = []
        for k in self.list_keys():
            v = self.lookup(k)
            if v is not None:
                out.append((k, v))
        return out

    def _items_batch(self, chunk: int) -> list[tuple[bytes, bytes]]:
        ks, vs = self.key_size, self.value_size
        keys = ctypes.create_string_buffer(chunk * ks)
        vals = ctypes.create_string_buffer(chunk * vs)
        # The batch position is opaque (a bucket index for hash maps): room for either.
        tokens = [ctypes.create_string_buffer(max(ks, 8)) for _ in range(2)]
        out: list[tuple[bytes, bytes]] = []
        first = True
        while True:
            attr = _BatchAttr(in_batch=0 if first else ctypes.addressof(tokens[0]),
                              out_batch=ctypes.addressof(tokens[1]), keys=ctypes.addressof(keys),
                              values=ctypes.addressof(vals), count=chunk, map_fd=self.fd)
            done = False
            try:
                _bpf(BPF_MAP_LOOKUP_BATCH, attr)
            except OSError as err:
                if err.errno != errno.ENOENT:  # ENOENT: the last batch (count says how many)
                    raise
                done = True
            kb, vb = keys.raw, vals.raw
            out += [(kb[i * ks:(i + 1) * ks], vb[i * vs:(i + 1) * vs]) for i in range(attr.count)]
            if done:
                return out
            ctypes.memmove(tokens[0], tokens[1], len(tokens[1]))
            first = False

    def update(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Write all entries: one batch syscall where the kernel has it, else one per entry."""
        if not items:
            return
        keys = ctypes.create_string_buffer(b"".join(k for k, _ in items),
                                           len(items) * self.key_size)
        vals = ctypes.create_string_buffer(b"".join(v for _, v in items),
                                           len(items) * self.value_size)
        if self._batch:
            attr = _BatchAttr(keys=ctypes.addressof(keys), values=ctypes.addressof(vals),
                              count=len(items), map_fd=self.fd, elem_flags=BPF_ANY)
            try:
                _bpf(BPF_MAP_UPDATE_BATCH, attr)
                return
            except OSError as err:
                if err.errno not in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP):
                    raise
                self._batch = False
        base_k, base_v = ctypes.addressof(keys), ctypes.addressof(vals)
        for i in range(len(items)):
            _bpf(BPF_MAP_UPDATE_ELEM, _ElemAttr(map_fd=self.fd, key=base_k + i * self.key_size,
                                                value=base_v + i * self.value_size,
                                                flags=BPF_ANY))

    def delete(self, keys: Sequence[bytes]) -> int:
        """Delete the entries that exist among ``keys``; returns how many did."""
        if not keys:
            return 0
        buf = ctypes.create_string_buffer(b"".join(keys), len(keys) * self.key_size)
        base = ctypes.addressof(buf)
        deleted = 0
        start = 0
        while start < len(keys) and self._batch:
            attr = _BatchAttr(keys=base + start * self.key_size, count=len(keys) - start,
                              map_fd=self.fd)
            try:
                _bpf(BPF_MAP_DELETE_BATCH, attr)
                return deleted + len(keys) - start
            except OSError as err:
                if err.errno == errno.ENOENT:
                    # The batch stops at a key that is not there: step over it and go on.
                    deleted += attr.count
                    start += attr.count + 1
                    continue
                if err.errno not in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP):
                    raise
                self._batch = False
        for i in range(start, len(keys)):
            try:
                _bpf(BPF_MAP_DELETE_ELEM, _ElemAttr(map_fd=self.fd, key=base + i * self.key_size))
                deleted += 1
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise
        return deleted


# --- the BPF filesystem, where pins live ------------------------------------------------------

BPFFS = Path("/sys/fs/bpf")


def bpffs_mounted() -> bool:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == str(BPFFS) and parts[2] == "bpf":
            return True
    return False


def ensure_bpffs() -> None:
    """Mount the BPF filesystem where pins live, as systemd does on most hosts."""
    if bpffs_mounted():
        return
    if _libc.mount(b"bpf", os.fsencode(BPFFS), b"bpf", 0, None) != 0:
        code = ctypes.get_errno()
        raise NetlockError(f"the BPF filesystem is not mounted at {BPFFS} and mounting it failed:"
                           f" {os.strerror(code)}",
                           hint=f"mount -t bpf bpf {BPFFS} (as root)")
