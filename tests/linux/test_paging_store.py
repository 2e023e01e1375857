"""The paging standby's store with real CRIU and a real tmpfs (root): incremental dumps of a
service whose hot set is a known fraction of its memory, committed into a ``PagingStore``; the
tmpfs holds about the hot set, the disk base the rest (out of the page cache); generations age
out of the window into the base; then the service is lost and restored lazily from the store
(the hot pages placed first, the cold ones from disk by CRIU's lazy-pages daemon), answers, and
every one of its pages checks out. The same image restored eagerly answers too (the figures are
printed, never asserted).

The workload is ``orthros_py.workloads.memhog``: N MiB in a checksummed pattern, a worker
rewriting a hot fraction of it, PING/STAT/VERIFY over TCP. The window's clock is the test's
(one "second" per generation), so which generations are young does not depend on this machine's
speed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import Spawner

from orthros_py.agent.pair.tiers import PagingStore
from orthros_py.checkpoint import dump_tree, restore_tree
from orthros_py.criu import dirtytrack
from orthros_py.criu.imagechain import verify
from orthros_py.criu.lazy import LazyPagesDaemon
from orthros_py.criu.request import DumpOptions, RestoreOptions
from orthros_py.workloads.memhog import PAGE, MemConn, tcp, wait_ready

MIB = 64
HOT = 0.25
WINDOW = 3.0  # generations (one test "second" each)
GENERATIONS = 8


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def first_reply(port: int, timeout: float = 60.0) -> None:
    """Until the service answers a PING (connecting again until it listens)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with MemConn(tcp(("127.0.0.1", port), timeout=timeout)) as c:
                c.ping()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def reap(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)  # restored as our child (rst_sibling): its pid is free again


def test_hot_pages_in_memory_cold_on_disk_and_a_lazy_restore(spawner: Spawner,
                                                             tmp_path: Path) -> None:
    log = tmp_path / "memhog.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orthros_py.workloads.memhog", "--mib", str(MIB),
             "--port", "0", "--hot-fraction", str(HOT), "--hot-layout", "spread",
             "--rate", "40000"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    spawner.track(proc.pid)
    pid, port = wait_ready(log, timeout=60, alive=lambda: proc.poll() is None)
    clock = Clock()
    store = PagingStore(tmp_path / "images", "svc", hot_window=WINDOW, clock=clock)
    tracker = dirtytrack.DirtyTracker()
    region = MIB << 20
    try:
        for k in range(1, GENERATIONS + 1):
            clock.t += 1
            prev = store.latest()
            d = store.begin(k, incremental=prev is not None)
            dump_tree(pid, d, DumpOptions(leave_running=True, track_mem=True,
                                          parent_img=f"../{prev.dir}" if prev else None),
                      dirty_track=tracker)
            tracker.collect()
            store.commit(k, prune=False)
            store.prune()
            s = store.tier_stats()
            print(f"generation {k}: hot {s.hot_pages} pages, tmpfs {s.tmpfs_bytes >> 10} KiB, "
                  f"disk {s.disk_bytes >> 10} KiB (cached {s.disk_cached_bytes >> 10} KiB), "
                  f"young {s.young_generations} on base {s.base_generation}, aged in place "
                  f"{s.aged_in_place}, by merge {s.aged_by_merge}")
            time.sleep(0.3)  # the worker writes its hot set meanwhile
        s = store.tier_stats()
        hot_set = HOT * region
        # The hot set is in memory, and about nothing else: the service's hot fraction plus
        # what the interpreter wrote (its heap, the thread stacks).
        assert s.young_generations == WINDOW + 1 or s.young_generations == WINDOW
        assert s.aged_in_place + s.aged_by_merge == GENERATIONS - 2 - WINDOW
        assert s.hot_bytes >= 0.8 * hot_set, s
        assert s.tmpfs_bytes >= s.hot_bytes  # every hot page in the tmpfs...
        assert s.tmpfs_bytes <= s.hot_bytes + 64 * PAGE * s.young_generations  # ...once
        assert s.memory_bytes <= hot_set + 0.1 * region, s
        assert s.disk_cached_bytes <= 0.05 * region, s
        assert s.disk_bytes >= region  # the base holds the whole memory
        print(f"hot set {hot_set / 2**20:.1f} MiB; standby memory {s.memory_bytes / 2**20:.1f} "
              f"MiB (tmpfs {s.tmpfs_bytes / 2**20:.1f}, cache "
              f"{s.disk_cached_bytes / 2**20:.1f}); disk {s.disk_bytes / 2**20:.1f} MiB")

        # The service is lost; its state at the last generation comes back lazily.
        proc.kill()
        proc.wait(10)
        latest = store.latest()
        assert latest is not None
        top = store.root / latest.dir
        verify(top)
        with store.reading():
            plan = store.prepare_lazy(top)
        assert plan["lazy_pages"] > 0.5 * region / PAGE, plan  # the cold ones
        assert plan["eager_pages"] >= 0.8 * hot_set / PAGE, plan  # the hot ones
        t0 = time.perf_counter()
        daemon = LazyPagesDaemon(Path(plan["view"]), log_level=3).start()
        try:
            restored = restore_tree(top, RestoreOptions(lazy_pages=True))
        except BaseException:
            daemon.stop()
            raise
        spawner.track(restored.pid)
        assert restored.pid == pid
        restore_s = time.perf_counter() - t0
        first_reply(port)
        lazy_first = time.perf_counter() - t0
        res = daemon.wait(timeout=300)
        with MemConn(tcp(("127.0.0.1", port))) as c:
            after = c.stat()
            checked = c.verify()
        assert res.stats.complete and res.stats.total == plan["lazy_pages"], res
        assert checked.ok and checked.pages == region // PAGE, checked
        assert after["mismatches"] == 0  # the worker found every hot page as it left it
        print(f"lazy restore: first PONG after {lazy_first * 1000:.0f} ms (restore "
              f"{restore_s * 1000:.0f} ms); {plan['eager_pages']} pages placed first, "
              f"{res.stats.total} lazy: all in after {res.elapsed_ms:.0f} ms "
              f"({res.stats.faulted} on fault, {res.stats.pushed} pushed)")
        reap(restored.pid)

        # The same generation restored eagerly: the comparison the benchmark makes.
        t0 = time.perf_counter()
        eager = restore_tree(top, RestoreOptions())
        spawner.track(eager.pid)
        first_reply(port)
        eager_first = time.perf_counter() - t0
        with MemConn(tcp(("127.0.0.1", port))) as c:
            assert c.verify().ok
        print(f"eager restore of the same generation: first PONG after "
              f"{eager_first * 1000:.0f} ms")
        reap(eager.pid)
    finally:
        spawner.cleanup()
        tracker.close()
        store.destroy()
    assert not any((tmp_path / "images").iterdir())


def test_pages_only_read_stay_cold_and_are_faulted_in_after_a_restore(
        spawner: Spawner, tmp_path: Path) -> None:
    """The stated limitation, measured: a service that only *reads* its hot set leaves the
    standby's hot set (nearly) empty, and after a lazy restore those pages come on fault."""
    mib = 32
    log = tmp_path / "memhog.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orthros_py.workloads.memhog", "--mib", str(mib),
             "--port", "0", "--hot-fraction", "0.5", "--read-only-hot", "--rate", "40000"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    spawner.track(proc.pid)
    pid, port = wait_ready(log, timeout=60, alive=lambda: proc.poll() is None)
    clock = Clock()
    store = PagingStore(tmp_path / "images", "svc", hot_window=WINDOW, clock=clock)
    tracker = dirtytrack.DirtyTracker()
    region = mib << 20
    try:
        for k in range(1, 5):
            clock.t += 1
            prev = store.latest()
            d = store.begin(k, incremental=prev is not None)
            dump_tree(pid, d, DumpOptions(leave_running=True, track_mem=True,
                                          parent_img=f"../{prev.dir}" if prev else None),
                      dirty_track=tracker)
            tracker.collect()
            store.commit(k, prune=False)
            store.prune()
            time.sleep(0.3)
        s = store.tier_stats()
        print(f"\nread-only hot set of {0.5 * region / 2**20:.0f} MiB: the standby's hot set "
              f"{s.hot_bytes / 2**20:.2f} MiB, tmpfs {s.tmpfs_bytes / 2**20:.2f} MiB")
        assert s.hot_bytes < 0.1 * region, s  # only what the interpreter wrote
        proc.kill()
        proc.wait(10)
        latest = store.latest()
        assert latest is not None
        top = store.root / latest.dir
        with store.reading():
            plan = store.prepare_lazy(top)
        daemon = LazyPagesDaemon(Path(plan["view"]), log_level=3).start()
        try:
            restored = restore_tree(top, RestoreOptions(lazy_pages=True))
        except BaseException:
            daemon.stop()
            raise
        spawner.track(restored.pid)
        res = daemon.wait(timeout=300)
        with MemConn(tcp(("127.0.0.1", port))) as c:
            assert c.verify().ok
            assert c.stat()["mismatches"] == 0
        assert res.stats.complete, res
        print(f"after the restore: {res.stats.total} lazy pages, {res.stats.faulted} of them "
              f"on fault (the worker reading its cold hot set), {res.stats.pushed} pushed, "
              f"all in after {res.elapsed_ms:.0f} ms")
        reap(restored.pid)
    finally:
        spawner.cleanup()
        tracker.close()
        store.destroy()
