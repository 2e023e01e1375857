"""The split-brain guard of a protected pair: the rules that keep two hosts from ever serving one
service at once, as pure objects over a clock the caller passes in.

The pattern is the field's proven one, not a protocol of our own:

- **A third vote** (corosync's qdevice): a witness, a third host's agent that only votes, breaks
  the tie. The standby promotes only with the witness's grant, never alone.
- **Self-fencing** (SBD's watchdog): an active that has lost both its standby and the witness for
  ``self_fence_after`` drops the service address and stops its copy by itself.
- **Leases at the witness**: the active renews with the witness every heartbeat; the witness
  grants a promotion only once the active's last renewal is older than ``lease``, and ``lease``
  leaves an isolated active the time to fence itself first (``GuardTimings``).
- **Epochs**: every promotion bumps the pair's epoch, kept on disk by both agents and the
  witness; a host that comes back with an older epoch stands down before doing anything else.

Clocks: every ``now`` is a monotonic reading (``time.monotonic()``) of the host that calls, never
wall-clock time, and each host compares only readings of its own clock. Every "heard from"
time is the time the answered request was *sent*: the peer heard us no earlier than that, so
the active's view of its last contact is never later than the peer's.

I/O: none, but the two small state files (``EpochFile``, ``WitnessBook``), written atomically.
No privileges.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orthros_py.errors import OrthrosError, UsageError

# heartbeat bounds: below 10 ms a Python agent's scheduling noise is the heartbeat; above 10 s a
# failover takes minutes.
MIN_HEARTBEAT = 0.010
MAX_HEARTBEAT = 10.0
MIN_MISSES = 2
# Two monotonic clocks may disagree on a duration: NTP slews each by at most 500 ppm
# (adjtimex's limit), in opposite directions at worst, so 0.1 % of the lease.
CLOCK_RATE_ERROR = 1e-3
# What the active needs past the tick at which it sees it must fence: its guard loop running
# late under load, then dropping the service address (one netlink request), the step that makes
# it silent. Stopping its copy follows and is not raced against the grant.
FENCE_SLACK = 0.050
# The active's guard ticks this often per heartbeat (see GuardTimings.check_every).
CHECKS_PER_HEARTBEAT = 4

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)\s*$")


class GuardError(OrthrosError):
    """A state file of the guard cannot be read or written, or the witness refuses a change
    that would roll a pair back."""


def parse_duration(text: str) -> float:
    """``"100ms"`` -> 0.1, ``"2s"`` -> 2.0, ``"0.5s"`` -> 0.5; a unit is required."""
    m = _DURATION_RE.match(text) if isinstance(text, str) else None
    if m is None:
        raise UsageError(f"{text!r} is not a duration: write a positive number with its unit, "
                         "as in 100ms, 2s or 0.5s")
    value = float(m[1]) / (1000.0 if m[2] == "ms" else 1.0)
    if value <= 0 or not math.isfinite(value):
        raise UsageError(f"{text!r} is not a positive duration")
    return value


def _fmt(seconds: float) -> str:
    return f"{round(seconds * 1000, 1):g}ms" if seconds < 1 else f"{round(seconds, 3):g}s"


@dataclass(frozen=True)
class GuardTimings:
    """How fast a pair detects a failure, and the derived times that keep it safe.

    With ``h`` the heartbeat and ``m`` the misses::

        detect           = h * m        the standby suspects the active (and may ask the witness)
        lease            = detect       the witness grants once the active's renewal is older
        margin           = FENCE_SLACK + CLOCK_RATE_ERROR * lease
        check_every      = h / 4        how often the active looks at its guard
        self_fence_after = lease - check_every - margin

    Invariant (``check``)::

        self_fence_after + check_every + margin <= lease <= detect
        self_fence_after >= 2 * heartbeat

    Why it is safe: let ``s`` be when the active sent its last answered request (to the witness
    or the standby). The witness recorded that renewal no earlier than ``s``, and the standby
    heard that heartbeat no earlier than ``s``; so no grant can come before ``s + lease`` (the
    witness's lease) and no request for one before ``s + detect`` (the standby's suspicion).
    The active checks its guard every ``check_every``, so it sees ``must_fence`` at most that long
    after
    ``s + self_fence_after`` and has dropped the address ``FENCE_SLACK`` later; the clocks of
    the two hosts may stretch these durations against each other by ``CLOCK_RATE_ERROR``. Hence
    ``self_fence_after + h + margin <= lease``: a partitioned active is silent before any grant.
    ``lease <= detect`` because a lease longer than detection only delays the failover.
    The second line is not about safety but use: an active must ride out one lost round trip
    without stopping a healthy service, so ``misses`` must leave two heartbeats of silence.

    What it cannot cover: an active whose agent is frozen (a paused VM, a stopped process) does
    not run its guard; that is what a hardware watchdog or a fence device is for.
    """

    heartbeat: float
    misses: int

    @property
    def detect(self) -> float:
        return self.heartbeat * self.misses

    @property
    def lease(self) -> float:
        return self.detect

    @property
    def margin(self) -> float:
        return FENCE_SLACK + CLOCK_RATE_ERROR * self.lease

    @property
    def check_every(self) -> float:
        """How often the active looks at its guard (a comparison, cheap: four times a
        heartbeat, so that a three-miss detection leaves room for one lost round trip)."""
        return self.heartbeat / CHECKS_PER_HEARTBEAT

    @property
    def self_fence_after(self) -> float:
        return self.lease - self.check_every - self.margin

    def check(self) -> GuardTimings:
        """``self`` if the timings are safe and usable; else UsageError in one sentence."""
        h, m = self.heartbeat, self.misses
        if isinstance(h, bool) or not isinstance(h, int | float) or not math.isfinite(h):
            raise UsageError(f"heartbeat must be a duration in seconds, not {h!r}")
        if isinstance(m, bool) or not isinstance(m, int):
            raise UsageError(f"misses must be a whole number, not {m!r}")
        if h < MIN_HEARTBEAT:
            raise UsageError(f"heartbeat {_fmt(h)} is below {_fmt(MIN_HEARTBEAT)}: the agent's "
                             "own scheduling delays would pass for failures")
        if h > MAX_HEARTBEAT:
            raise UsageError(f"heartbeat {_fmt(h)} is above {_fmt(MAX_HEARTBEAT)}: a failure "
                             "would go unnoticed too long")
        if m < MIN_MISSES:
            raise UsageError(f"misses must be at least {MIN_MISSES}, not {m}: a single lost "
                             "heartbeat must not promote the standby")
        # Constructive today; checked so that a change to the derivation cannot go unnoticed
        # (the epsilon absorbs float rounding only).
        if (self.self_fence_after + self.check_every + self.margin > self.lease + 1e-9
                or self.lease > self.detect):
            raise UsageError(
                f"heartbeat {_fmt(h)} x {m} misses: the witness could grant a promotion "
                f"({_fmt(self.lease)}) before an isolated active has fenced itself "
                f"({_fmt(self.self_fence_after + self.check_every + self.margin)})")
        if self.self_fence_after < 2 * h:
            need = self._min_misses()
            raise UsageError(
                f"heartbeat {_fmt(h)} x {m} misses leaves an isolated active only "
                f"{_fmt(max(self.self_fence_after, 0.0))} before it must fence itself, under "
                f"two heartbeats ({_fmt(2 * h)}), so one lost round trip would stop a healthy "
                f"service: use at least {need} misses")
        return self

    def _min_misses(self) -> int:
        m = max(self.misses, MIN_MISSES)
        while GuardTimings(self.heartbeat, m).self_fence_after < 2 * self.heartbeat:
            m += 1
        return m

    def to_dict(self) -> dict[str, Any]:
        return {"heartbeat": self.heartbeat, "misses": self.misses, "detect": self.detect,
                "lease": self.lease, "self_fence_after": self.self_fence_after}


class Lease:
    """When the holder last renewed, on the monotonic clock passed in."""

    def __init__(self, now: float) -> None:
        # A fresh lease counts as renewed when made: the safe side for whoever grants on it.
        self.renewed = now

    def renew(self, now: float) -> None:
        # Never backwards: an answer arriving late must not make the lease look older.
        self.renewed = max(self.renewed, now)

    def age(self, now: float) -> float:
        return now - self.renewed

    def expired(self, now: float, limit: float) -> bool:
        return self.age(now) > limit


# --- state files -------------------------------------------------------------------------------

def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old or the new content, never a
    mix: a temporary file beside it, fsync, rename, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise GuardError(f"cannot write {path}: {err.strerror}") from err


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise GuardError(f"cannot read {path}: {err.strerror}") from err


def _epoch(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GuardError(f"{what}: an epoch is a whole number >= 0, not {value!r}")
    return value


class EpochFile:
    """This agent's epoch of a pair, on disk: ``N`` and a newline. Absent: 0."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def read(self) -> int:
        text = _read(self.path)
        if text is None:
            return 0
        try:
            value = int(text.strip())
        except ValueError as err:
            # Never guess 0: a guessed epoch could let a stale copy serve.
            raise GuardError(f"{self.path} does not hold an epoch: {text.strip()[:40]!r}",
                             hint="restore it from the witness's book, or remove the pair"
                             ) from err
        return _epoch(value, str(self.path))

    def bump_to(self, epoch: int) -> int:
        """Raise the epoch on disk to ``epoch``; never lower it. Returns the epoch now kept."""
        _epoch(epoch, "bump_to")
        with self._lock:
            current = self.read()
            if epoch > current:
                _write_atomic(self.path, f"{epoch}\n")
                return epoch
            return current

    def is_stale(self, seen: int) -> bool:
        """True when ``seen`` (an epoch learnt from the witness or the peer) is newer than the
        one on disk: this agent's copy is from an older reign and must stand down (drop the
        address, stop the copy) before anything else."""
        return _epoch(seen, "is_stale") > self.read()


# --- the witness -------------------------------------------------------------------------------

class Verdict(enum.StrEnum):
    """The witness's answer to a renewal."""

    RENEWED = "renewed"  # the active, at the current epoch: keep serving
    STAND_DOWN = "stand-down"  # older epoch, or not the active: drop the address, stop the copy
    UNKNOWN = "unknown"  # no such pair here: register it
    # An epoch newer than the witness's own: its book is behind (restored from an old copy?).
    # Nothing is renewed on a claim the witness cannot check; an operator registers the pair.
    REFUSED = "refused"


@dataclass(frozen=True)
class Grant:
    """The witness's answer to a promotion request."""

    granted: bool
    epoch: int  # the pair's epoch after the answer (the new one on a grant)
    active: str | None  # the pair's active after the answer
    reason: str
    retry_in: float = 0.0  # refused only for the lease: how long until it runs out

    def to_dict(self) -> dict[str, Any]:
        return {"granted": self.granted, "epoch": self.epoch, "active": self.active,
                "reason": self.reason}


@dataclass
class _Pair:
    epoch: int
    active: str
    standby: str
    renewal: Lease  # monotonic, never persisted

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "active": self.active, "standby": self.standby}


class WitnessBook:
    """What the witness keeps per pair: epoch, active, standby (persisted, in ``path`` as JSON)
    and the active's last renewal (monotonic, in memory only).

    After a witness restart no renewal time is known: every pair's active counts as renewed at
    the restart (``now``), the safe side, since a lease then runs a full ``lease`` from the
    restart before any grant. Every change is on disk before the method returns.
    """

    VERSION = 1

    def __init__(self, path: Path | str, now: float | None = None) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._pairs: dict[str, _Pair] = {}
        started = time.monotonic() if now is None else now
        text = _read(self.path)
        if text is not None:
            self._pairs = self._parse(text, started)

    def _parse(self, text: str, now: float) -> dict[str, _Pair]:
        try:
            data = json.loads(text)
            if data.get("version") != self.VERSION:
                raise GuardError(f"{self.path}: unknown version {data.get('version')!r}")
            pairs = {}
            for name, p in data["pairs"].items():
                pairs[str(name)] = _Pair(_epoch(p["epoch"], f"{self.path} pair {name}"),
                                         str(p["active"]), str(p["standby"]), Lease(now))
            return pairs
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise GuardError(f"{self.path} is not a witness book: {err}") from err

    def _commit(self, pairs: dict[str, _Pair]) -> None:
        """Write ``pairs`` to disk, then make them the book's: memory never claims what the
        disk does not. Called with the lock held."""
        data = {"version": self.VERSION,
                "pairs": {n: p.to_dict() for n, p in sorted(pairs.items())}}
        _write_atomic(self.path, json.dumps(data, indent=1) + "\n")
        self._pairs = pairs

    def register(self, pair: str, active: str, standby: str, epoch: int,
                 now: float | None = None) -> None:
        """Record a pair (its active counts as renewed now). Refused if it would roll the
        pair back: an older epoch, or the same epoch with other hosts."""
        for what, value in (("pair", pair), ("active", active), ("standby", standby)):
            if not isinstance(value, str) or not value:
                raise GuardError(f"register: {what} must be a non-empty name, not {value!r}")
        if active == standby:
            raise GuardError(f"register: pair {pair} names {active} as both active and standby")
        _epoch(epoch, f"register {pair}")
        at = time.monotonic() if now is None else now
        with self._lock:
            old = self._pairs.get(pair)
            if old is not None:
                if epoch < old.epoch:
                    raise GuardError(f"pair {pair} is at epoch {old.epoch} here; registering "
                                     f"epoch {epoch} would roll it back")
                if epoch == old.epoch and (active, standby) != (old.active, old.standby):
                    raise GuardError(
                        f"pair {pair} at epoch {epoch} has active {old.active} and standby "
                        f"{old.standby} here; only a promotion (a new epoch) changes them")
            self._commit({**self._pairs, pair: _Pair(epoch, active, standby, Lease(at))})

    def renew(self, pair: str, host: str, epoch: int, now: float) -> Verdict:
        """The active's renewal (``now``: when it arrived here). Nothing is written: the
        renewal time lives in memory only."""
        with self._lock:
            p = self._pairs.get(pair)
            if p is None:
                return Verdict.UNKNOWN
            if epoch < p.epoch:
                return Verdict.STAND_DOWN
            if epoch > p.epoch:
                return Verdict.REFUSED
            if host != p.active:
                return Verdict.STAND_DOWN
            p.renewal.renew(now)
            return Verdict.RENEWED

    def promote(self, pair: str, candidate: str, epoch: int, now: float,
                lease: float) -> Grant:
        """Grant ``candidate`` the pair if it is the standby, at the current epoch, and the
        active's last renewal is older than ``lease``. ``lease`` is the witness's own (from its
        configuration), never one taken from the candidate's request. On a grant, the new
        epoch and active are on disk before this returns; a refusal writes nothing."""
        with self._lock:
            p = self._pairs.get(pair)
            if p is None:
                return Grant(False, 0, None, f"the witness knows no pair {pair}")
            if candidate != p.standby:
                return Grant(False, p.epoch, p.active,
                             f"{candidate} is not the standby of {pair} ({p.standby} is)")
            if epoch != p.epoch:
                return Grant(False, p.epoch, p.active,
                             f"{candidate} asks at epoch {epoch}; the pair is at {p.epoch}")
            age = p.renewal.age(now)
            if not p.renewal.expired(now, lease):
                return Grant(False, p.epoch, p.active,
                             f"{p.active} renewed {_fmt(max(age, 0.0))} ago, within the lease "
                             f"of {_fmt(lease)}", retry_in=max(lease - age, 0.0))
            # The new active counts as renewed at its grant: no second grant within a lease.
            new = _Pair(p.epoch + 1, candidate, p.active, Lease(now))
            self._commit({**self._pairs, pair: new})
        return Grant(True, new.epoch, candidate,
                     f"{p.active} has not renewed for {_fmt(age)} (lease {_fmt(lease)})")

    def forget(self, pair: str) -> bool:
        with self._lock:
            if pair not in self._pairs:
                return False
            self._commit({n: p for n, p in self._pairs.items() if n != pair})
            return True

    def epoch_of(self, pair: str) -> int | None:
        with self._lock:
            p = self._pairs.get(pair)
            return None if p is None else p.epoch

    def get(self, pair: str) -> dict[str, Any] | None:
        with self._lock:
            p = self._pairs.get(pair)
            return None if p is None else p.to_dict()

    def status(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Every pair: epoch, active, standby, and (given ``now``) the renewal's age."""
        with self._lock:
            out = {}
            for name, p in sorted(self._pairs.items()):
                d = p.to_dict()
                if now is not None:
                    d["renewed_ago"] = p.renewal.age(now)
                out[name] = d
            return out


# --- the two sides of a pair --------------------------------------------------------------------

class ActiveGuard:
    """The active's side: it must fence itself once it has heard neither the standby nor the
    witness for ``self_fence_after``.

    ``now``: when the request that made this host the active (its grant, its registration) was
    sent; both contacts count from then. Each ``heard_from_*`` takes the time the answered
    request was *sent* (a heartbeat the standby acknowledged, a renewal the witness answered
    RENEWED), never the time the answer arrived. A STAND_DOWN verdict is not a contact: the
    caller fences at once. Call ``must_fence`` at least every heartbeat.
    """

    def __init__(self, timings: GuardTimings, now: float) -> None:
        self.timings = timings
        self.standby = Lease(now)
        self.witness = Lease(now)

    def heard_from_standby(self, sent: float) -> None:
        self.standby.renew(sent)

    def heard_from_witness(self, sent: float) -> None:
        self.witness.renew(sent)

    def silence(self, now: float) -> float:
        """How long since the more recent of the two contacts."""
        return min(self.standby.age(now), self.witness.age(now))

    def must_fence(self, now: float) -> bool:
        return self.silence(now) > self.timings.self_fence_after

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"standby_ago": self.standby.age(now), "witness_ago": self.witness.age(now),
                "self_fence_after": self.timings.self_fence_after,
                "must_fence": self.must_fence(now)}


class StandbyWatch:
    """The standby's side: counts heartbeats from the active and suspects it once ``detect``
    has passed since the last good one (then, and only then, it may ask the witness)."""

    def __init__(self, timings: GuardTimings, now: float) -> None:
        self.timings = timings
        self.last_ok = Lease(now)  # a watch just started waits a full detect
        self.seen = 0
        self.missed = 0
        self.missed_in_a_row = 0

    def heartbeat_ok(self, now: float) -> None:
        """A heartbeat from the active arrived (``now``: when it arrived here)."""
        self.last_ok.renew(now)
        self.seen += 1
        self.missed_in_a_row = 0

    def heartbeat_missed(self, now: float) -> None:
        """A heartbeat was due and did not come (``now`` is only for symmetry and logs)."""
        del now
        self.missed += 1
        self.missed_in_a_row += 1

    def silence(self, now: float) -> float:
        return self.last_ok.age(now)

    def suspects(self, now: float) -> bool:
        return self.silence(now) >= self.timings.detect

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"seen": self.seen, "missed": self.missed, "missed_in_a_row": self.missed_in_a_row,
                "silence": self.silence(now), "suspects": self.suspects(now)}
