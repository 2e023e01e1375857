"""The paging standby's bookkeeping (pure): which pages are hot, where their newest copy lives,
what older copies can be punched out, and which pages a promotion leaves to the lazy-pages
daemon.

The hot set is the pages *written* within the hot window. This kernel offers no cheap way to
see pages only read (no idle page tracking, DAMON for physical addresses only, ``clear_refs``
per mapping only), but the standby needs none: every incremental generation's present pages
(PE_PRESENT entries) are exactly the pages the tree wrote during its interval. So a page is hot
while a generation younger than the window holds it, and its newest copy is in the youngest
generation that does (``HotIndex``). Pages only read stay cold, and after a failover they are
fetched on fault.

Pages are keyed by (pagemap image name, page address): ``pagemap-PID.img`` is one process's
address space, ``pagemap-shmem-ID.img`` one shared memory segment's. Address ranges are
half-open byte intervals ``(start, end)``, sorted and disjoint.

No I/O, no privileges.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orthros_py.criu.images import PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT

Range = tuple[int, int]  # [start, end) in bytes

# mmap flags and CRIU's VMA status bits (linux/mman.h, criu/include/image.h) that decide
# whether CRIU can restore a mapping's pages lazily (criu/include/vma.h vma_entry_can_be_lazy).
MAP_PRIVATE, MAP_ANONYMOUS, MAP_LOCKED, MAP_HUGETLB = 0x02, 0x20, 0x2000, 0x40000
VMA_AREA_VSYSCALL, VMA_AREA_VDSO, VMA_AREA_VVAR = 1 << 2, 1 << 3, 1 << 12


# --- ranges ---------------------------------------------------------------------------------


def page_runs(vaddrs: Iterable[int]) -> list[Range]:
    """Page addresses (any order, no duplicates needed) as maximal runs of adjacent pages."""
    out: list[Range] = []
    for v in sorted(set(vaddrs)):
        if out and out[-1][1] == v:
            out[-1] = (out[-1][0], v + PAGE_SIZE)
        else:
            out.append((v, v + PAGE_SIZE))
    return out


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, overlapping or touching ranges joined."""
    out: list[Range] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def subtract(a: Sequence[Range], b: Sequence[Range]) -> list[Range]:
    """``a`` without ``b`` (both sorted and disjoint)."""
    out: list[Range] = []
    j = 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            bs, be = b[k]
            if bs > cur:
                out.append((cur, bs))
            cur = max(cur, be)
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def intersect(a: Sequence[Range], b: Sequence[Range]) -> list[Range]:
    """Pages in both (both sorted and disjoint)."""
    out: list[Range] = []
    i = j = 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def hole_ranges(offsets: Iterable[int], page: int = PAGE_SIZE) -> list[Range]:
    """Byte offsets of single pages in a pages file as runs to punch, ``(offset, length)``."""
    out: list[Range] = []
    for off in sorted(set(offsets)):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + page)
        else:
            out.append((off, page))
    return out


# --- pagemap entries --------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Where one run of pages sits in a pages file: ``length`` bytes at ``offset``."""

    vaddr: int
    offset: int
    length: int


def present_runs(entries: Sequence[Mapping[str, Any]]) -> list[Slot]:
    """The present pages of a pagemap's entries (head excluded, image order) and their offsets
    in its pages file, which holds present entries' pages one after another in image order."""
    out: list[Slot] = []
    offset = 0
    for e in entries:
        flags = entry_flags(e)
        nr = entry_pages(e)
        if flags & PE_PRESENT and not flags & PE_PARENT:
            out.append(Slot(int(e["vaddr"]), offset, nr * PAGE_SIZE))
            offset += nr * PAGE_SIZE
    return out


def entry_flags(e: Mapping[str, Any]) -> int:
    flags = e.get("flags")
    if e.get("in_parent"):
        return int(flags or 0) | PE_PARENT
    return PE_PRESENT if flags is None else int(flags)


def entry_pages(e: Mapping[str, Any]) -> int:
    n = e.get("nr_pages")
    return int(e.get("compat_nr_pages") or 0) if n is None else int(n)


def slots_of(slots: Sequence[Slot], ranges: Sequence[Range]) -> Iterator[Slot]:
    """The parts of ``slots`` (sorted by address) that ``ranges`` cover, cut at both's edges:
    where in the pages file the pages of ``ranges`` are. Pages not in any slot are skipped."""
    starts = [s.vaddr for s in slots]
    for rs, re_ in ranges:
        i = max(bisect.bisect_right(starts, rs) - 1, 0)
        while i < len(slots) and slots[i].vaddr < re_:
            sl = slots[i]
            s, e = max(rs, sl.vaddr), min(re_, sl.vaddr + sl.length)
            if s < e:
                yield Slot(s, sl.offset + (s - sl.vaddr), e - s)
            i += 1


def lazy_capable(vmas: Iterable[Mapping[str, Any]], stack_pointers: Iterable[int] = ()
                 ) -> list[Range]:
    """The address ranges CRIU may restore lazily: private anonymous mappings that are not
    locked, huge-TLB, vDSO, vvar or vsyscall (``vma_entry_can_be_lazy``), less the page each
    thread's stack pointer is in (CRIU's dump never marks those lazy: ``is_stack``)."""
    ok = []
    for v in vmas:
        flags, status = int(v.get("flags") or 0), int(v.get("status") or 0)
        if not (flags & MAP_ANONYMOUS and flags & MAP_PRIVATE):
            continue
        if flags & (MAP_LOCKED | MAP_HUGETLB):
            continue
        if status & (VMA_AREA_VDSO | VMA_AREA_VVAR | VMA_AREA_VSYSCALL):
            continue
        ok.append((int(v["start"]), int(v["end"])))
    sps = [(sp & ~(PAGE_SIZE - 1), (sp & ~(PAGE_SIZE - 1)) + PAGE_SIZE)
           for sp in stack_pointers]
    return subtract(merge_ranges(ok), merge_ranges(sps))


def split_entries(entries: Sequence[Mapping[str, Any]], lazy: Sequence[Range]
                  ) -> list[dict[str, Any]]:
    """A pagemap's entries (head excluded, image order) rewritten so that exactly the pages in
    ``lazy`` carry PE_LAZY: an entry that ``lazy`` cuts is split into adjacent entries with the
    same other flags. The pages file needs no change, since a present entry's pages stay in
    the same order. What a lazy restore does with them: entries with PE_LAZY are left to the
    lazy-pages daemon, the others are placed before the tree resumes (criu/mem.c)."""
    out: list[dict[str, Any]] = []
    ends = [le for _ls, le in lazy]
    for e in entries:
        start = int(e["vaddr"])
        end = start + entry_pages(e) * PAGE_SIZE
        flags = entry_flags(e)
        base = {k: v for k, v in e.items() if k not in ("in_parent", "compat_nr_pages")}
        cur = start
        # The lazy ranges this entry meets: from the first that ends after its start.
        i = bisect.bisect_right(ends, start)
        cut = []
        while i < len(lazy) and lazy[i][0] < end:
            cut.append((max(lazy[i][0], start), min(lazy[i][1], end)))
            i += 1
        for ls, le in cut:
            if ls > cur:
                out.append(_entry(base, cur, ls, flags & ~PE_LAZY))
            out.append(_entry(base, ls, le, flags | PE_LAZY))
            cur = le
        if cur < end:
            out.append(_entry(base, cur, end, flags & ~PE_LAZY))
    return out


def _entry(base: Mapping[str, Any], start: int, end: int, flags: int) -> dict[str, Any]:
    e = dict(base)
    e["vaddr"] = start
    e["nr_pages"] = (end - start) // PAGE_SIZE
    e["flags"] = flags
    e["compat_nr_pages"] = 0  # required in pagemap.proto; CRIU writes 0
    return e


def count_pages(entries: Iterable[Mapping[str, Any]], flag: int) -> int:
    return sum(entry_pages(e) for e in entries if entry_flags(e) & flag)


# --- the hot set ----------------------------------------------------------------------------


class HotIndex:
    """Which young generation holds the newest copy of each hot page.

    ``add`` a generation's present pages as it is committed (oldest first): each page it holds
    becomes its, and the copies of those pages in older generations are superseded (their
    slots can be punched out: no restore of this or a newer generation reads them). ``drop``
    a generation when it leaves the window: the pages it still owns go with it (to the disk
    base). One dict entry per hot page: memory in proportion to the hot set, not the service.
    """

    def __init__(self) -> None:
        self._owner: dict[str, dict[int, int]] = {}
        self.generations: dict[int, int] = {}  # generation -> pages it owns now

    def __contains__(self, gen: int) -> bool:
        return gen in self.generations

    @property
    def hot_pages(self) -> int:
        return sum(self.generations.values())

    def owner(self, name: str, vaddr: int) -> int | None:
        return self._owner.get(name, {}).get(vaddr)

    def add(self, gen: int, present: Mapping[str, Sequence[Range]]
            ) -> dict[int, dict[str, list[int]]]:
        """Generation ``gen`` (newer than every one added before) holds ``present``; returns
        the superseded copies: older generation -> pagemap name -> page addresses."""
        if self.generations and gen <= max(self.generations):
            raise ValueError(f"generation {gen} is not newer than {max(self.generations)}")
        superseded: dict[int, dict[str, list[int]]] = {}
        owned = 0
        for name, ranges in present.items():
            owners = self._owner.setdefault(name, {})
            for s, e in ranges:
                for v in range(s, e, PAGE_SIZE):
                    old = owners.get(v)
                    if old is not None:
                        superseded.setdefault(old, {}).setdefault(name, []).append(v)
                        self.generations[old] -= 1
                    owners[v] = gen
                    owned += 1
        self.generations[gen] = owned
        return superseded

    def live(self, gen: int, present: Mapping[str, Sequence[Range]]) -> dict[str, list[Range]]:
        """The pages of ``present`` (generation ``gen``'s) that it still owns, as runs."""
        out: dict[str, list[Range]] = {}
        for name, ranges in present.items():
            owners = self._owner.get(name, {})
            mine = [v for s, e in ranges for v in range(s, e, PAGE_SIZE)
                    if owners.get(v) == gen]
            if mine:
                out[name] = page_runs(mine)
        return out

    def drop(self, gen: int, present: Mapping[str, Sequence[Range]]) -> int:
        """Forget generation ``gen`` (left the window); the pages it owned are cold now."""
        n = 0
        for name, ranges in present.items():
            owners = self._owner.get(name, {})
            for s, e in ranges:
                for v in range(s, e, PAGE_SIZE):
                    if owners.get(v) == gen:
                        del owners[v]
                        n += 1
        self.generations.pop(gen, None)
        return n

    def hot_ranges(self, name: str) -> list[Range]:
        return page_runs(self._owner.get(name, {}))

    def reset(self) -> None:
        self._owner.clear()
        self.generations.clear()
