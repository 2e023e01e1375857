"""The standby's generation store with real CRIU (root): incremental dumps of a running process
committed as generations, pruned by merging, and the newest one restored.

The workload is tests/workloads/dirty_pages.py: 32 MiB of random bytes that change only when the
test asks (SIGUSR1 rewrites 16 pages and prints "state SEQ SHA256"), and a checksum on demand
(SIGUSR2: "check SEQ SHA256"). The restored process's checksum must be the one it had at the
last dump, not the one it had when it was killed.

With memory tracking (``track_mem``: CRIU patched to track dirty pages with userfaultfd
write-protect, the userfaultfds kept between dumps by a ``DirtyTracker``) generation 2 holds only
the pages written since generation 1 and leaves the rest "in parent", and pruning merges
generation 2 with 1. A CRIU that refuses ``track_mem`` ("Tracking memory is not available")
cannot dump into a directory with a parent link either (its pid-reuse check wants the dump time
that only a tracked parent's inventory records: "Pid-reuse detection failed: no parent
inventory"), so the test then goes on with full generations (``begin(k, incremental=False)``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import signal
import time
from pathlib import Path
from typing import Any

from helpers import Spawner, read_lines, wait_for

from orthros_py.agent.pair.store import GenerationStore
from orthros_py.checkpoint import dump_tree, restore_tree
from orthros_py.criu.imagechain import PARENT_LINK, chain, pages_stats, verify
from orthros_py.criu.request import DumpOptions, RestoreOptions
from orthros_py.errors import CriuError

MIB = 32
DIRTY = 16  # pages the workload rewrites per SIGUSR1
NO_TRACKING = "Tracking memory is not available"


def reports(out: Path, kind: str) -> list[tuple[int, str]]:
    """The workload's complete "KIND SEQ SHA256" lines."""
    found = []
    for line in read_lines(out):
        parts = line.split()
        if len(parts) == 3 and parts[0] == kind and len(parts[2]) == 64:
            found.append((int(parts[1]), parts[2]))
    return found


def ask(pid: int, sig: int, out: Path, kind: str) -> tuple[int, str]:
    """Signal the workload and wait for the report it answers with."""
    before = len(reports(out, kind))
    os.kill(pid, sig)
    wait_for(lambda: len(reports(out, kind)) > before, what=f"the workload's {kind} line")
    return reports(out, kind)[-1]


def refused_tracking(err: CriuError) -> bool:
    return any(NO_TRACKING in s for s in [str(err), *err.log_tail])


def dirty_tracker() -> Any | None:
    """A ``DirtyTracker`` if this orthros has one (``dump_tree(..., dirty_track=)``)."""
    if "dirty_track" not in inspect.signature(dump_tree).parameters:
        return None
    try:
        return importlib.import_module("orthros_py.criu.dirtytrack").DirtyTracker()
    except (ImportError, AttributeError):
        return None


def test_generations_dumped_pruned_and_restored(spawner: Spawner, tmp_path: Path) -> None:
    out = tmp_path / "dirty.out"
    proc = spawner.workload("dirty_pages", str(MIB), str(DIRTY), stdout=out)
    wait_for(lambda: reports(out, "ready"), what="the workload to fill its memory")
    state = reports(out, "ready")[-1]

    store = GenerationStore(tmp_path / "images", "svc", keep=2)
    track = True
    tracker = dirty_tracker()
    at_dump: dict[int, tuple[int, str]] = {}
    try:
        for k in (1, 2, 3):
            if k > 1:
                state = ask(proc.pid, signal.SIGUSR1, out, "state")
            prev = store.latest()
            d = store.begin(k, incremental=track)
            opts = DumpOptions(leave_running=True, track_mem=track,
                               parent_img=f"../{prev.dir}" if prev and track else None)
            try:
                dumped = dump_tree(proc.pid, d, opts,
                                   **({"dirty_track": tracker} if tracker and track else {}))
            except CriuError as err:
                if not (track and refused_tracking(err)):
                    raise
                print(f"\nCRIU refuses track_mem here ({NO_TRACKING}): full generations")
                track = False
                store.abort(k)
                d = store.begin(k, incremental=False)
                dumped = dump_tree(proc.pid, d, DumpOptions(leave_running=True))
            at_dump[k] = state
            assert proc.poll() is None  # left running
            written = dumped.stats.pages_written if dumped.stats else None
            t0 = time.perf_counter()
            gen = store.commit(k, {"pages_written": written})
            commit_ms = (time.perf_counter() - t0) * 1000
            stats = pages_stats(store.path(k))
            tracked = bool(track and tracker is not None and tracker.tracking)
            print(f"generation {k}: track_mem={track} tracked={tracked} pages_written={written} "
                  f"stored={stats.pages} in_parent={stats.in_parent} bytes={stats.bytes} "
                  f"store={store.bytes_used()} commit_ms={commit_ms:.1f}")
            # The pointer names this generation, complete down its chain.
            assert store.latest() == gen and gen.number == k
            verify(store.root / gen.dir)
            assert [g.number for g in store.generations()] == list(range(max(1, k - 1), k + 1))
            if k == 2:
                assert (store.path(2) / PARENT_LINK).is_symlink() == track
                if not track:
                    assert stats.in_parent == 0
                elif tracked:
                    # Only what was written since generation 1 is stored again: the buffer's
                    # untouched pages, most of the process, are in parent.
                    assert stats.in_parent > (MIB << 20) // os.sysconf("SC_PAGE_SIZE") // 2
                    assert stats.pages < stats.in_parent
                else:
                    print("track_mem accepted but nothing keeps the tracking between dumps: "
                          "generation 2 is (almost) full")

        # keep=2: generation 2 was merged with 1, which is gone; 3 leans on 2 alone (or on
        # nothing, full generations).
        assert not store.path(1).exists()
        assert not (store.path(2) / PARENT_LINK).is_symlink()
        assert pages_stats(store.path(2)).in_parent == 0
        assert chain(store.path(3)) == [store.path(3).resolve(),
                                        *([store.path(2).resolve()] if track else [])]

        # Change the memory after the last dump, then lose the process.
        after = ask(proc.pid, signal.SIGUSR1, out, "state")
        assert after != at_dump[3]
        proc.kill()
        proc.wait(timeout=10)  # our child: reaped, so its PID is free for the restore

        latest = store.latest()
        assert latest is not None
        restored = restore_tree(store.root / latest.dir, RestoreOptions())
        spawner.track(restored.pid)
        assert restored.pid == proc.pid
        check = ask(restored.pid, signal.SIGUSR2, out, "check")
        assert check == at_dump[3], f"restored memory {check}, at the last dump {at_dump[3]}"
    finally:
        spawner.cleanup()
        if tracker is not None:
            tracker.close()
        store.destroy()
    assert not any((tmp_path / "images").iterdir())

