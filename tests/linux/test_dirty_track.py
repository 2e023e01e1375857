"""Incremental dumps without soft-dirty bits: orthros's patched CRIU tracks a real process's writes
with a userfaultfd that a ``DirtyTracker`` holds between dumps (real CRIU, real processes, root).

The workload is tests/workloads/dirty_mem.py: a 64 MiB region of random bytes that changes only
where a command says, and a checksum of all its memory on request. A dump that writes only the
pages written since its parent, and a restore through the parent chain that answers the checksum
the process gave at the dump, show that the tracking finds what changed and loses nothing.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Spawner, read_lines, wait_for

from orthros_py.checkpoint import DumpResult, dump_tree, restore_tree
from orthros_py.criu.dirtytrack import (
    DirtyTracker,
    criu_tracks_dirty,
    soft_dirty_available,
    tree_uses_userfaultfd,
    uffd_wp_async_available,
)
from orthros_py.criu.request import DumpOptions, RestoreOptions

MIB = 1 << 20
SIZE_MIB = 64
REGION_PAGES = SIZE_MIB * MIB // mmap.PAGESIZE
MIB_PAGES = MIB // mmap.PAGESIZE
# Besides the pages a command writes, the interpreter dirties some of its own between two dumps
# (stack, heap, libc data): bounded by 5 % of the region.
OVERHEAD = REGION_PAGES * 5 // 100


@pytest.fixture(scope="module")
def uffd_tracking() -> None:
    if soft_dirty_available():
        pytest.skip("the kernel keeps soft-dirty bits: CRIU tracks with those, not userfaultfd")
    if not uffd_wp_async_available():
        pytest.skip("the kernel has no userfaultfd write-protect tracking (Linux 6.7+)")
    if not criu_tracks_dirty():
        pytest.skip("this CRIU does not track memory here: not orthros's patched build "
                    "(run 'make setup')")


class Workload:
    """A running dirty_mem.py and its command FIFO."""

    def __init__(self, spawner: Spawner, tmp: Path, size_mib: int = SIZE_MIB) -> None:
        self.out = tmp / "dirty_mem.out"
        fifo = tmp / "dirty_mem.cmd"
        os.mkfifo(fifo)
        self.proc = spawner.workload("dirty_mem", str(fifo), str(size_mib), stdout=self.out)
        self.pid = self.proc.pid
        self.ready = self._answer("ready")
        # Ours stays open for the whole test: a restored process opens the same pipe again.
        self.fd = os.open(fifo, os.O_WRONLY | os.O_CLOEXEC)
        self.n = 0

    def _answer(self, ident: str) -> str:
        def answered() -> str | None:
            for line in read_lines(self.out):
                words = line.split()
                if len(words) >= 2 and words[0] == ident:
                    return " ".join(words[1:])
            return None

        wait_for(answered, what=f"the workload to answer {ident}")
        answer = answered()
        assert answer is not None and not answer.startswith("error"), answer
        return answer

    def cmd(self, text: str) -> str:
        """Run one command; the checksum of all the process's regions after it."""
        self.n += 1
        os.write(self.fd, f"c{self.n} {text}\n".encode())
        return self._answer(f"c{self.n}")

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def workload(spawner: Spawner, tmp_path: Path) -> Iterator[Workload]:
    w = Workload(spawner, tmp_path)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def tracker() -> Iterator[DirtyTracker]:
    with DirtyTracker() as t:
        yield t


def dump(pid: int, images: Path, tracker: DirtyTracker | None, parent: str | None = None
         ) -> DumpResult:
    opts = DumpOptions(leave_running=True, track_mem=True, parent_img=parent)
    result = dump_tree(pid, images, opts, dirty_track=tracker)
    assert result.stats is not None
    print(f"\n{images.name}: pages_written={result.stats.pages_written} "
          f"pages_skipped_parent={result.stats.pages_skipped_parent} "
          f"dump {result.elapsed_ms:.0f} ms (frozen {result.stats.frozen_ms:.0f} ms)")
    return result


def kill(pid: int) -> None:
    """Kill a restored root (our child) and reap it, so that its PID is free again."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def restored_sum(spawner: Spawner, w: Workload, images: Path) -> str:
    """Restore ``images`` (the original must be gone), ask the restored process for its
    checksum, then kill it again."""
    restored = restore_tree(images, RestoreOptions())
    spawner.track(restored.pid)
    assert restored.pid == w.pid
    try:
        return w.cmd("sum")
    finally:
        kill(restored.pid)


@pytest.mark.usefixtures("uffd_tracking")
def test_incremental_dump_writes_what_changed_and_restores_through_the_chain(
    spawner: Spawner, workload: Workload, tracker: DirtyTracker, tmp_path: Path
) -> None:
    w = workload
    gen1 = dump(w.pid, tmp_path / "gen1", tracker)
    assert gen1.stats is not None and gen1.stats.pages_written >= REGION_PAGES
    assert tracker.held == {w.pid: 1}  # one userfaultfd now tracks the whole process

    at_gen2 = w.cmd("write 10 1")
    gen2 = dump(w.pid, tmp_path / "gen2", tracker, "../gen1")
    assert gen2.stats is not None
    assert MIB_PAGES <= gen2.stats.pages_written <= MIB_PAGES + OVERHEAD
    assert gen2.stats.pages_skipped_parent >= REGION_PAGES - MIB_PAGES
    assert tracker.pids == [w.pid]

    # Tracking lost (the tracker closed, as when an agent restarts): the next dump counts every
    # page as dirty, and writes them all again.
    tracker.close()
    assert not tracker.tracking
    at_gen3 = w.cmd("write 20 1")
    with DirtyTracker() as fresh:
        gen3 = dump(w.pid, tmp_path / "gen3", fresh, "../gen2")
        assert fresh.held == {w.pid: 1}
    assert gen3.stats is not None and gen3.stats.pages_written >= REGION_PAGES

    w.cmd("write 30 1")  # after the last dump: no restore may show it
    w.proc.kill()
    w.proc.wait(timeout=10)  # our child: reaped, so its PID is free for the restore
    assert restored_sum(spawner, w, tmp_path / "gen2") == at_gen2
    assert restored_sum(spawner, w, tmp_path / "gen3") == at_gen3


@pytest.mark.usefixtures("uffd_tracking")
def test_a_region_mapped_between_dumps_is_in_the_next(
    spawner: Spawner, workload: Workload, tracker: DirtyTracker, tmp_path: Path
) -> None:
    w = workload
    dump(w.pid, tmp_path / "gen1", tracker)
    at_gen2 = w.cmd("map 4")  # a new VMA, which no userfaultfd tracks yet
    gen2 = dump(w.pid, tmp_path / "gen2", tracker, "../gen1")
    assert gen2.stats is not None
    assert 4 * MIB_PAGES <= gen2.stats.pages_written <= 4 * MIB_PAGES + OVERHEAD
    # The new region got a userfaultfd of its own, for the dumps to come.
    assert tracker.held == {w.pid: 2}

    at_gen3 = w.cmd("write 1 1")
    gen3 = dump(w.pid, tmp_path / "gen3", tracker, "../gen2")
    assert gen3.stats is not None
    assert MIB_PAGES <= gen3.stats.pages_written <= MIB_PAGES + OVERHEAD

    w.proc.kill()
    w.proc.wait(timeout=10)
    assert restored_sum(spawner, w, tmp_path / "gen2") == at_gen2
    assert restored_sum(spawner, w, tmp_path / "gen3") == at_gen3


@pytest.mark.usefixtures("uffd_tracking")
def test_tracker_lets_go_of_exited_processes(
    spawner: Spawner, workload: Workload, tracker: DirtyTracker, tmp_path: Path
) -> None:
    dump(workload.pid, tmp_path / "gen1", tracker)
    assert tracker.pids == [workload.pid]
    workload.proc.kill()
    workload.proc.wait(timeout=10)
    assert tracker.collect() == {} and not tracker.tracking


def test_a_tree_holding_its_own_userfaultfd_is_named(spawner: Spawner, tmp_path: Path) -> None:
    w = Workload(spawner, tmp_path, size_mib=1)
    try:
        others = [os.getpid()]
        assert tree_uses_userfaultfd([*others, w.pid]) is None
        w.cmd("uffd")
        assert tree_uses_userfaultfd([*others, w.pid]) == w.pid
    finally:
        w.close()


@pytest.mark.usefixtures("uffd_tracking")
@pytest.mark.parametrize("rounds", ["pre-dump", "dump"])
def test_scattered_writes_during_the_rounds_all_reach_the_last_image(
    spawner: Spawner, tracker: DirtyTracker, tmp_path: Path, rounds: str
) -> None:
    """A process that keeps writing scattered pages of a 128 MiB region (memhog's worker, a few
    thousand pages a second): two tracked rounds while it runs (pre-dumps, as pre-copy does, or
    dumps that leave it running, as a pair's checkpoints do), then a final dump that kills it.
    Restored through the chain, every page holds what the process last wrote. Before orthros's
    CRIU patch 0007 the pages after the point where a scan's report stopped kept the contents
    of an earlier round (scattered dirty pages make many report regions)."""
    from orthros_py.workloads.memhog import MemConn, tcp

    port = 7700 + (os.getpid() % 200)
    out = tmp_path / "memhog.out"
    with out.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "orthros_py.workloads.memhog", "--mib",
                                 "128", "--host", "127.0.0.1", "--port", str(port), "--rate",
                                 "5000"], stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    spawner.track(proc.pid)
    wait_for(lambda: "READY" in out.read_text(), timeout=60, what="memhog to fill its memory")
    prev: str | None = None
    for k in range(2):
        images = tmp_path / f"r{k}"
        opts = DumpOptions(pre_dump=rounds == "pre-dump", leave_running=rounds == "dump",
                           track_mem=True, parent_img=f"../{prev}" if prev else None)
        dump_tree(proc.pid, images, opts, dirty_track=tracker)
        prev = images.name
        time.sleep(0.3)  # the worker writes ~1,500 scattered pages meanwhile
    final = dump(proc.pid, tmp_path / "final", tracker, parent=f"../{prev}")
    assert final.stats is not None and final.stats.pages_skipped_parent > 0  # incremental
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    tracker.forget()
    restored = restore_tree(tmp_path / "final", RestoreOptions())
    spawner.track(restored.pid)
    try:
        with MemConn(tcp(("127.0.0.1", port)), timeout=60) as c:
            verdict = c.verify(timeout=120)
            assert verdict.ok and verdict.pages == 128 * 256, verdict.line()
            assert c.stat()["mismatches"] == 0
    finally:
        kill(restored.pid)
