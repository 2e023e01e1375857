"""Pure parts of ``orthros sync``: member and data parsing, snapshot names, clock estimates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orthros_py.host.clock import ClockSample, estimate, now_ns, spread_ns, wait_until
from orthros_py.policies.sync import (
    MemberSpec,
    SyncUsageError,
    check_name,
    parse_members,
)


def test_members_by_pid_and_name_with_their_data() -> None:
    got = parse_members(["alpha:123", "beta:etcd"], ["beta:/var/lib/etcd"],
                        known_hosts=["alpha", "beta"])
    assert got == [MemberSpec("alpha", "123"), MemberSpec("beta", "etcd", ("/var/lib/etcd",))]
    assert [m.label for m in got] == ["alpha-123", "beta-etcd"]


@pytest.mark.parametrize(("members", "data", "words"), [
    (["alpha:123", "alpha:123"], [], "given twice"),
    (["alpha"], [], "not HOST:PID"),
    (["omega:1234"], [], "no host named 'omega'"),
    (["alpha:1"], [], "cannot be saved"),
    ([], [], "at least one member"),
    (["alpha:12"], ["beta:/srv/x"], "where no member runs"),
    (["alpha:12"], ["alpha:relative"], "HOST:/ABSOLUTE/PATH"),
    (["alpha:12"], ["alpha:/srv/x", "alpha:/srv/x"], "given twice"),
])
def test_bad_members_get_one_sentence(members: list[str], data: list[str], words: str) -> None:
    with pytest.raises(SyncUsageError, match=words):
        parse_members(members, data, known_hosts=["alpha", "beta"])


@pytest.mark.parametrize("name", ["", "A", "-x", "a/b", "x" * 33, "a b"])
def test_bad_snapshot_names(name: str) -> None:
    with pytest.raises(SyncUsageError):
        check_name(name)


def test_the_quickest_exchange_gives_the_offset() -> None:
    # The agent's clock is 5 ms ahead; the second exchange is quick and symmetric.
    slow = ClockSample(t0=0, t1=5_000_000 + 3_000_000, t2=5_000_000 + 3_000_100, t3=4_000_000)
    quick = ClockSample(t0=10_000_000, t1=15_000_100, t2=15_000_200, t3=10_000_300)
    est = estimate([slow, quick])
    assert est.offset_ns == 5_000_000
    assert est.delay_ns == 200
    assert est.error_ns == 100
    assert est.to_caller(est.to_agent(123_456)) == 123_456


def test_no_usable_sample_is_an_error() -> None:
    with pytest.raises(ValueError):
        estimate([ClockSample(10, 0, 0, 5)])


def test_spread_and_wait() -> None:
    assert spread_ns([5, 9, 7]) == 4
    assert spread_ns([3]) == 0
    target = now_ns() + 3_000_000
    late = wait_until(target)
    assert late >= 0 and now_ns() >= target


class RecordingAgent:
    """Answers every request with {} and remembers it; ``silent`` makes it unreachable."""

    def __init__(self, name: str, silent: bool = False) -> None:
        self.name = name
        self.silent = silent
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def request(self, op: str, args: Any = None, *, timeout: float | None = None) -> Any:
        if self.silent:
            from orthros_py.agent.errors import AgentUnreachable

            raise AgentUnreachable(f"{self.name} does not answer", host=self.name)
        self.calls.append((op, dict(args or {})))
        return {}


def _record(stage: str, done: dict[str, list[str]]) -> Any:
    from orthros_py.policies.journal import HostRef, Record

    return Record(kind="sync", id="sync-s", hosts={"alpha": HostRef("alpha", "10.0.0.1", 1)},
                  stage=stage, state={"name": "s", "done": done}, coordinator=1, updated=0.0)


def test_recover_undoes_what_a_dead_coordinator_touched(tmp_path: Path) -> None:
    from orthros_py.policies.engine import recover_function
    from orthros_py.policies.hosts import Host
    from orthros_py.policies.journal import Journal

    journal = Journal(tmp_path)
    agent = RecordingAgent("alpha")
    hosts = {"alpha": Host("alpha", agent, "10.0.0.1", 1)}  # type: ignore[arg-type]
    # Died while freezing a save: the member resumes and its partial snapshot goes.
    out = recover_function("sync")(_record("freeze", {"alpha/m1": ["prepared", "freezing"]}),
                                   hosts, journal=journal)
    assert out.outcome == "rolled back" and not out.problems
    assert agent.calls == [("sync_abort", {"snap": "s", "member": "m1", "remove": True})]
    # Died while restoring: the member is stopped, the snapshot is kept.
    agent.calls.clear()
    recover_function("sync")(_record("restore", {"alpha/m1": ["replacing"]}), hosts,
                             journal=journal)
    assert agent.calls == [("sync_abort", {"snap": "s", "member": "m1", "remove": False})]
    # A host that does not answer is reported, and the record kept for another try.
    silent = {"alpha": Host("alpha", RecordingAgent("alpha", silent=True),  # type: ignore[arg-type]
                            "10.0.0.1", 1)}
    out = recover_function("sync")(_record("dump", {"alpha/m1": ["dumping"]}), silent,
                                   journal=journal)
    assert out.outcome == "failed" and "does not answer" in out.problems[0]


def test_urgent_raises_the_thread_and_puts_it_back() -> None:
    import os

    from orthros_py.host.clock import urgent

    before = os.sched_getscheduler(0)
    with urgent() as rt:
        if rt:  # root with CAP_SYS_NICE; elsewhere it declines and nothing changes
            assert os.sched_getscheduler(0) == os.SCHED_FIFO
        else:
            assert os.sched_getscheduler(0) == before
    assert os.sched_getscheduler(0) == before
