"""Chains of incremental CRIU checkpoints: verify one, count its pages, merge it with its parents.

Wraps CRIU's memory images, read and written through ``pycriu.images`` (``load``/``dump``):
``pagemap-ID.img`` and ``pagemap-shmem-ID.img`` (a ``pagemap_head`` naming ``pages_id``, then
entries {vaddr, nr_pages, flags} with PE_PARENT / PE_LAZY / PE_PRESENT; older images carry an
``in_parent`` boolean instead of flags) and the raw ``pages-ID.img`` files, which hold the pages
of the present entries one after another in entry order. An incremental dump
(``--prev-images-dir``) writes a ``parent`` symlink and marks the pages it did not write
PE_PARENT: CRIU's restore reads them from the same pagemap (same file name) in the parent
directory, which may say "in parent" again (criu/pagemap.c, ``read_parent_page``).

Pure file work: needs read access to a chain's directories (write access for ``materialize``),
no root, no CRIU binary. Page data is always streamed (``copy_file_range``, or bounded
read/write), never held whole in memory.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orthros_py.criu.images import PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT, _Reader
from orthros_py.errors import BadImageError

PARENT_LINK = "parent"  # CRIU's CR_PARENT_LINK
PAGEMAP_GLOB = "pagemap-*.img"  # pagemap-PID.img and pagemap-shmem-SHMID.img
# Files being written by ``materialize`` end so until renamed; a crash leaves them behind, and
# whoever owns the directory removes them (``remove_temp_files``).
TMP_SUFFIX = ".orthros-tmp"
_COPY_CHUNK = 1 << 20  # the largest buffer the read/write fallback holds


def pages_file(pages_id: int) -> str:
    return f"pages-{pages_id}.img"


# --------------------------------------------------------------------------------------------
# Value objects


@dataclass(frozen=True)
class Extent:
    """One pagemap entry, with where its pages sit in the directory's pages file."""

    vaddr: int
    nr_pages: int
    flags: int
    # Byte offset of its pages in pages-ID.img; meaningful for present entries only.
    offset: int
    index: int  # position of the entry in the image (after the head), for rewriting it

    @property
    def end(self) -> int:
        return self.vaddr + self.nr_pages * PAGE_SIZE

    @property
    def in_parent(self) -> bool:
        return bool(self.flags & PE_PARENT)

    @property
    def present(self) -> bool:
        return bool(self.flags & PE_PRESENT) and not self.in_parent


@dataclass(frozen=True)
class Pagemap:
    """One pagemap image of one directory, its entries sorted by address."""

    dir: Path
    name: str
    pages_id: int | None  # None: an empty image (CRIU skips it)
    entries: tuple[dict[str, Any], ...]  # as pycriu loaded them (pretty=False), head excluded
    extents: tuple[Extent, ...]
    starts: tuple[int, ...] = ()  # the extents' addresses, for bisect

    @property
    def pages_path(self) -> Path | None:
        return None if self.pages_id is None else self.dir / pages_file(self.pages_id)

    @property
    def needed_bytes(self) -> int:
        """What its pages file must hold: the pages of its present entries."""
        return sum(e.nr_pages for e in self.extents if e.present) * PAGE_SIZE

    def count(self, flag: int) -> int:
        return sum(e.nr_pages for e in self.extents if e.flags & flag)

    def find(self, vaddr: int) -> int:
        """Index of the extent holding ``vaddr``, or -1."""
        i = bisect.bisect_right(self.starts, vaddr) - 1
        return i if i >= 0 and self.extents[i].end > vaddr else -1


@dataclass(frozen=True)
class PagesStats:
    """What one directory holds of its checkpoint's memory (its parents not counted)."""

    pagemaps: int
    pages: int  # stored in this directory's pages files
    in_parent: int  # left to the parent chain
    lazy: int  # marked lazy (post-copy candidates), present or not
    pages_bytes: int  # size of its pages-*.img files
    bytes: int  # size of all its regular files (the parent link not followed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VerifyResult:
    """A complete checkpoint: every page it names is found in it or down its chain."""

    dir: Path
    chain: tuple[Path, ...]  # the directory first, then its parents
    pagemaps: int
    pages: int  # all pages the pagemaps cover
    present: int  # stored in the directory itself
    in_parent: int  # resolved in the parents

    def to_dict(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "chain": [str(p) for p in self.chain],
                "pagemaps": self.pagemaps, "pages": self.pages, "present": self.present,
                "in_parent": self.in_parent}


@dataclass(frozen=True)
class MaterializeResult:
    dir: Path
    rewritten: tuple[str, ...]  # pagemaps that had pages in parent
    pages_from_parents: int
    bytes_written: int
    unlinked_parent: bool

    def to_dict(self) -> dict[str, Any]:
        return {"dir": str(self.dir), "rewritten": list(self.rewritten),
                "pages_from_parents": self.pages_from_parents,
                "bytes_written": self.bytes_written, "unlinked_parent": self.unlinked_parent}


# --------------------------------------------------------------------------------------------
# Reading


def entry_flags(entry: dict[str, Any]) -> int:
    """An entry's flags as CRIU reads them (``init_compat_pagemap_entry``)."""
    flags = entry.get("flags")
    if entry.get("in_parent"):
        return int(flags or 0) | PE_PARENT
    return PE_PRESENT if flags is None else int(flags)


def entry_pages(entry: dict[str, Any]) -> int:
    n = entry.get("nr_pages")
    return int(entry.get("compat_nr_pages") or 0) if n is None else int(n)


def parse_pagemap(dir_: Path, name: str, image: list[dict[str, Any]]) -> Pagemap:
    """A pagemap from pycriu's entries (head first); BadImageError if CRIU could not read it:
    CRIU walks entries forward only, so they must be in address order and never overlap."""
    if not image:
        return Pagemap(dir_, name, None, (), ())
    head, *entries = image
    if "pages_id" not in head:
        raise BadImageError(f"{name} in {dir_} is corrupt: it has no pagemap head")
    extents: list[Extent] = []
    offset = 0
    for i, e in enumerate(entries):
        ext = Extent(int(e["vaddr"]), entry_pages(e), entry_flags(e), offset, i)
        if ext.vaddr % PAGE_SIZE:
            raise BadImageError(f"{name} in {dir_} is corrupt: address {ext.vaddr:#x} is not "
                                "page aligned")
        if ext.present:  # the pages file holds present entries' pages in image order
            offset += ext.nr_pages * PAGE_SIZE
        extents.append(ext)
    extents.sort(key=lambda x: x.vaddr)
    for a, b in itertools.pairwise(extents):
        if b.vaddr < a.end:
            raise BadImageError(f"{name} in {dir_} is corrupt: entries at {a.vaddr:#x} and "
                                f"{b.vaddr:#x} overlap")
    return Pagemap(dir_, name, int(head["pages_id"]), tuple(entries), tuple(extents),
                   tuple(e.vaddr for e in extents))


def load_pagemap(dir_: Path, name: str) -> Pagemap | None:
    """``name`` of ``dir_``, None if the directory has no such image."""
    image = _Reader(dir_).optional(name, "PAGEMAP")
    return None if image is None else parse_pagemap(dir_, name, image)


def pagemap_names(dir_: Path) -> list[str]:
    return sorted(p.name for p in dir_.glob(PAGEMAP_GLOB) if p.is_file())


def chain(dir_: Path) -> list[Path]:
    """``dir_``, its parent, the parent's parent ... as CRIU follows ``parent`` links."""
    start = Path(dir_)
    if not start.is_dir():
        raise BadImageError(f"image directory {start} does not exist")
    out = [start.resolve()]
    while True:
        cur = out[-1]
        link = cur / PARENT_LINK
        if not link.is_symlink() and not link.exists():
            return out
        if not link.is_dir():
            target = os.readlink(link) if link.is_symlink() else "a non-directory"
            raise BadImageError(f"the chain of {start} is broken: the parent link of {cur} "
                                f"points to {target}, which is not an image directory")
        nxt = link.resolve()
        if nxt in out:
            raise BadImageError(f"the chain of {start} is a cycle: the parent link of {cur} "
                                f"leads back to {nxt}")
        out.append(nxt)


class _Chain:
    """The pagemaps of a chain of directories, loaded once each, checked against their pages
    files as they are loaded."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs
        self._maps: dict[tuple[int, str], Pagemap | None] = {}

    def pagemap(self, level: int, name: str) -> Pagemap | None:
        key = (level, name)
        if key not in self._maps:
            pm = load_pagemap(self.dirs[level], name)
            if pm is not None:
                check_pages_file(pm)
            self._maps[key] = pm
        return self._maps[key]

    def segments(self, level: int, name: str, vaddr: int, nr: int
                 ) -> Iterator[tuple[Path, int, int]]:
        """Where the pages [vaddr, vaddr + nr pages) of pagemap ``name`` at ``level`` are
        stored: (pages file, offset, length), in address order."""
        if level >= len(self.dirs):
            child = self.dirs[level - 1]
            raise BadImageError(f"page {vaddr:#x} of {name} in {child} is in parent, but "
                                f"{child} has no parent")
        pm = self.pagemap(level, name)
        where = self.dirs[level]
        if pm is None:
            raise BadImageError(f"page {vaddr:#x} of {name} is in parent, but {where} has "
                                f"no {name}")
        end = vaddr + nr * PAGE_SIZE
        i = pm.find(vaddr)
        cur = vaddr
        while cur < end:
            if i < 0 or i >= len(pm.extents) or pm.extents[i].vaddr > cur:
                raise BadImageError(f"page {cur:#x} of {name} is in parent, but {name} in "
                                    f"{where} holds no such page")
            e = pm.extents[i]
            take = min(end, e.end) - cur
            if e.in_parent:
                yield from self.segments(level + 1, name, cur, take // PAGE_SIZE)
            elif e.present:
                assert pm.pages_path is not None
                yield pm.pages_path, e.offset + (cur - e.vaddr), take
            else:
                raise BadImageError(f"page {cur:#x} of {name} in {where} is held by a page "
                                    "server (a lazy dump), not by any image")
            cur += take
            i += 1

    def resolve(self, pm: Pagemap, e: Extent) -> Iterator[tuple[Path, int, int]]:
        """The stored bytes of one extent of a level-0 pagemap, adjacent pieces merged."""
        if e.present:
            assert pm.pages_path is not None
            yield pm.pages_path, e.offset, e.nr_pages * PAGE_SIZE
            return
        if not e.in_parent:
            return  # lazy only: no data in any image (refused by ``verify``)
        last: tuple[Path, int, int] | None = None
        for seg in self.segments(1, pm.name, e.vaddr, e.nr_pages):
            if last and last[0] == seg[0] and last[1] + last[2] == seg[1]:
                last = (last[0], last[1], last[2] + seg[2])
                continue
            if last:
                yield last
            last = seg
        if last:
            yield last


def check_pages_file(pm: Pagemap) -> None:
    path = pm.pages_path
    if path is None:
        return
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImageError(f"the checkpoint in {pm.dir} is incomplete: {pm.name} names "
                            f"{path.name}, which is missing") from None
    if size != pm.needed_bytes:
        raise BadImageError(
            f"the checkpoint in {pm.dir} is incomplete: {path.name} holds {size} bytes where "
            f"{pm.name} needs {pm.needed_bytes} ({pm.needed_bytes // PAGE_SIZE} pages)")


def _top_pagemaps(ch: _Chain) -> list[Pagemap]:
    out = []
    for name in pagemap_names(ch.dirs[0]):
        pm = ch.pagemap(0, name)
        if pm is not None:
            out.append(pm)
    return out


def _check_resolvable(ch: _Chain, maps: list[Pagemap]) -> None:
    for pm in maps:
        for e in pm.extents:
            if not e.present and not e.in_parent:
                raise BadImageError(
                    f"page {e.vaddr:#x} of {pm.name} in {pm.dir} is held by a page server "
                    "(a lazy dump), not by any image")
            if e.in_parent:
                for _ in ch.resolve(pm, e):
                    pass


def verify(dir_: Path) -> VerifyResult:
    """Check that ``dir_`` holds a complete checkpoint that CRIU can restore: inventory.img,
    every pagemap's pages file with exactly the bytes its entries need, and every page in
    parent found down the chain. BadImageError, in one sentence, says what is wrong."""
    dirs = chain(dir_)
    if not (dirs[0] / "inventory.img").exists():
        raise BadImageError(f"the checkpoint in {dirs[0]} is incomplete: inventory.img is missing")
    _Reader(dirs[0]).one("inventory.img", "INVENTORY")
    ch = _Chain(dirs)
    maps = _top_pagemaps(ch)
    _check_resolvable(ch, maps)
    total = sum(e.nr_pages for pm in maps for e in pm.extents)
    return VerifyResult(dirs[0], tuple(dirs), len(maps), total,
                        sum(pm.count(PE_PRESENT) for pm in maps),
                        sum(pm.count(PE_PARENT) for pm in maps))


def pages_stats(dir_: Path) -> PagesStats:
    """Pages stored in ``dir_``, pages it leaves to its parents, and its size on disk."""
    dir_ = Path(dir_)
    if not dir_.is_dir():
        raise BadImageError(f"image directory {dir_} does not exist")
    maps = [pm for name in pagemap_names(dir_) if (pm := load_pagemap(dir_, name)) is not None]
    stored = sum(e.nr_pages for pm in maps for e in pm.extents if e.present)
    pages_bytes = 0
    total = 0
    for p in dir_.iterdir():
        if p.is_file() and not p.is_symlink():
            size = p.stat().st_size
            total += size
            if p.name.startswith("pages-") and p.name.endswith(".img"):
                pages_bytes += size
    return PagesStats(len(maps), stored, sum(pm.count(PE_PARENT) for pm in maps),
                      sum(pm.count(PE_LAZY) for pm in maps), pages_bytes, total)


def referenced_pages_files(dir_: Path) -> set[str]:
    """The pages files that ``dir_``'s pagemaps name."""
    out = set()
    for name in pagemap_names(dir_):
        pm = load_pagemap(dir_, name)
        if pm is not None and pm.pages_path is not None:
            out.add(pm.pages_path.name)
    return out


# --------------------------------------------------------------------------------------------
# Writing


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temp_files(dir_: Path) -> list[str]:
    """Remove what an interrupted ``materialize`` left half-written in ``dir_``."""
    removed = []
    for p in dir_.glob(f"*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p.name)
    return removed


def _copy_range(src: int, dst: int, offset: int, length: int, name: str) -> None:
    """Append ``length`` bytes of ``src`` from ``offset`` to ``dst``, in the kernel when it
    can (copy_file_range: no page of data crosses into this process), else 1 MiB at a time."""
    done = 0
    use_cfr = True
    while done < length:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src, dst, length - done, offset + done)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_cfr = False
                continue
        else:
            buf = os.pread(src, min(_COPY_CHUNK, length - done), offset + done)
            n = len(buf)
            view = memoryview(buf)
            while view:
                view = view[os.write(dst, view):]
        if n == 0:
            raise BadImageError(f"{name} ended at byte {offset + done} while copying pages "
                                "from it")
        done += n


def _new_entry(entry: dict[str, Any], ext: Extent) -> dict[str, Any]:
    e = dict(entry)
    e.pop("in_parent", None)
    flags = ext.flags
    if flags & PE_PARENT:
        flags = (flags & ~PE_PARENT) | PE_PRESENT
    e["flags"] = flags
    e["nr_pages"] = ext.nr_pages
    e.setdefault("compat_nr_pages", 0)  # required in pagemap.proto; CRIU writes 0
    return e


def _write_pagemap(path: Path, pages_id: int, entries: list[dict[str, Any]]) -> None:
    from pycriu import images as pimages  # lazy: ``orthros --help`` runs without pycriu

    with path.open("wb") as f:
        pimages.dump({"magic": "PAGEMAP", "entries": [{"pages_id": pages_id}, *entries]}, f)
        f.flush()
        os.fsync(f.fileno())


def replace_pagemap(dir_: Path, name: str, pages_id: int, entries: list[dict[str, Any]]) -> None:
    """Replace pagemap ``name`` of ``dir_`` by rename: a reader sees the old one or the new one,
    never half of either. The entries must describe the same pages file (same present pages in
    the same order): only flags and how runs are cut may change."""
    tmp = dir_ / (name + TMP_SUFFIX)
    _write_pagemap(tmp, pages_id, entries)
    os.rename(tmp, dir_ / name)
    fsync_dir(dir_)


def _free_pages_id(dir_: Path, maps: list[Pagemap]) -> int:
    used = {pm.pages_id for pm in maps if pm.pages_id is not None}
    for p in dir_.glob("pages-*.img*"):
        num = p.name.removeprefix("pages-").split(".", 1)[0]
        if num.isdigit():
            used.add(int(num))
    return max(used, default=0) + 1


def _materialize_one(ch: _Chain, pm: Pagemap, pages_id: int) -> tuple[int, int]:
    """Write ``pm``'s pages, those in parent included, under a new pages id, then switch the
    pagemap to it by rename. Returns (pages taken from parents, bytes written)."""
    dir_ = pm.dir
    new_pages = dir_ / pages_file(pages_id)
    tmp_pages = dir_ / (new_pages.name + TMP_SUFFIX)
    fds: dict[Path, int] = {}
    from_parents = 0
    written = 0
    mode = 0o600
    if pm.pages_path is not None and pm.pages_path.exists():
        mode = pm.pages_path.stat().st_mode & 0o7777
    out = os.open(tmp_pages, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        for ext in pm.extents:
            for path, offset, length in ch.resolve(pm, ext):
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                _copy_range(fds[path], out, offset, length, str(path))
                written += length
            if ext.in_parent:
                from_parents += ext.nr_pages
        os.fsync(out)
    except BaseException:
        os.close(out)
        with contextlib.suppress(FileNotFoundError):
            tmp_pages.unlink()
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    os.close(out)
    os.rename(tmp_pages, new_pages)

    entries = [_new_entry(pm.entries[e.index], e) for e in pm.extents]
    tmp_map = dir_ / (pm.name + TMP_SUFFIX)
    _write_pagemap(tmp_map, pages_id, entries)
    fsync_dir(dir_)  # the new pages file's name is durable before the pagemap names it
    os.rename(tmp_map, dir_ / pm.name)  # the switch: old and new pagemap read the same pages
    fsync_dir(dir_)
    if pm.pages_path is not None:
        with contextlib.suppress(FileNotFoundError):
            pm.pages_path.unlink()
    return from_parents, written


def materialize(dir_: Path) -> MaterializeResult:
    """Make ``dir_`` restore alone: every page it has in parent is copied into it from down its
    chain, and its ``parent`` link goes. Nothing changes if a page in parent cannot be found.

    Safe to interrupt at any instant, and safe while ``dir_`` is the parent of another
    checkpoint: each pagemap gets its pages file under a fresh pages id (written, fsynced,
    renamed into place), and only then is the pagemap itself replaced by rename. Old and new
    pagemap describe the same page contents, and the old one's parent chain and pages file stay
    until the switch, so every reader of ``dir_`` sees a complete checkpoint whichever it finds.
    The parent link is removed last. An interruption leaves at most an unreferenced pages file
    or a ``*.orthros-tmp`` file, and running this again finishes the work."""
    dirs = chain(dir_)
    top = dirs[0]
    ch = _Chain(dirs)
    maps = _top_pagemaps(ch)
    _check_resolvable(ch, maps)  # before touching anything: refuse a chain with a hole
    todo = [pm for pm in maps if any(e.in_parent for e in pm.extents)]
    rewritten: list[str] = []
    from_parents = written = 0
    next_id = _free_pages_id(top, maps)
    for pm in todo:
        n, w = _materialize_one(ch, pm, next_id)
        next_id += 1
        rewritten.append(pm.name)
        from_parents += n
        written += w
    link = top / PARENT_LINK
    unlinked = link.is_symlink()
    if unlinked:
        link.unlink()
        fsync_dir(top)
    return MaterializeResult(top, tuple(rewritten), from_parents, written, unlinked)
