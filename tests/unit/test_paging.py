"""The paging standby (agent/pair/paging.py, agent/pair/tiers.py) without root: the pure logic,
and the two-tier store on synthetic image directories (the tmpfs replaced by a plain directory,
``mount=False``; the window's clock driven by the test).

The store's chain is read back by the test's own resolver (``test_imagechain.memory``): after
every commit and every aging, the newest generation must still hold every page's newest
content, whatever was punched, moved to the base or merged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pycriu import images as pimages
from test_imagechain import (
    BASE,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    PS,
    TASK,
    content,
    expected,
    memory,
    runs,
    write_inventory,
    write_pagemap,
)

from orthros_py.agent.pair.config import PairConfig
from orthros_py.agent.pair.paging import (
    HotIndex,
    Slot,
    count_pages,
    hole_ranges,
    intersect,
    lazy_capable,
    merge_ranges,
    page_runs,
    present_runs,
    slots_of,
    split_entries,
    subtract,
)
from orthros_py.agent.pair.tiers import HOT_DIR, PagingStore
from orthros_py.agent.protocol import ProtocolError
from orthros_py.criu.imagechain import PARENT_LINK, verify


def v(page: int) -> int:
    return BASE + page * PS


def r(a: int, b: int) -> tuple[int, int]:
    """Pages [a, b) as a byte range."""
    return (v(a), v(b))


# --- ranges -------------------------------------------------------------------------------------


def test_page_runs_join_adjacent_pages_in_any_order() -> None:
    assert page_runs([v(5), v(1), v(2), v(3), v(9), v(2)]) == [r(1, 4), r(5, 6), r(9, 10)]
    assert page_runs([]) == []


def test_range_arithmetic() -> None:
    a = [r(0, 10), r(20, 30)]
    b = [r(2, 4), r(8, 22), r(29, 40)]
    assert subtract(a, b) == [r(0, 2), r(4, 8), r(22, 29)]
    assert intersect(a, b) == [r(2, 4), r(8, 10), r(20, 22), r(29, 30)]
    assert subtract(a, []) == a and intersect(a, []) == []
    assert merge_ranges([r(5, 6), r(0, 2), r(2, 3), r(1, 2)]) == [r(0, 3), r(5, 6)]


def test_hole_ranges_join_adjacent_offsets() -> None:
    assert hole_ranges([3 * PS, 0, PS, 7 * PS]) == [(0, 2 * PS), (3 * PS, PS), (7 * PS, PS)]


def test_present_runs_and_slots_follow_the_pages_file_order() -> None:
    entries = [{"vaddr": v(0), "nr_pages": 2, "flags": PE_PRESENT | PE_LAZY},
               {"vaddr": v(2), "nr_pages": 3, "flags": PE_PARENT},
               {"vaddr": v(5), "nr_pages": 4, "flags": PE_PRESENT}]
    slots = present_runs(entries)
    assert slots == [Slot(v(0), 0, 2 * PS), Slot(v(5), 2 * PS, 4 * PS)]
    # Pages 1, 3 (in parent: no slot) and 6-7.
    got = list(slots_of(slots, [r(1, 2), r(3, 4), r(6, 8)]))
    assert got == [Slot(v(1), PS, PS), Slot(v(6), 3 * PS, 2 * PS)]


# --- which pages may be lazy, and the split ------------------------------------------------------


def vma(start: int, end: int, flags: int, status: int = 0x201) -> dict[str, Any]:
    return {"start": v(start), "end": v(end), "flags": flags, "status": status}


def test_lazy_capable_takes_private_anonymous_memory_only_and_not_the_stack_page() -> None:
    vmas = [vma(0, 10, 0x22),  # private anonymous: lazy
            vma(10, 20, 0x02, 0x41),  # private file mapping: never
            vma(20, 30, 0x01 | 0x20, 0x101),  # shared anonymous: never
            vma(30, 40, 0x22 | 0x2000),  # locked: never
            vma(40, 42, 0x22, 0x201 | (1 << 3)),  # vDSO: never
            vma(50, 60, 0x22)]
    assert lazy_capable(vmas, [v(55) + 100]) == [r(0, 10), r(50, 55), r(56, 60)]


def test_split_marks_exactly_the_lazy_pages_and_keeps_the_pages_file_order() -> None:
    entries = [{"vaddr": v(0), "nr_pages": 6, "flags": PE_PRESENT | PE_LAZY},
               {"vaddr": v(6), "nr_pages": 4, "flags": PE_PARENT},
               {"vaddr": v(10), "nr_pages": 2, "flags": PE_PRESENT}]
    new = split_entries(entries, [r(2, 4), r(5, 8)])
    got = [((e["vaddr"] - BASE) // PS, e["nr_pages"], e["flags"]) for e in new]
    assert got == [(0, 2, PE_PRESENT), (2, 2, PE_PRESENT | PE_LAZY), (4, 1, PE_PRESENT),
                   (5, 1, PE_PRESENT | PE_LAZY), (6, 2, PE_PARENT | PE_LAZY),
                   (8, 2, PE_PARENT), (10, 2, PE_PRESENT)]
    # Every present page keeps its slot in the pages file.

    def offsets(ents: list[dict[str, Any]]) -> dict[int, int]:
        return {s.vaddr + i: s.offset + i for s in present_runs(ents)
                for i in range(0, s.length, PS)}

    assert offsets(new) == offsets(entries) and len(offsets(new)) == 8
    assert count_pages(new, PE_LAZY) == 5


# --- the hot index ----------------------------------------------------------------------------


def test_the_index_tracks_the_newest_copy_and_what_it_supersedes() -> None:
    idx = HotIndex()
    assert idx.add(2, {TASK: [r(0, 4)]}) == {}
    assert idx.add(3, {TASK: [r(2, 6)]}) == {2: {TASK: [v(2), v(3)]}}
    assert idx.owner(TASK, v(1)) == 2 and idx.owner(TASK, v(3)) == 3
    assert idx.hot_pages == 6 and idx.generations == {2: 2, 3: 4}
    assert idx.live(2, {TASK: [r(0, 4)]}) == {TASK: [r(0, 2)]}
    assert idx.drop(2, {TASK: [r(0, 4)]}) == 2
    assert idx.hot_ranges(TASK) == [r(2, 6)] and idx.hot_pages == 4
    with pytest.raises(ValueError):
        idx.add(3, {TASK: [r(0, 1)]})


# --- configuration ------------------------------------------------------------------------------


def test_paging_settings_are_checked() -> None:
    peer = {"name": "a", "address": "10.0.0.1", "port": 1}
    base = {"name": "p", "pid": 2, "active": peer, "standby": dict(peer, name="b")}
    cfg = PairConfig.from_dict({**base, "paging": True, "hot_window": 5})
    assert cfg.paging and cfg.hot_window == 5.0
    for bad in ({"paging": "yes"}, {"hot_window": "5s"}, {"hot_window": 0.0},
                {"paging": True, "hot_window": 0.1, "interval": 0.2}):
        with pytest.raises(ProtocolError):
            PairConfig.from_dict({**base, **bad})


# --- the store, on synthetic generations -------------------------------------------------------


NPAGES = 32


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Rig:
    """A paging store fed with synthetic generations; ``model`` is the memory the newest one
    must restore: {page: generation that last wrote it}."""

    def __init__(self, root: Path, window: float = 10.0) -> None:
        self.clock = Clock()
        self.store = PagingStore(root, "svc", hot_window=window, mount=False, clock=self.clock)
        self.model: dict[int, int] = {}
        self.k = 0

    def generation(self, written: set[int], *, npages: int = NPAGES, full: bool = False,
                   at: float | None = None) -> Path:
        self.k += 1
        if at is not None:
            self.clock.t = at
        latest = self.store.latest()
        d = self.store.begin(self.k, incremental=not full and latest is not None)
        write_inventory(d)
        first = full or latest is None
        for p in range(npages) if first else written:
            self.model[p] = self.k
        owner = dict(self.model) if first else None
        ents = runs(npages, written, first=first)
        write_pagemap(d, TASK, 1, self.k, ents, owner=owner)
        self.store.commit(self.k, prune=False)  # committed at the clock's time
        self.store.prune()
        return d

    def check(self) -> None:
        top = self.store.root / self.store.latest().dir  # type: ignore[union-attr]
        verify(top)
        assert memory(top, TASK) == expected(self.model, TASK)


def hot_files(store: PagingStore) -> dict[str, int]:
    return {p.name: p.stat().st_blocks * 512 for p in store.hot_root.iterdir()}


def test_young_pages_go_to_memory_superseded_copies_are_punched(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    g1 = rig.generation(set())
    assert not any(p.is_symlink() for p in g1.glob("pages-*.img"))  # the base: on disk
    g2 = rig.generation({1, 2, 3, 4}, at=1001)
    g3 = rig.generation({3, 4, 5}, at=1002)
    rig.check()
    assert (g2 / "pages-1.img").is_symlink() and (g3 / "pages-1.img").is_symlink()
    assert (g2 / "pages-1.img").resolve().parent == tmp_path / HOT_DIR / "svc"
    # Pages 3 and 4 of g2 are superseded by g3: punched, the file keeps its size.
    g2_hot = (g2 / "pages-1.img").resolve()
    assert g2_hot.stat().st_size == 4 * PS
    if g2_hot.stat().st_blocks * 512 < 4 * PS:  # the filesystem punches holes (ext4, tmpfs)
        assert g2_hot.stat().st_blocks * 512 == 2 * PS
    assert rig.store.index.hot_pages == 5  # 1, 2 (g2) and 3, 4, 5 (g3)
    assert rig.store.stats.punched_bytes == 2 * PS
    s = rig.store.tier_stats()
    assert s.young_generations == 2 and s.base_generation == 1 and s.hot_pages == 5


def test_an_aged_generation_goes_into_the_base_in_place(tmp_path: Path) -> None:
    rig = Rig(tmp_path, window=10)
    g1 = rig.generation(set(), at=1000)
    base_pages = g1 / "pages-1.img"
    inode = base_pages.stat().st_ino
    rig.generation({1, 2, 3}, at=1001)
    rig.generation({3, 4}, at=1002)
    g4 = rig.generation({9}, at=1012)  # g2 (1001) is older than 1012 - 10: it ages out
    rig.check()
    assert not (tmp_path / "svc.g000002").exists()
    assert os.readlink(tmp_path / "svc.g000003" / PARENT_LINK) == "../svc.g000001"
    assert base_pages.stat().st_ino == inode  # written in place, not merged
    assert rig.store.stats.aged_in_place == 1 and rig.store.stats.aged_by_merge == 0
    # g2's pages 1 and 2 are in the base now; page 3 is g3's.
    assert memory(g1, TASK)[1] == content(2, TASK, 1) and memory(g1, TASK)[3] == content(1, TASK, 3)
    assert rig.store.index.hot_pages == 3  # 3, 4 (g3), 9 (g4)
    assert sorted(hot_files(rig.store)) == ["svc.g000003.pages-1.img", "svc.g000004.pages-1.img"]
    # Everything but the newest ages out; the newest never does.
    rig.clock.t = 2000
    rig.store.prune()
    rig.check()
    assert rig.store.tier_stats().young_generations == 1 and g4.exists()


def test_a_new_mapping_makes_the_aged_generation_the_new_base(tmp_path: Path) -> None:
    rig = Rig(tmp_path, window=10)
    rig.generation(set(), at=1000)
    # g2 maps 8 more pages (32-39, all present: new): the base has no slot for them.
    rig.generation({1, *range(32, 40)}, npages=NPAGES + 8, at=1001)
    rig.generation({2}, npages=NPAGES + 8, at=1002)
    rig.generation({3}, npages=NPAGES + 8, at=1020)
    rig.check()
    assert not (tmp_path / "svc.g000001").exists()
    g2 = tmp_path / "svc.g000002"
    assert not (g2 / PARENT_LINK).exists() and not (g2 / "pages-1.img").is_symlink()
    # g2 merged with the base (it became the base), then g3 went into it in place.
    assert (rig.store.stats.aged_by_merge, rig.store.stats.aged_in_place) == (1, 1)
    assert rig.store.tier_stats().base_generation == 2
    assert sorted(hot_files(rig.store)) == ["svc.g000004.pages-1.img"]


def test_a_full_generation_becomes_the_base_and_the_rest_goes(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.generation(set(), at=1000)
    rig.generation({1, 2}, at=1001)
    rig.generation(set(), full=True, at=1002)
    rig.check()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("svc.g")) == [
        "svc.g000003"]
    assert rig.store.index.hot_pages == 0 and hot_files(rig.store) == {}
    rig.generation({4}, at=1003)
    rig.check()
    assert rig.store.index.hot_pages == 1


def test_lost_hot_pages_fall_back_to_the_base(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.generation(set(), at=1000)
    rig.generation({1, 2}, at=1001)
    rig.generation({5}, at=1002)
    for p in rig.store.hot_root.iterdir():  # what a reboot does to a tmpfs
        p.unlink()
    again = PagingStore(tmp_path, "svc", hot_window=10, mount=False)
    done = again.recover()
    assert done["lost_young"] == ["svc.g000003", "svc.g000002"]
    assert again.latest() is not None and again.latest().number == 1  # type: ignore[union-attr]
    verify(tmp_path / "svc.g000001")


def test_an_agent_restart_rebuilds_the_index(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.generation(set(), at=1000)
    rig.generation({1, 2}, at=1001)
    rig.generation({2, 5}, at=1002)
    again = PagingStore(tmp_path, "svc", hot_window=10, mount=False, clock=rig.clock)
    again.recover()
    assert again.index.hot_pages == 3 and again.index.owner(TASK, v(2)) == 3


def test_prepare_lazy_leaves_the_cold_pages_to_the_daemon(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.generation(set(), at=1000)
    rig.generation({1, 2}, at=1001)
    top = rig.generation({2, 5}, at=1002)
    pid = 100
    with (top / "pstree.img").open("wb") as f:
        pimages.dump({"magic": "PSTREE", "entries": [{"pid": pid, "ppid": 0, "pgid": pid,
                                                      "sid": pid, "threads": [pid]}]}, f)
    with (top / f"mm-{pid}.img").open("wb") as f:
        pimages.dump({"magic": "MM", "entries": [{
            "mm_start_code": 0, "mm_end_code": 0, "mm_start_data": 0, "mm_end_data": 0,
            "mm_start_stack": 0, "mm_start_brk": 0, "mm_brk": 0, "mm_arg_start": 0,
            "mm_arg_end": 0, "mm_env_start": 0, "mm_env_end": 0, "exe_file_id": 0,
            "vmas": [dict(vma(0, 30, 0x22), pgoff=0, shmid=0, prot=3, fd=-1),
                     dict(vma(30, 32, 0x02, 0x41), pgoff=0, shmid=0, prot=3, fd=-1)]}]}, f)
    plan = rig.store.prepare_lazy(top)
    with (top / TASK).open("rb") as f:
        _head, *entries = pimages.load(f)["entries"]
    lazy = {p for e in entries if e["flags"] & PE_LAZY
            for p in range((e["vaddr"] - BASE) // PS, (e["vaddr"] - BASE) // PS + e["nr_pages"])}
    # Hot (1, 2, 5) eager; 30-31 a file mapping: eager; the rest lazy.
    assert lazy == set(range(30)) - {1, 2, 5}
    assert plan == {"eager_pages": 5, "lazy_pages": 27, "hot_pages": 3,
                    "view": str(tmp_path / "svc.lazy")}
    rig.check()  # the same memory: only flags changed
    # The daemon's view: the base's pagemap, exactly the same pages lazy, read from the base's
    # pages file (no parent: CRIU's daemon cannot answer a fault from a parent).
    view = tmp_path / "svc.lazy"
    assert not (view / PARENT_LINK).exists()
    with (view / TASK).open("rb") as f:
        vhead, *ventries = pimages.load(f)["entries"]
    assert {p for e in ventries if e["flags"] & PE_LAZY
            for p in range((e["vaddr"] - BASE) // PS, (e["vaddr"] - BASE) // PS + e["nr_pages"])
            } == lazy
    assert (view / f"pages-{vhead['pages_id']}.img").resolve() == (
        tmp_path / "svc.g000001" / f"pages-{vhead['pages_id']}.img")
    assert os.readlink(top / "lazy-pages.socket") == "../svc.lazy/lazy-pages.socket"
    assert (view / "pstree.img").resolve() == top / "pstree.img"


def test_destroy_leaves_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.generation(set(), at=1000)
    rig.generation({1}, at=1001)
    rig.store.destroy()
    assert list(tmp_path.iterdir()) == []
