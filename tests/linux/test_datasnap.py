"""Data directory snapshots (orthros_py.host.datasnap) on real filesystems (root).

A btrfs filesystem is made for each test on a 256 MiB sparse image in /var/tmp, attached to a
loop device and mounted under /var/tmp; it is unmounted, detached and removed at the end, pass
or fail. /tmp (ext4 here, which cannot share extents) is the plain-copy case.

Each tree is compared by a manifest: every entry's relative path, type, mode, owner, size,
mtime in ns, and the sha256 of a file's content (a symlink's target).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

from orthros_py.host.datasnap import (
    FS_NOCOW_FL,
    NEW_SUFFIX,
    OLD_SUFFIX,
    PARTIAL_SUFFIX,
    RESERVED,
    DataSnapError,
    DataSnapshot,
    Method,
    dir_size,
    remove_snapshot,
    restore_dir,
    snapshot_dir,
    store_for,
)
from orthros_py.run import run

MIB = 1 << 20
T0 = 1_600_000_000_123_456_789  # a set mtime, in ns


@dataclass
class Btrfs:
    mnt: Path
    image: Path
    loop: str

    def used(self) -> int:
        """Bytes of data the filesystem holds, once written out."""
        run(["btrfs", "filesystem", "sync", str(self.mnt)])
        out = run(["btrfs", "filesystem", "df", "-b", str(self.mnt)]).stdout
        for line in out.splitlines():
            if line.startswith("Data"):
                return int(line.rsplit("used=", 1)[1].split()[0])
        raise AssertionError(f"no Data line in: {out}")


def _umount(path: Path) -> None:
    if run(["umount", str(path)], check=False).returncode != 0:
        # Busy (a child a failed test left running): detach it from the tree anyway.
        run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def btrfs() -> Iterator[Btrfs]:
    base = Path(tempfile.mkdtemp(prefix="orthros-datasnap-", dir="/var/tmp"))
    image, mnt = base / "fs.img", base / "mnt"
    loop = ""
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(256 * MIB)
        run(["mkfs.btrfs", "-q", str(image)])
        loop = run(["losetup", "--find", "--show", str(image)]).stdout.strip()
        mnt.mkdir()
        run(["mount", "-t", "btrfs", loop, str(mnt)])
        mounted = True
        yield Btrfs(mnt, image, loop)
    finally:
        if mounted:
            _umount(mnt)
        if loop:
            run(["losetup", "-d", loop], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def ext4_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="orthros-datasnap-", dir="/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- trees ------------------------------------------------------------------------------------


def manifest(root: Path) -> dict[str, tuple[Any, ...]]:
    """{relative path: (type, mode, uid, gid, size, mtime ns, sha256 or link target)}; the
    root is "."; orthros's own .orthros-sync at the top is left out."""
    out: dict[str, tuple[Any, ...]] = {}

    def entry(p: Path, rel: str) -> None:
        st = p.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", mode, st.st_uid, st.st_gid, None, st.st_mtime_ns, None)
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", None, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                        os.readlink(p))
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("file", mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                        hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[rel] = (stat.S_IFMT(st.st_mode), mode, st.st_uid, st.st_gid, None,
                        st.st_mtime_ns, None)

    entry(root, ".")
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root and RESERVED in dirnames:
            dirnames.remove(RESERVED)
        for name in dirnames + filenames:
            p = here / name
            entry(p, str(p.relative_to(root)))
    return out


def populate(d: Path) -> None:
    """Files with content, a symlink, an empty directory, a 0600 file with a set mtime, a file
    of another owner, a hard link, a FIFO, a socket, a read-only directory with a file in it."""
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "empty").mkdir()
    (d / "a.txt").write_text("alpha\n" * 100)
    (d / "b.log").write_bytes(os.urandom(300_000))
    (d / "sub" / "c.bin").write_bytes(os.urandom(4096 * 3 + 17))
    (d / "sub" / "deeper" / "d").write_text("d")
    (d / "empty-file").touch()
    secret = d / "secret"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    os.utime(secret, ns=(T0, T0))
    theirs = d / "theirs"
    theirs.write_text("owned by someone else")
    os.chown(theirs, 1234, 5678)
    os.link(d / "a.txt", d / "sub" / "a-hardlink")
    (d / "link").symlink_to("sub/c.bin")
    (d / "dangling").symlink_to("/nonexistent/target")
    os.mkfifo(d / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(d / "sock"))  # leaves a socket inode behind
    ro = d / "ro"
    ro.mkdir()
    (ro / "inside").write_text("in a read-only directory")
    ro.chmod(0o555)
    os.utime(d / "sub" / "deeper", ns=(T0, T0 + 1))


def mutate(d: Path, n: int) -> None:
    """Same-size rewrite, append, delete, create, chmod, retarget a symlink, fill the empty
    directory: every kind of change the restore must undo."""
    a = d / "a.txt"
    a.write_text(a.read_text().replace("alpha", f"beta{n % 10}"))  # same size
    with open(d / "b.log", "ab") as f:
        f.write(os.urandom(1000 + n))  # size change
    with contextlib.suppress(FileNotFoundError):
        (d / "sub" / "c.bin").unlink()
    (d / f"new-{n}").write_text(f"created after the snapshot {n}")
    (d / "empty" / f"x{n}").mkdir(exist_ok=True)
    (d / "secret").chmod(0o644)
    (d / "link").unlink()
    (d / "link").symlink_to("elsewhere")


def check_hard_link(d: Path) -> None:
    assert (d / "a.txt").stat().st_ino == (d / "sub" / "a-hardlink").stat().st_ino


# -- the three methods ---------------------------------------------------------------------


def cycle(source: Path, snap_name: str = "one") -> DataSnapshot:
    """Snapshot, check the snapshot, change the source, restore, check; twice."""
    before = manifest(source)
    snap = snapshot_dir(source, store_for(source, snap_name, "m1"))
    assert manifest(source) == before  # a snapshot does not touch its source
    assert manifest(Path(snap.path)) == before
    check_hard_link(Path(snap.path))
    assert (snap.bytes, snap.files) == dir_size(source)
    for n in range(2):
        mutate(source, n)
        assert manifest(source) != before
        ms = restore_dir(snap)
        assert ms >= 0
        assert manifest(source) == before
        check_hard_link(source)
        assert Path(snap.path).is_dir()  # kept for the next restore
        for leftover in (NEW_SUFFIX, OLD_SUFFIX):
            assert not Path(str(source) + leftover).exists()
    return snap


def test_plain_dir_on_btrfs_is_reflinked(btrfs: Btrfs) -> None:
    data = btrfs.mnt / "data"
    data.mkdir()
    populate(data)
    snap = cycle(data)
    assert snap.method is Method.REFLINK
    assert snap.warning is None
    assert snap.path == str(btrfs.mnt / RESERVED / "one" / "m1" / "data")
    assert data.stat().st_ino != 256  # still a plain directory
    remove_snapshot(snap)
    assert not (btrfs.mnt / RESERVED).exists()  # the empty store directories went too


def test_subvolume_is_snapshotted_read_only(btrfs: Btrfs) -> None:
    data = btrfs.mnt / "data"
    run(["btrfs", "subvolume", "create", str(data)])
    populate(data)
    os.chmod(data, 0o750)
    snap = cycle(data)
    assert snap.method is Method.SUBVOLUME
    assert snap.warning is None
    ro = run(["btrfs", "property", "get", "-ts", snap.path, "ro"]).stdout.strip()
    assert ro == "ro=true"
    with pytest.raises(OSError) as info:
        (Path(snap.path) / "drift").write_text("x")
    assert info.value.errno == errno.EROFS
    # The restored data directory is a writable subvolume again.
    assert data.stat().st_ino == 256
    run(["btrfs", "subvolume", "show", str(data)])
    (data / "writable").write_text("yes")
    remove_snapshot(snap)
    remove_snapshot(snap)
    assert not Path(snap.path).exists()


def test_ext4_is_copied_with_a_warning(ext4_dir: Path) -> None:
    data = ext4_dir / "data"
    data.mkdir()
    populate(data)
    snap = cycle(data)
    assert snap.method is Method.COPY
    assert snap.warning is not None
    assert "ext4" in snap.warning and "cannot share extents" in snap.warning
    remove_snapshot(snap)
    assert not (ext4_dir / RESERVED).exists()


def test_store_on_another_filesystem_is_a_copy(btrfs: Btrfs, ext4_dir: Path) -> None:
    data = btrfs.mnt / "data"
    data.mkdir()
    populate(data)
    before = manifest(data)
    snap = snapshot_dir(data, ext4_dir / "store" / "data")
    assert snap.method is Method.COPY
    assert snap.warning is not None and "not on the filesystem" in snap.warning
    mutate(data, 0)
    restore_dir(snap)
    assert manifest(data) == before
    # A restore elsewhere, onto a target that does not exist yet (parents made too).
    other = ext4_dir / "again" / "data"
    restore_dir(snap, target=other)
    assert manifest(other) == before


def test_subvolume_snapshot_restored_to_another_filesystem(btrfs: Btrfs,
                                                           ext4_dir: Path) -> None:
    data = btrfs.mnt / "data"
    run(["btrfs", "subvolume", "create", str(data)])
    populate(data)
    snap = snapshot_dir(data, store_for(data, "one", "m1"))
    assert snap.method is Method.SUBVOLUME
    restore_dir(snap, target=ext4_dir / "data")  # no btrfs snapshot there: a copy
    assert manifest(ext4_dir / "data") == manifest(data)


@pytest.mark.parametrize("kind", ["dir", "subvolume", "ext4"])
def test_snapshots_restored_in_any_order(kind: str, btrfs: Btrfs, ext4_dir: Path) -> None:
    data = (ext4_dir if kind == "ext4" else btrfs.mnt) / "data"
    if kind == "subvolume":
        run(["btrfs", "subvolume", "create", str(data)])
    else:
        data.mkdir()
    populate(data)
    m_a = manifest(data)
    a = snapshot_dir(data, store_for(data, "a", "m1"))
    mutate(data, 1)
    m_b = manifest(data)
    b = snapshot_dir(data, store_for(data, "b", "m1"))
    mutate(data, 2)
    for snap, want in ((a, m_a), (b, m_b), (a, m_a)):
        restore_dir(snap)
        assert manifest(data) == want
    assert m_a != m_b
    remove_snapshot(a)
    restore_dir(b)  # b does not depend on a
    assert manifest(data) == m_b
    remove_snapshot(b)


def test_target_missing_is_recreated(btrfs: Btrfs) -> None:
    for name, subvolume in (("plain", False), ("subvol", True)):
        data = btrfs.mnt / name
        if subvolume:
            run(["btrfs", "subvolume", "create", str(data)])
        else:
            data.mkdir()
        populate(data)
        before = manifest(data)
        snap = snapshot_dir(data, store_for(data, "one", "m1"))
        if subvolume:
            run(["btrfs", "subvolume", "delete", str(data)])
        else:
            shutil.rmtree(data)
        restore_dir(snap)
        assert manifest(data) == before


def test_mount_root_is_restored_in_place(btrfs: Btrfs) -> None:
    """The data directory is the btrfs filesystem itself (its top-level subvolume): it cannot
    be renamed nor deleted, and its parent is another filesystem."""
    data = btrfs.mnt
    populate(data)
    store = store_for(data, "one", "m1")
    assert store == data / RESERVED / "one" / "m1" / data.name
    snap = snapshot_dir(data, store)
    assert snap.method is Method.SUBVOLUME
    before = manifest(data)  # after: the store's directory changed the root's mtime
    assert manifest(Path(snap.path)) == before
    b = snapshot_dir(data, store_for(data, "two", "m1"))
    assert manifest(Path(b.path)) == before  # the first snapshot is not in the second
    for n in range(2):
        mutate(data, n)
        restore_dir(snap)
        assert manifest(data) == before
        check_hard_link(data)
    assert sorted(os.listdir(data / RESERVED)) == ["one", "two"]
    remove_snapshot(b)
    remove_snapshot(snap)
    assert not (data / RESERVED).exists()


def test_reflink_keeps_nocow_files(btrfs: Btrfs) -> None:
    """btrfs refuses to clone between a NOCOW file and a COW one: the flag is carried over."""
    data = btrfs.mnt / "data"
    data.mkdir()
    (data / "0-cow").write_bytes(os.urandom(100_000))
    nocow = data / "nocow"
    nocow.mkdir()
    run(["chattr", "+C", str(nocow)])
    (nocow / "db").write_bytes(os.urandom(200_000))  # takes the directory's flag
    before = manifest(data)
    snap = snapshot_dir(data, store_for(data, "one", "m1"))
    assert snap.method is Method.REFLINK
    assert snap.warning is None  # nothing had to be copied
    mutate_db = nocow / "db"
    mutate_db.write_bytes(b"changed")
    restore_dir(snap)
    assert manifest(data) == before
    for p in (nocow, nocow / "db"):
        assert "C" in run(["lsattr", "-d", str(p)]).stdout.split()[0]
    assert "C" not in run(["lsattr", "-d", str(data / "0-cow")]).stdout.split()[0]
    assert FS_NOCOW_FL == 0x00800000


# -- a file in use -------------------------------------------------------------------------

WRITER = """
import sys, time
f = open(sys.argv[1], "ab", buffering=0)
n = 0
while True:
    f.write(b"line %08d\\n" % n)
    n += 1
    time.sleep(0.002)
"""


@pytest.mark.parametrize("kind", ["dir", "subvolume"])
def test_file_held_open_by_a_writer(kind: str, btrfs: Btrfs) -> None:
    data = btrfs.mnt / "data"
    if kind == "subvolume":
        run(["btrfs", "subvolume", "create", str(data)])
    else:
        data.mkdir()
    log = data / "wal"
    log.write_bytes(b"")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(log)],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: log.stat().st_size > 1000, what="the writer's first lines")
        snap = snapshot_dir(data, store_for(data, "one", "m1"))
        copy = Path(snap.path) / "wal"
        frozen = copy.read_bytes()
        # Whole lines (each a single write), and what the file held at some instant.
        assert frozen and len(frozen) % len(b"line 00000000\n") == 0
        assert log.read_bytes().startswith(frozen)
        wait_for(lambda: log.stat().st_size > len(frozen) + 1000, what="more lines")
        assert copy.read_bytes() == frozen  # the snapshot does not follow the file
        restore_dir(snap)  # the writer still runs, on the old file
        assert log.read_bytes() == frozen
        assert manifest(data) == manifest(Path(snap.path))
    finally:
        proc.kill()
        proc.wait()
    assert log.read_bytes() == frozen


# -- efficiency -----------------------------------------------------------------------------


def test_reflink_does_not_copy_data(btrfs: Btrfs) -> None:
    data = btrfs.mnt / "data"
    data.mkdir()
    (data / "big").write_bytes(os.urandom(64 * MIB))
    start = btrfs.used()
    snap = snapshot_dir(data, store_for(data, "one", "m1"))
    assert snap.method is Method.REFLINK
    assert snap.bytes == 64 * MIB
    after_snapshot = btrfs.used()
    assert after_snapshot - start < 4 * MIB
    (data / "big").write_bytes(b"small now")
    restore_dir(snap)
    assert btrfs.used() - start < 4 * MIB
    assert (data / "big").stat().st_size == 64 * MIB
    # The measure would see a real copy: cp without reflink grows the data by 64 MiB.
    run(["cp", "--reflink=never", str(data / "big"), str(btrfs.mnt / "copied")])
    assert btrfs.used() - start > 60 * MIB


# -- bad input and failures -----------------------------------------------------------------


def test_bad_input(ext4_dir: Path) -> None:
    with pytest.raises(DataSnapError, match="does not exist"):
        snapshot_dir(ext4_dir / "missing", ext4_dir / "s1")
    (ext4_dir / "file").write_text("x")
    with pytest.raises(DataSnapError, match="not a directory"):
        snapshot_dir(ext4_dir / "file", ext4_dir / "s1")
    data = ext4_dir / "data"
    data.mkdir()
    (ext4_dir / "taken").mkdir()
    with pytest.raises(DataSnapError, match="already exists"):
        snapshot_dir(data, ext4_dir / "taken")
    with pytest.raises(DataSnapError, match="inside the data directory"):
        snapshot_dir(data, data / "snap")
    for bad in ("", ".hidden", "a/b", "..", "x" * 65, "sp ace", "-dash"):
        with pytest.raises(ValueError):
            store_for(data, bad, "m1")
        with pytest.raises(ValueError):
            store_for(data, "ok", bad)
    snap = snapshot_dir(data, store_for(data, "ok", "m1"))
    remove_snapshot(snap)
    remove_snapshot(snap)
    with pytest.raises(DataSnapError, match="missing"):
        restore_dir(snap)
    assert not list(ext4_dir.glob("*" + PARTIAL_SUFFIX))


def test_failed_copy_leaves_nothing(ext4_dir: Path) -> None:
    """A store on a full filesystem: the error says so, and no part of the store stays."""
    data = ext4_dir / "data"
    data.mkdir()
    (data / "big").write_bytes(os.urandom(4 * MIB))
    small = ext4_dir / "small"
    small.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)])
    try:
        with pytest.raises(DataSnapError) as info:
            snapshot_dir(data, small / "deep" / "store")
        assert info.value.hint is not None and "free space" in info.value.hint
        assert os.listdir(small) == []  # the parents it made are gone too
    finally:
        _umount(small)


def test_subvolume_holding_subvolumes_is_cloned(btrfs: Btrfs) -> None:
    """A btrfs snapshot would leave the nested subvolume out (an empty directory in its
    place): the files are cloned one by one instead, and all come back."""
    data = btrfs.mnt / "data"
    run(["btrfs", "subvolume", "create", str(data)])
    populate(data)
    run(["btrfs", "subvolume", "create", str(data / "inner")])
    (data / "inner" / "kept").write_bytes(os.urandom(50_000))
    os.utime(data / "inner", ns=(T0, T0))
    snap = cycle(data)
    assert snap.method is Method.REFLINK
    assert snap.warning is not None and "inner" in snap.warning
    assert not any(p.name.startswith("data.orthros") for p in btrfs.mnt.iterdir())


def test_tmpfs_mount_root_is_copied_and_restored_in_place(ext4_dir: Path) -> None:
    data = ext4_dir / "data"
    data.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0750", "tmpfs", str(data)])
    try:
        populate(data)
        snap = snapshot_dir(data, store_for(data, "one", "m1"))
        assert snap.path.startswith(str(data / RESERVED) + "/")
        assert snap.method is Method.COPY
        assert snap.warning is not None and "tmpfs" in snap.warning
        before = manifest(data)
        for n in range(2):
            mutate(data, n)
            restore_dir(snap)
            assert manifest(data) == before
        remove_snapshot(snap)
        assert not (data / RESERVED).exists()
    finally:
        _umount(data)
