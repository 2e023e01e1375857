"""Chains of incremental checkpoints (criu/imagechain.py) and the standby's generation store
(agent/pair/store.py), on synthetic image directories written with pycriu's own writer.

Every page of a synthetic checkpoint holds bytes that name its generation, pagemap and address,
so a page found at the wrong place, or taken from the wrong generation, shows. The expected
memory is computed by the test from its own model, and what the images hold is read back by a
small resolver of the test's own (pycriu's reader plus the raw pages files), independent of the
code under test.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pycriu import images as pimages

from orthros_py.agent.pair.store import (
    META,
    Generation,
    GenerationError,
    GenerationStore,
)
from orthros_py.criu.imagechain import (
    chain,
    materialize,
    pages_stats,
    verify,
)
from orthros_py.errors import BadImageError

PS = mmap.PAGESIZE
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
BASE = 0x7F0000000000
TASK = "pagemap-100.img"
SHMEM = "pagemap-shmem-7.img"

Entry = tuple[int, int, int]  # page index, number of pages, flags


def content(gen: int, name: str, page: int) -> bytes:
    """The bytes generation ``gen`` wrote at page ``page`` of pagemap ``name``."""
    tag = f"g{gen}:{name}:{page};".encode()
    return (tag * (PS // len(tag) + 1))[:PS]


def write_image(path: Path, magic: str, entries: list[dict[str, Any]]) -> None:
    with path.open("wb") as f:
        pimages.dump({"magic": magic, "entries": entries}, f)


def write_inventory(d: Path) -> None:
    write_image(d / "inventory.img", "INVENTORY", [{
        "img_version": 2, "fdinfo_per_id": True, "ns_per_id": True, "lsmtype": "NO_LSM",
        "dump_criu_run_id": "test-run"}])


def write_pagemap(d: Path, name: str, pages_id: int, gen: int, entries: list[Entry], *,
                  legacy: bool = False, owner: dict[int, int] | None = None) -> None:
    """pagemap ``name`` (entries in the order given) and its pages file: the present entries'
    pages, in entry order, as CRIU writes them. A page holds generation ``gen``'s bytes, or
    those of generation ``owner[page]`` (a full dump writes what earlier ones wrote too)."""
    pm: list[dict[str, Any]] = [{"pages_id": pages_id}]
    data = bytearray()
    for page, nr, flags in entries:
        e: dict[str, Any] = {"vaddr": BASE + page * PS, "compat_nr_pages": 0}
        if legacy:  # images older than the flags field: a bool, and compat_nr_pages only
            e["compat_nr_pages"] = nr
            if flags & PE_PARENT:
                e["in_parent"] = True
        else:
            e.update(nr_pages=nr, flags=flags)
        pm.append(e)
        if flags & PE_PRESENT:
            data += b"".join(content(owner[p] if owner else gen, name, p)
                             for p in range(page, page + nr))
    write_image(d / name, "PAGEMAP", pm)
    (d / f"pages-{pages_id}.img").write_bytes(bytes(data))


def runs(npages: int, written: set[int], *, first: bool) -> list[Entry]:
    """Entries covering pages 0..npages-1: runs of written pages present, the others in
    parent (all present in a first generation)."""
    out: list[Entry] = []
    for p in range(npages):
        flags = PE_PRESENT if first or p in written else PE_PARENT
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1, flags)
        else:
            out.append((p, 1, flags))
    return out


def link_parent(d: Path, parent: Path) -> None:
    os.symlink(f"../{parent.name}", d / "parent")


# --- the test's own reader ----------------------------------------------------------------


def memory(d: Path, name: str) -> dict[int, bytes]:
    """Page index -> bytes, as a restore from ``d`` would find them (parents followed)."""
    with (d / name).open("rb") as f:
        head, *entries = pimages.load(f)["entries"]
    raw = (d / f"pages-{head['pages_id']}.img").read_bytes()
    out: dict[int, bytes] = {}
    parent: dict[int, bytes] | None = None
    off = 0
    for e in entries:
        nr = e.get("nr_pages") or e["compat_nr_pages"]
        flags = e.get("flags", PE_PARENT if e.get("in_parent") else PE_PRESENT)
        first = (e["vaddr"] - BASE) // PS
        for i in range(nr):
            if flags & PE_PARENT:
                if parent is None:
                    parent = memory((d / "parent").resolve(), name)
                out[first + i] = parent[first + i]
            else:
                out[first + i] = raw[off:off + PS]
                off += PS
    return out


def expected(model: dict[int, int], name: str) -> dict[int, bytes]:
    """The memory of a model {page: generation that last wrote it}."""
    return {p: content(g, name, p) for p, g in model.items()}


def standalone(d: Path) -> None:
    """``d`` holds every page itself: no parent link, no entry in parent, all flags present,
    entries in address order, the pages file exactly their size."""
    assert not (d / "parent").exists() and not (d / "parent").is_symlink()
    for pm in d.glob("pagemap-*.img"):
        with pm.open("rb") as f:
            head, *entries = pimages.load(f)["entries"]
        assert all(e["flags"] & PE_PRESENT and not e["flags"] & PE_PARENT for e in entries)
        assert [e["vaddr"] for e in entries] == sorted(e["vaddr"] for e in entries)
        assert (d / f"pages-{head['pages_id']}.img").stat().st_size == PS * sum(
            e["nr_pages"] for e in entries)


def files(d: Path) -> dict[str, bytes]:
    return {p.name: (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(d.iterdir())}


# --- chains of directories ----------------------------------------------------------------


def make_gen(root: Path, gen: int, entries: dict[str, list[Entry]], parent: Path | None,
             **kw: Any) -> Path:
    d = root / f"g{gen}"
    d.mkdir()
    write_inventory(d)
    for i, (name, ents) in enumerate(sorted(entries.items())):
        write_pagemap(d, name, 10 * gen + i, gen, ents, **kw)
    if parent is not None:
        link_parent(d, parent)
    return d


def three(tmp_path: Path) -> tuple[Path, Path, Path, dict[int, int]]:
    """g1 writes pages 0-15; g2 pages 2, 3, 9; g3 pages 3-5, 12, 13. Returns g3's model."""
    g1 = make_gen(tmp_path, 1, {TASK: runs(16, set(), first=True)}, None)
    g2 = make_gen(tmp_path, 2, {TASK: runs(16, {2, 3, 9}, first=False)}, g1)
    g3 = make_gen(tmp_path, 3, {TASK: runs(16, {3, 4, 5, 12, 13}, first=False)}, g2)
    model = {p: 1 for p in range(16)}
    model.update({2: 2, 3: 2, 9: 2})
    model.update({3: 3, 4: 3, 5: 3, 12: 3, 13: 3})
    return g1, g2, g3, model


def test_chain_follows_parent_links(tmp_path: Path) -> None:
    g1, g2, g3, _ = three(tmp_path)
    assert chain(g3) == [g3.resolve(), g2.resolve(), g1.resolve()]
    assert chain(g1) == [g1.resolve()]


def test_chain_refuses_a_broken_link_and_a_cycle(tmp_path: Path) -> None:
    g1, g2, _, _ = three(tmp_path)
    shutil.rmtree(g1)
    with pytest.raises(BadImageError, match=r"broken.*g1"):
        chain(g2)
    d = tmp_path / "loop"
    d.mkdir()
    e = tmp_path / "loop2"
    e.mkdir()
    link_parent(d, e)
    link_parent(e, d)
    with pytest.raises(BadImageError, match="cycle"):
        chain(d)
    with pytest.raises(BadImageError, match="does not exist"):
        chain(tmp_path / "nowhere")


def test_materialize_two_generations_with_a_shmem_pagemap(tmp_path: Path) -> None:
    g1 = make_gen(tmp_path, 1, {TASK: runs(8, set(), first=True),
                                SHMEM: runs(4, set(), first=True)}, None)
    g2 = make_gen(tmp_path, 2, {TASK: runs(8, {2, 3}, first=False),
                                SHMEM: runs(4, {0}, first=False)}, g1)
    want_task = expected({0: 1, 1: 1, 2: 2, 3: 2, 4: 1, 5: 1, 6: 1, 7: 1}, TASK)
    want_shmem = expected({0: 2, 1: 1, 2: 1, 3: 1}, SHMEM)
    assert memory(g2, TASK) == want_task  # the test's own reader agrees with the model

    before = pages_stats(g2)
    assert (before.pagemaps, before.pages, before.in_parent) == (2, 3, 9)
    res = materialize(g2)
    assert set(res.rewritten) == {TASK, SHMEM} and res.pages_from_parents == 9
    assert res.unlinked_parent
    standalone(g2)
    shutil.rmtree(g1)  # it restores alone now
    assert memory(g2, TASK) == want_task
    assert memory(g2, SHMEM) == want_shmem
    assert verify(g2).chain == (g2.resolve(),)
    after = pages_stats(g2)
    assert (after.pages, after.in_parent) == (12, 0)
    assert after.pages_bytes == 12 * PS
    # Run again: nothing left to do, nothing changes.
    snapshot = files(g2)
    assert materialize(g2).rewritten == ()
    assert files(g2) == snapshot


def test_materialize_a_chain_of_three(tmp_path: Path) -> None:
    _, _, g3, model = three(tmp_path)
    assert memory(g3, TASK) == expected(model, TASK)
    v = verify(g3)
    assert (v.pages, v.present, v.in_parent, len(v.chain)) == (16, 5, 11, 3)
    materialize(g3)
    standalone(g3)
    assert memory(g3, TASK) == expected(model, TASK)


def test_pruning_order_keeps_the_newest_readable(tmp_path: Path) -> None:
    # What the store does with keep=2: merge g2 with g1, delete g1; g3 reads through g2.
    g1, g2, g3, model = three(tmp_path)
    materialize(g2)
    shutil.rmtree(g1)
    assert verify(g3).chain == (g3.resolve(), g2.resolve())
    assert memory(g3, TASK) == expected(model, TASK)


def test_a_parent_range_split_across_entries_and_levels(tmp_path: Path) -> None:
    # g3 has one entry of 10 pages in parent. In g2 that range is four entries: present,
    # in parent, present, in parent; g2's in-parent ranges start in the middle of g1's entries,
    # which are themselves split three ways. g2's entries are written in reverse address order:
    # the pages file follows the image's order, the rewritten image is sorted.
    g1 = make_gen(tmp_path, 1, {TASK: [(0, 3, PE_PRESENT), (3, 4, PE_PRESENT | PE_LAZY),
                                       (7, 5, PE_PRESENT)]}, None)
    g2_entries = [(0, 2, PE_PARENT), (2, 2, PE_PRESENT), (4, 5, PE_PARENT), (9, 1, PE_PRESENT),
                  (10, 2, PE_PARENT)]
    g2 = make_gen(tmp_path, 2, {TASK: list(reversed(g2_entries))}, g1)
    g3 = make_gen(tmp_path, 3, {TASK: [(0, 1, PE_PRESENT), (1, 10, PE_PARENT),
                                       (11, 1, PE_PRESENT)]}, g2)
    model = {p: 1 for p in range(12)}
    model.update({2: 2, 3: 2, 9: 2, 0: 3, 11: 3})
    assert memory(g3, TASK) == expected(model, TASK)
    materialize(g3)
    standalone(g3)
    assert memory(g3, TASK) == expected(model, TASK)
    # The lazy flag of g1's pages is not carried into g3: the entry is g3's own.
    materialize(g2)
    with (g2 / TASK).open("rb") as f:
        flags = [e["flags"] for e in pimages.load(f)["entries"][1:]]
    assert flags == [PE_PRESENT] * 5
    assert memory(g2, TASK) == expected({**{p: 1 for p in range(12)}, 2: 2, 3: 2, 9: 2}, TASK)


def test_legacy_in_parent_booleans(tmp_path: Path) -> None:
    g1 = make_gen(tmp_path, 1, {TASK: runs(6, set(), first=True)}, None, legacy=True)
    g2 = make_gen(tmp_path, 2, {TASK: runs(6, {1, 4}, first=False)}, g1, legacy=True)
    model = {0: 1, 1: 2, 2: 1, 3: 1, 4: 2, 5: 1}
    assert verify(g2).in_parent == 4
    materialize(g2)
    standalone(g2)
    assert memory(g2, TASK) == expected(model, TASK)


def test_a_missing_page_in_parent_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    g1 = make_gen(tmp_path, 1, {TASK: [(0, 4, PE_PRESENT), (6, 2, PE_PRESENT)]}, None)
    # Pages 4 and 5 are in none of g1's entries.
    g2 = make_gen(tmp_path, 2, {TASK: [(0, 1, PE_PRESENT), (1, 6, PE_PARENT)]}, g1)
    before = files(g2)
    with pytest.raises(BadImageError, match=rf"page {BASE + 4 * PS:#x} of {TASK}.*no such page"):
        verify(g2)
    with pytest.raises(BadImageError, match="no such page"):
        materialize(g2)
    assert files(g2) == before


def test_pages_in_parent_without_a_parent(tmp_path: Path) -> None:
    g = make_gen(tmp_path, 2, {TASK: [(0, 1, PE_PRESENT), (1, 2, PE_PARENT)]}, None)
    with pytest.raises(BadImageError, match="has no parent"):
        verify(g)
    with pytest.raises(BadImageError, match="has no parent"):
        materialize(g)


def test_pagemap_missing_in_the_parent(tmp_path: Path) -> None:
    g1 = make_gen(tmp_path, 1, {TASK: runs(2, set(), first=True)}, None)
    g2 = make_gen(tmp_path, 2, {SHMEM: [(0, 2, PE_PARENT)]}, g1)
    with pytest.raises(BadImageError, match=f"has no {SHMEM}"):
        verify(g2)


def test_verify_catches_a_short_or_missing_pages_file(tmp_path: Path) -> None:
    g1, g2, g3, _ = three(tmp_path)
    pages = g2 / "pages-20.img"
    pages.write_bytes(pages.read_bytes()[:-1])
    with pytest.raises(BadImageError, match=r"pages-20\.img holds \d+ bytes where"):
        verify(g2)
    with pytest.raises(BadImageError, match=r"pages-20\.img holds"):
        verify(g3)  # found while resolving g3's pages in parent
    pages.unlink()
    with pytest.raises(BadImageError, match=r"pages-20\.img, which is missing"):
        verify(g2)
    (g1 / "pages-10.img").write_bytes((g1 / "pages-10.img").read_bytes() + b"x")
    with pytest.raises(BadImageError, match=r"pages-10\.img holds"):
        verify(g1)  # too long is as wrong as too short


def test_verify_needs_an_inventory_and_refuses_lazy_pages(tmp_path: Path) -> None:
    g1, _, _, _ = three(tmp_path)
    (g1 / "inventory.img").unlink()
    with pytest.raises(BadImageError, match=r"inventory\.img is missing"):
        verify(g1)
    g = make_gen(tmp_path, 5, {TASK: [(0, 1, PE_PRESENT), (1, 1, PE_LAZY)]}, None)
    with pytest.raises(BadImageError, match="page server"):
        verify(g)


def test_copy_without_copy_file_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: Any, **_k: Any) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    _, _, g3, model = three(tmp_path)
    materialize(g3)
    assert memory(g3, TASK) == expected(model, TASK)


class Crash(BaseException):
    """The process dying at this instant (not an Exception: nothing may catch it)."""


@contextlib.contextmanager
def crash_after(n: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Let ``n`` filesystem changes (rename, unlink, rmdir, symlink) through, then die at the
    next one. Yields a counter of the changes made."""
    count = [0]
    real = {name: getattr(os, name) for name in ("rename", "unlink", "rmdir", "symlink")}

    def wrap(name: str) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            if count[0] >= n:
                raise Crash(f"died before {name} #{n}")
            count[0] += 1
            return real[name](*a, **k)
        return call

    with monkeypatch.context() as m:
        for name in real:
            m.setattr(os, name, wrap(name))
        yield count


def test_materialize_interrupted_anywhere_leaves_the_same_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 0
    while True:
        root = tmp_path / f"run{n}"
        root.mkdir()
        _, g2, g3, model = three(root)
        g2_model = {**{p: 1 for p in range(16)}, 2: 2, 3: 2, 9: 2}
        try:
            with crash_after(n, monkeypatch):
                materialize(g2)
            done = True
        except Crash:
            done = False
        # g2, and g3 reading through it, hold the same pages at every instant.
        verify(g3)
        assert memory(g2, TASK) == expected(g2_model, TASK)
        assert memory(g3, TASK) == expected(model, TASK)
        materialize(g2)  # finishes the work
        standalone(g2)
        assert memory(g3, TASK) == expected(model, TASK)
        if done:
            break
        n += 1
    assert n >= 4  # pages file, pagemap, old pages file, parent link


# --- the generation store -----------------------------------------------------------------

WRITES = {1: set(range(16)), 2: {2, 3, 9}, 3: {3, 4, 5, 12, 13}, 4: {0, 15}, 5: {7},
          6: {1, 2, 3}}


def model_at(k: int) -> dict[int, int]:
    model: dict[int, int] = {}
    for g in range(1, k + 1):
        model.update(dict.fromkeys(WRITES[g], g))
    return model


def receive(store: GenerationStore, k: int) -> Path:
    """What the page server and the agent write into a begun generation: the pages written
    since the previous generation present, the others in parent."""
    d = store.path(k)
    write_inventory(d)
    first = not (d / "parent").is_symlink()
    write_pagemap(d, TASK, 1, k, runs(16, WRITES[k], first=first),
                  owner=model_at(k) if first else None)
    (d / "stats-dump").write_bytes(b"")  # another file the agent copies; its content is not ours
    return d


def assert_restorable(store: GenerationStore, k: int | None, *, pruned: bool = True) -> None:
    """The pointer names generation ``k`` (None: nothing committed), whose chain is complete
    and holds exactly the memory the service had at that generation."""
    latest = store.latest()
    if k is None:
        assert latest is None
        return
    assert latest is not None and latest.number == k
    d = store.root / latest.dir
    v = verify(d)
    assert v.pages == 16
    assert memory(d, TASK) == expected(model_at(k), TASK)
    assert [g.number for g in store.generations()][-1] == k
    if pruned:  # a crash may leave one generation too many, until ``recover``
        assert len(store.generations()) <= store.keep


def names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def test_store_begin_commit_keep_and_prune(tmp_path: Path) -> None:
    root = tmp_path / "images"
    store = GenerationStore(root, "svc", keep=2)
    assert store.latest() is None and store.generations() == []
    d1 = store.begin(1)
    assert d1 == root / "svc.g000001" and not (d1 / "parent").is_symlink()
    assert_restorable(store, None)  # begun is not committed
    receive(store, 1)
    g = store.commit(1, {"pages_written": 16})
    assert isinstance(g, Generation) and g.number == 1 and g.dir == "svc.g000001"
    pointer = json.loads((root / "svc.committed").read_text())
    assert pointer["generation"] == 1 and pointer["dir"] == "svc.g000001"
    assert pointer["pages_written"] == 16 and pointer["committed_at"] > 0
    assert g.to_dict() == pointer
    assert_restorable(store, 1)

    for k in range(2, 7):
        d = store.begin(k)
        assert os.readlink(d / "parent") == f"../svc.g{k - 1:06d}"
        assert_restorable(store, k - 1)
        receive(store, k)
        assert_restorable(store, k - 1)
        store.commit(k, {"pages_written": len(WRITES[k])})
        assert_restorable(store, k)
        gens = store.generations()
        assert [x.number for x in gens] == list(range(max(1, k - 1), k + 1))
        # Pruned: the oldest kept restores alone, the newest leans on it only.
        oldest = root / gens[0].dir
        assert not (oldest / "parent").is_symlink()
        assert chain(root / gens[-1].dir) == [(root / x.dir).resolve() for x in reversed(gens)]
        assert names(root) == {x.dir for x in gens} | {"svc.committed"}
    # Storage stays bounded: two generations, the older one full, the newer a delta.
    assert store.bytes_used() < 16 * PS + 4 * PS + 64 * 1024
    stats = store.generations()[0].stats["images"]
    assert stats["in_parent"] == 0 and stats["pages"] == 16  # refreshed after the merge


def test_store_keep_one_merges_the_pointers_own_generation(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path, "svc", keep=1)
    for k in range(1, 5):
        store.begin(k)
        receive(store, k)
        store.commit(k)
        assert_restorable(store, k)
        assert [g.number for g in store.generations()] == [k]
        standalone(store.path(k))
        assert store.latest().stats["images"]["in_parent"] == 0  # type: ignore[union-attr]


def test_store_full_generations_between_incremental_ones(tmp_path: Path) -> None:
    # Without memory tracking the active side dumps every page, into a directory without a
    # parent link; pruning then has nothing to merge for the generation after it.
    store = GenerationStore(tmp_path, "svc", keep=2)
    for k, incremental in ((1, True), (2, True), (3, False), (4, True), (5, False)):
        d = store.begin(k, incremental=incremental)
        assert (d / "parent").is_symlink() == (incremental and k > 1)
        receive(store, k)
        store.commit(k)
        assert_restorable(store, k)
    assert [g.number for g in store.generations()] == [4, 5]
    assert not (store.path(4) / "parent").is_symlink()  # merged with 3 before 3 went
    assert names(tmp_path) == {"svc.g000004", "svc.g000005", "svc.committed"}


def test_store_refusals(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path, "svc", keep=2)
    with pytest.raises(GenerationError, match="never begun"):
        store.commit(1)
    store.begin(1)
    receive(store, 1)
    store.commit(1)
    with pytest.raises(GenerationError, match="not newer"):
        store.begin(1)
    with pytest.raises(GenerationError, match="not newer"):
        store.commit(1)
    with pytest.raises(GenerationError, match="committed"):
        store.abort(1)
    with pytest.raises(ValueError, match="may not set"):
        store.commit(2, {"generation": 9})
    # An incomplete generation is not committed; the pointer stays where it was.
    d = store.begin(2)
    receive(store, 2)
    (d / "pages-1.img").write_bytes(b"short")
    with pytest.raises(BadImageError, match=r"pages-1\.img holds 5 bytes"):
        store.commit(2)
    assert_restorable(store, 1)
    # A begun generation whose parent is not the newest committed one is refused.
    (d / "parent").unlink()
    os.symlink("../elsewhere", d / "parent")
    with pytest.raises(GenerationError, match="parent"):
        store.commit(2)
    assert_restorable(store, 1)
    with pytest.raises(ValueError):
        GenerationStore(tmp_path, "svc", keep=0)
    with pytest.raises(Exception, match="not allowed"):
        GenerationStore(tmp_path, "../escape", keep=2)


def test_store_abort_and_a_new_begin_replace_a_begun_generation(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path, "svc", keep=2)
    store.begin(1)
    receive(store, 1)
    store.commit(1)
    store.begin(2)
    receive(store, 2)
    store.abort(2)
    assert not store.path(2).exists()
    assert_restorable(store, 1)
    store.abort(2)  # again: nothing to do
    store.begin(3)  # a transfer given up (3) is replaced by the next begin
    d4 = store.begin(4)
    assert not store.path(3).exists() and d4.is_dir()
    assert_restorable(store, 1)


def test_store_destroy_leaves_nothing_of_the_pair(tmp_path: Path) -> None:
    (tmp_path / "other.g000001").mkdir()  # another pair's: untouched
    (tmp_path / "svc2.committed").write_text("{}")
    store = GenerationStore(tmp_path, "svc", keep=2)
    for k in (1, 2, 3):
        store.begin(k)
        receive(store, k)
        store.commit(k)
    store.begin(4)
    store.destroy()
    assert names(tmp_path) == {"other.g000001", "svc2.committed"}
    assert store.latest() is None and store.bytes_used() == 0
    store.destroy()  # idempotent


def test_store_recover_cleans_up_after_a_crash(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path, "svc", keep=3)
    for k in (1, 2, 3):
        store.begin(k)
        receive(store, k)
        store.commit(k)
    store.begin(4)
    receive(store, 4)
    # What a crash can leave: a half-written pointer, temp and orphaned files, trash.
    (tmp_path / "svc.committed.orthros-tmp").write_text('{"gener')
    (store.path(3) / "pagemap-100.img.orthros-tmp").write_bytes(b"x")
    (store.path(3) / "pages-99.img").write_bytes(b"y" * PS)
    (tmp_path / "svc.g000000.trash").mkdir()
    # The agent restarts with keep=2: one generation too many.
    store = GenerationStore(tmp_path, "svc", keep=2)
    done = store.recover()
    assert set(done["removed_dirs"]) == {"svc.g000000.trash", "svc.g000004"}
    assert set(done["removed_files"]) == {"svc.committed.orthros-tmp",
                                          "svc.g000003/pagemap-100.img.orthros-tmp",
                                          "svc.g000003/pages-99.img"}
    assert names(tmp_path) == {"svc.g000002", "svc.g000003", "svc.committed"}
    assert_restorable(store, 3)
    assert store.recover() == {"removed_dirs": [], "removed_files": []}


def test_store_recover_with_nothing_committed(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path, "svc", keep=2)
    store.begin(1)
    receive(store, 1)
    assert store.recover()["removed_dirs"] == ["svc.g000001"]
    assert names(tmp_path) == set()
    assert GenerationStore(tmp_path / "absent", "svc", keep=2).recover()["removed_dirs"] == []


@pytest.mark.parametrize("keep", [1, 2])
def test_store_commit_interrupted_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           keep: int) -> None:
    """Die before each filesystem change of a commit in turn (pruning included): the pointer
    names a restorable generation with the right memory, before and after ``recover``, and a
    recovered store goes on committing."""
    n = 0
    while True:
        root = tmp_path / f"run{n}"
        store = GenerationStore(root, "svc", keep=keep)
        for k in (1, 2):
            store.begin(k)
            receive(store, k)
            store.commit(k)
        store.begin(3)
        receive(store, 3)
        try:
            with crash_after(n, monkeypatch):
                store.commit(3)
            done = True
        except Crash:
            done = False
        latest = store.latest()
        assert latest is not None and latest.number in (2, 3)
        assert_restorable(store, latest.number, pruned=False)
        store = GenerationStore(root, "svc", keep=keep)
        store.recover()
        assert_restorable(store, latest.number)
        assert names(root) == {g.dir for g in store.generations()} | {"svc.committed"}
        # The active side sends the generation after the committed one (3 again if it was lost).
        nxt = latest.number + 1
        store.begin(nxt)
        receive(store, nxt)
        store.commit(nxt)
        assert_restorable(store, nxt)
        if done:
            break
        n += 1
    assert n >= 5


def test_generation_record_beside_the_images(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path, "svc", keep=2)
    store.begin(1)
    receive(store, 1)
    g = store.commit(1, {"dump_ms": 12.5})
    record = json.loads((store.path(1) / META).read_text())
    assert record == g.to_dict()
    assert Generation.from_dict(record) == g
    assert g.stats["dump_ms"] == 12.5 and g.stats["images"]["chain"] == 1
    assert g.stats["images"]["pages_total"] == 16 and g.stats["images"]["pages"] == 16
    with pytest.raises(ValueError, match="may not set"):
        store.commit(2, {"images": {}})
