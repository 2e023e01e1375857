"""Snapshots of a data directory, and putting one back exactly, for ``orthros sync``.

CRIU refuses to restore a process whose open files changed size since the dump, so a data
directory (an etcd member's, say) saved along with its processes must come back byte for byte.
Three ways, the cheapest the filesystem allows:

- ``btrfs-subvolume``: the directory is a btrfs subvolume: a read-only snapshot of it, O(1)
  whatever its size; restored as a writable snapshot of that snapshot.
- ``reflink``: a filesystem whose files can share extents (btrfs, xfs with reflink): the tree is
  walked and each regular file cloned; O(files), no data is copied.
- ``copy``: anything else (ext4, tmpfs), or a store on another filesystem than the data: a full
  copy, with a warning that says why.

Kernel interfaces: the FICLONE ioctl (ioctl_ficlone(2)); the btrfs ioctls SNAP_CREATE_V2,
SNAP_DESTROY and FS_INFO; FS_IOC_GETFLAGS/SETFLAGS (btrfs refuses to clone between a NOCOW
file and a COW one, so the NOCOW flag is kept); renameat2(2) with RENAME_EXCHANGE (to swap a
restored tree in at once); copy_file_range(2). Mount points and filesystem types come from
/proc/self/mounts through psutil.

Privileges: read access to the data and write access to the store. Keeping the owners of files
that are not ours, and device nodes, needs root (CAP_CHOWN, CAP_FOWNER, CAP_MKNOD); so does
deleting a snapshot subvolume (CAP_SYS_ADMIN, unless btrfs is mounted user_subvol_rm_allowed).
Taking a btrfs snapshot needs only to own the subvolume.

What is kept: contents, modes, owners, atimes and mtimes, symlinks, empty directories, FIFOs,
sockets and device nodes, hard links within the tree, btrfs's NOCOW flag. What is not: extended
attributes and ACLs, other inode flags, inode numbers, the holes of sparse files in a copy (a
copy writes them as zeros), and subvolumes as such: a btrfs snapshot leaves nested subvolumes
out, so a subvolume that holds others is cloned file by file instead (``reflink``, warned), and
comes back, with those it holds, as plain directories.

An entry named ``.orthros-sync`` directly in a data directory is orthros's own: snapshots of a
directory that is the root of a mount live there (see store_for), and it is neither part of a
snapshot nor touched by a restore.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from orthros_py.errors import ExitStatus, OrthrosError

RESERVED = ".orthros-sync"  # orthros's own entry in a data directory or beside it
NEW_SUFFIX = ".orthros-new"  # a restored tree being built beside its target
OLD_SUFFIX = ".orthros-old"  # the tree it replaced, until removed
PARTIAL_SUFFIX = ".orthros-partial"  # a reflink/copy snapshot being built beside its store

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417  # _IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2)
BTRFS_IOC_SNAP_DESTROY = 0x5000940F  # _IOW(0x94, 15, struct btrfs_ioctl_vol_args)
BTRFS_IOC_FS_INFO = 0x8400941F  # _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args)
BTRFS_SUBVOL_RDONLY = 1 << 1
BTRFS_FIRST_FREE_OBJECTID = 256  # the inode number of every subvolume's root directory
BTRFS_EMPTY_SUBVOL_DIR_OBJECTID = 2  # what a snapshot shows where a nested subvolume was
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOCOW_FL = 0x00800000
AT_FDCWD = -100
RENAME_EXCHANGE = 1 << 1

# What FICLONE answers when the filesystem cannot share these extents (not a real failure).
_CLONE_REFUSED = frozenset({errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY})
# What copy_file_range answers when it cannot copy between these files at all.
_CFR_REFUSED = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
# Filesystems that may share extents: a tree without data is deemed reflinkable on them.
_CLONE_FS = frozenset({"btrfs", "xfs", "bcachefs", "ocfs2", "zfs"})
_CHUNK = 1 << 30
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

log = logging.getLogger("orthros.datasnap")


class DataSnapError(OrthrosError):
    """A data directory could not be snapshotted, or a snapshot could not be put back."""

    # A data snapshot is part of what a sync saves: one that cannot be made or put back makes
    # the saved state unusable, as a bad image does.
    exit_status = ExitStatus.BAD_IMAGE


class Method(enum.StrEnum):
    SUBVOLUME = "btrfs-subvolume"  # the data dir is a btrfs subvolume: a snapshot (O(1))
    REFLINK = "reflink"  # a filesystem that shares extents (btrfs, xfs): FICLONE per file
    COPY = "copy"  # anything else: a full copy (warned)


@dataclass(frozen=True)
class DataSnapshot:
    source: str  # the data directory (absolute, symlinks resolved)
    path: str  # where the snapshot lives
    method: Method
    bytes: int  # apparent size of the regular files in it (each inode once)
    files: int  # regular files in it (each inode once)
    elapsed_ms: float
    warning: str | None  # why the snapshot cost more than it might have, if it did

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "method": str(self.method),
                "bytes": self.bytes, "files": self.files, "elapsed_ms": self.elapsed_ms,
                "warning": self.warning}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataSnapshot:
        return cls(str(d["source"]), str(d["path"]), Method(str(d["method"])), int(d["bytes"]),
                   int(d["files"]), float(d["elapsed_ms"]),
                   str(d["warning"]) if d.get("warning") else None)


# -- paths, names, mounts ----------------------------------------------------------------------


def _abs(path: str | Path) -> str:
    """``path`` made absolute with the symlinks of its parent resolved (not of itself: a
    snapshot store does not exist yet, and a target is replaced, not followed)."""
    p = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def _within(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it (both absolute and normalised)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def check_name(name: str, what: str = "name") -> str:
    """``name`` if it is a valid snapshot or member name; ValueError otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"bad {what} {name!r}: it must be 1 to 64 letters, digits, '_', '.' or "
                         "'-', and begin with a letter or digit")
    return name


class _Mount(NamedTuple):
    mountpoint: str
    fstype: str
    device: str


def _mounts() -> list[_Mount]:
    return [_Mount(p.mountpoint, p.fstype, p.device) for p in psutil.disk_partitions(all=True)]


def _mount_of(path: str) -> _Mount:
    """The mount ``path`` (absolute, existing) is on: the longest mount point above it, the
    last mounted of equals (it hides the others)."""
    path = os.path.realpath(path)
    best = _Mount("/", "unknown", "")
    for m in _mounts():
        if _within(path, m.mountpoint) and len(m.mountpoint) >= len(best.mountpoint):
            best = m
    return best


def is_mount_root(path: str | Path) -> bool:
    """``path`` is where a filesystem is mounted (not merely another btrfs subvolume, which
    os.path.ismount also calls a mount point: each has its own st_dev)."""
    p = os.path.realpath(path)
    return any(m.mountpoint == p for m in _mounts())


def _is_subvolume(path: str, st: os.stat_result | None = None) -> bool:
    st = st or os.lstat(path)
    return (stat.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_FIRST_FREE_OBJECTID
            and _mount_of(path).fstype == "btrfs")


def _btrfs_fsid(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        buf = bytearray(1024)
        fcntl.ioctl(fd, BTRFS_IOC_FS_INFO, buf)
        return bytes(buf[16:32])  # after u64 max_id and u64 num_devices
    finally:
        os.close(fd)


def _same_fs(a: str, ma: _Mount, b: str, mb: _Mount) -> bool:
    """Directories ``a`` and ``b`` are on one filesystem, the condition for sharing extents.
    On btrfs st_dev differs per subvolume, so its filesystem id tells instead."""
    if ma.fstype != mb.fstype:
        return False
    if ma.fstype == "btrfs":
        try:
            return _btrfs_fsid(a) == _btrfs_fsid(b)
        except OSError:
            return ma.device == mb.device
    return os.stat(a).st_dev == os.stat(b).st_dev


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


# -- kernel calls ----------------------------------------------------------------------------


def _btrfs_snapshot(src: str, dst: str, *, readonly: bool) -> None:
    """A snapshot of subvolume ``src`` at ``dst`` (which must not exist; its parent must)."""
    name = os.fsencode(os.path.basename(dst))
    sfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        pfd = os.open(os.path.dirname(dst), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # struct btrfs_ioctl_vol_args_v2: fd, transid, flags, 32 bytes of union, name[4040]
            # A mutable buffer: fcntl.ioctl copies at most 1024 bytes of an immutable one.
            args = bytearray(struct.pack("=qQQ32s4040s", sfd, 0,
                                         BTRFS_SUBVOL_RDONLY if readonly else 0, b"", name))
            fcntl.ioctl(pfd, BTRFS_IOC_SNAP_CREATE_V2, args)
        except OSError as err:
            raise OSError(err.errno, err.strerror, dst) from None
        finally:
            os.close(pfd)
    finally:
        os.close(sfd)


def _btrfs_delete(path: str) -> None:
    """Delete subvolume ``path``, read-only or not (its space is freed in the background)."""
    pfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # struct btrfs_ioctl_vol_args: fd (unused here), name[4088]
        args = bytearray(struct.pack("=q4088s", 0, os.fsencode(os.path.basename(path))))
        fcntl.ioctl(pfd, BTRFS_IOC_SNAP_DESTROY, args)
    except OSError as err:
        raise OSError(err.errno, err.strerror, path) from None
    finally:
        os.close(pfd)


_renameat2: Any = None


def _exchange(a: str, b: str) -> bool:
    """Swap ``a`` and ``b`` in one step; False where the filesystem (or libc) cannot."""
    global _renameat2
    if _renameat2 is None:
        fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            fn.restype = ctypes.c_int
        _renameat2 = fn or False
    if not _renameat2:
        return False
    if _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(e, os.strerror(e), a, None, b)


def _flags(fd: int) -> int:
    buf = bytearray(8)
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    return int(struct.unpack_from("=i", buf)[0])


def _match_nocow(fin: int, fout: int) -> None:
    """Give ``fout`` (empty, or a directory) the NOCOW flag of ``fin`` if it differs: btrfs
    refuses to clone between the two kinds, and a new file takes its directory's flag."""
    with contextlib.suppress(OSError):  # best effort: the clone or copy that follows tells
        want = _flags(fin) & FS_NOCOW_FL
        have = _flags(fout)
        if have & FS_NOCOW_FL != want:
            fcntl.ioctl(fout, FS_IOC_SETFLAGS, struct.pack("=iI", (have & ~FS_NOCOW_FL) | want,
                                                           0))


def _copy_data(fin: int, fout: int) -> int:
    """Copy ``fin`` to ``fout`` from their current offsets to the end; the bytes copied."""
    n = 0
    try:
        while k := os.copy_file_range(fin, fout, _CHUNK):
            n += k
        return n
    except OSError as err:
        if err.errno not in _CFR_REFUSED or n:
            raise
    while chunk := os.read(fin, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fout, view):]
        n += len(chunk)
    return n


def _set_meta(path: str | int, want: os.stat_result, have: os.stat_result) -> None:
    """Owner, mode and times of ``want`` on ``path`` (a path or an open fd), not following a
    symlink. The owner first: chown clears set-user-ID bits that chmod then puts back."""
    link = isinstance(path, str) and stat.S_ISLNK(want.st_mode)
    if (have.st_uid, have.st_gid) != (want.st_uid, want.st_gid):
        os.chown(path, want.st_uid, want.st_gid, follow_symlinks=not link)
    if not link:  # a symlink has no mode of its own on Linux
        os.chmod(path, stat.S_IMODE(want.st_mode))
    os.utime(path, ns=(want.st_atime_ns, want.st_mtime_ns), follow_symlinks=not link)


# -- walking trees ---------------------------------------------------------------------------


def _entries(path: str, *, top: bool) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return [e for e in it if not (top and e.name == RESERVED)]


def dir_size(path: str | Path) -> tuple[int, int]:
    """(bytes, files) of the regular files below ``path``: apparent sizes, each inode once,
    symlinks not followed, orthros's own ``.orthros-sync`` at the top left out."""
    root = os.fspath(path)
    if not os.path.isdir(root) or os.path.islink(root):
        raise DataSnapError(f"{root} is not a directory")
    total, files, _ = _walk(root, stubs=False)
    return total, files


def _walk(root: str, *, stubs: bool) -> tuple[int, int, list[str]]:
    """dir_size's (bytes, files), and with ``stubs`` (``root`` a btrfs snapshot) the places
    where the snapshot left out a nested subvolume, relative to ``root``."""
    seen: set[tuple[int, int]] = set()
    holes: list[str] = []
    total = 0
    stack = [(root, True)]
    while stack:
        d, top = stack.pop()
        for e in _entries(d, top=top):
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if stubs and st.st_ino == BTRFS_EMPTY_SUBVOL_DIR_OBJECTID:
                    holes.append(os.path.relpath(e.path, root))
                stack.append((e.path, False))
            elif stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total, len(seen), sorted(holes)


class _Tree:
    """Copies a directory tree to a new one: each regular file cloned (FICLONE) while the
    filesystem allows it, else copied. The first file with data is the probe: if it cannot be
    cloned, no other is tried. Entries that vanish while the tree is read are left out (the
    snapshot is of a moment after they went)."""

    def __init__(self, *, clone: bool, nocow: bool) -> None:
        self.clone = clone
        self.nocow = nocow  # the source is on btrfs: keep NOCOW flags
        self.refusal: OSError | None = None  # why the probe could not be cloned
        self.unshared: OSError | None = None  # why a later file could not
        self.cloned = 0
        self.copied = 0
        self.copied_bytes = 0
        self.bytes = 0
        self.files = 0
        self._links: dict[tuple[int, int], str] = {}

    def copy(self, src: str, dst: str) -> None:
        root = os.lstat(src)
        os.mkdir(dst, 0o700)  # its own mode last: a read-only directory must be filled first
        dirs: list[tuple[str, str, os.stat_result]] = [(src, dst, root)]
        i = 0
        while i < len(dirs):
            s, d, _ = dirs[i]
            for e in _entries(s, top=i == 0):
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                dp = os.path.join(d, e.name)
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(dp, 0o700)
                    dirs.append((e.path, dp, st))
                elif stat.S_ISREG(st.st_mode):
                    self._file(e.path, dp, st)
                elif stat.S_ISLNK(st.st_mode):
                    with contextlib.suppress(FileNotFoundError):
                        os.symlink(os.readlink(e.path), dp)
                        _set_meta(dp, st, os.lstat(dp))
                else:  # FIFO, socket, device
                    os.mknod(dp, st.st_mode, st.st_rdev)
                    _set_meta(dp, st, os.lstat(dp))
            i += 1
        # Children before parents: filling a directory changes its mtime.
        for s, d, st in reversed(dirs):
            if self.nocow:
                self._dir_nocow(s, d)
            _set_meta(d, st, os.lstat(d))

    def _dir_nocow(self, src: str, dst: str) -> None:
        with contextlib.suppress(OSError):
            fin = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fout = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    _match_nocow(fin, fout)
                finally:
                    os.close(fout)
            finally:
                os.close(fin)

    def _file(self, src: str, dst: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self._links:
            os.link(self._links[key], dst)
            return
        try:
            # O_NONBLOCK: should it have become a FIFO since it was listed, open must not hang.
            fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            if not stat.S_ISREG(os.fstat(fin).st_mode):
                raise OSError(errno.EAGAIN, "it changed type while it was read", src)
            fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o600)
            try:
                if self.nocow:
                    _match_nocow(fin, fout)
                if os.fstat(fin).st_size:
                    self._data(fin, fout)
                # As of the clone: the times of a file still being written move on.
                _set_meta(fout, os.fstat(fin), os.fstat(fout))
                self.bytes += os.fstat(fout).st_size
                self.files += 1
            finally:
                os.close(fout)
        finally:
            os.close(fin)
        if st.st_nlink > 1:
            self._links[key] = dst

    def _data(self, fin: int, fout: int) -> None:
        if self.clone:
            try:
                fcntl.ioctl(fout, FICLONE, fin)
                self.cloned += 1
                return
            except OSError as err:
                if err.errno not in _CLONE_REFUSED:
                    raise
                if self.cloned == 0 and self.copied == 0:
                    self.clone, self.refusal = False, err
                elif self.unshared is None:
                    self.unshared = err
        self.copied_bytes += _copy_data(fin, fout)
        self.copied += 1


def _remove_tree(path: str) -> None:
    """Remove ``path`` whatever it is: nothing, a file, a subvolume, a directory tree."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
    elif _is_subvolume(path, st) and not is_mount_root(path):
        try:
            _btrfs_delete(path)
        except OSError as err:
            if err.errno != errno.ENOTEMPTY:
                raise
            # It holds subvolumes of its own: file by file, as root rmdir deletes an empty
            # (writable) subvolume.
            shutil.rmtree(path)
    else:
        shutil.rmtree(path)


def _makedirs(path: str, mode: int = 0o700) -> list[str]:
    """Create ``path`` and its missing parents (by default private: they hold copies of
    data); the directories created, deepest last."""
    missing: list[str] = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    missing.reverse()
    made = []
    for d in missing:
        try:
            os.mkdir(d, mode)
            made.append(d)
        except FileExistsError:  # another member's snapshot, taken at the same instant
            pass
    return made


def _undo_makedirs(created: list[str]) -> None:
    for d in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _failure(what: str, err: OSError) -> DataSnapError:
    where = f" ({err.filename})" if err.filename else ""
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        hint = "free space on that filesystem"
    elif err.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        hint = "run as root, on a writable filesystem"
    else:
        hint = None
    return DataSnapError(f"{what}: {reason}{where}", hint=hint)


# -- the API ---------------------------------------------------------------------------------


def store_for(source: str | Path, snap_name: str, member: str) -> Path:
    """Where snapshots of ``source`` live by default: on its own filesystem so that it can
    share extents: ``<parent of source>/.orthros-sync/<snap_name>/<member>/<basename>``.

    A source that is the root of a mount (a btrfs filesystem mounted at the data directory,
    say) has its parent on another filesystem: its snapshots go into the directory itself,
    ``<source>/.orthros-sync/<snap_name>/<member>/<basename>``, an entry that snapshots and
    restores leave out. Names are validated; ValueError otherwise."""
    check_name(snap_name, "snapshot name")
    check_name(member, "member name")
    src = Path(os.path.realpath(source))
    if not src.name:
        raise ValueError(f"{source} cannot be a data directory")
    base = src if is_mount_root(src) else src.parent
    return base / RESERVED / snap_name / member / src.name


def snapshot_dir(source: str | Path, store: str | Path) -> DataSnapshot:
    """Snapshot ``source`` into ``store`` (a new path; its parents are created, private).

    SUBVOLUME when ``source`` is a btrfs subvolume (holding no other) and ``store`` on the
    same filesystem (a read-only snapshot: it cannot drift); else REFLINK when the first file
    with data can be cloned into the store; else COPY, with a warning saying why (the
    filesystem cannot share extents, or the store is on another filesystem). Keeps what the
    module docstring lists, hard links within the tree included. A store inside ``source``
    must be under its ``.orthros-sync``. DataSnapError if ``source`` is not a directory,
    ``store`` exists, or anything fails; then nothing is left behind (a crash leaves at most
    ``<store>.orthros-partial``, which the next snapshot to that store removes)."""
    t0 = time.monotonic()
    src = os.path.realpath(source)
    dst = _abs(store)
    if not os.path.isdir(src):
        what = "does not exist" if not os.path.lexists(src) else "is not a directory"
        raise DataSnapError(f"the data directory {source} {what}",
                            hint="give the directory the process tree keeps its data in")
    if os.path.lexists(dst):
        raise DataSnapError(f"the snapshot store {dst} already exists",
                            hint="snapshot into a new path, or remove the old snapshot first")
    if _within(dst, src) and not _within(dst, os.path.join(src, RESERVED)):
        raise DataSnapError(f"the snapshot store {dst} is inside the data directory {src}",
                            hint=f"store it outside, or under {os.path.join(src, RESERVED)}")
    partial = dst + PARTIAL_SUFFIX
    created: list[str] = []
    made = False
    try:
        created = _makedirs(os.path.dirname(dst))
        src_m, dst_m = _mount_of(src), _mount_of(os.path.dirname(dst))
        same = _same_fs(src, src_m, os.path.dirname(dst), dst_m)
        nested: list[str] = []
        if same and _is_subvolume(src):
            _btrfs_snapshot(src, dst, readonly=True)
            made = True
            nbytes, nfiles, nested = _walk(dst, stubs=True)
            if not nested:
                return DataSnapshot(src, dst, Method.SUBVOLUME, nbytes, nfiles,
                                    (time.monotonic() - t0) * 1000, None)
            # A btrfs snapshot leaves nested subvolumes out: file by file instead.
            _remove_tree(dst)
            made = False
        _remove_tree(partial)
        tree = _Tree(clone=same, nocow=src_m.fstype == "btrfs")
        tree.copy(src, partial)
        os.rename(partial, dst)
        made = True
        method, warning = _verdict(tree, src, src_m, dst, dst_m, same=same)
        if nested and method is Method.REFLINK:
            shown = ", ".join(nested[:3]) + (", ..." if len(nested) > 3 else "")
            warning = (f"{src} holds other subvolumes ({shown}), which a btrfs snapshot "
                       f"leaves out: its files were cloned one by one instead"
                       + (f"; {warning}" if warning else ""))
    except BaseException as err:
        with contextlib.suppress(OSError):
            _remove_tree(partial)
        if made:
            with contextlib.suppress(OSError):
                _remove_tree(dst)
        _undo_makedirs(created)
        if isinstance(err, OSError):
            raise _failure(f"cannot snapshot {src} into {dst}", err) from err
        raise
    return DataSnapshot(src, dst, method, tree.bytes, tree.files,
                        (time.monotonic() - t0) * 1000, warning)


def _verdict(tree: _Tree, src: str, src_m: _Mount, dst: str, dst_m: _Mount, *,
             same: bool) -> tuple[Method, str | None]:
    """The method a tree snapshot turned out to use, and the warning it deserves."""
    if not same:
        return Method.COPY, (
            f"the store {dst} is not on the filesystem of {src} ({src_m.fstype} at "
            f"{src_m.mountpoint}; the store's is {dst_m.fstype} at {dst_m.mountpoint}), so "
            f"nothing can be shared: a full copy of {human(tree.copied_bytes)} was made")
    if tree.refusal is not None or (tree.cloned == 0 and src_m.fstype not in _CLONE_FS):
        why = f" ({tree.refusal.strerror})" if tree.refusal is not None else ""
        return Method.COPY, (f"{src} is on {src_m.fstype}, which cannot share extents{why}: "
                             f"a full copy of {human(tree.copied_bytes)} was made")
    if tree.copied:
        why = f" ({tree.unshared.strerror})" if tree.unshared is not None else ""
        return Method.REFLINK, (f"{tree.copied} files of {src} ({human(tree.copied_bytes)}) "
                                f"could not share extents and were copied{why}")
    return Method.REFLINK, None


def restore_dir(snap: DataSnapshot, *, target: str | Path | None = None) -> float:
    """Put the directory back exactly as in ``snap`` at ``target`` (default ``snap.source``,
    created if missing): files created since are gone, removed ones back, changed ones as they
    were. The snapshot is kept: it can be restored any number of times. Returns elapsed ms.

    The new tree is built beside the target (``<target>.orthros-new``: a writable btrfs
    snapshot of a SUBVOLUME snapshot, else clones or copies of its files) and swapped in at
    once (renameat2 RENAME_EXCHANGE; where a filesystem cannot, by two renames through
    ``<target>.orthros-old``); then the old tree is removed. A crash never leaves a half tree
    at the target, and the next restore removes what one left beside it.

    A target that is the root of a mount cannot be renamed or deleted (the top-level btrfs
    subvolume, say), nor can one that holds the snapshot: the tree is then built in its
    ``.orthros-sync`` and swapped in entry by entry (old entries out, new ones in). That is not
    atomic: after a crash in between, restore again."""
    t0 = time.monotonic()
    dest = _abs(target if target is not None else snap.source)
    if not os.path.isdir(snap.path) or os.path.islink(snap.path):
        raise DataSnapError(f"the snapshot {snap.path} of {snap.source} is missing",
                            hint="it was removed, or taken on another host")
    if os.path.lexists(dest) and (os.path.islink(dest) or not os.path.isdir(dest)):
        raise DataSnapError(f"{dest} is not a directory", hint="move it out of the way")
    if _within(dest, snap.path):
        raise DataSnapError(f"cannot restore {snap.path} into itself ({dest})")
    holds_snap = _within(snap.path, dest)
    if holds_snap and not _within(snap.path, os.path.join(dest, RESERVED)):
        raise DataSnapError(f"the snapshot {snap.path} is inside {dest}, which restoring would "
                            "remove", hint=f"keep snapshots under {os.path.join(dest, RESERVED)}")
    try:
        if os.path.exists(dest) and (holds_snap or is_mount_root(dest)):
            _restore_in_place(snap, dest)
        else:
            _restore_by_swap(snap, dest)
    except OSError as err:
        raise _failure(f"cannot restore {snap.path} to {dest}", err) from err
    return (time.monotonic() - t0) * 1000


def _restore_by_swap(snap: DataSnapshot, dest: str) -> None:
    _makedirs(os.path.dirname(dest), 0o777)  # as mkdir -p would: the umask decides
    new, old = dest + NEW_SUFFIX, dest + OLD_SUFFIX
    _remove_tree(new)  # leftovers of a restore that crashed: ours
    _remove_tree(old)
    try:
        snapped = False
        if snap.method is Method.SUBVOLUME:
            try:
                _btrfs_snapshot(snap.path, new, readonly=False)
                snapped = True
            except OSError as err:
                # Another filesystem than the snapshot's (a target given): clone or copy.
                if err.errno not in (errno.EXDEV, errno.ENOTTY, errno.EOPNOTSUPP):
                    raise
        if snapped:
            # A snapshot of a mount's top-level subvolume holds its .orthros-sync (empty).
            _remove_tree(os.path.join(new, RESERVED))
        else:
            _Tree(clone=True, nocow=_mount_of(snap.path).fstype == "btrfs").copy(snap.path, new)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove_tree(new)
        raise
    if not os.path.lexists(dest):
        os.rename(new, dest)
        return
    if _exchange(new, dest):
        os.rename(new, old)
    else:
        os.rename(dest, old)
        os.rename(new, dest)
    _discard(old)


def _discard(old: str) -> None:
    """Remove the tree a restore replaced. The restore has succeeded by then: a failure here
    is logged, not raised (the next restore removes what is left)."""
    try:
        _remove_tree(old)
    except OSError as err:
        log.warning("the data directory was restored, but its old tree %s could not be "
                    "removed: %s", old, err)


def _restore_in_place(snap: DataSnapshot, dest: str) -> None:
    work = os.path.join(dest, RESERVED)
    made_work = not os.path.lexists(work)
    if made_work:
        os.mkdir(work, 0o700)
    # Names a snapshot or member cannot have (they begin with a letter or digit).
    new, old = os.path.join(work, ".restore-new"), os.path.join(work, ".restore-old")
    _remove_tree(new)
    _remove_tree(old)
    try:
        _Tree(clone=True, nocow=_mount_of(snap.path).fstype == "btrfs").copy(snap.path, new)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove_tree(new)
        raise
    os.mkdir(old, 0o700)
    for name in os.listdir(dest):
        if name != RESERVED:
            os.rename(os.path.join(dest, name), os.path.join(old, name))
    for name in os.listdir(new):
        os.rename(os.path.join(new, name), os.path.join(dest, name))
    os.rmdir(new)
    _discard(old)
    if made_work:
        with contextlib.suppress(OSError):
            os.rmdir(work)
    # Last: the renames above changed the directory's mtime.
    _set_meta(dest, os.lstat(snap.path), os.lstat(dest))


def remove_snapshot(snap: DataSnapshot) -> None:
    """Remove the snapshot (a subvolume or a tree), and the directories of store_for's layout
    left empty above it. Idempotent."""
    path = _abs(snap.path)
    if _within(os.path.realpath(snap.source), path):
        raise DataSnapError(f"refusing to remove {path}: it holds the data directory "
                            f"{snap.source}", hint="the snapshot record is wrong")
    try:
        _remove_tree(path + PARTIAL_SUFFIX)
        _remove_tree(path)
    except OSError as err:
        raise _failure(f"cannot remove the snapshot {path}", err) from err
    parent = Path(path).parent
    if RESERVED not in parent.parts:
        return
    while True:
        try:
            parent.rmdir()
        except OSError:  # another snapshot is still there, or it is gone already
            return
        if parent.name == RESERVED:
            return
        parent = parent.parent
