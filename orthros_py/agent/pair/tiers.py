"""The paging standby's generation store: the hot pages in memory, the cold ones on disk.

A pair started with ``--paging`` keeps its generations as ``GenerationStore`` does (same names,
same pointer, same crash-safe commit), laid out in two tiers:

- **young** generations, committed within the hot window: their ``pages-*.img`` live in a tmpfs
  mounted for the pair at ``IMAGES_ROOT/.hot/PAIR`` (in the generation's directory a symlink
  points there, which CRIU's ``openat`` follows). Each holds the pages the tree wrote during its
  interval; when a newer generation holds a page again, the older copy is punched out
  (``fallocate(PUNCH_HOLE | KEEP_SIZE)``: offsets stay valid, the memory is freed; no restore
  of the newest generation reads it there), so the tmpfs holds each hot page once;
- the **base**, the oldest generation, full (no parent), on disk, out of the page cache
  (``posix_fadvise(DONTNEED)`` after it is durable).

When a young generation leaves the window, the pages it still owns go to the base: written over
the base's slots of the same pages in place when the base has them all, then the next
generation's parent link is switched to the base by rename, and only then is the aged one
deleted (until the switch nobody reads those base slots: the aged generation holds the pages,
so a crash anywhere leaves a complete chain). When the base lacks one of them (a new mapping,
a new process), the aged generation is merged with the base instead (``materialize``: it becomes
the new base, written to disk) and the old base goes. A full generation (after a failed
checkpoint) becomes the new base and everything older goes.

The newest generation never ages out: without new checkpoints the hot set stays as it was.
A tmpfs does not survive a reboot: ``recover`` then finds young generations without their pages
and falls back to the base (the active's next checkpoint is a full one).

Privileges: root to mount the tmpfs (CAP_SYS_ADMIN); ``mount=False`` uses a plain directory
(unit tests). Interfaces: mount(2), umount2(2), fallocate(2), posix_fadvise(2), mincore(2).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import mmap
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orthros_py.agent.pair.paging import (
    HotIndex,
    Range,
    Slot,
    count_pages,
    entry_pages,
    intersect,
    lazy_capable,
    merge_ranges,
    page_runs,
    present_runs,
    slots_of,
    split_entries,
    subtract,
)
from orthros_py.agent.pair.store import META, GenerationError, GenerationStore, _read_json
from orthros_py.criu.imagechain import (
    PARENT_LINK,
    TMP_SUFFIX,
    VerifyResult,
    chain,
    check_pages_file,
    fsync_dir,
    load_pagemap,
    materialize,
    pagemap_names,
    pages_file,
    replace_pagemap,
    verify,
)
from orthros_py.criu.images import PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT, _Reader
from orthros_py.errors import BadImageError, OrthrosError

log = logging.getLogger("orthros.agent.pair")

HOT_DIR = ".hot"  # below the images root; a dotted name no image can have
LAZY_VIEW_SUFFIX = ".lazy"  # PAIR.lazy: what the lazy-pages daemon of a promotion reads
LAZY_SOCKET = "lazy-pages.socket"  # CRIU's LAZY_PAGES_SOCK_NAME, in the restore's work dir
TMPFS_SIZE = "50%"  # of RAM: the kernel's own default, said out loud
MAX_YOUNG = 1000  # generations in the hot tier at most (CRIU opens every level of a chain)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MNT_DETACH = 0x2
_COPY_CHUNK = 1 << 20


# --- the kernel interfaces --------------------------------------------------------------------


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int64]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def _oserror(what: str, path: Path | str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}", str(path))


def mount_tmpfs(path: Path, size: str = TMPFS_SIZE) -> None:
    opts = f"size={size},mode=0700".encode()
    if _libc().mount(b"tmpfs", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                     opts) != 0:
        raise _oserror("mount tmpfs", path)


def unmount(path: Path) -> None:
    # Detached: a reader still holding a file (a lazy-pages daemon) keeps it until it is done.
    if _libc().umount2(os.fsencode(path), _MNT_DETACH) != 0:
        raise _oserror("umount", path)


def punch(fd: int, offset: int, length: int) -> None:
    if _libc().fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise _oserror("fallocate(PUNCH_HOLE)", f"fd {fd}")


def cached_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache now (mincore over a shared read-only mapping)."""
    libc = _libc()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise _oserror("mmap", path)
        try:
            pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise _oserror("mincore", path)
            return (pages - bytes(vec).count(0)) * PAGE_SIZE
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop_cache(path: Path) -> None:
    """Durable first, then out of the page cache: the base's memory use is honest."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def allocated_bytes(path: Path) -> int:
    """What a file really takes (its blocks: punched holes do not count)."""
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


# --- the store -------------------------------------------------------------------------------


@dataclass
class TierStats:
    """What ``pair status`` shows of a paging standby."""

    hot_window_s: float
    hot_pages: int = 0  # written within the window: their newest copy is in the tmpfs
    tmpfs_bytes: int = 0  # allocated in the tmpfs (should be about hot_pages pages)
    disk_bytes: int = 0  # allocated on disk: the base and every generation's small images
    disk_cached_bytes: int = 0  # of the base's pages files, in the page cache now
    young_generations: int = 0
    base_generation: int | None = None
    tmpfs: str = ""  # the mount point, or why there is none
    aged_in_place: int = 0  # generations that left the window into the base's slots
    aged_by_merge: int = 0  # ... by a full merge with the base (a new mapping)
    punched_bytes: int = 0  # superseded copies freed from the tmpfs so far
    # The tmpfs right after the last re-sort (each hot page once), and the most it held:
    # a generation arrives whole before the copies it supersedes can go, so while one is
    # committed the tmpfs also holds its pages (the double buffer of a consistent replica).
    settled_tmpfs_bytes: int = 0
    peak_tmpfs_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def hot_bytes(self) -> int:
        return self.hot_pages * PAGE_SIZE

    @property
    def memory_bytes(self) -> int:
        """The standby's memory for the replica between checkpoints: the tmpfs after the
        last re-sort and the base's cached pages."""
        return self.settled_tmpfs_bytes + self.disk_cached_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hot_bytes": self.hot_bytes, "memory_bytes": self.memory_bytes}


@dataclass
class _Young:
    """A young generation as the index knows it: its present pages per pagemap."""

    number: int
    dir: Path
    committed_at: float
    slots: dict[str, tuple[Path, list[Slot]]]  # pagemap -> (pages file, present slots)

    def present(self) -> dict[str, list[Range]]:
        return {name: merge_ranges((s.vaddr, s.vaddr + s.length) for s in slots)
                for name, (_path, slots) in self.slots.items()}


class PagingStore(GenerationStore):
    """``GenerationStore`` with the hot pages in a tmpfs and the rest in a disk base."""

    def __init__(self, root: Path, pair: str, *, hot_window: float, mount: bool = True,
                 clock: Callable[[], float] = time.time, max_young: int = MAX_YOUNG) -> None:
        super().__init__(root, pair, keep=1)  # the window decides what is kept, not a count
        if not hot_window > 0:
            raise ValueError(f"the hot window must be positive, not {hot_window}")
        self.hot_window = hot_window
        self.mount = mount
        self.clock = clock
        self.now = clock
        self.max_young = max_young
        self.hot_root = self.root / HOT_DIR / pair
        self.index = HotIndex()
        self._young: dict[int, _Young] = {}  # indexed, oldest first
        self._settled: set[str] = set()  # base directories whose pages left the page cache
        self._coverage: dict[tuple[str, str, int, int], list[Range]] = {}
        self.stats = TierStats(hot_window)

    # --- the tmpfs -------------------------------------------------------------------------

    def ensure_hot(self) -> None:
        """The pair's tmpfs, mounted (once; it survives the agent, not the machine)."""
        self.hot_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.mount:
            self.stats.tmpfs = f"{self.hot_root} (a plain directory: not mounted)"
            return
        if not os.path.ismount(self.hot_root):
            try:
                mount_tmpfs(self.hot_root)
            except OSError as err:
                raise OrthrosError(f"the paging standby cannot mount its tmpfs at "
                                   f"{self.hot_root}: {err.strerror}", stage="pair paging",
                                   hint="the agent needs CAP_SYS_ADMIN (root)") from err
        self.stats.tmpfs = f"{self.hot_root} (tmpfs, size {TMPFS_SIZE} of RAM)"

    def _hot_name(self, d: Path, pages: str) -> Path:
        return self.hot_root / f"{d.name}.{pages}"

    def _place(self, d: Path) -> None:
        """An incremental generation's pages go to the tmpfs (a full one stays on disk: it
        will be the base). The page server wrote them to disk; moved before they are ever
        written back, they cost no disk I/O (the file is gone before writeback)."""
        if not (d / PARENT_LINK).is_symlink():
            return
        self.ensure_hot()
        for p in sorted(d.glob("pages-*.img")):
            if p.is_symlink() or not p.is_file():
                continue
            target = self._hot_name(d, p.name)
            tmp = target.with_name(target.name + TMP_SUFFIX)
            try:
                shutil.copyfile(p, tmp)
                os.rename(tmp, target)
            except OSError as err:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                if err.errno != errno.ENOSPC:
                    raise
                # A full tmpfs: this generation's pages stay on disk (correct, not hot).
                self._note(f"the tmpfs is full: generation {d.name} kept on disk")
                continue
            link = d / (p.name + TMP_SUFFIX)
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            os.symlink(os.path.relpath(target, d), link)
            os.rename(link, p)  # the disk copy goes in the same step
        self.stats.peak_tmpfs_bytes = max(self.stats.peak_tmpfs_bytes, self._tmpfs_bytes())

    def _tmpfs_bytes(self) -> int:
        if not self.hot_root.is_dir():
            return 0
        with contextlib.suppress(OSError):
            return sum(allocated_bytes(p) for p in self.hot_root.iterdir())
        return 0

    def _covered(self, d: Path, name: str) -> list[Range]:
        """Every page pagemap ``name`` of ``d`` names (present or in parent), cached by the
        file's identity (a merge replaces a pagemap by rename)."""
        try:
            st = os.stat(d / name)
        except FileNotFoundError:
            return []
        key = (str(d.resolve()), name, st.st_ino, st.st_mtime_ns)
        got = self._coverage.get(key)
        if got is None:
            image = _Reader(d).optional(name, "PAGEMAP") or []
            got = _entry_ranges(image[1:])
            if len(self._coverage) > 4 * self.max_young:
                self._coverage.clear()
            self._coverage[key] = got
        return got

    def _verify(self, d: Path) -> VerifyResult:
        """A new incremental generation checked against its parent only: its pages files
        complete, and every page it leaves "in parent" named by the parent. The parent's own
        chain was complete when it was committed and stays so (``_in_place_plan``), so this is
        the whole chain's check in one level: ``verify`` would walk every young generation, up
        to ``hot window / interval`` of them, at every commit."""
        if not (d / PARENT_LINK).is_symlink():
            return verify(d)
        dirs = chain(d)
        if not (d / "inventory.img").exists():
            raise BadImageError(f"the checkpoint in {d} is incomplete: inventory.img is missing")
        n = total = present = in_parent = 0
        for name in pagemap_names(d):
            pm = load_pagemap(d, name)
            if pm is None:
                continue
            check_pages_file(pm)
            n += 1
            for e in pm.extents:
                if not e.present and not e.in_parent:
                    raise BadImageError(f"page {e.vaddr:#x} of {name} in {d} is held by a page "
                                        "server (a lazy dump), not by any image")
            need = merge_ranges((e.vaddr, e.end) for e in pm.extents if e.in_parent)
            missing = subtract(need, self._covered(dirs[1], name)) if need else []
            if missing:
                raise BadImageError(f"page {missing[0][0]:#x} of {name} in {d} is in parent, "
                                    f"but {name} in {dirs[1]} holds no such page")
            total += sum(e.nr_pages for e in pm.extents)
            present += pm.count(PE_PRESENT)
            in_parent += pm.count(PE_PARENT)
        return VerifyResult(dirs[0], tuple(dirs), n, total, present, in_parent)

    def _note(self, msg: str) -> None:
        log.warning("pair %s: %s", self.pair, msg)
        self.stats.notes.append(msg)
        del self.stats.notes[:-5]

    # --- the tiers, after each commit ----------------------------------------------------------

    def _prune(self, latest: Any) -> None:
        t0 = time.perf_counter()
        dirs = chain(self.root / latest.dir)
        in_chain = {p.name for p in dirs}
        # Off the chain: what a new full generation left behind, or an aged generation a
        # crash left after its successor was switched to the base.
        for _k, p in self._committed(latest).items():
            if p.name not in in_chain:
                self._delete(p)
        base = dirs[-1]
        young = list(reversed(dirs[:-1]))
        self._settle(base)
        t1 = time.perf_counter()
        self._sync_index(young)
        t2 = time.perf_counter()
        now = self.clock()
        while len(young) > 1 and (len(young) > self.max_young
                                  or self._young[self._num(young[0])].committed_at
                                  < now - self.hot_window):
            base = self._age_out(young[0], young[1], base)
            young.pop(0)
        t3 = time.perf_counter()
        self._gc_hot(base, young)
        log.debug("pair %s: tiers after generation %d: settle %.0f ms, index %.0f ms, aging "
                 "%.0f ms, gc %.0f ms", self.pair, latest.number, (t1 - t0) * 1000,
                 (t2 - t1) * 1000, (t3 - t2) * 1000, (time.perf_counter() - t3) * 1000)
        self.stats.base_generation = self._num(base)
        self.stats.young_generations = len(young)
        self.stats.hot_pages = self.index.hot_pages
        self.stats.settled_tmpfs_bytes = self._tmpfs_bytes()

    def _num(self, d: Path) -> int:
        m = self._dir_re.fullmatch(d.name)
        if m is None:
            raise GenerationError(f"{d} is not a generation of pair {self.pair}")
        return int(m.group(1))

    def _sync_index(self, young: list[Path]) -> None:
        """Index the young generations not indexed yet, oldest first, punching the copies
        they supersede; start over if the index knows one that is gone (a new base)."""
        nums = [self._num(d) for d in young]
        known = list(self._young)
        if known != nums[:len(known)]:  # the index holds only a prefix of the young ones
            self._forget_all()
        for k, d in zip(nums, young, strict=True):
            if k in self._young:
                continue
            y = self._load_young(k, d)
            superseded = self.index.add(k, y.present())
            self._young[k] = y
            for old, pages in superseded.items():
                if old in self._young and old != k:
                    self._punch(self._young[old], pages)

    def _forget_all(self) -> None:
        self.index.reset()
        self._young.clear()

    def _load_young(self, k: int, d: Path) -> _Young:
        slots: dict[str, tuple[Path, list[Slot]]] = {}
        for name in pagemap_names(d):
            image = _Reader(d).optional(name, "PAGEMAP")
            if not image:
                continue
            head, *entries = image
            runs = present_runs(entries)
            if runs:
                slots[name] = (d / pages_file(int(head["pages_id"])), runs)
        meta = _read_json(d / META) or {}
        return _Young(k, d, float(meta.get("committed_at") or self.clock()), slots)

    def _punch(self, y: _Young, pages: dict[str, list[int]]) -> None:
        for name, vaddrs in pages.items():
            if name not in y.slots:
                continue
            path, slots = y.slots[name]
            pieces = list(slots_of(slots, page_runs(vaddrs)))
            if not pieces:
                continue
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                for piece in pieces:
                    punch(fd, piece.offset, piece.length)
                    self.stats.punched_bytes += piece.length
            finally:
                os.close(fd)

    def _settle(self, base: Path) -> None:
        if base.name in self._settled:
            return
        for p in base.glob("pages-*.img"):
            if p.is_file() and not p.is_symlink():
                drop_cache(p)
        self._settled = {base.name}

    def _age_out(self, aged: Path, nxt: Path, base: Path) -> Path:
        """``aged`` leaves the window: the pages it still owns go to ``base``; returns the
        base after (``base``, or ``aged`` itself when it had to be merged with it)."""
        k = self._num(aged)
        y = self._young.get(k) or self._load_young(k, aged)
        live = self.index.live(k, y.present())
        plan = self._in_place_plan(y, live, base)
        if plan is None:
            materialize(aged)  # aged becomes full, on disk: the new base
            self._delete(base)
            self._settled.discard(base.name)
            self._settle(aged)
            new_base = aged
            self.stats.aged_by_merge += 1
        else:
            self._write_in_place(plan)
            tmp = nxt / (PARENT_LINK + TMP_SUFFIX)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.symlink(f"../{base.name}", tmp)
            os.rename(tmp, nxt / PARENT_LINK)  # from here nobody reads ``aged``
            fsync_dir(nxt)
            self._delete(aged)
            new_base = base
            self.stats.aged_in_place += 1
        self.index.drop(k, y.present())
        self._young.pop(k, None)
        return new_base

    def _in_place_plan(self, y: _Young, live: dict[str, list[Range]], base: Path
                       ) -> list[tuple[Path, Path, list[tuple[Slot, Slot]]]] | None:
        """For each pagemap: (source pages file, base pages file, [(source piece, base
        piece)]); None if the base lacks a slot for one of the live pages."""
        plan = []
        # Every page the aged generation names must have a slot in the base, not only those it
        # still owns: the next generation's pages "in parent" then all resolve in the base
        # once it leans on it, so every generation's chain stays complete (what ``_verify``
        # relies on, and ``materialize`` checks).
        for name in pagemap_names(y.dir):
            need = self._covered(y.dir, name)
            if not need:
                continue
            image = _Reader(base).optional(name, "PAGEMAP")
            if not image:
                return None
            _head, *entries = image
            if subtract(need, merge_ranges((s.vaddr, s.vaddr + s.length)
                                           for s in present_runs(entries))):
                return None
        for name, ranges in live.items():
            image = _Reader(base).optional(name, "PAGEMAP")
            if not image:
                return None
            head, *entries = image
            bslots = present_runs(entries)
            src_path, slots = y.slots[name]
            pairs = []
            for src in slots_of(slots, ranges):
                for dst in slots_of(bslots, [(src.vaddr, src.vaddr + src.length)]):
                    pairs.append((Slot(dst.vaddr, src.offset + (dst.vaddr - src.vaddr),
                                       dst.length), dst))
            plan.append((src_path, base / pages_file(int(head["pages_id"])), pairs))
        return plan

    def _write_in_place(self, plan: list[tuple[Path, Path, list[tuple[Slot, Slot]]]]) -> None:
        for src_path, dst_path, pairs in plan:
            src = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
            dst = os.open(dst_path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                for s, d in pairs:
                    done = 0
                    while done < s.length:
                        buf = os.pread(src, min(_COPY_CHUNK, s.length - done), s.offset + done)
                        if not buf:
                            raise GenerationError(f"{src_path} ended at byte "
                                                  f"{s.offset + done} while aging it out")
                        os.pwrite(dst, buf, d.offset + done)
                        done += len(buf)
                os.fdatasync(dst)
                os.posix_fadvise(dst, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(src)
                os.close(dst)

    def _gc_hot(self, base: Path, young: list[Path]) -> None:
        """Remove tmpfs files no generation links to any more (aged, merged, deleted)."""
        if not self.hot_root.is_dir():
            return
        wanted = set()
        for d in young:
            for p in d.glob("pages-*.img"):
                if p.is_symlink():
                    wanted.add(os.path.basename(os.readlink(p)))
        for p in self.hot_root.iterdir():
            if p.name not in wanted:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    # --- promotion -----------------------------------------------------------------------------

    @property
    def lazy_view(self) -> Path:
        return self.root / f"{self.pair}{LAZY_VIEW_SUFFIX}"

    def prepare_lazy(self, top: Path) -> dict[str, Any]:
        """Prepare a lazy restore of the newest generation ``top``: its hot pages (newest copy
        in the tmpfs) are placed before the tree resumes, its cold ones (newest copy in the disk
        base) are left to CRIU's lazy-pages daemon. Only private anonymous memory can be lazy
        (shared memory and file pages stay eager). Call it under ``reading``.

        Two directories, because CRIU 4.2.1's daemon cannot serve a lazy page that is "in
        parent" from local images (criu/pagemap.c: a parent's page_read reads the page but has
        no ``io_complete``, so the fault is never answered and the tree hangs): ``top``'s
        pagemap marks the cold pages lazy (the restore skips them), and the daemon runs on a
        view of its own (``lazy_view``) whose pagemap is the base's, with exactly those pages
        lazy and read from the base's own pages file. The restore finds the daemon's socket
        through a link in ``top``. Returns the counts and the view's path ("view")."""
        with self._lock:
            dirs = chain(top)
            base = dirs[-1]
            self._sync_index(list(reversed(dirs[:-1])))
            view = self.lazy_view
            self._rmtree(view)
            view.mkdir(mode=0o700)
            for p in top.iterdir():
                if (p.is_file() and not p.is_symlink() and not p.name.startswith("pagemap-")
                        and not p.name.startswith("pages-") and not p.name.endswith(".log")):
                    os.symlink(f"../{top.name}/{p.name}", view / p.name)
            pids = _pids_threads(top)
            eager = lazy = 0
            for name in pagemap_names(top):
                if name.startswith("pagemap-shmem-"):
                    continue
                pid = int(name.removeprefix("pagemap-").removesuffix(".img"))
                image = _Reader(top).optional(name, "PAGEMAP")
                if not image:
                    continue
                head, *entries = image
                base_image = _Reader(base).optional(name, "PAGEMAP") or []
                base_head, *base_entries = base_image or [{"pages_id": 0}]
                mm = _Reader(top).one(f"mm-{pid}.img", "MM")
                sps = [_stack_pointer(top, tid) for tid in pids.get(pid, [pid])]
                can = lazy_capable(mm.get("vmas") or [], [sp for sp in sps if sp])
                cold = subtract(can, self.index.hot_ranges(name))
                # Only pages the newest generation has (one it does not have is zero after a
                # restore, whatever the base holds) and the base holds itself.
                cold = intersect(cold, _entry_ranges(entries))
                cold = intersect(cold, merge_ranges(
                    (s.vaddr, s.vaddr + s.length) for s in present_runs(base_entries)))
                new = split_entries(entries, cold)
                replace_pagemap(top, name, int(head["pages_id"]), new)
                n_lazy = count_pages(new, PE_LAZY)
                lazy += n_lazy
                eager += sum(int(e["nr_pages"]) for e in new) - n_lazy
                view_id = int(base_head["pages_id"])
                replace_pagemap(view, name, view_id, split_entries(base_entries, cold))
                if base_entries:
                    os.symlink(f"../{base.name}/{pages_file(view_id)}",
                               view / pages_file(view_id))
                else:
                    (view / pages_file(view_id)).touch()
            sock = top / LAZY_SOCKET
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            os.symlink(f"../{view.name}/{LAZY_SOCKET}", sock)
            return {"eager_pages": eager, "lazy_pages": lazy,
                    "hot_pages": self.index.hot_pages, "view": str(view)}

    # --- life ----------------------------------------------------------------------------------

    def recover(self) -> dict[str, Any]:
        with self._lock:
            if self.hot_root.is_dir():
                for p in self.hot_root.glob(f"*{TMP_SUFFIX}"):
                    p.unlink()
            lost = self._fall_back_if_lost()
            done = super().recover()
            if lost:
                done["lost_young"] = lost
            return done

    def _fall_back_if_lost(self) -> list[str]:
        """Young generations whose pages are gone (the tmpfs did not survive a reboot): the
        pointer goes back to the base, and they go."""
        latest = self.latest()
        if latest is None or not (self.root / latest.dir).is_dir():
            return []
        try:
            dirs = chain(self.root / latest.dir)
        except OrthrosError:
            return []
        lost = [d for d in dirs[:-1]
                if any(p.is_symlink() and not p.exists() for p in d.glob("pages-*.img"))]
        if not lost:
            return []
        base = dirs[-1]
        data = _read_json(base / META)
        if data is None:
            raise GenerationError(f"the hot pages of pair {self.pair} are lost and its base "
                                  f"{base.name} has no record", hint="protect anew")
        from orthros_py.agent.pair.store import _write_json

        _write_json(self.pointer, data)  # the commit point, backwards
        for d in dirs[:-1]:
            self._delete(d)
        self._forget_all()
        return [d.name for d in dirs[:-1]]

    def destroy(self) -> None:
        with self._lock:
            super().destroy()
            self._rmtree(self.lazy_view)
            self._forget_all()
            if self.hot_root.exists():
                if self.mount and os.path.ismount(self.hot_root):
                    with contextlib.suppress(OSError):
                        unmount(self.hot_root)
                if self.hot_root.is_dir():
                    shutil.rmtree(self.hot_root, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.root / HOT_DIR).rmdir()  # only when no other pair has one

    def bytes_used(self) -> int:
        total = super().bytes_used()
        if self.hot_root.is_dir():
            total += sum(allocated_bytes(p) for p in self.hot_root.iterdir())
        return total

    def tier_stats(self) -> TierStats:
        """The figures of ``pair status``, measured now (best effort while pruning runs)."""
        s = self.stats
        s.hot_pages = self.index.hot_pages
        s.tmpfs_bytes = self._tmpfs_bytes()
        disk = cached = 0
        base = s.base_generation
        for k, d in self._dirs().items():
            with contextlib.suppress(OSError):
                for p in d.iterdir():
                    if p.is_symlink() or not p.is_file():
                        continue
                    disk += allocated_bytes(p)
                    if k == base and p.name.startswith("pages-"):
                        with contextlib.suppress(OSError):
                            cached += cached_bytes(p)
        s.disk_bytes, s.disk_cached_bytes = disk, cached
        return s


def _entry_ranges(entries: list[dict[str, Any]]) -> list[Range]:
    return merge_ranges((int(e["vaddr"]), int(e["vaddr"]) + entry_pages(e) * PAGE_SIZE)
                        for e in entries)


def _pids_threads(d: Path) -> dict[int, list[int]]:
    return {int(e["pid"]): [int(t) for t in e.get("threads") or [e["pid"]]]
            for e in _Reader(d).required("pstree.img", "PSTREE")}


def _stack_pointer(d: Path, tid: int) -> int | None:
    core = _Reader(d).optional(f"core-{tid}.img", "CORE")
    if not core:
        return None
    regs = ((core[0].get("thread_info") or {}).get("gpregs") or {})
    sp = regs.get("sp")
    return int(sp) if sp is not None else None
