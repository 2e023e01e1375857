"""This host's wall clock as several hosts agree on one instant with it: NTP-style offset
estimates from timestamp exchanges, and a precise wait until an instant.

Interface: ``clock_gettime(CLOCK_REALTIME)`` and ``clock_nanosleep``-grade sleeps through
Python's ``time`` module. No privileges. Pure but for reading the clock and sleeping.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

# The last stretch before an instant is spun, not slept: a sleep may overshoot by a scheduler
# tick (up to ~1 ms on a busy 2-core machine); a spin of 2 ms costs 2 ms of one core. A thread
# at real-time priority wakes from its sleep within tens of µs: it spins less.
SPIN_NS = 2_000_000
URGENT_SPIN_NS = 300_000
URGENT_PRIORITY = 50  # SCHED_FIFO: above every ordinary task, below the kernel's own threads
URGENT_SWITCH_S = 0.00005


@contextlib.contextmanager
def urgent() -> Iterator[bool]:
    """The calling thread runs at real-time priority (SCHED_FIFO) inside: what it does at an
    instant is not held up by the work of others (on a small host, by the members already
    resumed). Yields whether it could (CAP_SYS_NICE, an RT budget in its cpu cgroup)."""
    # Python threads take turns holding the interpreter every switch interval (5 ms): a thread
    # woken at its instant would wait that long for one that holds it. Shorter while inside.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(URGENT_SWITCH_S)
    try:
        before = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(URGENT_PRIORITY))
    except (OSError, AttributeError):
        try:
            yield False
        finally:
            sys.setswitchinterval(interval)
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, before[0], before[1])
        sys.setswitchinterval(interval)


def now_ns() -> int:
    """CLOCK_REALTIME in ns: the clock every agent schedules and stamps with."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


def wait_until(t_ns: int, *, spin_ns: int = SPIN_NS) -> int:
    """Return at ``t_ns`` (this host's CLOCK_REALTIME) as closely as this host can: sleep until
    ``spin_ns`` before it, then spin. Returns how late it woke (ns, >= 0; large when ``t_ns`` had
    passed already)."""
    while True:
        left = t_ns - now_ns()
        if left <= spin_ns:
            break
        time.sleep((left - spin_ns) / 1e9)
    while True:
        late = now_ns() - t_ns
        if late >= 0:
            return late


@dataclass(frozen=True)
class ClockSample:
    """One exchange: t0 the caller sent, t1 the agent received, t2 it answered, t3 the caller
    got the answer; t0 and t3 on the caller's clock, t1 and t2 on the agent's (ns)."""

    t0: int
    t1: int
    t2: int
    t3: int

    @property
    def offset_ns(self) -> float:
        """The agent's clock minus the caller's, assuming the way out and back took as long."""
        return ((self.t1 - self.t0) + (self.t2 - self.t3)) / 2

    @property
    def delay_ns(self) -> int:
        """The round trip spent on the network and in the stacks (not in the agent)."""
        return (self.t3 - self.t0) - (self.t2 - self.t1)


@dataclass(frozen=True)
class ClockEstimate:
    """The agent's offset from the caller's clock, from the sample with the shortest round trip
    (NTP's rule: a quick exchange leaves the least room for asymmetry). The true offset lies
    within ``error_ns`` (half that round trip) of ``offset_ns``."""

    offset_ns: int
    delay_ns: int
    samples: int

    @property
    def error_ns(self) -> int:
        return max(0, self.delay_ns) // 2

    def to_agent(self, t_ns: int) -> int:
        """An instant on the caller's clock, read on the agent's."""
        return int(t_ns + self.offset_ns)

    def to_caller(self, t_ns: int) -> int:
        """An instant on the agent's clock, read on the caller's."""
        return int(t_ns - self.offset_ns)

    def to_dict(self) -> dict[str, Any]:
        return {"offset_us": round(self.offset_ns / 1000, 1),
                "error_us": round(self.error_ns / 1000, 1),
                "samples": self.samples}


def estimate(samples: Iterable[ClockSample]) -> ClockEstimate:
    """The best estimate from ``samples``; ValueError if there are none or they make no sense
    (an answer before its question)."""
    good = [s for s in samples if s.t3 >= s.t0 and s.t2 >= s.t1]
    if not good:
        raise ValueError("no usable clock sample (each needs t0 <= t3 and t1 <= t2)")
    best = min(good, key=lambda s: s.delay_ns)
    return ClockEstimate(round(best.offset_ns), best.delay_ns, len(good))


def spread_ns(instants: Iterable[int]) -> int:
    """How far apart a set of instants (on one clock) lie: max - min; 0 for one or none."""
    values = list(instants)
    return max(values) - min(values) if len(values) > 1 else 0
