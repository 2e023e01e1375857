"""The stage runner every policy stands on: a policy declares its stages (an Enum of names, in
order) and the last of them that is still rolled back (its point of no return); the engine runs
them, emits progress events (the stage's name and a kind), times them, writes the policy's
journal record before every agent call, tags errors with the host and stage they came from,
and runs the policy's undo steps with retries for hosts that do not answer.

Also here: the registry of recover functions, by journal record kind, that ``orthros recover``
dispatches on (each policy module registers its own).

No privileges and no I/O but the journal's: the policies' agents do the work. Never prints:
progress goes to an observer callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

from orthros_py.agent.errors import AgentError, AgentUnreachable
from orthros_py.errors import OperationTimeout, OrthrosError
from orthros_py.policies.hosts import Host
from orthros_py.policies.journal import HostRef, Journal, JournalError, Record

# Stage names every policy shares: the engine emits them around a rollback and at the end.
DONE = "done"
ROLLBACK = "rollback"
ROLLED_BACK = "rolled back"
FAILED = "failed"


class PolicyStage(enum.StrEnum):
    """Base of a policy's ``Stage`` enum: its members' values are the names events carry."""


@dataclass(frozen=True)
class Event:
    """A progress report: a stage started or ended, or a note within one."""

    stage: str  # the stage's name (a policy's Stage member compares equal to it)
    kind: str  # "start", "done", "note", "failed"
    message: str = ""
    elapsed_ms: float | None = None
    host: str | None = None


Observer = Callable[[Event], None]


class PolicyError(OrthrosError):
    """A policy failed. ``rolled_back``: everything before the point of no return was undone;
    ``problems`` lists what the rollback could not undo (a lock, an address, the tree),
    ``leftovers`` the files it could not remove (on a host that does not answer)."""

    def __init__(self, msg: str, *, cause: BaseException | None = None,
                 rolled_back: bool = False, problems: Sequence[str] = (),
                 leftovers: Sequence[str] = (), service_down: bool = False,
                 **context: Any) -> None:
        super().__init__(msg, **context)
        self.cause = cause
        self.rolled_back = rolled_back
        self.problems = list(problems)
        self.leftovers = list(leftovers)
        self.service_down = service_down

    def __str__(self) -> str:
        return self.msg  # one sentence that already says where

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.update(rolled_back=self.rolled_back, problems=self.problems,
                    leftovers=self.leftovers, service_down=self.service_down,
                    cause=self.cause.to_dict() if isinstance(self.cause, OrthrosError) else
                    (repr(self.cause) if self.cause else None))
        return data


def is_transport(err: BaseException) -> bool:
    """Did the call fail to reach the agent or to hear back (rather than being refused)?"""
    return isinstance(err, AgentUnreachable | OperationTimeout) or type(err) is AgentError


def reason(err: BaseException) -> str:
    if isinstance(err, OrthrosError):
        text = err.msg
        if err.hint and not isinstance(err, PolicyError):
            text += f" ({err.hint})"
        return text
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    return f"{type(err).__name__}: {err}"


# --- undo ------------------------------------------------------------------------------------


class UndoStep(Protocol):
    """One rollback step of a policy (an Enum member, typically)."""

    @property
    def side(self) -> str: ...  # the role of the host that performs it
    @property
    def sides(self) -> frozenset[str]: ...  # every role it needs to answer
    @property
    def what(self) -> str: ...
    @property
    def brings_tree(self) -> bool: ...  # brings the tree back where it was
    @property
    def needs_tree(self) -> bool: ...  # only once the tree is back
    @property
    def leaves_litter(self) -> bool: ...  # failing it leaves files, not a lock or an address


U = TypeVar("U", bound=UndoStep)


@dataclass
class UndoOutcome:
    tree_back: bool
    pid: int | None
    problems: list[str] = field(default_factory=list)  # a lock, an address, the tree
    leftovers: list[str] = field(default_factory=list)  # files and records

    def fail(self, step: UndoStep, why: str) -> None:
        (self.leftovers if step.leaves_litter else self.problems).append(
            f"could not {step.what} ({why})")


# --- recovery --------------------------------------------------------------------------------


@dataclass
class Recovery:
    """What ``orthros recover`` did with one interrupted policy run."""

    image: str  # the journal record's id
    pid: int
    died_in: str  # the stage its coordinator was in
    outcome: str  # "completed", "rolled back" or "failed"
    runs_as: int | None  # the tree's pid where it runs now, if it does
    runs_on: str
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RecoverFn(Protocol):
    def __call__(self, record: Record, hosts: Mapping[str, Host], *, journal: Journal,
                 observer: Observer | None = None) -> Recovery: ...


_RECOVER: dict[str, RecoverFn] = {}


def register_recover(kind: str) -> Callable[[RecoverFn], RecoverFn]:
    """Make ``fn`` the recover function of journal records of ``kind`` (a policy's own)."""
    def add(fn: RecoverFn) -> RecoverFn:
        _RECOVER[kind] = fn
        return fn
    return add


def recover_function(kind: str) -> RecoverFn:
    """The recover function of ``kind``; JournalError if no loaded policy writes that kind."""
    try:
        return _RECOVER[kind]
    except KeyError:
        raise JournalError(f"no policy recovers journal records of kind {kind!r}",
                           hint="a newer orthros wrote it, or it is damaged: "
                                "orthros recover --forget drops it") from None


# --- the runner ------------------------------------------------------------------------------


class Policy:
    """A policy run over ``hosts`` (role -> Host): its stages, in order, up to and including
    ``point_of_no_return`` are rolled back when one fails; those after it are not."""

    kind: ClassVar[str]  # the journal record's kind
    # The forward stages, in order (a policy whose stages depend on its options sets them per
    # instance).
    stages: tuple[PolicyStage, ...]
    point_of_no_return: ClassVar[PolicyStage]  # the last stage a failure rolls back
    self_timed: ClassVar[frozenset[str]] = frozenset()  # stages that time their own rows

    def __init__(self, hosts: Mapping[str, Host], *, observer: Observer | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep,
                 journal: Journal | None = None) -> None:
        self.hosts = dict(hosts)
        self.observer = observer
        self.clock = clock
        self.sleep = sleep
        # Where the progress is recorded before every agent call (see policies.journal).
        self.journal = journal
        self.stage: str = self.stages[0]
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []
        self._failed_on: str | None = None

    # -- what a policy supplies -----------------------------------------------------------

    @property
    def id(self) -> str:
        raise NotImplementedError

    def step(self, stage: PolicyStage) -> Callable[[], None]:
        """The function that runs ``stage``."""
        raise NotImplementedError

    def rollback(self, err: BaseException) -> BaseException:
        """Undo what was done before ``err``; the error to raise (``err`` itself if nothing
        was touched)."""
        raise NotImplementedError

    def journal_state(self) -> dict[str, Any]:
        """The policy's own part of its journal record (plain JSON)."""
        return {}

    def title(self) -> str:
        return self.id

    def tree_pid(self) -> int | None:
        return None

    # -- plumbing -------------------------------------------------------------------------

    def emit(self, stage: str, kind: str, message: str = "", elapsed_ms: float | None = None,
             host: str | None = None) -> None:
        if self.observer is not None:
            self.observer(Event(str(stage), kind, message, elapsed_ms, host))

    def note(self, message: str, host: str | None = None) -> None:
        self.emit(self.stage, "note", message, host=host)

    def warn(self, what: str, err: BaseException, host: Host) -> None:
        self.warnings.append(f"{what} on {host.name} failed: {reason(err)}")
        self.note(self.warnings[-1], host=host.name)

    def record(self) -> None:
        """Write what may be done by now to the journal, before the next agent call."""
        if self.journal is None:
            return
        self.journal.write(Record(
            kind=self.kind, id=self.id,
            hosts={role: HostRef(h.name, h.address, h.agent_port)
                   for role, h in self.hosts.items()},
            stage=str(self.stage), state=self.journal_state(), coordinator=os.getpid(),
            updated=0.0, title=self.title(), pid=self.tree_pid()))

    def forget(self) -> None:
        if self.journal is not None:
            self.journal.remove(self.id)

    @contextlib.contextmanager
    def enter(self, stage: PolicyStage) -> Iterator[None]:
        """Run a stage: recorded, announced, timed (as its own row unless it times itself)."""
        self.stage = stage
        self.record()
        self.emit(stage, "start")
        start = self.clock()
        try:
            yield
        finally:
            elapsed = self.clock() - start
            if stage not in self.self_timed:  # a failed stage's time counts too
                self.timings[stage] = self.timings.get(stage, 0.0) + elapsed * 1000
        self.emit(stage, "done", elapsed_ms=elapsed * 1000)

    @contextlib.contextmanager
    def timed(self, row: str) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            self.timings[row] = self.timings.get(row, 0.0) + (self.clock() - start) * 1000

    @contextlib.contextmanager
    def on(self, host: Host) -> Iterator[None]:
        """Calls to ``host``'s agent: an error is marked with the host and the stage. What the
        calls may do is in the policy's state already: recorded first, for a successor to
        undo."""
        self.record()
        try:
            yield
        except OrthrosError as err:
            err.host = err.host or host.name
            err.stage = err.stage or str(self.stage)
            self._failed_on = err.host
            raise
        except BaseException:
            self._failed_on = host.name
            raise

    def role_of(self, name: str | None) -> str | None:
        for role, h in self.hosts.items():
            if h.name == name:
                return role
        return None

    # -- the forward path -----------------------------------------------------------------

    def run_stages(self) -> None:
        """Run every stage; before the point of no return a failure rolls back (the error
        ``rollback`` makes is raised), after it the policy's steps report and go on."""
        total_start = self.clock()
        cut = self.stages.index(self.point_of_no_return) + 1
        try:
            for stage in self.stages[:cut]:
                with self.enter(stage):
                    self.step(stage)()
        except BaseException as err:
            self.timings["total"] = (self.clock() - total_start) * 1000
            failure = self.rollback(err)
            if failure is err:
                self.forget()
                raise  # nothing was touched: the error as it came
            if isinstance(failure, PolicyError) and failure.rolled_back \
                    and not failure.leftovers:
                self.forget()  # else orthros recover can try again what is left
            raise failure from err

        # === POINT OF NO RETURN: from here on nothing is rolled back; what fails is reported
        # (warnings, or an error that says so), and the work stays where it is.
        for stage in self.stages[cut:]:
            with self.enter(stage):
                self.step(stage)()
        self.stage = DONE
        self.forget()
        self.timings["total"] = (self.clock() - total_start) * 1000
        self.emit(DONE, "done", elapsed_ms=self.timings["total"])

    # -- undo ---------------------------------------------------------------------------

    def undo(self, steps: Sequence[U], do_one: Callable[[U], int | None], *,
             tree_back: bool, pid: int | None, retry_s: float,
             interval: float) -> UndoOutcome:
        """Run the undo steps in order, retrying those whose host does not answer until
        ``retry_s`` runs out (a host found silent is skipped for the rest of a pass, so that
        the other hosts' steps, the tree's return first, are not held up). Steps that need the
        tree wait until one that brings it back has run, and are dropped if none can."""
        out = UndoOutcome(tree_back=tree_back, pid=pid)
        tree_lost = False
        pending = list(steps)
        deadline: float | None = None
        while pending:
            silent: set[str] = set()
            still: list[U] = []
            for step in pending:
                if step.needs_tree and not out.tree_back:
                    if not tree_lost:
                        still.append(step)
                    continue
                if step.sides & silent:
                    still.append(step)
                    continue
                try:
                    got = do_one(step)
                except BaseException as err:
                    if is_transport(err):
                        role = self.role_of(err.host) if isinstance(err, OrthrosError) else None
                        silent.add(role or step.side)
                        still.append(step)
                        self.emit(ROLLBACK, "note",
                                  f"no answer; will try again to {step.what}: {reason(err)}")
                        continue
                    out.fail(step, reason(err))
                    tree_lost = tree_lost or step.brings_tree
                    continue
                if step.brings_tree:
                    out.tree_back, out.pid = True, got
            if not still or (tree_lost and all(s.needs_tree for s in still)):
                break
            if deadline is None:
                deadline = self.clock() + retry_s
            if self.clock() >= deadline:
                for step in still:
                    out.fail(step, f"no answer for {retry_s:g} s")
                break
            self.sleep(interval)
            pending = still
        return out
