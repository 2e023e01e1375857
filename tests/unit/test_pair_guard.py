"""The split-brain guard's rules (orthros_py.agent.pair.guard) on fake clocks: timings refused
and accepted, leases, epochs on disk, the witness's verdicts and grants, the two sides of a
pair, and a simulated partition showing that an isolated active is silent before any grant.
No root, no network, no real time."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from orthros_py.agent.pair import guard
from orthros_py.agent.pair.guard import (
    CLOCK_RATE_ERROR,
    FENCE_SLACK,
    ActiveGuard,
    EpochFile,
    Grant,
    GuardError,
    GuardTimings,
    Lease,
    StandbyWatch,
    Verdict,
    WitnessBook,
    parse_duration,
)
from orthros_py.errors import ExitStatus, UsageError

HEARTBEATS = [0.01, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0]
MISSES = list(range(1, 13))


def accepted(h: float, m: int) -> bool:
    try:
        GuardTimings(h, m).check()
    except UsageError:
        return False
    return True


GRID = [(h, m) for h in HEARTBEATS for m in MISSES if accepted(h, m)]


# --- durations ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("100ms", 0.1), ("2s", 2.0), ("0.5s", 0.5), (" 250 ms ", 0.25), ("1.5ms", 0.0015),
    (".5s", 0.5), ("10s", 10.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["100", "2 sec", "-1s", "0s", "0ms", "1e3ms", "s", "", "1h",
                                  "nan s", "1,5s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="duration") as info:
        parse_duration(text)
    assert info.value.exit_status == ExitStatus.USAGE


# --- timings ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("h", "m", "why"), [
    (1.0, 1, "misses must be at least 2"),
    (1.0, 0, "misses must be at least 2"),
    (1.0, True, "misses must be a whole number"),
    (1.0, 4.0, "misses must be a whole number"),
    (0.005, 20, "heartbeat 5ms is below 10ms"),
    (10.5, 4, "heartbeat 10.5s is above 10s"),
    (math.nan, 4, "heartbeat must be a duration"),
    (1.0, 2, "use at least 3 misses"),
    (0.1, 2, "use at least 3 misses"),
    (0.01, 7, "use at least 8 misses"),
])
def test_unsafe_timings_are_refused_with_one_sentence(h: float, m: int, why: str) -> None:
    with pytest.raises(UsageError) as info:
        GuardTimings(h, m).check()
    msg = str(info.value)
    assert why in msg
    assert "\n" not in msg and msg.count(": ") <= 1
    assert info.value.exit_status == ExitStatus.USAGE


@pytest.mark.parametrize(("h", "m"), [(1.0, 4), (0.1, 4), (0.01, 9), (10.0, 4), (0.5, 6)])
def test_usable_timings_are_accepted(h: float, m: int) -> None:
    t = GuardTimings(h, m)
    assert t.check() is t
    assert t.detect == pytest.approx(h * m)
    assert t.to_dict()["self_fence_after"] == t.self_fence_after


@pytest.mark.parametrize(("h", "m"), GRID)
def test_every_accepted_timing_keeps_the_invariant(h: float, m: int) -> None:
    t = GuardTimings(h, m)
    margin = FENCE_SLACK + CLOCK_RATE_ERROR * t.lease
    assert t.self_fence_after + t.check_every + margin <= t.lease + 1e-9
    assert t.lease <= t.detect
    assert t.self_fence_after >= 2 * h  # rides out one lost round trip


def test_a_derivation_that_breaks_the_order_is_refused() -> None:
    class Hasty(GuardTimings):
        @property
        def self_fence_after(self) -> float:  # forgets the check lag and the margin
            return self.lease

    with pytest.raises(UsageError, match=r"could grant a promotion .* before an isolated active"):
        Hasty(1.0, 8).check()


def test_the_grid_accepts_something_at_every_heartbeat() -> None:
    assert {h for h, _ in GRID} == set(HEARTBEATS)


# --- leases -------------------------------------------------------------------------------------

def test_lease_ages_and_expires_only_past_the_limit() -> None:
    lease = Lease(100.0)
    assert lease.age(103.0) == 3.0
    assert not lease.expired(103.0, 3.0)  # exactly the limit is not past it
    assert lease.expired(103.01, 3.0)
    lease.renew(102.0)
    assert lease.age(103.0) == 1.0
    lease.renew(101.0)  # a late answer never makes it look older
    assert lease.renewed == 102.0


# --- epochs on disk -----------------------------------------------------------------------------

def test_epoch_file_starts_at_zero_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "pairs" / "web.epoch"
    ep = EpochFile(path)
    assert ep.read() == 0
    assert ep.bump_to(3) == 3
    assert path.read_text() == "3\n"
    assert EpochFile(path).read() == 3  # another agent process reads the same
    assert [p.name for p in path.parent.iterdir()] == ["web.epoch"]  # no temporary left


def test_epoch_never_goes_backwards(tmp_path: Path) -> None:
    ep = EpochFile(tmp_path / "e")
    ep.bump_to(5)
    assert ep.bump_to(2) == 5
    assert ep.bump_to(5) == 5
    assert ep.read() == 5
    with pytest.raises(GuardError):
        ep.bump_to(-1)


def test_stale_epoch(tmp_path: Path) -> None:
    ep = EpochFile(tmp_path / "e")
    ep.bump_to(4)
    assert ep.is_stale(5)  # the witness or the peer has moved on: stand down
    assert not ep.is_stale(4)
    assert not ep.is_stale(3)


def test_a_corrupt_epoch_is_never_guessed(tmp_path: Path) -> None:
    path = tmp_path / "e"
    path.write_text("three\n")
    with pytest.raises(GuardError, match="does not hold an epoch"):
        EpochFile(path).read()


# --- the witness --------------------------------------------------------------------------------

LEASE = 4.0


@pytest.fixture
def book(tmp_path: Path) -> WitnessBook:
    b = WitnessBook(tmp_path / "witness.json", now=0.0)
    b.register("web", "alpha", "beta", 1, now=100.0)
    return b


def test_renewal_verdicts(book: WitnessBook) -> None:
    assert book.renew("web", "alpha", 1, 101.0) is Verdict.RENEWED
    assert book.renew("web", "alpha", 0, 101.0) is Verdict.STAND_DOWN  # an older epoch
    assert book.renew("web", "beta", 1, 101.0) is Verdict.STAND_DOWN  # not the active
    assert book.renew("db", "alpha", 1, 101.0) is Verdict.UNKNOWN
    assert book.renew("web", "alpha", 2, 101.0) is Verdict.REFUSED  # newer than the witness


def test_promotion_only_after_the_lease(book: WitnessBook) -> None:
    book.renew("web", "alpha", 1, 110.0)
    refused = book.promote("web", "beta", 1, 110.0 + LEASE, LEASE)
    assert not refused.granted and "within the lease" in refused.reason
    assert (refused.epoch, refused.active) == (1, "alpha")
    grant = book.promote("web", "beta", 1, 110.0 + LEASE + 0.001, LEASE)
    assert grant == Grant(True, 2, "beta", grant.reason)
    assert grant.to_dict()["granted"] is True


def test_a_refused_renewal_does_not_extend_the_lease(book: WitnessBook) -> None:
    book.renew("web", "alpha", 0, 103.0)  # a stale host, whatever its name
    book.renew("web", "beta", 1, 103.0)
    assert book.promote("web", "beta", 1, 104.5, LEASE).granted


@pytest.mark.parametrize(("pair", "candidate", "epoch", "why"), [
    ("db", "beta", 1, "knows no pair db"),
    ("web", "alpha", 1, "alpha is not the standby of web"),
    ("web", "gamma", 1, "gamma is not the standby"),
    ("web", "beta", 0, "asks at epoch 0; the pair is at 1"),
    ("web", "beta", 2, "asks at epoch 2; the pair is at 1"),
])
def test_promotion_refusals(book: WitnessBook, pair: str, candidate: str, epoch: int,
                            why: str) -> None:
    grant = book.promote(pair, candidate, epoch, 1000.0, LEASE)  # lease long expired
    assert not grant.granted and why in grant.reason
    assert book.epoch_of("web") == 1


def test_a_grant_is_on_disk_before_it_returns(book: WitnessBook, tmp_path: Path) -> None:
    assert book.promote("web", "beta", 1, 200.0, LEASE).granted
    on_disk = json.loads((tmp_path / "witness.json").read_text())
    assert on_disk["pairs"]["web"] == {"epoch": 2, "active": "beta", "standby": "alpha"}
    # The old active comes back: it must stand down; it cannot take the pair back at once.
    assert book.renew("web", "alpha", 1, 201.0) is Verdict.STAND_DOWN
    assert not book.promote("web", "alpha", 2, 201.0, LEASE).granted  # beta counts as renewed
    assert book.renew("web", "beta", 2, 201.0) is Verdict.RENEWED


def test_no_grant_when_it_cannot_be_written(book: WitnessBook,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path, text: str) -> None:
        raise GuardError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(guard, "_write_atomic", broken)
    with pytest.raises(GuardError, match="No space left"):
        book.promote("web", "beta", 1, 200.0, LEASE)
    assert book.get("web") == {"epoch": 1, "active": "alpha", "standby": "beta"}


def test_a_witness_restart_counts_the_active_as_renewed(book: WitnessBook,
                                                        tmp_path: Path) -> None:
    book.renew("web", "alpha", 1, 100.0)
    # The witness restarts at 103: alpha's renewal at 100 is forgotten.
    again = WitnessBook(tmp_path / "witness.json", now=103.0)
    assert again.get("web") == {"epoch": 1, "active": "alpha", "standby": "beta"}
    # 6 s after the real renewal, more than the lease, yet only 3 s after the restart: refused.
    assert not again.promote("web", "beta", 1, 106.0, LEASE).granted
    assert again.promote("web", "beta", 1, 103.0 + LEASE + 0.001, LEASE).granted


def test_register_never_rolls_a_pair_back(book: WitnessBook) -> None:
    book.register("web", "alpha", "beta", 1, now=101.0)  # the same again: fine
    with pytest.raises(GuardError, match="would roll it back"):
        book.register("web", "alpha", "beta", 0, now=101.0)
    with pytest.raises(GuardError, match="only a promotion"):
        book.register("web", "beta", "alpha", 1, now=101.0)
    with pytest.raises(GuardError, match="both active and standby"):
        book.register("db", "alpha", "alpha", 1, now=101.0)
    book.register("web", "beta", "alpha", 7, now=101.0)  # an operator's fresh start
    assert book.epoch_of("web") == 7


def test_forget_and_status(book: WitnessBook, tmp_path: Path) -> None:
    book.register("db", "gamma", "delta", 3, now=100.0)
    status = book.status(now=102.5)
    assert list(status) == ["db", "web"]
    assert status["web"] == {"epoch": 1, "active": "alpha", "standby": "beta",
                             "renewed_ago": 2.5}
    assert book.forget("db") and not book.forget("db")
    assert list(WitnessBook(tmp_path / "witness.json", now=0.0).status()) == ["web"]


def test_a_corrupt_book_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_text('{"version": 1, "pairs": {"web": {"epoch": "x"}}}')
    with pytest.raises(GuardError):
        WitnessBook(path, now=0.0)
    path.write_text("not json")
    with pytest.raises(GuardError, match="not a witness book"):
        WitnessBook(path, now=0.0)


# --- the two sides --------------------------------------------------------------------------------

T = GuardTimings(1.0, 4).check()  # self_fence_after 2.946 s, detect 4 s


def test_active_fences_only_when_both_are_lost() -> None:
    g = ActiveGuard(T, now=0.0)
    for now in range(1, 20):  # the standby answers every heartbeat, the witness never
        g.heard_from_standby(float(now))
        assert not g.must_fence(now + 0.5)
    g = ActiveGuard(T, now=0.0)
    for now in range(1, 20):  # the witness answers, the standby never
        g.heard_from_witness(float(now))
        assert not g.must_fence(now + 0.5)
    assert g.must_fence(19 + T.self_fence_after + 0.001)  # then the witness too goes silent
    assert g.to_dict(20.0)["witness_ago"] == 1.0


def test_active_rides_out_one_lost_round_trip() -> None:
    g = ActiveGuard(T, now=0.0)
    g.heard_from_standby(0.0)
    g.heard_from_witness(0.0)
    # The round trips sent at 1.0 are lost; the guard checks at each tick before sending.
    assert not g.must_fence(1.0) and not g.must_fence(2.0)
    g.heard_from_witness(2.0)
    assert not g.must_fence(3.0)
    assert g.must_fence(2.0 + T.self_fence_after + 0.001)


def test_standby_watch_counts_and_suspects() -> None:
    w = StandbyWatch(T, now=10.0)
    assert not w.suspects(13.9)  # a watch just started waits a full detect
    assert w.suspects(14.0)
    w.heartbeat_ok(14.0)
    w.heartbeat_ok(15.0)
    w.heartbeat_missed(16.0)
    w.heartbeat_missed(17.0)
    assert (w.seen, w.missed, w.missed_in_a_row) == (2, 2, 2)
    assert not w.suspects(18.9)
    w.heartbeat_missed(18.0)
    assert w.suspects(19.0)
    w.heartbeat_ok(19.5)
    assert (w.seen, w.missed, w.missed_in_a_row) == (3, 3, 0)
    assert not w.suspects(19.5)
    assert w.to_dict(20.0)["silence"] == 0.5


# --- a partition, simulated -------------------------------------------------------------------------

RHO = 5e-4  # each clock's worst NTP slew


def _clock(rate: float, offset: float) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """A host's monotonic clock as a function of real time, and its inverse."""
    return (lambda r: offset + r * rate), (lambda c: (c - offset) / rate)


def simulate(t: GuardTimings, path: Path, partition_at: float, a_phase: float, b_phase: float,
             *, witness_cut: bool = True, standby_cut: bool = True
             ) -> tuple[float | None, float | None]:
    """The pair alpha (active) / beta (standby) with witness gamma, every heartbeat answered
    until real time ``partition_at``, when alpha loses the links named. Returns the real times
    at which alpha has dropped its address and at which gamma grants beta (None: never, within
    ten detects). The adverse choices throughout: alpha's clock slow, the others' fast; no
    network delay (gamma and beta record alpha's last contact as early as it can be); alpha
    acts on must_fence at its next tick and takes all of FENCE_SLACK but a hair to go silent."""
    h = t.heartbeat
    a_at, a_real = _clock(1 - RHO, 1000.0)
    b_at, b_real = _clock(1 + RHO, 9000.0)
    w_at, _ = _clock(1 + RHO, 5000.0)
    book = WitnessBook(path, now=w_at(0.0))
    book.register("web", "alpha", "beta", 1, now=w_at(0.0))
    active = ActiveGuard(t, now=a_at(0.0))
    watch = StandbyWatch(t, now=b_at(0.0))
    end = partition_at + 10 * t.detect

    # alpha's ticks, every check_every on its own clock: check; every heartbeat's tick also
    # sends (and is answered).
    per = round(h / t.check_every)
    beats: list[float] = []  # real times at which alpha's heartbeats reach beta
    fenced = None
    for k in itertools.count():
        r = a_real(a_at(0.0) + (k / per + a_phase) * h)
        if r > end:
            break
        if active.must_fence(a_at(r)):
            assert r >= partition_at, "a healthy active fenced itself"
            fenced = r + FENCE_SLACK * 0.999 / (1 - RHO)
            break
        if k % per:
            continue
        if r < partition_at or not witness_cut:
            assert book.renew("web", "alpha", 1, w_at(r)) is Verdict.RENEWED
            active.heard_from_witness(a_at(r))
        if r < partition_at or not standby_cut:
            beats.append(r)
            active.heard_from_standby(a_at(r))
    # beta's ticks, on its clock: count what arrived, suspect, ask gamma.
    granted = None
    arrived = iter(sorted(beats))
    pending = next(arrived, None)
    for j in itertools.count():
        q = b_real(b_at(0.0) + (j + b_phase) * h)
        if q > end:
            break
        got = False
        while pending is not None and pending <= q:
            watch.heartbeat_ok(b_at(pending))
            got, pending = True, next(arrived, None)
        if not got:
            watch.heartbeat_missed(b_at(q))
        if watch.suspects(b_at(q)):
            assert q >= partition_at, "the standby suspected a healthy active"
            if book.promote("web", "beta", 1, w_at(q), t.lease).granted:
                granted = q
                break
    return fenced, granted


@pytest.mark.parametrize(("h", "m"), GRID)
def test_an_isolated_active_is_silent_before_any_grant(h: float, m: int, tmp_path: Path) -> None:
    t = GuardTimings(h, m)
    for i, (p, a, b) in enumerate(itertools.product((0.001, 0.5, 0.999), (0.0, 0.999),
                                                    (0.0, 0.5, 0.999))):
        fenced, granted = simulate(t, tmp_path / f"w{i}.json", (3 * m + p) * h, a, b)
        assert fenced is not None and granted is not None, (p, a, b)
        assert fenced < granted, (p, a, b, fenced, granted)


@pytest.mark.parametrize(("h", "m"), [(0.1, 4), (1.0, 5), (0.01, 9)])
def test_losing_one_link_fences_nothing_and_grants_nothing(h: float, m: int,
                                                         tmp_path: Path) -> None:
    t = GuardTimings(h, m)
    # Only the witness is lost: beta hears alpha, never suspects, never asks.
    fenced, granted = simulate(t, tmp_path / "a.json", 3 * m * h + h / 2, 0.3, 0.6,
                               standby_cut=False)
    assert (fenced, granted) == (None, None)
    # Only the standby is lost: beta suspects and asks, gamma refuses, alpha keeps serving.
    fenced, granted = simulate(t, tmp_path / "b.json", 3 * m * h + h / 2, 0.3, 0.6,
                               witness_cut=False)
    assert (fenced, granted) == (None, None)
