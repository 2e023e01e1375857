"""The stage runner under every policy, with a toy policy of four stages over the fake agents:
the stages run in their declared order, a failure before the point of no return is undone and
one after it is not, the stages are timed, the journal record is written before every agent
call, undo steps on a silent host are retried, and recover functions are found by kind.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fakes import FakeAgent, World, host, pair

from orthros_py.agent.errors import AgentUnreachable
from orthros_py.errors import OrthrosError
from orthros_py.policies.engine import (
    Event,
    Policy,
    PolicyError,
    PolicyStage,
    Recovery,
    recover_function,
    register_recover,
)
from orthros_py.policies.hosts import Host
from orthros_py.policies.journal import Journal, JournalError, Record


class Stage(PolicyStage):
    FIRST = "first"
    SECOND = "second"
    THIRD = "third"
    FOURTH = "fourth"


class Undo(enum.Enum):
    UNDO_A = ("a", "undo on a")
    UNDO_B = ("b", "undo on b")

    @property
    def side(self) -> str:
        return str(self.value[0])

    @property
    def sides(self) -> frozenset[str]:
        return frozenset({self.side})

    @property
    def what(self) -> str:
        return str(self.value[1])

    @property
    def brings_tree(self) -> bool:
        return self is Undo.UNDO_A

    @property
    def needs_tree(self) -> bool:
        return self is Undo.UNDO_B

    @property
    def leaves_litter(self) -> bool:
        return False


class Toy(Policy):
    """Each stage asks one host's agent for its status; ``fail_in`` makes that call fail."""

    kind = "toy"
    stages: ClassVar[tuple[PolicyStage, ...]] = (Stage.FIRST, Stage.SECOND, Stage.THIRD,
                                                 Stage.FOURTH)
    point_of_no_return = Stage.SECOND
    self_timed = frozenset({Stage.THIRD})

    def __init__(self, a: Host, b: Host, world: World, journal: Journal | None = None,
                 fail_in: Stage | None = None) -> None:
        self.events: list[Event] = []
        super().__init__({"a": a, "b": b}, clock=world.clock, sleep=world.sleep,
                         journal=journal, observer=self.events.append)
        self.world = world
        self.fail_in = fail_in
        self.done: list[str] = []
        self.undone: list[str] = []
        self.seen_records: list[dict[str, Any]] = []  # the journal at each agent call

    @property
    def id(self) -> str:
        return "toy-1"

    def journal_state(self) -> dict[str, Any]:
        return {"done": list(self.done)}

    def step(self, stage: PolicyStage) -> Callable[[], None]:
        def run() -> None:
            h = self.hosts["a" if stage in (Stage.FIRST, Stage.THIRD) else "b"]
            self.done.append(str(stage))
            self.world.now += 1.0  # every stage takes a second
            with self.on(h):
                if self.journal is not None:
                    self.seen_records.append(self.journal.read(self.id).state)
                if stage == self.fail_in:
                    raise OrthrosError(f"{stage} refused")
                h.agent.status()
        return run

    def rollback(self, err: BaseException) -> BaseException:
        out = self.undo([Undo.UNDO_A, Undo.UNDO_B], self._undo_one, tree_back=False, pid=None,
                        retry_s=3.0, interval=0.5)
        return PolicyError(f"toy failed: {err}", cause=err, rolled_back=out.tree_back and not out.problems,
                           problems=out.problems)

    def _undo_one(self, step: Undo) -> int | None:
        self.hosts[step.side].agent.status()
        self.undone.append(step.side)
        return 42 if step.brings_tree else None


@pytest.fixture
def world() -> World:
    return World()


def toy(world: World, **kw: Any) -> tuple[Toy, FakeAgent, FakeAgent]:
    a, b = pair(world)
    return Toy(host(a), host(b), world, **kw), a, b


def test_stages_run_in_their_declared_order_and_events_carry_names(world: World) -> None:
    t, _, _ = toy(world)
    t.run_stages()
    starts = [e.stage for e in t.events if e.kind == "start"]
    assert starts == ["first", "second", "third", "fourth"]
    assert all(type(e.stage) is str for e in t.events)  # names, not a policy's enum
    assert [e.stage for e in t.events if e.kind == "done"] == [*starts, "done"]
    assert t.undone == []


def test_a_failure_before_the_point_of_no_return_is_undone(world: World) -> None:
    t, _, _ = toy(world, fail_in=Stage.SECOND)
    with pytest.raises(PolicyError, match="toy failed") as exc:
        t.run_stages()
    assert exc.value.rolled_back and t.undone == ["a", "b"]
    cause = exc.value.cause
    assert isinstance(cause, OrthrosError)
    assert (cause.host, cause.stage) == ("beta", "second")  # tagged where it happened
    assert t.done == ["first", "second"]  # nothing after the failing stage ran


def test_a_failure_after_the_point_of_no_return_is_not_undone(world: World) -> None:
    t, _, _ = toy(world, fail_in=Stage.THIRD)
    with pytest.raises(OrthrosError, match="third refused") as exc:
        t.run_stages()
    assert not isinstance(exc.value, PolicyError) and t.undone == []
    assert exc.value.stage == "third" and exc.value.host == "alpha"


def test_stages_are_timed_unless_they_time_themselves(world: World) -> None:
    t, _, _ = toy(world)
    t.run_stages()
    assert t.timings == {"first": 1000.0, "second": 1000.0, "fourth": 1000.0, "total": 4000.0}
    done = [e for e in t.events if e.kind == "done" and e.stage == "third"]
    assert done[0].elapsed_ms == 1000.0  # the event has it all the same


def test_the_journal_record_is_written_before_every_agent_call(
        world: World, tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    t, _, _ = toy(world, journal=journal)
    t.run_stages()
    # Each call saw a record that already named the stage it belongs to.
    assert t.seen_records == [{"done": ["first"]}, {"done": ["first", "second"]},
                              {"done": ["first", "second", "third"]},
                              {"done": ["first", "second", "third", "fourth"]}]
    assert journal.entries() == []  # finished: the record went


def test_a_rolled_back_run_keeps_no_record_but_a_failed_one_does(
        world: World, tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    t, _, _ = toy(world, journal=journal, fail_in=Stage.SECOND)
    with pytest.raises(PolicyError):
        t.run_stages()
    assert journal.entries() == []
    t, _, b = toy(world, journal=journal, fail_in=Stage.FIRST)
    b.down = True  # undo on b never answers
    with pytest.raises(PolicyError) as exc:
        t.run_stages()
    assert exc.value.problems and "no answer for 3 s" in exc.value.problems[0]
    (rec,) = journal.entries()
    assert (rec.kind, rec.id, rec.stage) == ("toy", "toy-1", "first")
    assert rec.state == {"done": ["first"]}  # for orthros recover to go on from
    assert {r: h.name for r, h in rec.hosts.items()} == {"a": "alpha", "b": "beta"}


def test_undo_retries_a_silent_host_without_holding_up_the_other(world: World) -> None:
    t, a, _ = toy(world, fail_in=Stage.FIRST)
    a.fail["status"] = AgentUnreachable("agent on alpha is not reachable", host="alpha")
    a.fail_times["status"] = 3
    with pytest.raises(PolicyError) as exc:
        t.run_stages()
    # a's undo answered on the fourth try, half a second apart; b's needs the tree (a's
    # brings it back) and waited for it.
    assert exc.value.rolled_back and t.undone == ["a", "b"] and world.now == 2.5


def test_migrate_names_the_engines_stages_alike() -> None:
    from orthros_py.policies import engine, migrate

    assert (migrate.Stage.DONE, migrate.Stage.ROLLBACK, migrate.Stage.ROLLED_BACK,
            migrate.Stage.FAILED) == (engine.DONE, engine.ROLLBACK, engine.ROLLED_BACK,
                                      engine.FAILED)


def test_recover_functions_are_found_by_kind() -> None:
    @register_recover("toy-kind")
    def rec(record: Record, hosts: Any, *, journal: Journal,
            observer: Any = None) -> Recovery:
        return Recovery(record.id, 1, record.stage, "completed", 1, "alpha")

    assert recover_function("toy-kind") is rec
    with pytest.raises(JournalError, match="no policy recovers journal records of kind 'x'"):
        recover_function("x")
