"""The sync benchmark's pure half: the plan (a heartbeat sweep, and a stagger sweep interleaved
in rounds), the record of one round (a synchronized save left running, writes, a restore, the
cluster's state before, between and after), whether an election happened across the save and
across the restore, the writer's longest gap around each, the summaries (medians with min-max
spreads over the rounds), the shortest heartbeat interval that survived every round, and the
targets of the issue, each met or not.

Wraps no interface and needs no privileges: nothing here starts a process or touches the host,
so all of it is unit-tested.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from orthros_py.bench.pair.model import Figure, Target

DEFAULT_HEARTBEATS_MS: tuple[int, ...] = (1000, 300, 100, 50, 20)
DEFAULT_STAGGERS_MS: tuple[int, ...] = (0, 50, 200, 400, 1000)
# etcd refuses an election timeout below 5 heartbeats (embed.Config.Validate) or above 50 s.
MIN_ELECTION_FACTOR = 5.0
MAX_ELECTION_MS = 50_000
HEARTBEAT = "heartbeat"
STAGGER = "stagger"
PARTS = (HEARTBEAT, STAGGER)

# The targets: reported, never asserted.
TARGET_RESUME_SKEW_US = 1000.0  # members resumed within 1 ms of each other
SEED_RESUME_SKEW_MS = 400  # what the seed paper had left
TARGET_HEARTBEAT_MS = 100  # survives every save and restore without an election
SEED_HEARTBEAT_MS = 300  # the seed's heartbeat, which did not

SAVE_STAGES = ("clock", "prepare", "freeze", "dump", "resume")
RESTORE_STAGES = ("check", "clock", "replace", "restore", "resume")


# --- options ------------------------------------------------------------------------------------


def parse_ms_list(text: str, *, minimum: int, maximum: int, what: str) -> tuple[int, ...]:
    """``1000,300, 100ms,0.05s`` -> (1000, 300, 100, 50): whole milliseconds in the order
    given, each once; ValueError naming what is wrong."""
    out: list[int] = []
    for raw in text.split(","):
        part = raw.strip().replace("_", "").lower()
        if not part:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s)?", part)
        if m is None:
            raise ValueError(f"{part!r} is not a {what} (give milliseconds: 100,50,20)")
        ms = float(m[1]) * (1000.0 if m[2] == "s" else 1.0)
        if ms != int(ms) or not minimum <= ms <= maximum:
            raise ValueError(f"{part!r}: a {what} is a whole number of milliseconds, "
                             f"{minimum} to {maximum:,}")
        out.append(int(ms))
    if not out:
        raise ValueError(f"no {what} given")
    return tuple(dict.fromkeys(out))


def parse_heartbeats(text: str) -> tuple[int, ...]:
    return parse_ms_list(text, minimum=1, maximum=MAX_ELECTION_MS // 5, what="heartbeat")


def parse_staggers(text: str) -> tuple[int, ...]:
    return parse_ms_list(text, minimum=0, maximum=10_000, what="stagger")


@dataclass(frozen=True)
class BenchConfig:
    heartbeats: tuple[int, ...] = DEFAULT_HEARTBEATS_MS
    reps: int = 5  # rounds per heartbeat
    staggers: tuple[int, ...] = DEFAULT_STAGGERS_MS
    stagger_reps: int = 3  # rounds of the stagger sweep (every stagger once per round)
    stagger_heartbeat_ms: int = TARGET_HEARTBEAT_MS
    election_factor: float = MIN_ELECTION_FACTOR  # election timeout = this x heartbeat
    write_s: float = 0.5  # the writer writes this long between a save and its restore
    settle_s: float = 1.0  # the cluster is looked at again this long after a restore
    recover_timeout_s: float = 60.0  # how long an election after a restore may take
    volume_mib: int = 2048
    seed: int | None = None
    out: Path = Path("results")

    def __post_init__(self) -> None:
        if self.election_factor < MIN_ELECTION_FACTOR:
            raise ValueError(f"etcd needs an election timeout of at least "
                             f"{MIN_ELECTION_FACTOR:g} heartbeats, not {self.election_factor:g}")
        for hb in (*self.heartbeats, self.stagger_heartbeat_ms):
            if self.election_ms(hb) > MAX_ELECTION_MS:
                raise ValueError(f"heartbeat {hb} ms x {self.election_factor:g} is more than "
                                 f"etcd's largest election timeout ({MAX_ELECTION_MS:,} ms)")

    def election_ms(self, heartbeat_ms: int) -> int:
        return round(heartbeat_ms * self.election_factor)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["heartbeats"] = list(self.heartbeats)
        d["staggers"] = list(self.staggers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["out"] = Path(kw.get("out", "results"))
        kw["heartbeats"] = tuple(int(x) for x in kw.get("heartbeats", DEFAULT_HEARTBEATS_MS))
        kw["staggers"] = tuple(int(x) for x in kw.get("staggers", DEFAULT_STAGGERS_MS))
        return cls(**kw)


def config_for(*, quick: bool = False, heartbeats: tuple[int, ...] | None = None,
               reps: int | None = None, staggers: tuple[int, ...] | None = None,
               stagger_reps: int | None = None, **rest: Any) -> BenchConfig:
    """The configuration the command's options ask for: what is given, else ``--quick``'s
    (one cluster at the target's heartbeat, two rounds, the two ends of the staggers once),
    else the defaults. ValueError for what etcd would refuse."""
    if quick:
        heartbeats = heartbeats or (TARGET_HEARTBEAT_MS,)
        reps = reps or 2
        staggers = staggers or (0, 1000)
        stagger_reps = 1 if stagger_reps is None else stagger_reps
    return BenchConfig(heartbeats=heartbeats or DEFAULT_HEARTBEATS_MS, reps=reps or 5,
                       staggers=staggers or DEFAULT_STAGGERS_MS,
                       stagger_reps=3 if stagger_reps is None else stagger_reps, **rest)


POSITIONS = ("first", "middle", "last")  # the leader's turn among 3 members resumed in turn


@dataclass(frozen=True)
class PlannedRound:
    part: str  # HEARTBEAT or STAGGER
    heartbeat_ms: int
    stagger_ms: int
    rep: int
    # Stagger rounds: the leader is moved to the member resumed at this turn (0 first) before
    # the save; None: whoever leads.
    leader_position: int | None = None

    @property
    def name(self) -> str:
        """The snapshot's name (lower-case letters, digits, '-')."""
        if self.part == HEARTBEAT:
            return f"hb{self.heartbeat_ms}-r{self.rep}"
        return f"st{self.stagger_ms}-hb{self.heartbeat_ms}-r{self.rep}"

    @property
    def cluster_key(self) -> tuple[str, int]:
        """Rounds with one key run on one cluster, one after the other."""
        return (self.part, self.heartbeat_ms)


def plan(config: BenchConfig, seed: int) -> list[PlannedRound]:
    """Every round in order: per heartbeat (a fresh cluster each) its ``reps`` rounds; then the
    stagger sweep on a cluster of its own, ``stagger_reps`` rounds each with every stagger once,
    in an order shuffled anew each round (by ``seed``), so that drift hits every stagger
    alike; in each, the leader is the member resumed last, in the middle, then first, in
    turn."""
    rng = random.Random(seed)
    out = [PlannedRound(HEARTBEAT, hb, 0, rep)
           for hb in config.heartbeats for rep in range(config.reps)]
    for rep in range(config.stagger_reps):
        order = list(config.staggers)
        rng.shuffle(order)
        out += [PlannedRound(STAGGER, config.stagger_heartbeat_ms, s, rep,
                             leader_position_for(rep)) for s in order]
    return out


def leader_position_for(rep: int, members: int = 3) -> int:
    """Where the leader stands in the resume order in stagger round ``rep``: last first (the
    worst case: the followers wait longest for it), then middle, then first, in turn."""
    return (members - 1 - rep) % members


# --- the writer's view ------------------------------------------------------------------------


def longest_gap(acks: Iterable[float], t0: float, t1: float, until: float) -> float:
    """The longest time without an acknowledgement that overlaps the operation ``[t0, t1]``:
    from the last ack at or before ``t0`` (``t0`` if none) through the acks that follow, up to
    the first ack after ``t1``. If none came after ``t1`` by ``until``, the last gap runs to
    ``until`` (a lower bound). Seconds."""
    times = sorted(acks)
    prev = max((a for a in times if a <= t0), default=t0)
    best = 0.0
    for a in times:
        if a <= prev:
            continue
        if a > until:
            break
        best = max(best, a - prev)
        prev = a
        if prev > t1:
            return best
    return max(best, until - prev)


# --- etcd's logs --------------------------------------------------------------------------------

# What etcd 3.4 (raft, at info level and above) says around an election or a stall.
ELECTION_WORDS = re.compile(
    r"election|became (?:pre-)?candidate|became leader|became follower|elected leader|"
    r"lost leader|changed leader|leader changed|heartbeat on time|took too long|overloaded|"
    r"rejected msgvote|ignored msgvote|received msgvoteresp|campaign", re.IGNORECASE)


def parse_log_time(ts: str) -> float | None:
    """A zap ``ts`` (``2026-11-28T10:00:00.123+0000`` or ``...Z``) as seconds since the epoch."""
    text = ts.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    text = re.sub(r"([+-]\d{2})(\d{2})$", r"\1:\2", text)
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


CAMPAIGN = re.compile(r"became (?:pre-)?candidate at term")


def count_campaigns(lines: Iterable[str], t0: float, t1: float) -> int:
    """How many campaigns etcd's log (zap JSON) records between ``t0`` and ``t1``: a member that
    became a (pre-)candidate. The status' raft term is the last applied entry's, which a
    campaign leaves unchanged until a leader commits in the new term: this sees every one."""
    import json

    n = 0
    for line in lines:
        if "candidate" not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or not CAMPAIGN.search(str(rec.get("msg", ""))):
            continue
        at = parse_log_time(str(rec.get("ts", "")))
        if at is not None and t0 <= at <= t1:
            n += 1
    return n


def log_events(lines: Iterable[str], t0: float, t1: float, *, host: str = "",
               limit: int = 12) -> list[tuple[float, str]]:
    """etcd's log lines (zap JSON) between ``t0`` and ``t1`` that speak of elections, leaders or
    stalls: (seconds after ``t0``, ``+MS ms host: msg``); at most ``limit``."""
    import json

    out: list[tuple[float, str]] = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        at = parse_log_time(str(rec.get("ts", "")))
        msg = str(rec.get("msg", ""))
        if at is None or not t0 <= at <= t1 or not ELECTION_WORDS.search(msg):
            continue
        out.append((at - t0, f"+{(at - t0) * 1000:,.0f} ms {host + ': ' if host else ''}{msg}"))
        if len(out) >= limit:
            break
    return out


# --- one round --------------------------------------------------------------------------------


@dataclass
class SyncRound:
    """One round: the cluster looked at, saved (left running), written on for ``write_s``,
    restored (members resumed ``stagger_ms`` apart, 0: at one instant), looked at at once and
    ``settle_s`` later (and, if it was not healthy then, until it was again). Terms are raft
    terms (the highest any member reports); leaders are member names; times are this machine's
    wall clock (every lab host shares it)."""

    part: str
    heartbeat_ms: int
    election_ms: int
    stagger_ms: int
    rep: int
    seq: int = 0
    name: str = ""
    ok: bool = False
    error: str | None = None
    stage: str | None = None  # where it failed
    # The cluster's state: before the save, right after it, just before the restore, right
    # after the restore, settle_s later, and once healthy again (if it was not).
    term_before: int | None = None
    leader_before: str | None = None
    term_after_save: int | None = None
    leader_after_save: str | None = None
    term_before_restore: int | None = None
    leader_before_restore: str | None = None
    term_after_restore: int | None = None
    leader_after_restore: str | None = None
    healthy_after_restore: bool | None = None
    term_settled: int | None = None
    leader_settled: str | None = None
    healthy_settled: bool | None = None
    term_recovered: int | None = None
    # Campaigns in etcd's logs: from the save to the restore, and from the restore to the end.
    campaigns_save: int | None = None
    campaigns_restore: int | None = None
    recovered_s: float | None = None  # restore's end to healthy again, when it was not settled
    # The save (left running) and the restore, from their reports.
    save_ms: float | None = None
    save_stages_ms: dict[str, float] = field(default_factory=dict)
    freeze_skew_us: float | None = None
    freeze_settled_skew_us: float | None = None
    save_resume_skew_us: float | None = None
    save_resume_settled_skew_us: float | None = None
    save_clock_error_us: float | None = None
    restore_ms: float | None = None
    restore_stages_ms: dict[str, float] = field(default_factory=dict)
    resume_skew_us: float | None = None
    resume_settled_skew_us: float | None = None
    restore_clock_error_us: float | None = None
    # The raw stamps (see stamps_us): the save's freeze and resume, the restore's resume.
    freeze_stamps_us: dict[str, list[float]] = field(default_factory=dict)
    save_resume_stamps_us: dict[str, list[float]] = field(default_factory=dict)
    resume_stamps_us: dict[str, list[float]] = field(default_factory=dict)
    members: list[dict[str, Any]] = field(default_factory=list)  # per member, see member_facts
    resume_order: list[str] = field(default_factory=list)  # the restore's members' hosts, in turn
    warnings: list[str] = field(default_factory=list)
    # The writer: its longest time without an acknowledgement around each operation, and what
    # it got acknowledged between the save and the restore (which the restore takes back).
    gap_save_s: float | None = None
    gap_restore_s: float | None = None
    acked_between: int | None = None
    failures_restore: int | None = None
    # The btrfs at the round's end, synced: the live data, the restored data and the snapshot.
    volume_used_bytes: int | None = None
    t_save: float | None = None
    t_restore: float | None = None
    t_end: float | None = None
    log: list[str] = field(default_factory=list)  # etcd's lines about elections, if any
    wall_s: float = 0.0

    # -- elections --------------------------------------------------------------------------

    @staticmethod
    def _growth(base: int | None, *later: int | None) -> int | None:
        seen = [t for t in later if t is not None]
        if base is None or not seen:
            return None
        return max(0, max(seen) - base)

    @property
    def save_term_growth(self) -> int | None:
        """How much the term grew from before the save to just before the restore."""
        return self._growth(self.term_before, self.term_after_save, self.term_before_restore)

    @property
    def save_leader_changed(self) -> bool | None:
        after = [x for x in (self.leader_after_save, self.leader_before_restore) if x]
        if not self.leader_before or not after:
            return None
        return any(x != self.leader_before for x in after)

    @property
    def save_election(self) -> bool | None:
        """An election across the save: the term grew, another member leads, or a member
        campaigned (etcd's log)."""
        g, lc, c = self.save_term_growth, self.save_leader_changed, self.campaigns_save
        if g is None and lc is None and c is None:
            return None
        return bool(g) or bool(lc) or bool(c)

    @property
    def restore_term_growth(self) -> int | None:
        """How much the term grew from the save's (the term before it: what the snapshot holds)
        to after the restore (at once, settled, or once healthy again)."""
        return self._growth(self.term_before, self.term_after_restore, self.term_settled,
                            self.term_recovered)

    @property
    def restore_leader_changed(self) -> bool | None:
        after = [x for x in (self.leader_after_restore, self.leader_settled) if x]
        if not self.leader_before or not after:
            return None
        return any(x != self.leader_before for x in after)

    @property
    def restore_election(self) -> bool | None:
        g, lc, c = self.restore_term_growth, self.restore_leader_changed, self.campaigns_restore
        if g is None and lc is None and c is None:
            return None
        return bool(g) or bool(lc) or bool(c)

    @property
    def leader_position(self) -> int | None:
        """The leader's turn (0 first) in the restore's resume order, as it led at the save."""
        if self.leader_before in self.resume_order:
            return self.resume_order.index(str(self.leader_before))
        return None

    @property
    def survived(self) -> bool:
        """Went through without an election, and the cluster was healthy a moment after the
        restore: what the issue asks of a heartbeat interval."""
        return (self.ok and self.save_election is False and self.restore_election is False
                and bool(self.healthy_settled))

    # -- sizes -------------------------------------------------------------------------------

    def _sum(self, key: str) -> float | None:
        got = [m.get(key) for m in self.members]
        vals = [float(v) for v in got if v is not None]
        return sum(vals) if vals else None

    @property
    def image_bytes(self) -> float | None:
        """The snapshot's checkpoints, every member's (disk blocks)."""
        return self._sum("image_bytes")

    @property
    def data_bytes(self) -> float | None:
        """The snapshot's data directories, every member's (apparent size: a reflink shares
        them with the live directories)."""
        return self._sum("data_bytes")

    @property
    def freeze_requested_skew_us(self) -> float | None:
        """How far apart the agents woke to freeze (before their writes)."""
        return spread_us(self.freeze_stamps_us, 0)

    @property
    def save_resume_requested_skew_us(self) -> float | None:
        return spread_us(self.save_resume_stamps_us, 0)

    @property
    def resume_requested_skew_us(self) -> float | None:
        """How far apart the agents woke to thaw after the restore (before their writes)."""
        return spread_us(self.resume_stamps_us, 0)

    @property
    def frozen_ms(self) -> float | None:
        """How long the save kept the slowest member frozen (its freeze to its resume)."""
        got = [m.get("frozen_ms") for m in self.members]
        vals = [float(v) for v in got if v is not None]
        return max(vals) if vals else None

    def value(self, key: str) -> float | None:
        """A figure of the round by name (see METRICS); None for a failed round."""
        if not self.ok:
            return None
        if key.startswith("save:"):
            return self.save_stages_ms.get(key[5:])
        if key.startswith("restore:"):
            return self.restore_stages_ms.get(key[8:])
        v = getattr(self, key)
        return None if v is None else float(v)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(save_term_growth=self.save_term_growth, save_election=self.save_election,
                 save_leader_changed=self.save_leader_changed,
                 restore_term_growth=self.restore_term_growth,
                 restore_leader_changed=self.restore_leader_changed,
                 restore_election=self.restore_election, survived=self.survived,
                 image_bytes=self.image_bytes, data_bytes=self.data_bytes,
                 frozen_ms=self.frozen_ms, leader_position=self.leader_position,
                 freeze_requested_skew_us=self.freeze_requested_skew_us,
                 save_resume_requested_skew_us=self.save_resume_requested_skew_us,
                 resume_requested_skew_us=self.resume_requested_skew_us)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SyncRound:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def member_facts(saved: Mapping[str, Any], restored: Mapping[str, Any] | None) -> dict[str, Any]:
    """One member's sizes and times from its entry in the save's report (and the restore's)."""
    data = list(saved.get("data") or [])
    freeze, resume = saved.get("freeze") or {}, saved.get("resume") or {}
    frozen = None
    if freeze.get("written_ns") is not None and resume.get("written_ns") is not None:
        frozen = round((int(resume["written_ns"]) - int(freeze["written_ns"])) / 1e6, 3)
    r = restored or {}
    return {"host": saved.get("host"), "member": saved.get("member"),
            "tasks": saved.get("tasks"), "conns": saved.get("conns"),
            "timens": saved.get("timens"), "dump_ms": saved.get("dump_ms"),
            "image_bytes": saved.get("image_bytes"),
            "data_bytes": sum(int(x.get("bytes") or 0) for x in data) if data else None,
            "data_files": sum(int(x.get("files") or 0) for x in data) if data else None,
            "data_methods": sorted({str(x.get("method")) for x in data}),
            "data_snapshot_ms": sum(float(x.get("elapsed_ms") or 0) for x in data)
            if data else None,
            "frozen_ms": frozen, "restore_ms": r.get("restore_ms"),
            "data_restore_ms": r.get("data_ms")}


def stamps_us(members: Sequence[Mapping[str, Any]], clocks: Mapping[str, Mapping[str, Any]],
              phase: str) -> dict[str, list[float]]:
    """Each member's ``phase`` stamp ("freeze" or "resume": requested, written, settled) on the
    coordinator's clock, in µs after the earliest member's request: {member: [requested,
    written, settled]}. Who went first and where the time went (the wake-up before the write,
    the write, the group seen settled)."""
    raw: dict[str, list[float]] = {}
    for m in members:
        st = m.get(phase) or {}
        off_ns = float((clocks.get(str(m.get("host"))) or {}).get("offset_us") or 0.0) * 1000
        try:
            raw[str(m.get("member"))] = [float(st[k]) - off_ns for k in
                                         ("requested_ns", "written_ns", "settled_ns")]
        except (KeyError, TypeError, ValueError):
            continue
    if not raw:
        return {}
    t0 = min(v[0] for v in raw.values())
    return {k: [round((x - t0) / 1000, 1) for x in v] for k, v in raw.items()}


def spread_us(stamps: Mapping[str, Sequence[float]], index: int) -> float | None:
    """How far apart the members' stamps ``index`` (0 requested, 1 written, 2 settled) lie."""
    vals = [v[index] for v in stamps.values() if len(v) > index]
    return round(max(vals) - min(vals), 1) if len(vals) > 1 else None


# --- summaries --------------------------------------------------------------------------------

# (key, label, unit): the figures of the tables and of results.json's summaries.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("save_ms", "save", "ms"),
    ("restore_ms", "restore", "ms"),
    ("frozen_ms", "frozen by the save", "ms"),
    ("freeze_skew_us", "freeze skew", "us"),
    ("freeze_settled_skew_us", "freeze skew (settled)", "us"),
    ("save_resume_skew_us", "save's resume skew", "us"),
    ("save_resume_settled_skew_us", "save's resume skew (settled)", "us"),
    ("resume_skew_us", "restore's resume skew", "us"),
    ("resume_settled_skew_us", "restore's resume skew (settled)", "us"),
    ("freeze_requested_skew_us", "freeze skew (woken)", "us"),
    ("save_resume_requested_skew_us", "save's resume skew (woken)", "us"),
    ("resume_requested_skew_us", "restore's resume skew (woken)", "us"),
    ("save_clock_error_us", "clock error (save)", "us"),
    ("restore_clock_error_us", "clock error (restore)", "us"),
    ("gap_save_s", "writer's longest gap, save", "s"),
    ("gap_restore_s", "writer's longest gap, restore", "s"),
    ("acked_between", "keys acked between save and restore", "n"),
    ("image_bytes", "checkpoint bytes (3 members)", "B"),
    ("data_bytes", "data bytes (3 members)", "B"),
    ("volume_used_bytes", "btrfs used at the round's end", "B"),
    *((f"save:{s}", f"save: {s}", "ms") for s in SAVE_STAGES),
    *((f"restore:{s}", f"restore: {s}", "ms") for s in RESTORE_STAGES),
)


@dataclass
class GroupSummary:
    """The rounds of one heartbeat (heartbeat sweep) or one stagger (stagger sweep)."""

    part: str
    heartbeat_ms: int
    election_ms: int
    stagger_ms: int
    rounds: int
    ok: int
    survived: int
    save_elections: int  # rounds with an election across the save
    restore_elections: int  # rounds with an election across the restore
    healthy_at_once: int  # rounds healthy right after the restore
    term_growth: Figure  # across the restore, per round
    campaigns: Figure  # campaigns in etcd's logs after the restore, per round
    recovered_s: Figure  # back to healthy, for rounds that were not a moment after
    figures: dict[str, Figure]
    errors: list[str]
    # {leader's turn in the resume order: (rounds with an election across the restore, rounds)}
    by_leader: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def all_survived(self) -> bool:
        return self.rounds > 0 and self.survived == self.rounds

    def to_dict(self) -> dict[str, Any]:
        return {"part": self.part, "heartbeat_ms": self.heartbeat_ms,
                "election_ms": self.election_ms, "stagger_ms": self.stagger_ms,
                "rounds": self.rounds, "ok": self.ok, "survived": self.survived,
                "all_survived": self.all_survived, "save_elections": self.save_elections,
                "restore_elections": self.restore_elections,
                "healthy_at_once": self.healthy_at_once,
                "term_growth": self.term_growth.to_dict(),
                "campaigns": self.campaigns.to_dict(),
                "recovered_s": self.recovered_s.to_dict(),
                "figures": {k: v.to_dict() for k, v in self.figures.items()},
                "errors": self.errors,
                "by_leader": {POSITIONS[k] if k < len(POSITIONS) else str(k): list(v)
                              for k, v in sorted(self.by_leader.items())}}


def _group(rounds: Sequence[SyncRound]) -> GroupSummary:
    first = rounds[0]
    good = [r for r in rounds if r.ok]
    return GroupSummary(
        part=first.part, heartbeat_ms=first.heartbeat_ms, election_ms=first.election_ms,
        stagger_ms=first.stagger_ms, rounds=len(rounds), ok=len(good),
        survived=sum(1 for r in rounds if r.survived),
        save_elections=sum(1 for r in good if r.save_election),
        restore_elections=sum(1 for r in good if r.restore_election),
        healthy_at_once=sum(1 for r in good if r.healthy_after_restore),
        term_growth=Figure.of([None if r.restore_term_growth is None
                               else float(r.restore_term_growth) for r in good]),
        campaigns=Figure.of([None if r.campaigns_restore is None
                             else float(r.campaigns_restore) for r in good]),
        recovered_s=Figure.of([r.recovered_s for r in good]),
        figures={k: Figure.of([r.value(k) for r in good]) for k, _, _ in METRICS},
        errors=list(dict.fromkeys(f"{r.name}: {r.error}" for r in rounds if r.error)),
        by_leader={p: (sum(1 for r in good if r.leader_position == p and r.restore_election),
                       sum(1 for r in good if r.leader_position == p))
                   for p in sorted({r.leader_position for r in good
                                    if r.leader_position is not None})})


def summarize_heartbeats(rounds: Sequence[SyncRound]) -> list[GroupSummary]:
    """The heartbeat sweep per heartbeat, longest first."""
    mine = [r for r in rounds if r.part == HEARTBEAT]
    return [_group([r for r in mine if r.heartbeat_ms == hb])
            for hb in sorted({r.heartbeat_ms for r in mine}, reverse=True)]


def summarize_staggers(rounds: Sequence[SyncRound]) -> list[GroupSummary]:
    """The stagger sweep per stagger, shortest first."""
    mine = [r for r in rounds if r.part == STAGGER]
    return [_group([r for r in mine if r.stagger_ms == s])
            for s in sorted({r.stagger_ms for r in mine})]


def shortest_surviving(heartbeats: Sequence[GroupSummary]) -> int | None:
    """The shortest heartbeat interval at which every round went without an election (and
    without a failure); None if none did."""
    ok = [s.heartbeat_ms for s in heartbeats if s.all_survived]
    return min(ok) if ok else None


def headline(heartbeats: Sequence[GroupSummary]) -> str:
    """The result the issue wants, in one sentence."""
    if not heartbeats:
        return "no heartbeat was measured"
    per = ", ".join(f"{s.heartbeat_ms:,} ms {s.survived}/{s.rounds}" for s in heartbeats)
    best = shortest_surviving(heartbeats)
    if best is None:
        return f"no heartbeat interval survived every save and restore (rounds without an " \
               f"election: {per})"
    text = (f"the shortest heartbeat interval at which every save and restore went without an "
            f"election: {best:,} ms (rounds without an election: {per})")
    worse = [s.heartbeat_ms for s in heartbeats if s.heartbeat_ms > best and not s.all_survived]
    if worse:
        text += (f"; but the longer {', '.join(f'{h:,}' for h in worse)} ms did not survive "
                 "every round")
    return text


# --- targets ----------------------------------------------------------------------------------


def _fmt_us(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f} µs" if v >= 100 else f"{v:,.1f} µs"


def _skew_target(name: str, values: Sequence[float], seed_note: str) -> Target:
    goal = f"< {TARGET_RESUME_SKEW_US / 1000:g} ms between members ({seed_note})"
    if not values:
        return Target(name, goal, "—", None, "not measured")
    f = Figure.of(list(values))
    over = [v for v in values if v >= TARGET_RESUME_SKEW_US]
    value = f"median {_fmt_us(f.median)} [{_fmt_us(f.low)}-{_fmt_us(f.high)}], " \
            f"{len(values)} resumes"
    met = not over
    detail = "every one under 1 ms" if met else \
        f"{len(over)} of {len(values)} at 1 ms or more (worst {_fmt_us(max(over))})"
    return Target(name, goal, value, met, detail)


def targets(rounds: Sequence[SyncRound]) -> list[Target]:
    """Resume skew under 1 ms (the restores at one instant, and the saves' resumes), and a
    100 ms heartbeat through every save and restore without an election."""
    synced = [r for r in rounds if r.ok and r.stagger_ms == 0]
    out = [
        _skew_target("resume skew after a restore",
                     [r.resume_skew_us for r in synced if r.resume_skew_us is not None],
                     f"the seed's: ~{SEED_RESUME_SKEW_MS} ms"),
        _skew_target("resume skew after a save (--leave-running)",
                     [r.save_resume_skew_us for r in rounds
                      if r.ok and r.save_resume_skew_us is not None],
                     "members frozen and resumed at one instant"),
    ]
    name = f"{TARGET_HEARTBEAT_MS} ms heartbeat through every save and restore"
    goal = f"no election in any round (the seed's {SEED_HEARTBEAT_MS} ms had elections)"
    mine = [r for r in rounds if r.part == HEARTBEAT and r.heartbeat_ms == TARGET_HEARTBEAT_MS]
    if not mine:
        out.append(Target(name, goal, "—", None, f"{TARGET_HEARTBEAT_MS} ms was not in the "
                                                 "heartbeat sweep"))
        return out
    s = _group(mine)
    value = f"{s.survived}/{s.rounds} rounds without an election"
    problems = []
    if s.ok < s.rounds:
        problems.append(f"{s.rounds - s.ok} round(s) failed")
    if s.save_elections:
        problems.append(f"{s.save_elections} election(s) across a save")
    if s.restore_elections:
        problems.append(f"{s.restore_elections} election(s) across a restore")
    unhealthy = sum(1 for r in mine if r.ok and not r.healthy_settled
                    and not r.save_election and not r.restore_election)
    if unhealthy:
        problems.append(f"{unhealthy} not healthy a moment after the restore")
    out.append(Target(name, goal, value, s.all_survived, "; ".join(problems)))
    return out


# --- the results record ------------------------------------------------------------------------


@dataclass
class BenchResults:
    config: BenchConfig
    seed: int = 0
    env: dict[str, Any] = field(default_factory=dict)
    rounds: list[SyncRound] = field(default_factory=list)
    clusters: list[dict[str, Any]] = field(default_factory=list)  # each cluster started
    started: str = ""
    finished: str | None = None
    wall_s: float | None = None
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # what cleanup found or could not do

    @property
    def heartbeats(self) -> list[GroupSummary]:
        return summarize_heartbeats(self.rounds)

    @property
    def staggers(self) -> list[GroupSummary]:
        return summarize_staggers(self.rounds)

    @property
    def shortest_surviving(self) -> int | None:
        return shortest_surviving(self.heartbeats)

    @property
    def headline(self) -> str:
        return headline(self.heartbeats)

    @property
    def targets(self) -> list[Target]:
        return targets(self.rounds)

    @property
    def ok(self) -> bool:
        return bool(self.rounds) and all(r.ok for r in self.rounds) and not self.interrupted

    def to_dict(self) -> dict[str, Any]:
        hbs = self.heartbeats
        return {
            "benchmark": "sync", "config": self.config.to_dict(), "seed": self.seed,
            "env": self.env, "started": self.started, "finished": self.finished,
            "wall_s": self.wall_s, "interrupted": self.interrupted, "notes": self.notes,
            "leftovers": self.leftovers,
            "shortest_surviving_heartbeat_ms": shortest_surviving(hbs),
            "headline": headline(hbs),
            "targets": [t.to_dict() for t in self.targets],
            "heartbeats": [s.to_dict() for s in hbs],
            "staggers": [s.to_dict() for s in self.staggers],
            "clusters": self.clusters,
            "rounds": [r.to_dict() for r in self.rounds],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchResults:
        return cls(config=BenchConfig.from_dict(d.get("config") or {}),
                   seed=int(d.get("seed") or 0), env=dict(d.get("env") or {}),
                   rounds=[SyncRound.from_dict(r) for r in d.get("rounds") or []],
                   clusters=list(d.get("clusters") or []), started=str(d.get("started", "")),
                   finished=d.get("finished"), wall_s=d.get("wall_s"),
                   interrupted=bool(d.get("interrupted")), notes=list(d.get("notes") or []),
                   leftovers=list(d.get("leftovers") or []))


def round_line(r: SyncRound) -> str:
    """One round in a line, for progress and for results.md."""
    head = (f"{r.heartbeat_ms:,} ms heartbeat" + (f", stagger {r.stagger_ms:,} ms"
                                                  if r.part == STAGGER else "")
            + f", round {r.rep + 1}")
    if r.part == STAGGER and r.leader_position is not None:
        pos = r.leader_position
        head += f", leader {r.leader_before} ({POSITIONS[pos] if pos < 3 else pos} to resume)"
    head += ":"
    if not r.ok:
        return f"{head} FAILED{f' in {r.stage}' if r.stage else ''}: {r.error}"

    def el(e: bool | None, growth: int | None, lc: bool | None, c: int | None) -> str:
        if e is None:
            return "?"
        if not e:
            return "no election"
        return (f"ELECTION (term +{growth or 0}{', new leader' if lc else ''}"
                f"{f', {c} campaign(s)' if c else ''})")

    at_save = el(r.save_election, r.save_term_growth, r.save_leader_changed, r.campaigns_save)
    at_restore = el(r.restore_election, r.restore_term_growth, r.restore_leader_changed,
                    r.campaigns_restore)
    text = (f"{head} save {r.save_ms or 0:,.0f} ms (freeze skew {_fmt_us(r.freeze_skew_us)}, "
            f"{at_save}), restore {r.restore_ms or 0:,.0f} ms (resume skew "
            f"{_fmt_us(r.resume_skew_us)}, {at_restore})")
    if r.recovered_s is not None:
        text += f"; healthy again {r.recovered_s:,.1f} s after"
    elif not r.healthy_settled:
        text += "; not healthy after it"
    if r.gap_restore_s is not None:
        text += f"; writer gap {r.gap_save_s or 0:,.2f} s / {r.gap_restore_s:,.2f} s"
    return text
