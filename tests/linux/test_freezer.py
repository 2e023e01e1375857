"""The cgroup freezer on real processes (root): trees are brought into a group of their own (or
use theirs in place), freeze so that they really stop running, thaw so that they run again, are
killed, and their groups go away. Each test runs on cgroup v2 and on the v1 freezer, and skips
the one this host does not mount (``helpers.host_cgroups``: hybrid development VM, pure v2
users' hosts).

Every workload counts in a file of its own; a frozen one's count stops. No durations are
asserted (a shared 2-core machine): only what ran and what stopped. Processes and groups are
removed at the end, pass or fail; a frozen v1 task dies only once thawed, so groups are
thawed first.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import host_cgroups, wait_for

from orthros_py.cgroup.freezer import PREFIX, FreezeGroup, Stamp
from orthros_py.cgroup.fs import CgroupError
from orthros_py.errors import NoSuchProcessError
from orthros_py.proc.tree import ProcessRef, kill_tree, read_cgroups

# A tree of counters: the parent and two children each count in DIR/<name>, every 2 ms. The
# children die with the parent (PR_SET_PDEATHSIG). SIGUSR1 makes the parent fork one more
# counter ("extra-N"). With "forker", the parent instead forks up to 60 idle children, one
# every 2 ms, and counts in DIR/parent.
TREE = r"""
import ctypes, os, signal, sys, time
d, mode = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None)

def child(name):
    if os.fork() == 0:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(0)
        if name is None:
            while True:
                signal.pause()
        count(name)
        os._exit(0)

def count(name):
    fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT, 0o644)
    n = 0
    while True:
        n += 1
        os.pwrite(fd, b"%020d" % n, 0)
        if name == "parent" and extra:
            extra.pop()
            child("extra-%d" % len(os.listdir(d)))
        if mode == "forker" and name == "parent" and len(forked) < 60:
            forked.append(child(None))
        time.sleep(0.002)

extra, forked = [], []
signal.signal(signal.SIGUSR1, lambda *_: extra.append(1))
if mode == "counters":
    child("child1")
    child("child2")
count("parent")
"""


def counters(d: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in sorted(d.iterdir()):
        text = f.read_text().strip()
        if text.isdigit():
            out[f.name] = int(text)
    return out


class Tree:
    """A running TREE, its counter files in ``dir``."""

    def __init__(self, proc: subprocess.Popen[bytes], d: Path) -> None:
        self.proc, self.dir = proc, d

    @property
    def root(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """The root, then its descendants, as now."""
        kids = psutil.Process(self.root).children(recursive=True)
        return [self.root, *(k.pid for k in kids if k.status() != psutil.STATUS_ZOMBIE)]

    def counters(self) -> dict[str, int]:
        return counters(self.dir)


class Trees:
    """Starts trees and makes groups; ``cleanup`` thaws every group, kills every tree, and
    removes every group, each step tried even when an earlier one failed."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.refs: list[ProcessRef] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.groups: list[Path] = []

    def start(self, mode: str = "counters", expect: int = 3) -> Tree:
        d = self.tmp / f"tree-{len(self.procs)}"
        d.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", TREE, str(d), mode],
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        self.refs.append(ProcessRef.current(proc.pid))
        tree = Tree(proc, d)
        wait_for(lambda: len(tree.counters()) == expect and all(tree.counters().values()),
                 what=f"{expect} counters to start")
        return tree

    def track(self, path: Path) -> Path:
        self.groups.append(path)
        return path

    def cleanup(self) -> None:
        errors: list[str] = []
        for g in self.groups:
            for d in sorted(g.rglob("*/") if g.is_dir() else [], key=lambda p: len(p.parts)):
                _thaw(d)
            _thaw(g)
        # Every process in the groups, whatever tree it came from, and every tree.
        for g in self.groups:
            for d in [g, *(g.rglob("*/") if g.is_dir() else [])]:
                with contextlib.suppress(OSError):
                    for pid in (d / "cgroup.procs").read_text().split():
                        with contextlib.suppress(psutil.NoSuchProcess):
                            psutil.Process(int(pid)).kill()
        for ref in self.refs:
            kill_tree(ref)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for g in reversed(self.groups):
            for d in sorted([g, *(g.rglob("*/") if g.is_dir() else [])],
                            key=lambda p: -len(p.parts)):
                try:
                    wait_for(lambda d=d: not d.exists() or
                             not (d / "cgroup.procs").read_text().split(),
                             timeout=10, what=f"{d} to empty")
                    if d.exists():
                        d.rmdir()
                except (OSError, AssertionError) as err:
                    errors.append(f"{d}: {err}")
        if errors:
            raise AssertionError("left behind: " + "; ".join(errors))


def _thaw(d: Path) -> None:
    with contextlib.suppress(OSError):
        if (d / "cgroup.freeze").exists():
            (d / "cgroup.freeze").write_text("0")
        elif (d / "freezer.state").exists():
            (d / "freezer.state").write_text("THAWED")


@pytest.fixture
def trees(tmp_path: Path) -> Iterator[Trees]:
    t = Trees(tmp_path)
    try:
        yield t
    finally:
        t.cleanup()


@pytest.fixture(params=[2, 1], ids=["v2", "v1"])
def hier(request: pytest.FixtureRequest) -> tuple[int, str, Path]:
    """(version, hierarchy name in /proc/PID/cgroup, mount point), or a skip saying why."""
    v1, v2 = host_cgroups()
    if request.param == 2:
        if v2 is None or not (v2 / "cgroup.procs").exists():
            pytest.skip("no cgroup2 hierarchy on this host")
        return 2, "", v2
    if "freezer" not in v1:
        pytest.skip("no cgroup v1 freezer hierarchy on this host (pure cgroup v2?)")
    return 1, "freezer", v1["freezer"]


def label() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def group_of(pid: int, name: str) -> str:
    return read_cgroups(pid)[name]


def assert_ordered(st: Stamp) -> None:
    assert st.requested_ns <= st.written_ns <= st.settled_ns, st


def assert_stopped(tree: Tree) -> dict[str, int]:
    """The tree's counters do not move while it is frozen."""
    before = tree.counters()
    time.sleep(0.3)
    assert tree.counters() == before
    return before


def wait_all_advance(tree: Tree, since: dict[str, int]) -> None:
    wait_for(lambda: all(tree.counters()[k] > v for k, v in since.items()), timeout=60,
             what="every counter to count again")


def test_owned_group_freezes_thaws_and_goes(trees: Trees, hier: tuple[int, str, Path]) -> None:
    version, name, mount = hier
    tree = trees.start()
    pids = tree.pids()
    assert len(pids) == 3
    homes = {p: group_of(p, name) for p in pids}
    lab = label()
    group = FreezeGroup.for_tree(pids, lab, version=version)
    trees.track(group.path)

    assert group.owned and group.version == version
    assert group.path == mount / homes[pids[0]].lstrip("/") / (PREFIX + lab)
    assert sorted(group.pids()) == sorted(pids)
    assert {p: group_of(p, name) for p in pids} == \
        {p: "/" + str(group.path.relative_to(mount)) for p in pids}
    assert group.to_dict() == {"path": str(group.path), "version": version, "owned": True}
    same = FreezeGroup.of_process(pids[1], version=version)
    assert (same.path, same.version, same.owned) == (group.path, version, True)
    again = FreezeGroup.at(group.path, owned=True)
    assert (again.path, again.version) == (group.path, version)

    assert not group.is_frozen()
    frozen = group.freeze()
    assert_ordered(frozen)
    assert group.is_frozen()
    stopped = assert_stopped(tree)
    assert set(stopped) == {"parent", "child1", "child2"}

    thawed = group.thaw()
    assert_ordered(thawed)
    assert frozen.settled_ns <= thawed.requested_ns
    assert thawed.to_dict() == {"requested_ns": thawed.requested_ns,
                                "written_ns": thawed.written_ns,
                                "settled_ns": thawed.settled_ns}
    assert not group.is_frozen()
    wait_all_advance(tree, stopped)

    group.freeze()  # release thaws a frozen group before moving its processes out
    group.release()
    assert not group.path.exists()
    assert {p: group_of(p, name) for p in pids} == homes
    wait_all_advance(tree, tree.counters())
    group.release()  # twice: nothing left to do


def test_tree_in_its_own_group_is_used_in_place(
        trees: Trees, hier: tuple[int, str, Path]) -> None:
    version, _, mount = hier
    tree = trees.start()
    own = trees.track(mount / f"orthros-test-{uuid.uuid4().hex[:8]}")
    own.mkdir()
    pids = tree.pids()
    for pid in pids:
        (own / "cgroup.procs").write_text(str(pid))

    group = FreezeGroup.for_tree(pids, label(), version=version)
    assert (group.path, group.owned, group.version) == (own, False, version)
    assert sorted(group.pids()) == sorted(pids)
    assert not any(own.glob(PREFIX + "*"))
    found = FreezeGroup.of_process(pids[0], version=version)
    assert (found.path, found.owned) == (own, False)

    group.freeze()
    stopped = assert_stopped(tree)
    group.release()  # thaws, and leaves the group and its processes where they are
    assert own.is_dir()
    assert sorted(int(p) for p in (own / "cgroup.procs").read_text().split()) == sorted(pids)
    assert not group.is_frozen()
    wait_all_advance(tree, stopped)


def test_tree_spread_over_groups_is_brought_together(
        trees: Trees, hier: tuple[int, str, Path]) -> None:
    version, name, mount = hier
    tree = trees.start()
    pids = tree.pids()
    home = group_of(pids[0], name)
    aside = trees.track(mount / f"orthros-test-{uuid.uuid4().hex[:8]}")
    aside.mkdir()
    (aside / "cgroup.procs").write_text(str(pids[2]))  # one child elsewhere

    group = FreezeGroup.for_tree(pids, label(), version=version)
    trees.track(group.path)
    assert group.owned and sorted(group.pids()) == sorted(pids)
    group.freeze()
    stopped = assert_stopped(tree)
    group.release()
    # Back to the root's group, the parent of the one made: the root's home.
    assert {group_of(p, name) for p in pids} == {home}
    wait_all_advance(tree, stopped)


def test_a_child_forked_after_listing_is_caught(
        trees: Trees, hier: tuple[int, str, Path]) -> None:
    version, _, _ = hier
    tree = trees.start()
    stale = tree.pids()
    tree.proc.send_signal(signal.SIGUSR1)  # the tree forks right before
    wait_for(lambda: len(tree.pids()) == 4 and len(tree.counters()) == 4,
             what="the fourth counter")
    (new,) = set(tree.pids()) - set(stale)

    group = FreezeGroup.for_tree(stale, label(), version=version)
    trees.track(group.path)
    assert group.owned and new in group.pids()
    assert sorted(group.pids()) == sorted(tree.pids())
    group.freeze()
    assert len(assert_stopped(tree)) == 4
    group.release()
    assert not group.path.exists()


def test_a_tree_forking_meanwhile_is_caught_whole(
        trees: Trees, hier: tuple[int, str, Path]) -> None:
    version, _, _ = hier
    tree = trees.start("forker", expect=1)
    group = FreezeGroup.for_tree(tree.pids(), label(), version=version)
    trees.track(group.path)
    group.freeze()
    # Frozen: no more forks. Not one process of the tree escaped the group.
    everyone = tree.pids()
    held = group.pids()
    assert set(everyone) <= set(held), set(everyone) - set(held)
    assert_stopped(tree)
    group.kill()
    assert group.pids() == []
    group.release()
    assert not group.path.exists()


def test_kill_empties_a_frozen_group(trees: Trees, hier: tuple[int, str, Path]) -> None:
    version, _, _ = hier
    tree = trees.start()
    pids = tree.pids()
    group = FreezeGroup.for_tree(pids, label(), version=version)
    trees.track(group.path)
    group.freeze()
    assert group.is_frozen()
    group.kill()
    assert group.pids() == []
    assert tree.proc.wait(timeout=30) == -signal.SIGKILL
    wait_for(lambda: not any(psutil.pid_exists(p) for p in pids[1:]),
             what="the children to be gone")
    group.release()
    assert not group.path.exists()
    group.release()


def test_bad_labels_and_missing_processes_are_refused(
        trees: Trees, hier: tuple[int, str, Path]) -> None:
    version, name, mount = hier
    tree = trees.start()
    for bad in ("Upper", "under_score", "dot.ted", "", "x" * 49, "sp ace", "ünï"):
        with pytest.raises(ValueError):
            FreezeGroup.for_tree(tree.pids(), bad, version=version)
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    lab = label()
    with pytest.raises(NoSuchProcessError):
        FreezeGroup.for_tree([pid_max + 1], lab, version=version)
    with pytest.raises(NoSuchProcessError):
        FreezeGroup.for_tree([tree.root, pid_max + 1], lab, version=version)
    home = mount / group_of(tree.root, name).lstrip("/")
    assert not (home / (PREFIX + lab)).exists()  # refused before making anything
    with pytest.raises(CgroupError):
        FreezeGroup.at(mount / f"orthros-test-{uuid.uuid4().hex[:8]}", owned=True)
    with pytest.raises(CgroupError):
        FreezeGroup.at(tree.dir, owned=False)  # a directory, not a group

    # A hierarchy's root group cannot be frozen.
    with pytest.raises(CgroupError):
        FreezeGroup.at(mount, owned=False).freeze()

    group = FreezeGroup.for_tree(tree.pids(), label(), version=version)
    trees.track(group.path)
    group.release()
    group.release()
    assert not group.path.exists()
    # A group gone already is fine to release; freezing it is an error.
    gone = FreezeGroup(group.path, version, owned=True)
    gone.release()
    with pytest.raises(CgroupError):
        gone.freeze()
