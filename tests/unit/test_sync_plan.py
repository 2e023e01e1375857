"""Pure parts of ``orthros sync``: member and data parsing, snapshot names, clock estimates."""

from __future__ import annotations

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
