"""The cgroup freezer: stop every process of a group at one instant and let them run again at
one instant. cgroup v2's ``cgroup.freeze``/``cgroup.events``/``cgroup.kill`` where a cgroup2
hierarchy is mounted (and its groups can freeze), else the v1 ``freezer`` hierarchy's
``freezer.state``.

``orthros sync`` freezes trees here, has CRIU dump them through its ``freeze_cgroup`` option
(CRIU leaves the group frozen), and resumes restored trees by thawing their groups together.
A tree that shares its group with others is first moved into a group of its own.

Needs root (or write access to the groups, as a delegated v2 subtree gives). Processes and
their groups come from psutil and /proc/PID/cgroup; no program is run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psutil

from orthros_py.cgroup.fs import CgroupError, mounts, remove_dirs, wait_empty
from orthros_py.cgroup.model import V2
from orthros_py.errors import NoSuchProcessError
from orthros_py.proc.tree import read_cgroups

PREFIX = "orthros-sync-"  # groups this module creates are named PREFIX + label
_LABEL = re.compile(r"[a-z0-9-]{1,48}")

# v1 freezer.state values.
_FROZEN, _FREEZING, _THAWED = "FROZEN", "FREEZING", "THAWED"
_FREEZER_FILES = ("cgroup.freeze", "cgroup.events", "freezer.state")
# v1 can stall in FREEZING (a task frozen while holding what another, not freezable in that
# wait, needs): write FROZEN again this often, and thaw and refreeze this often, as CRIU does.
_V1_REWRITE_S = 0.01
_V1_CYCLE_S = 1.0
# Moving a tree that keeps forking: give up after this long rather than chase it for ever.
_MOVE_TIMEOUT_S = 10.0


def _now() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


@dataclass(frozen=True)
class Stamp:
    """When a freeze or thaw happened, on this host's CLOCK_REALTIME, in ns."""

    requested_ns: int  # read just before the write to cgroup.freeze / freezer.state
    written_ns: int  # just after the write returned
    settled_ns: int  # when the group was seen frozen (or thawed)

    def to_dict(self) -> dict[str, int]:
        return {"requested_ns": self.requested_ns, "written_ns": self.written_ns,
                "settled_ns": self.settled_ns}


def check_label(label: str) -> str:
    """``label`` if it can name a group (PREFIX + label), else ValueError."""
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise ValueError(f"a freeze group label is 1 to 48 of a-z, 0-9 and '-', not {label!r}")
    return label


def v2_events_frozen(text: str) -> bool | None:
    """The ``frozen`` field of a v2 cgroup.events (None if absent)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "frozen":
            return value.strip() == "1"
    return None


def kernel_at_least(release: str, want: tuple[int, int]) -> bool:
    """Whether a kernel release string ("6.1.0-18-amd64") is at least ``want`` (major, minor)."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= want


def _v2_freezes(mount: Path) -> bool:
    """Whether this v2 hierarchy's groups have cgroup.freeze (Linux 5.2, or a backport): an
    existing group says; without one, the kernel's version."""
    with contextlib.suppress(OSError), os.scandir(mount) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                return os.path.exists(os.path.join(entry.path, "cgroup.freeze"))
    return kernel_at_least(os.uname().release, (5, 2))


def _hierarchy(version: int | None = None) -> tuple[int, str, Path]:
    """(version, hierarchy name as /proc/PID/cgroup gives it, mount point) of the hierarchy to
    freeze in: v2 when mounted and able to freeze, else v1's freezer. ``version`` forces one."""
    if version not in (None, 1, 2):
        raise ValueError(f"cgroup version is 1 or 2, not {version!r}")
    ms = mounts()
    if version in (None, 2) and V2 in ms and _v2_freezes(ms[V2]):
        return 2, V2, ms[V2]
    if version in (None, 1):
        for name, mount in ms.items():
            if "freezer" in name.split(","):
                return 1, name, mount
    wanted = {None: "a cgroup v2 hierarchy with cgroup.freeze nor a v1 freezer hierarchy",
              2: "a cgroup v2 hierarchy with cgroup.freeze", 1: "a cgroup v1 freezer hierarchy"}
    raise CgroupError(f"this host has no {wanted[version]}",
                      hint="mount cgroup2 (Linux 5.2 or later) or the v1 freezer controller")


def _group_of(pid: int, name: str, mount: Path) -> Path:
    """The directory of the group ``pid`` is in, in hierarchy ``name`` mounted at ``mount``."""
    rel = read_cgroups(pid).get(name)
    if rel is None:
        if not psutil.pid_exists(pid):
            raise NoSuchProcessError(f"no process with pid {pid} exists", pid=pid)
        raise CgroupError(f"process {pid} is in no group of the cgroup hierarchy at {mount}",
                          pid=pid)
    return mount / rel.removesuffix(" (deleted)").lstrip("/")


def _is_zombie(pid: int) -> bool:
    """Gone or a zombie: neither is listed in cgroup.procs nor can be moved (the kernel takes a
    zombie's pid written there without a word, and moves nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _tree(pids: Sequence[int]) -> list[int]:
    """``pids`` and the descendants of each, as they are now, root first, without duplicates;
    those gone meanwhile are left out. NoSuchProcessError if the root is gone."""
    out: dict[int, None] = {}
    for i, pid in enumerate(pids):
        if pid in out:
            continue
        try:
            proc = psutil.Process(pid)
            # One scan of /proc per given process not already found below the root (normally
            # only the root's): a tree is every process below it.
            out.update(dict.fromkeys([pid, *(c.pid for c in proc.children(recursive=True))]))
        except psutil.NoSuchProcess as err:
            if i == 0:
                raise NoSuchProcessError(f"process {pid} exited", pid=pid) from err
    return list(out)


def _raise_write(path: Path, what: str, err: OSError) -> NoReturn:
    """A CgroupError, one sentence with a hint, for a failed write to a group's file."""
    group = path.parent
    if err.errno in (errno.ENOENT, errno.ENODEV):
        raise CgroupError(f"cgroup {group} no longer exists") from err
    if err.errno == errno.EBUSY and path.name == "cgroup.procs":
        raise CgroupError(
            f"cannot move {what} into cgroup {group}: it has controllers enabled for its "
            f"children, so it may hold no process itself",
            hint=f"clear {group / 'cgroup.subtree_control'} or use a leaf group") from err
    if err.errno == errno.EOPNOTSUPP:
        raise CgroupError(
            f"cannot move {what} into cgroup {group}: it is a threaded (or invalid) group that "
            f"takes no whole process", hint=f"see {group / 'cgroup.type'}") from err
    if err.errno in (errno.EACCES, errno.EPERM):
        raise CgroupError(f"not permitted to write {what} to {path}",
                          hint="run as root, or delegate the cgroup subtree") from err
    raise CgroupError(f"cannot write {what} to {path}: {err.strerror}") from err


def _read_fd(fd: int) -> str:
    # A cgroup file is regenerated on every read from offset 0: one open file serves a poll.
    return os.pread(fd, 4096, 0).decode(errors="replace")


def _pause(started: float) -> None:
    """Sleep between polls: 0.2 ms for the first millisecond (a small group settles in tens of
    microseconds), then 1 ms."""
    time.sleep(0.0002 if time.monotonic() - started < 0.001 else 0.001)


@contextlib.contextmanager
def _opened(path: Path, flags: int) -> Iterator[int]:
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENODEV):
            if not path.parent.is_dir():
                raise CgroupError(f"cgroup {path.parent} no longer exists") from err
            if path.name in _FREEZER_FILES:
                raise CgroupError(f"cgroup {path.parent} has no {path.name}: it cannot be frozen",
                                  hint="a hierarchy's root group cannot be frozen; "
                                       "cgroup v2 freezes from Linux 5.2 on") from err
            raise CgroupError(f"{path.parent} is not a cgroup (it has no {path.name})") from err
        raise CgroupError(f"cannot open {path}: {err.strerror}",
                          hint="run as root, or delegate the cgroup subtree") from err
    try:
        yield fd
    finally:
        os.close(fd)


def _write_fd(fd: int, path: Path, value: bytes) -> None:
    try:
        os.write(fd, value)
    except OSError as err:
        _raise_write(path, repr(value.decode()), err)


def _freezable(d: Path, version: int) -> bool:
    return (d / ("cgroup.freeze" if version == 2 else "freezer.state")).exists()


@dataclass
class FreezeGroup:
    """A cgroup whose processes freeze and thaw together."""

    path: Path  # the group's directory
    version: int  # 1 or 2
    owned: bool  # created by this module (removed by release), or a tree's own group in place

    # -- finding -------------------------------------------------------------------------------

    @classmethod
    def for_tree(cls, pids: Sequence[int], label: str, *,
                 version: int | None = None) -> FreezeGroup:
        """A group holding exactly ``pids`` (a process tree, root first) and whatever they
        fork. The tree root's group is used in place (owned=False) when it is not the
        hierarchy's root and its subtree holds exactly the tree; otherwise a child group
        PREFIX+label is made under it and every process of the tree moved there (owned=True).

        ``version`` (1 or 2) forces a hierarchy; by default v2 when it can freeze, else v1.
        ValueError for a bad label, NoSuchProcessError for a pid that is gone, CgroupError when
        the processes cannot be brought together or the group cannot be frozen."""
        check_label(label)
        if not pids:
            raise ValueError("no processes to freeze")
        for pid in pids:
            if not psutil.pid_exists(pid):
                raise NoSuchProcessError(f"no process with pid {pid} exists", pid=pid)
        if _is_zombie(pids[0]):
            raise NoSuchProcessError(f"process {pids[0]} has exited", pid=pids[0])
        ver, name, mount = _hierarchy(version)
        home = _group_of(pids[0], name, mount)
        if home != mount and _freezable(home, ver):
            group = cls(home, ver, owned=False)
            held = set(group.pids())
            tree = set(_tree(pids))
            # Compared both ways, the tree listed after the group: a child forked in between
            # is in the tree and, born in its parent's group, in the group's subtree too.
            if held <= tree and all(p in held or _is_zombie(p) or _within(p, name, mount, home)
                                    for p in tree):
                return group
        return cls._make(home, ver, name, mount, pids, label)

    @classmethod
    def _make(cls, parent: Path, ver: int, name: str, mount: Path, pids: Sequence[int],
              label: str) -> FreezeGroup:
        """Make (or reuse, if a previous run left it empty) PREFIX+label under ``parent`` and
        move the tree into it; on failure, move back what was moved and remove what was made."""
        d = parent / (PREFIX + label)
        made = False
        try:
            d.mkdir()
            made = True
        except FileExistsError:
            pass
        except OSError as err:
            raise CgroupError(f"cannot create cgroup {d}: {err.strerror}",
                              hint="run as root; on cgroup v2 the group may be at "
                                   "cgroup.max.depth or cgroup.max.descendants") from err
        group = cls(d, ver, owned=True)
        moved: dict[int, Path] = {}
        try:
            if not _freezable(d, ver):
                raise CgroupError(f"cgroup {d} cannot be frozen (it has no "
                                  f"{'cgroup.freeze' if ver == 2 else 'freezer.state'})",
                                  hint="cgroup v2 freezes from Linux 5.2 on")
            if not made:
                tree = set(_tree(pids))
                strangers = [p for p in group.pids() if p not in tree]
                if strangers:
                    raise CgroupError(f"cgroup {d} already exists and holds other processes "
                                      f"({', '.join(map(str, strangers[:5]))})",
                                      hint="pick another label, or release that group first")
                if group._self_frozen():
                    if group.pids():
                        raise CgroupError(f"cgroup {d} already exists and is frozen",
                                          hint="release it first")
                    group.thaw()  # empty: a leftover; anything moved in must not stop
            group._gather(pids, name, mount, moved)
        except BaseException:
            group._undo(moved)
            if made:
                remove_dirs([d])
            raise
        return group

    def _gather(self, pids: Sequence[int], name: str, mount: Path,
                moved: dict[int, Path]) -> None:
        """Move the tree in, listing it again until a pass finds nothing new outside: it may
        fork meanwhile, and a child forked before its parent moved stays where it was born.
        ``moved`` gets each moved pid's former group."""
        deadline = time.monotonic() + _MOVE_TIMEOUT_S
        procs = self.path / "cgroup.procs"
        with _opened(procs, os.O_WRONLY) as fd:
            while True:
                held = set(self.pids())
                todo = [p for p in _tree(pids) if p not in held and not _is_zombie(p)]
                if not todo:
                    return
                if time.monotonic() > deadline:
                    raise CgroupError(f"process tree {pids[0]} kept forking new processes "
                                      f"faster than they could be moved into {self.path}",
                                      pid=pids[0])
                for pid in todo:
                    if pid not in moved:
                        with contextlib.suppress(NoSuchProcessError, CgroupError):
                            moved[pid] = _group_of(pid, name, mount)
                    try:
                        # One pid per write: the kernel takes one.
                        os.write(fd, b"%d" % pid)
                    except OSError as err:
                        if err.errno == errno.ESRCH:
                            continue  # exited meanwhile
                        _raise_write(procs, f"process {pid}", err)

    def _undo(self, moved: dict[int, Path]) -> None:
        """Put moved processes back where they were (best effort: a failure is already being
        reported)."""
        for pid, home in moved.items():
            with contextlib.suppress(OSError):
                (home / "cgroup.procs").write_text(str(pid))

    @classmethod
    def of_process(cls, pid: int, *, version: int | None = None) -> FreezeGroup:
        """The group ``pid`` is in now (in the hierarchy for_tree would choose); owned=True when
        its name starts with PREFIX (a restore recreated it), else False."""
        ver, name, mount = _hierarchy(version)
        d = _group_of(pid, name, mount)
        return cls(d, ver, owned=d != mount and d.name.startswith(PREFIX))

    @classmethod
    def at(cls, path: Path | str, *, owned: bool) -> FreezeGroup:
        """Re-open a group by path (version from the files it has); CgroupError if not a
        group."""
        d = Path(path)
        if not (d / "cgroup.procs").is_file():
            raise CgroupError(f"{d} is not a cgroup (it has no cgroup.procs)")
        # cgroup.controllers is v2's alone.
        return cls(d, 2 if (d / "cgroup.controllers").exists() else 1, owned=owned)

    # -- reading -------------------------------------------------------------------------------

    def _dirs(self) -> list[Path]:
        """This group's directory and its descendants', parents first (freezing, like killing,
        takes the whole subtree)."""
        out = [self.path]
        for top, names, _ in os.walk(self.path):
            names.sort()
            out.extend(Path(top, n) for n in names)
        return out

    def pids(self) -> list[int]:
        """The processes in the group (cgroup.procs; those of groups below it after)."""
        if not self.path.is_dir():
            raise CgroupError(f"cgroup {self.path} no longer exists")
        out: dict[int, None] = {}
        for d in self._dirs():
            try:
                text = (d / "cgroup.procs").read_text()
            except FileNotFoundError:
                continue  # a subgroup removed while we walked
            except OSError as err:
                raise CgroupError(f"cannot read {d / 'cgroup.procs'}: {err.strerror}") from err
            out.update(dict.fromkeys(int(x) for x in text.split()))
        return list(out)

    def _read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text().strip()
        except OSError:
            return None

    def is_frozen(self) -> bool:
        """Whether every process in it is frozen now (by this group's freeze or a parent's)."""
        if self.version == 2:
            return v2_events_frozen(self._read("cgroup.events") or "") is True
        return self._read("freezer.state") == _FROZEN

    def _self_frozen(self) -> bool:
        """Whether this group itself is told to freeze (frozen or on the way), as opposed to
        being frozen by a parent, which thawing this one cannot change."""
        if self.version == 2:
            return self._read("cgroup.freeze") == "1"
        self_freezing = self._read("freezer.self_freezing")
        if self_freezing is not None:
            return self_freezing == "1"
        return (self._read("freezer.state") or _THAWED) != _THAWED

    # -- freezing ------------------------------------------------------------------------------

    def freeze(self, timeout: float = 5.0, *, before: Callable[[], object] | None = None
               ) -> Stamp:
        """Freeze every process in the group (and in groups below it); returns when all are.
        CgroupError if they are not within ``timeout`` s, and the group is then left thawed.

        On v1, a freeze that stalls is thawed and written again each second (as CRIU does):
        the stamp's requested/written times are then those of the last write from thawed."""
        if self.version == 2:
            return self._set_v2(True, timeout, before)
        return self._freeze_v1(timeout, before)

    def thaw(self, timeout: float = 5.0, *, before: Callable[[], object] | None = None
             ) -> Stamp:
        """Let every process in the group run again; returns once the group is seen thawed.
        CgroupError if it is not within ``timeout`` s (a frozen parent group keeps it frozen)."""
        if self.version == 2:
            return self._set_v2(False, timeout, before)
        return self._thaw_v1(timeout, before)

    def _set_v2(self, frozen: bool, timeout: float,
                before: Callable[[], object] | None = None) -> Stamp:
        ctl = self.path / "cgroup.freeze"
        with _opened(ctl, os.O_WRONLY) as wfd, \
                _opened(self.path / "cgroup.events", os.O_RDONLY) as rfd:
            if before is not None:
                before()  # e.g. the wait for an instant: the files are open by then
            requested = _now()
            _write_fd(wfd, ctl, b"1" if frozen else b"0")
            written = _now()
            # v2 freezes asynchronously: each task stops on its way back to user space.
            settled = self._poll(lambda: v2_events_frozen(_read_fd(rfd)) is frozen, timeout)
            if settled is None:
                if frozen:
                    with contextlib.suppress(OSError):
                        os.write(wfd, b"0")
                self._timed_out(frozen, timeout)
            return Stamp(requested, written, settled)

    def _freeze_v1(self, timeout: float, before: Callable[[], object] | None = None) -> Stamp:
        ctl = self.path / "freezer.state"
        frozen, thawed = _FROZEN.encode(), _THAWED.encode()
        with _opened(ctl, os.O_WRONLY) as wfd, _opened(ctl, os.O_RDONLY) as rfd:
            if before is not None:
                before()
            requested = _now()
            _write_fd(wfd, ctl, frozen)
            written = _now()
            started = last_write = cycle = time.monotonic()
            deadline = started + timeout
            while True:
                # Reading freezer.state is what moves it from FREEZING to FROZEN.
                state = _read_fd(rfd).strip()
                if state == _FROZEN:
                    return Stamp(requested, written, _now())
                t = time.monotonic()
                if t >= deadline:
                    with contextlib.suppress(OSError):
                        os.write(wfd, thawed)
                    self._timed_out(True, timeout)
                if t - cycle >= _V1_CYCLE_S:
                    # Let whatever blocks the freeze finish, then freeze from scratch.
                    _write_fd(wfd, ctl, thawed)
                    requested = _now()
                    _write_fd(wfd, ctl, frozen)
                    written = _now()
                    last_write = cycle = time.monotonic()
                elif t - last_write >= _V1_REWRITE_S or state == _THAWED:
                    # Freezes tasks that were in a wait that cannot freeze and left it.
                    _write_fd(wfd, ctl, frozen)
                    last_write = time.monotonic()
                _pause(started)

    def _thaw_v1(self, timeout: float, before: Callable[[], object] | None = None) -> Stamp:
        ctl = self.path / "freezer.state"
        with _opened(ctl, os.O_WRONLY) as wfd, _opened(ctl, os.O_RDONLY) as rfd:
            if before is not None:
                before()
            requested = _now()
            _write_fd(wfd, ctl, _THAWED.encode())
            written = _now()
            settled = self._poll(lambda: _read_fd(rfd).strip() == _THAWED, timeout)
            if settled is None:
                self._timed_out(False, timeout)
            return Stamp(requested, written, settled)

    @staticmethod
    def _poll(done: Callable[[], bool], timeout: float) -> int | None:
        """The time ``done()`` was first seen true, or None after ``timeout`` s."""
        started = time.monotonic()
        while True:
            if done():
                return _now()
            if time.monotonic() - started >= timeout:
                return None
            _pause(started)

    def _timed_out(self, freezing: bool, timeout: float) -> NoReturn:
        if not self.path.is_dir():
            raise CgroupError(f"cgroup {self.path} no longer exists")
        if not freezing:
            raise CgroupError(f"cgroup {self.path} did not thaw within {timeout:g} s",
                              hint="a frozen parent group keeps it frozen: thaw that one")
        stuck: list[int] = []
        with contextlib.suppress(CgroupError):
            for pid in self.pids():
                with contextlib.suppress(psutil.NoSuchProcess):
                    if psutil.Process(pid).status() == psutil.STATUS_DISK_SLEEP:
                        stuck.append(pid)
        why = (f"processes {', '.join(map(str, stuck[:10]))} are in uninterruptible sleep"
               if stuck else "a process would not stop")
        raise CgroupError(f"cgroup {self.path} did not freeze within {timeout:g} s: {why}",
                          hint="it was left thawed; try again once they are out of that wait "
                               "(ps -o pid,stat,wchan)")

    # -- ending --------------------------------------------------------------------------------

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the group (and below it) and wait until it is empty. A v2
        group keeps its freeze setting; a v1 group is left thawed (its frozen tasks die only
        once thawed)."""
        started = time.monotonic()
        cgroup_kill = self.version == 2 and (self.path / "cgroup.kill").exists()
        while True:
            try:
                left = self.pids()
            except CgroupError:
                if not self.path.is_dir():
                    return
                raise
            if not left:
                return
            if time.monotonic() - started >= timeout:
                raise CgroupError(f"cgroup {self.path} still holds processes "
                                  f"{', '.join(map(str, left[:10]))} after SIGKILL")
            if cgroup_kill:
                # The kernel kills the whole subtree, forks racing with it included.
                try:
                    (self.path / "cgroup.kill").write_text("1")
                except OSError as err:
                    _raise_write(self.path / "cgroup.kill", "'1'", err)
            else:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if self.version == 1:
                    self._thaw_v1_subtree()
            # An exited task leaves its group before anyone reaps it.
            wait_empty([self.path], timeout=min(0.2, timeout))

    def _thaw_v1_subtree(self) -> None:
        for d in self._dirs():
            with contextlib.suppress(OSError):
                if (d / "freezer.state").read_text().strip() != _THAWED:
                    (d / "freezer.state").write_text(_THAWED)

    def release(self, timeout: float = 5.0) -> None:
        """Thaw the group if it was frozen; if owned, move its processes back to the parent
        group and remove the directory (waiting for exiting tasks to leave). Idempotent; a
        group already gone is fine."""
        if not self.path.is_dir():
            return
        try:
            if self._self_frozen():
                self.thaw(timeout)
            if self.owned:
                self._disband(timeout)
        except CgroupError:
            if not self.path.is_dir():
                return  # removed by someone else meanwhile: what release wants
            raise

    def _disband(self, timeout: float) -> None:
        started = time.monotonic()
        parent = self.path.parent
        procs = parent / "cgroup.procs"
        with _opened(procs, os.O_WRONLY) as fd:
            while True:
                left = [p for p in self.pids() if not _is_zombie(p)]
                if not left:
                    break
                if time.monotonic() - started >= timeout:
                    raise CgroupError(f"could not move processes "
                                      f"{', '.join(map(str, left[:10]))} out of {self.path}")
                for pid in left:
                    try:
                        os.write(fd, b"%d" % pid)
                    except OSError as err:
                        if err.errno != errno.ESRCH:
                            _raise_write(procs, f"process {pid}", err)
        while True:
            wait_empty([self.path], timeout=max(0.0, timeout - (time.monotonic() - started)))
            failures = remove_dirs([self.path])
            if not failures or time.monotonic() - started >= timeout:
                break
            time.sleep(0.01)
        if failures:
            raise CgroupError(f"cannot remove cgroup {self.path}: {failures[0]}",
                              hint="its processes may still be exiting; release it again")

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "version": self.version, "owned": self.owned}


def _within(pid: int, name: str, mount: Path, top: Path) -> bool:
    """Whether ``pid`` sits in ``top`` or a group below it (gone: counts as within)."""
    rel = read_cgroups(pid).get(name)
    if rel is None:
        return not psutil.pid_exists(pid)
    d = mount / rel.lstrip("/")
    return d == top or top in d.parents
