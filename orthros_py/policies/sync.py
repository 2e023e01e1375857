"""Synchronized save and restore of process trees on several hosts (``orthros sync``): a cluster
under test is saved at one instant, with its data directories, and later woken up as if nothing
had happened.

Save: the hosts' clocks are compared (NTP-style, the best of several exchanges), every member is
prepared (a freezer group, the lock loaded, data directories checked), frozen at one instant on
each host's own clock, its connections locked, dumped with its data directories; then either
resumed at one instant (``leave_running``) or left frozen for a restore to follow. Restore: every
member's host is checked first; then each member's current run is stopped without a word to its
peers, its data directories put back, it is restored frozen, and all resume at one instant.
What reaches the members' hosts is all the agents' work (``orthros_py.agent.sync``); this module
chooses the instants, calls every host in parallel, measures how far apart the members really
froze and resumed (from each agent's own stamps, on the caller's clock), and undoes a failure.

Packets in flight between members: TCP keeps them. What one member had sent and another had not
read is in one of the two sockets' queues, which CRIU saves (send queue: not yet acknowledged;
receive queue: not yet read); both ends are locked from the freeze until the resume, so no
acknowledgment crosses that the other end's checkpoint does not know about, and after a restore
the sender retransmits what the receiver's checkpoint lacks. CRIU saves no datagram queue: the
agents read what waits in the members' UDP sockets at the save and give it back at the restore
(``orthros_py.net.udpqueue``).

No privileges here; never prints.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, TypeVar

from orthros_py.errors import ExitStatus, OrthrosError
from orthros_py.host import clock
from orthros_py.host.clock import ClockEstimate, ClockSample
from orthros_py.policies.engine import (
    Observer,
    Policy,
    PolicyError,
    PolicyStage,
    Recovery,
    is_transport,
    reason,
    register_recover,
)
from orthros_py.policies.hosts import Host
from orthros_py.policies.journal import Journal, Record

T = TypeVar("T")
CLOCK_SAMPLES = 8
# How far ahead of now an instant is set: every agent must have it in hand before it comes
# (the slowest round trip, twice, and room for a busy coordinator).
LEAD_MIN_S = 0.15
# A host that does not answer an undo is asked again this long (its agent may be restarting).
UNDO_RETRY_S = 60.0
UNDO_INTERVAL_S = 0.5
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_MEMBER_CHARS = re.compile(r"[^a-z0-9-]+")


class SyncUsageError(OrthrosError):
    """A sync command asked for something that cannot be (a member twice, an unknown snapshot)."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.USAGE


class SnapshotNotFound(OrthrosError):
    exit_status: ClassVar[ExitStatus] = ExitStatus.BAD_IMAGE


@dataclass(frozen=True)
class MemberSpec:
    """One member: a tree on a host, by pid or by process name, and its data directories."""

    host: str
    target: str  # a pid, or a process name
    data: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """Its name in the snapshot: HOST-TARGET, in the characters names allow."""
        return _MEMBER_CHARS.sub("-", f"{self.host}-{self.target}".lower()).strip("-")[:40]


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name or ""):
        raise SyncUsageError(f"snapshot name {name!r} is not allowed: 1-32 lower-case letters, "
                             "digits and '-', starting with a letter or digit")
    return name


def parse_members(specs: Sequence[str], data: Sequence[str] = (),
                  known_hosts: Sequence[str] | None = None) -> list[MemberSpec]:
    """``HOST:PID`` or ``HOST:NAME`` members, and ``HOST:PATH`` data directories (each goes
    with the first member on its host). One sentence for each mistake."""
    members: list[MemberSpec] = []
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        host, sep, target = spec.partition(":")
        if not sep or not host or not target:
            raise SyncUsageError(f"member {spec!r} is not HOST:PID or HOST:NAME")
        if known_hosts is not None and host not in known_hosts:
            raise SyncUsageError(f"member {spec}: no host named {host!r} in the inventory "
                                 f"(hosts: {', '.join(known_hosts)})")
        if target.isdigit() and int(target) < 2:
            raise SyncUsageError(f"member {spec}: pid {target} cannot be saved")
        if (host, target) in seen:
            raise SyncUsageError(f"member {spec} is given twice")
        seen.add((host, target))
        members.append(MemberSpec(host, target))
    if not members:
        raise SyncUsageError("a snapshot needs at least one member (--member HOST:PID)")
    labels = [m.label for m in members]
    if len(set(labels)) != len(labels):
        raise SyncUsageError("two members would have the same name in the snapshot: "
                             "name them by pid")
    by_host: dict[str, list[str]] = {}
    for spec in data:
        host, sep, path = spec.partition(":")
        if not sep or not path.startswith("/"):
            raise SyncUsageError(f"data directory {spec!r} is not HOST:/ABSOLUTE/PATH")
        if path in by_host.setdefault(host, []):
            raise SyncUsageError(f"data directory {spec} is given twice")
        by_host[host].append(path)
    out = []
    for m in members:
        out.append(MemberSpec(m.host, m.target, tuple(by_host.pop(m.host, ()))))
    if by_host:
        host = next(iter(by_host))
        raise SyncUsageError(f"data directory on {host}, where no member runs")
    return out


@dataclass
class SyncReport:
    """What a save or restore did, with the measured skews (µs, on the caller's clock)."""

    name: str
    action: str
    members: list[dict[str, Any]]
    freeze_skew_us: float | None = None
    freeze_settled_skew_us: float | None = None
    resume_skew_us: float | None = None
    resume_settled_skew_us: float | None = None
    clock_error_us: float = 0.0  # the skews are known within this (the worst clock estimate)
    clocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    left_running: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class SaveStage(PolicyStage):
    CLOCK = "clock"
    PREPARE = "prepare"
    FREEZE = "freeze"
    DUMP = "dump"
    RESUME = "resume"
    HOLD = "hold"


class RestoreStage(PolicyStage):
    CHECK = "check"
    CLOCK = "clock"
    REPLACE = "replace"
    RESTORE = "restore"
    RESUME = "resume"


def _us(ns: float) -> float:
    return round(ns / 1000, 1)


@dataclass(frozen=True)
class Ref:
    """One member as the agents know it: its host and its name in the snapshot."""

    host: str
    member: str

    @property
    def key(self) -> str:
        return f"{self.host}/{self.member}"


class _SyncRun(Policy):
    """What save, restore and resume share: calls to every member at once, clocks, instants,
    measured skews, the undo."""

    kind = "sync"
    action: ClassVar[str]

    def __init__(self, hosts: Mapping[str, Host], name: str, *,
                 observer: Observer | None = None, stagger_ms: float = 0.0,
                 **kw: Any) -> None:
        super().__init__(hosts, observer=observer, **kw)
        self.name = check_name(name)
        # Experiments only (``orthros bench sync``): the members freeze and resume this far
        # apart, in member order, to show what skew a cluster survives; 0 for one instant.
        self.stagger_ns = int(stagger_ms * 1e6)
        self.clocks: dict[str, ClockEstimate] = {}
        self.done: dict[str, set[str]] = {}  # HOST/member -> the steps done for it
        self.refs: list[Ref] = []
        self.report = SyncReport(name, self.action, [])
        self.resumed: dict[str, dict[str, int]] = {}

    @property
    def id(self) -> str:
        return f"sync-{self.name}"

    def title(self) -> str:
        return f"sync {self.action} {self.name}"

    def call(self, ref: Ref, op: str, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        return self.hosts[ref.host].agent.request(
            op, {"snap": self.name, "member": ref.member, **args}, timeout=timeout)

    def each(self, jobs: Sequence[tuple[str, Callable[[], T]]]) -> list[T]:
        """Run ``jobs`` (host name, call) at once, one thread each; the first failure (tagged
        with its host and stage) is raised once all have ended."""
        self.record()
        results: list[T] = []
        errors: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
            futures = [(h, pool.submit(fn)) for h, fn in jobs]
            for h, fut in futures:
                try:
                    results.append(fut.result())
                except BaseException as err:
                    if isinstance(err, OrthrosError):
                        err.host = err.host or h
                        err.stage = err.stage or str(self.stage)
                    errors.append(err)
        if errors:
            raise errors[0]
        return results

    def each_member(self, fn: Callable[[int, Ref], T]) -> list[T]:
        return self.each([(r.host, partial(fn, i, r)) for i, r in enumerate(self.refs)])

    # -- clocks and instants ------------------------------------------------------------

    def sample_clocks(self) -> None:
        """Each member host's offset from this clock, from the quickest of several exchanges."""
        def one(name: str) -> tuple[str, ClockEstimate]:
            agent = self.hosts[name].agent
            samples = []
            for _ in range(CLOCK_SAMPLES):
                t0 = clock.now_ns()
                got = agent.request("sync_clock", {}, timeout=10.0)
                t3 = clock.now_ns()
                samples.append(ClockSample(t0, int(got["t1"]), int(got["t2"]), t3))
            return name, clock.estimate(samples)

        names = list(dict.fromkeys(r.host for r in self.refs))
        self.clocks = dict(self.each([(n, partial(one, n)) for n in names]))
        self.report.clocks = {h: e.to_dict() for h, e in self.clocks.items()}
        self.report.clock_error_us = _us(max((e.error_ns for e in self.clocks.values()),
                                             default=0))

    def instant(self) -> int:
        """An instant (caller's clock) every agent will have in hand before it comes."""
        slowest = max((e.delay_ns for e in self.clocks.values()), default=0)
        lead_ns = max(int(LEAD_MIN_S * 1e9), 4 * slowest + 50_000_000)
        return clock.now_ns() + lead_ns

    def at(self, instant: int, host: str, index: int) -> int:
        """Member ``index``'s instant on ``host``'s own clock."""
        return self.clocks[host].to_agent(instant + index * self.stagger_ns)

    def skew(self, stamps: Mapping[str, Mapping[str, int]], key: str) -> float:
        """How far apart the members' ``key`` stamps lie, on the caller's clock (µs)."""
        return _us(clock.spread_ns(self.clocks[host_of(m)].to_caller(int(s[key]))
                                   for m, s in stamps.items()))

    def resume_all(self, op: str = "sync_resume") -> None:
        """Every member resumes at one instant (``op``: sync_resume, or sync_thaw for members
        a save left frozen); the skew as measured."""
        at = self.instant()

        def one(i: int, r: Ref) -> None:
            got = self.call(r, op, timeout=60.0 + i * self.stagger_ns / 1e9,
                            at_ns=self.at(at, r.host, i))
            self.resumed[r.key] = got["stamp"]

        self.each_member(one)
        self.report.resume_skew_us = self.skew(self.resumed, "written_ns")
        self.report.resume_settled_skew_us = self.skew(self.resumed, "settled_ns")

        # Then, with every member running, their groups are given back and their locks taken
        # off (slow kernel work, kept out of the resume); a failure leaves a warning.
        def finish(i: int, r: Ref) -> None:
            try:
                self.call(r, "sync_finish", timeout=60.0)
            except OrthrosError as err:
                self.warnings.append(f"{r.host}:{r.member}: cleanup after the resume: "
                                     f"{reason(err)}")

        self.each_member(finish)

    # -- undo -----------------------------------------------------------------------------

    def mark(self, ref: Ref, step: str) -> None:
        """``ref`` has had ``step`` done: rollback and recover undo it."""
        self.done.setdefault(ref.key, set()).add(step)

    def undo_members(self, err: BaseException, *, remove: bool, done_text: str,
             **kw: Any) -> BaseException:
        """Ask every member host that was touched to undo its part (``sync_abort``); a host
        that does not answer is asked again until ``UNDO_RETRY_S`` runs out (an agent
        restarted meanwhile gives its member back from what it wrote to disk). The error to
        raise: ``err`` itself if nothing was touched."""
        touched = [r for r in self.refs if r.key in self.done]
        if not touched:
            return err
        problems: list[str] = []

        def one(r: Ref) -> None:
            deadline = time.monotonic() + UNDO_RETRY_S
            while True:
                try:
                    self.call(r, "sync_abort", timeout=60.0, remove=remove)
                    return
                except BaseException as e:
                    if is_transport(e) and time.monotonic() < deadline:
                        self.emit(str(self.stage), "note",
                                  f"no answer; will try again to undo {r.key}: {reason(e)}")
                        time.sleep(UNDO_INTERVAL_S)
                        continue
                    problems.append(f"{r.host}:{r.member}: {reason(e)}")
                    return

        with ThreadPoolExecutor(max_workers=len(touched)) as pool:
            list(pool.map(one, touched))
        where = f" on {err.host}" if isinstance(err, OrthrosError) and err.host else ""
        msg = (f"sync {self.action} of {self.name!r} failed{where} in its {self.stage} stage: "
               f"{reason(err)}; ")
        msg += (done_text if not problems else
                f"{len(problems)} member(s) could not be cleaned up: " + "; ".join(problems))
        failure = PolicyError(msg, cause=err, rolled_back=not problems, problems=problems,
                              host=err.host if isinstance(err, OrthrosError) else None,
                              stage=str(self.stage), **kw)
        if isinstance(err, OrthrosError):
            # It exits as its cause does (a pid that is not there: 5; CRIU refusing: 7).
            vars(failure)["exit_status"] = err.exit_status
        return failure

    def journal_state(self) -> dict[str, Any]:
        return {"name": self.name, "action": self.action,
                "done": {k: sorted(v) for k, v in self.done.items()}}

    def finish_report(self) -> SyncReport:
        self.report.timings = dict(self.timings)
        self.report.warnings = list(self.warnings)
        return self.report


def host_of(key: str) -> str:
    """The host part of a ``HOST/member`` key."""
    return key.split("/", 1)[0]


class SyncSave(_SyncRun):
    """``orthros sync save``."""

    action = "save"
    point_of_no_return: ClassVar[PolicyStage] = SaveStage.DUMP

    def __init__(self, hosts: Mapping[str, Host], name: str, members: Sequence[MemberSpec], *,
                 leave_running: bool = False, keep_datagrams: bool = True,
                 observer: Observer | None = None, **kw: Any) -> None:
        self.stages = (SaveStage.CLOCK, SaveStage.PREPARE, SaveStage.FREEZE, SaveStage.DUMP,
                       SaveStage.RESUME if leave_running else SaveStage.HOLD)
        super().__init__(hosts, name, observer=observer, **kw)
        self.members = list(members)
        self.refs = [Ref(m.host, m.label) for m in self.members]
        self.leave_running = leave_running
        # The datagrams waiting in the members' UDP sockets (off only for control runs).
        self.keep_datagrams = keep_datagrams
        missing = sorted({m.host for m in self.members} - set(self.hosts))
        if missing:
            raise SyncUsageError(f"no host named {missing[0]!r} with an agent")
        self.report.left_running = leave_running
        self.prepared: dict[str, dict[str, Any]] = {}
        self.frozen: dict[str, dict[str, int]] = {}
        self.dumped: dict[str, dict[str, Any]] = {}

    def step(self, stage: PolicyStage) -> Callable[[], None]:
        return {SaveStage.CLOCK: self.sample_clocks, SaveStage.PREPARE: self._prepare,
                SaveStage.FREEZE: self._freeze, SaveStage.DUMP: self._dump,
                SaveStage.RESUME: self.resume_all, SaveStage.HOLD: self._hold}[SaveStage(stage)]

    def _prepare(self) -> None:
        def one(i: int, r: Ref) -> None:
            m = self.members[i]
            got = self.call(r, "sync_prepare", target=m.target, data=list(m.data),
                            total=len(self.members))
            self.mark(r, "prepared")
            self.prepared[r.key] = got
            for w in got.get("warnings", []):
                self.warnings.append(w)
                self.note(w, host=r.host)

        self.each_member(one)

    def _freeze(self) -> None:
        at = self.instant()

        def one(i: int, r: Ref) -> None:
            self.mark(r, "freezing")
            got = self.call(r, "sync_freeze", timeout=60.0 + i * self.stagger_ns / 1e9,
                            at_ns=self.at(at, r.host, i))
            self.frozen[r.key] = got["stamp"]

        self.each_member(one)
        self.report.freeze_skew_us = self.skew(self.frozen, "written_ns")
        self.report.freeze_settled_skew_us = self.skew(self.frozen, "settled_ns")
        self.note(f"froze {len(self.refs)} members within {self.report.freeze_skew_us:g} µs "
                  f"(clocks known within {self.report.clock_error_us:g} µs)")

    def _dump(self) -> None:
        def one(i: int, r: Ref) -> None:
            self.mark(r, "dumping")
            got = self.call(r, "sync_dump", timeout=600.0, datagrams=self.keep_datagrams)
            self.dumped[r.key] = got
            self.warnings += [w for w in got.get("warnings", []) if w not in self.warnings]

        self.each_member(one)

    def _hold(self) -> None:
        self.each_member(lambda i, r: self.call(r, "sync_hold"))

    def rollback(self, err: BaseException) -> BaseException:
        return self.undo_members(err, remove=True,
                         done_text="every member was resumed and nothing of the snapshot "
                                   "was kept")

    def run(self) -> SyncReport:
        self.run_stages()
        for m, r in zip(self.members, self.refs, strict=True):
            prep, dump = self.prepared.get(r.key, {}), self.dumped.get(r.key, {})
            self.report.members.append({
                "host": r.host, "member": r.member, "pid": prep.get("pid"),
                "target": m.target, "tasks": len(prep.get("pids", [])),
                "conns": prep.get("conns"), "timens": prep.get("timens"),
                "dump_ms": dump.get("dump_ms"), "image_bytes": dump.get("image_bytes"),
                "datagrams": dump.get("datagrams"), "data": dump.get("data", []),
                "freeze": self.frozen.get(r.key), "resume": self.resumed.get(r.key)})
        return self.finish_report()


def _listing(hosts: Sequence[Host]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every snapshot member the ``hosts`` keep (``sync_list``, all at once, each with its
    host), and the hosts that did not answer."""
    found: list[dict[str, Any]] = []
    silent: list[str] = []

    def one(h: Host) -> list[dict[str, Any]]:
        got = h.agent.request("sync_list", {}, timeout=15.0)
        return [{**m, "host": h.name} for m in got["members"]]

    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        futures = [(h, pool.submit(one, h)) for h in hosts]
        for h, fut in futures:
            try:
                found += fut.result()
            except BaseException as err:
                if not is_transport(err):
                    raise
                silent.append(h.name)
    return found, silent


def snapshot_members(hosts: Sequence[Host], name: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Every member of snapshot ``name`` on ``hosts``, and the hosts that did not answer."""
    found, silent = _listing(hosts)
    return sorted((m for m in found if m["snap"] == name),
                  key=lambda m: (m["host"], m["member"])), silent


class _FromSnapshot(_SyncRun):
    """Restore and resume: the members are those the hosts keep for the snapshot."""

    def find_members(self) -> None:
        found, silent = snapshot_members(list(self.hosts.values()), self.name)
        self.refs = [Ref(m["host"], m["member"]) for m in found]
        total = max((int(m.get("members_total") or 0) for m in found), default=0)
        if found and len(found) == total:
            return  # every member found: hosts that did not answer keep none of it
        if not found:
            raise SnapshotNotFound(
                f"no snapshot named {self.name!r} is kept on any host"
                + (f" that answered ({', '.join(silent)} did not)" if silent else ""),
                hint="orthros sync list shows the snapshots")
        if silent:
            raise OrthrosError(f"cannot {self.action} {self.name!r}: the agent of "
                               f"{', '.join(silent)} does not answer, and "
                               f"{total - len(found) if total else 'some'} member(s) of the "
                               "snapshot may be kept there; nothing was touched",
                               host=silent[0], stage=str(self.stage))
        raise SnapshotNotFound(f"snapshot {self.name!r} is incomplete: {len(found)} of its "
                               f"{total} members are kept",
                               hint="a host that kept a member lost it; delete the "
                                    "snapshot and save again")


class SyncRestore(_FromSnapshot):
    """``orthros sync restore``."""

    action = "restore"
    point_of_no_return: ClassVar[PolicyStage] = RestoreStage.RESTORE
    stages = (RestoreStage.CHECK, RestoreStage.CLOCK, RestoreStage.REPLACE,
              RestoreStage.RESTORE, RestoreStage.RESUME)

    def __init__(self, hosts: Mapping[str, Host], name: str, *,
                 observer: Observer | None = None, **kw: Any) -> None:
        super().__init__(hosts, name, observer=observer, **kw)
        self.replaced: dict[str, dict[str, Any]] = {}
        self.restored: dict[str, dict[str, Any]] = {}

    def step(self, stage: PolicyStage) -> Callable[[], None]:
        return {RestoreStage.CHECK: self.find_members, RestoreStage.CLOCK: self.sample_clocks,
                RestoreStage.REPLACE: self._replace, RestoreStage.RESTORE: self._restore,
                RestoreStage.RESUME: self.resume_all}[RestoreStage(stage)]

    def _replace(self) -> None:
        def one(i: int, r: Ref) -> None:
            self.mark(r, "replacing")
            self.replaced[r.key] = self.call(r, "sync_replace")

        self.each_member(one)

    def _restore(self) -> None:
        def one(i: int, r: Ref) -> None:
            self.restored[r.key] = self.call(r, "sync_restore", timeout=600.0)

        self.each_member(one)

    def rollback(self, err: BaseException) -> BaseException:
        return self.undo_members(err, remove=False, service_down=True,
                         done_text="no member was left half restored: the members it had "
                                   "replaced are stopped, and the snapshot is kept for "
                                   "another try")

    def run(self) -> SyncReport:
        self.run_stages()
        for r in self.refs:
            got, rep = self.restored.get(r.key, {}), self.replaced.get(r.key, {})
            self.report.members.append({
                "host": r.host, "member": r.member, "pid": got.get("pid"),
                "restore_ms": got.get("restore_ms"), "datagrams": got.get("datagrams"),
                "replaced": rep.get("stopped"), "data_ms": rep.get("data_ms"),
                "resume": self.resumed.get(r.key)})
        return self.finish_report()


class SyncThaw(_FromSnapshot):
    """``orthros sync resume``: members a save left frozen resume at one instant."""

    action = "resume"
    point_of_no_return: ClassVar[PolicyStage] = RestoreStage.CLOCK
    stages = (RestoreStage.CHECK, RestoreStage.CLOCK, RestoreStage.RESUME)

    def step(self, stage: PolicyStage) -> Callable[[], None]:
        steps: dict[RestoreStage, Callable[[], None]] = {
            RestoreStage.CHECK: self.find_members, RestoreStage.CLOCK: self.sample_clocks,
            RestoreStage.RESUME: partial(self.resume_all, "sync_thaw")}
        return steps[RestoreStage(stage)]

    def rollback(self, err: BaseException) -> BaseException:
        return err  # nothing was touched before the resume

    def run(self) -> SyncReport:
        self.run_stages()
        self.report.members = [{"host": r.host, "member": r.member,
                                "resume": self.resumed.get(r.key)} for r in self.refs]
        return self.finish_report()


def list_snapshots(hosts: Sequence[Host]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every snapshot kept on ``hosts``: name, members, sizes, age; and the silent hosts."""
    found: dict[str, dict[str, Any]] = {}
    members, silent = _listing(hosts)
    for m in members:
        snap = found.setdefault(m["snap"], {"name": m["snap"], "members": [], "image_bytes": 0,
                                            "data_bytes": 0, "created": m["created"]})
        snap["members"].append({k: m[k] for k in ("host", "member", "pid", "name", "timens",
                                                  "data")})
        snap["image_bytes"] += int(m["image_bytes"])
        snap["data_bytes"] += int(m["data_bytes"])
        snap["created"] = min(snap["created"], m["created"])
    now = time.time()
    out = sorted(found.values(), key=lambda s: s["created"])
    for s in out:
        s["age_s"] = round(now - s["created"], 1)
    return out, silent


def delete_snapshot(hosts: Sequence[Host], name: str) -> dict[str, Any]:
    """Remove snapshot ``name`` from every host that keeps it."""
    check_name(name)
    found, silent = snapshot_members(hosts, name)
    if not found:
        raise SnapshotNotFound(f"no snapshot named {name!r} is kept on any host"
                               + (f" that answered ({', '.join(silent)} did not)"
                                  if silent else ""))
    removed: list[str] = []
    for host in sorted({m["host"] for m in found}):
        h = next(x for x in hosts if x.name == host)
        got = h.agent.request("sync_delete", {"snap": name}, timeout=120.0)
        removed += [f"{host}:{m}" for m in got["removed"]]
    return {"name": name, "removed": removed, "unreachable": silent}


@register_recover("sync")
def recover(record: Record, hosts: Mapping[str, Host], *, journal: Journal,
            observer: Observer | None = None) -> Recovery:
    """A coordinator died during a save or restore: every member it had touched is undone as
    its own rollback would (a saved member resumes and its partial snapshot goes unless the
    save had dumped everything; a restored one is stopped)."""
    name = str(record.state.get("name", ""))
    done = dict(record.state.get("done", {}))
    complete = record.stage in (SaveStage.RESUME, SaveStage.HOLD)
    problems: list[str] = []
    for key in sorted(done):
        host, _, member = key.partition("/")
        h = hosts.get(host)
        if h is None:
            problems.append(f"{key}: host not in the record")
            continue
        try:
            h.agent.request("sync_abort", {"snap": name, "member": member,
                                           "remove": not complete and "replacing" not in done[key]},
                            timeout=60.0)
        except BaseException as err:
            problems.append(f"{key}: {reason(err)}")
    if not problems:
        journal.remove(record.id)
    return Recovery(image=record.id, pid=0, died_in=record.stage,
                    outcome="rolled back" if not problems else "failed", runs_as=None,
                    runs_on=", ".join(sorted({k.partition("/")[0] for k in done})),
                    problems=problems)
