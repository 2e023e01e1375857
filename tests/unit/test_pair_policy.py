"""A pair's configuration, its record on disk, and the controller's side of ``orthros pair``
(orthros_py.agent.pair.config, orthros_py.policies.pair) with small fake agents: every bad
setting refused with a sentence that names it, records that survive a round trip and a crash
in the middle of a save, ``pair status`` merged from what the three roles say, the witness
chosen, the pair named, and ``pair start`` refusing or undoing. No root, no network."""

from __future__ import annotations

import json
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest

from orthros_py.agent.errors import AgentUnreachable, ProtocolError, Refusal
from orthros_py.agent.pair import config as pair_config
from orthros_py.agent.pair.config import (
    PAIRS_DIR,
    PairConfig,
    PairRecord,
    PeerAddr,
    RecordStore,
    validate_pair_name,
)
from orthros_py.errors import ExitStatus, OrthrosError
from orthros_py.policies import pair as policy
from orthros_py.policies.hosts import AgentAPI, Host
from orthros_py.policies.pair import PairError, PairOptions, choose_witness, default_name

ALPHA = {"name": "alpha", "address": "10.77.0.11", "port": 7070}
BETA = {"name": "beta", "address": "10.77.0.12", "port": 7070}
GAMMA = {"name": "gamma", "address": "10.77.0.13", "port": 7070}
SVC = "10.77.0.100"


def cfg_dict(**changes: Any) -> dict[str, Any]:
    """A configuration as ``pair start`` sends it, every field set, with ``changes``."""
    d: dict[str, Any] = {
        "name": "redis-server-4242", "pid": 4242, "active": dict(ALPHA),
        "standby": dict(BETA), "witness": dict(GAMMA), "interval": 0.1, "keep": 3,
        "service_ip": f"{SVC}/32", "service_ifname": "eth0", "output_commit": True,
        "failover": True, "heartbeat": 0.1, "misses": 3, "tcp_established": True,
        "shell_job": False, "file_locks": False,
        "fence": {"agent": "lab", "netns": "orthros-lab", "ifname": "b-alpha"},
        "paging": False, "hot_window": 30.0, "created_at": 1_700_000_000.0,
    }
    d.update(changes)
    return d


def refusal(d: Any) -> ProtocolError:
    """The refusal of ``d``: a bad request (what the agent answers), never anything else."""
    with pytest.raises(ProtocolError) as info:
        PairConfig.from_dict(d)
    err = info.value
    assert err.code == Refusal.BAD_REQUEST, err
    return err


def sentence(err: OrthrosError) -> str:
    """The message, which must be one plain sentence: no traceback, no repr of a class."""
    msg = str(err.msg)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


# --- PairConfig.from_dict ---------------------------------------------------------------------

def test_a_full_configuration_is_accepted_and_keeps_every_field() -> None:
    cfg = PairConfig.from_dict(cfg_dict())
    assert cfg.name == "redis-server-4242" and cfg.pid == 4242
    assert cfg.active == PeerAddr("alpha", "10.77.0.11", 7070)
    assert cfg.standby == PeerAddr("beta", "10.77.0.12", 7070)
    assert cfg.witness == PeerAddr("gamma", "10.77.0.13", 7070)
    assert cfg.service_ip == f"{SVC}/32" and cfg.service_ifname == "eth0"
    assert cfg.failover and cfg.output_commit
    assert cfg.fence == {"agent": "lab", "netns": "orthros-lab", "ifname": "b-alpha"}
    assert cfg.to_dict() == {**cfg_dict(), "interval": 0.1, "heartbeat": 0.1}
    assert cfg.role_of("alpha") == "active" and cfg.role_of("beta") == "standby"
    assert cfg.role_of("gamma") == "witness" and cfg.role_of("delta") is None


def test_the_smallest_configuration_takes_the_defaults() -> None:
    cfg = PairConfig.from_dict({"name": "p", "pid": 2, "active": ALPHA, "standby": BETA})
    assert cfg.witness is None and cfg.service_ip is None and not cfg.failover
    assert (cfg.interval, cfg.keep, cfg.heartbeat, cfg.misses) == (0.2, 3, 0.1, 3)


@pytest.mark.parametrize("name", [
    "Redis", "redis_server", "-redis", "", "a" * 41, "re dis", "../x", "x/y", "é", None, 42,
    ["a"],
])
def test_bad_names_are_refused(name: Any) -> None:
    msg = sentence(refusal(cfg_dict(name=name)))
    assert "pair name" in msg and "not allowed" in msg, msg


@pytest.mark.parametrize("name", ["a", "0", "redis-server-4242", "a" * 40, "x-1-y"])
def test_good_names_are_accepted(name: str) -> None:
    assert PairConfig.from_dict(cfg_dict(name=name)).name == name


@pytest.mark.parametrize("pid", [1, 0, -1, -4242])
def test_pid_1_and_below_are_refused(pid: int) -> None:
    msg = sentence(refusal(cfg_dict(pid=pid)))
    assert str(pid) in msg and "protect" in msg, msg


@pytest.mark.parametrize("witness", [None, {}])
def test_failover_without_a_witness_is_refused(witness: Any) -> None:
    msg = sentence(refusal(cfg_dict(witness=witness)))
    assert "failover needs a witness" in msg, msg
    # Without failover, no witness is fine.
    assert PairConfig.from_dict(cfg_dict(witness=witness, failover=False)).witness is None


@pytest.mark.parametrize("peer", [ALPHA, BETA, {**GAMMA, "name": "alpha"}])
def test_a_witness_that_is_the_active_or_the_standby_is_refused(peer: dict[str, Any]) -> None:
    msg = sentence(refusal(cfg_dict(witness=dict(peer))))
    assert "witness must be a third host" in msg, msg


def test_the_active_and_the_standby_must_be_two_hosts() -> None:
    msg = sentence(refusal(cfg_dict(standby={**BETA, "name": "alpha"}, witness=GAMMA)))
    assert "two hosts" in msg, msg


@pytest.mark.parametrize("ifname", [None, "", "eth0; rm -rf /", "a" * 16, "eth 0"])
def test_a_service_address_without_a_good_interface_is_refused(ifname: Any) -> None:
    msg = sentence(refusal(cfg_dict(service_ifname=ifname)))
    assert "service address needs the standby's interface" in msg, msg


@pytest.mark.parametrize("ip", ["10.77.0.300", "svc", "10.77.0.100/33", "::1"])
def test_a_bad_service_address_is_refused(ip: str) -> None:
    msg = sentence(refusal(cfg_dict(service_ip=ip)))
    assert ip in msg and "IPv4" in msg, msg


def test_no_service_address_needs_no_interface() -> None:
    cfg = PairConfig.from_dict(cfg_dict(service_ip=None, service_ifname=None))
    assert cfg.service_ip is None


@pytest.mark.parametrize("extra", [{"command": "rm -rf /"}, {"images_dir": "/"},
                                   {"Name": "x", "zz": 1}])
def test_unknown_settings_are_refused_by_name(extra: dict[str, Any]) -> None:
    msg = sentence(refusal({**cfg_dict(), **extra}))
    assert "unknown pair settings" in msg, msg
    for k in extra:
        assert k in msg, msg


@pytest.mark.parametrize("missing", ["name", "pid", "active", "standby"])
def test_a_missing_required_setting_is_named(missing: str) -> None:
    d = cfg_dict()
    del d[missing]
    assert missing in sentence(refusal(d))


@pytest.mark.parametrize(("changes", "what"), [
    ({"interval": 0.001}, "interval"), ({"interval": 7200}, "interval"),
    ({"interval": float("nan")}, "interval"), ({"keep": 0}, "keep"), ({"keep": 101}, "keep"),
    ({"heartbeat": 0.001}, "heartbeat"), ({"misses": 0}, "misses"),
    ({"misses": 101}, "misses"),
])
def test_thresholds_out_of_range_are_refused(changes: dict[str, Any], what: str) -> None:
    assert what in sentence(refusal(cfg_dict(**changes)))


@pytest.mark.parametrize(("peer", "what"), [
    ("alpha", "object"), (["alpha"], "object"), ({"name": "alpha"}, "address"),
    ({**ALPHA, "address": "alpha.example"}, "IP address"), ({**ALPHA, "port": 0}, "port"),
    ({**ALPHA, "port": 70000}, "port"), ({**ALPHA, "port": "http"}, "port"),
])
def test_a_bad_host_is_refused(peer: Any, what: str) -> None:
    assert what in sentence(refusal(cfg_dict(active=peer)))


@pytest.mark.parametrize(("field", "value"), [
    ("pid", "4242"), ("pid", 4242.0), ("pid", True), ("keep", 2.5), ("keep", "3"),
    ("misses", None), ("misses", False),
    ("output_commit", 1), ("failover", "yes"), ("tcp_established", None),
    ("shell_job", "false"), ("file_locks", 0),
    ("fence", "lab"), ("fence", {"agent": 1}), ("fence", {1: "lab"}),
    # Numbers and strings where the other is due.
    ("interval", "fast"), ("interval", None), ("heartbeat", [0.1]), ("created_at", "now"),
    ("service_ip", 5), ("service_ifname", 5),
])
def test_wrong_types_are_refused_with_a_sentence_naming_the_setting(field: str,
                                                                   value: Any) -> None:
    msg = sentence(refusal(cfg_dict(**{field: value})))
    assert field in msg, f"the refusal of {field}={value!r} does not name it: {msg!r}"


@pytest.mark.parametrize("value", [True, False])
def test_a_port_is_a_number_not_a_truth_value(value: bool) -> None:
    msg = sentence(refusal(cfg_dict(standby={**BETA, "port": value})))
    assert "port" in msg, msg


def test_a_configuration_that_is_not_an_object_is_refused() -> None:
    d: Any
    for d in (None, [], "name=p", 42):
        assert "must be an object" in sentence(refusal(d))


# --- PairRecord -------------------------------------------------------------------------------

def a_record(role: str = "standby", **changes: Any) -> PairRecord:
    rec = PairRecord(PairConfig.from_dict(cfg_dict()), role)
    for k, v in changes.items():
        setattr(rec, k, v)
    return rec


def comparable(d: dict[str, Any]) -> dict[str, Any]:
    # updated_at is the time of the last save: a loaded record starts it anew.
    return {k: v for k, v in d.items() if k != "updated_at"}


@pytest.mark.parametrize("role", ["active", "standby", "witness"])
def test_a_record_survives_a_round_trip_through_json(role: str) -> None:
    rec = a_record(role, epoch=3, state="degraded", reason="No space left on device",
                   generation=17, committed_at=1_700_000_123.25, serving_pid=None,
                   tree_started=1_700_000_000.5)
    rec.event("checkpoint failed", reason="No space left on device")
    rec.event("agent restarted")
    back = PairRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back.config == rec.config
    assert comparable(back.to_dict()) == comparable(rec.to_dict())


def test_a_fresh_record_round_trips_with_its_defaults() -> None:
    rec = a_record("active")
    back = PairRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert (back.epoch, back.generation, back.state, back.reason) == (1, 0, "starting", None)
    assert comparable(back.to_dict()) == comparable(rec.to_dict())


def test_a_record_of_a_failed_over_standby_keeps_its_serving_pid() -> None:
    rec = a_record("standby", state="failed over", reason="a planned failover", epoch=2,
                   serving_pid=5151)
    back = PairRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert (back.state, back.serving_pid, back.epoch) == ("failed over", 5151, 2)


@pytest.mark.parametrize("role", ["leader", None, "Active"])
def test_a_record_with_an_unknown_role_is_refused(role: Any) -> None:
    d = a_record().to_dict()
    d["role"] = role
    with pytest.raises(ProtocolError, match="unknown pair role"):
        PairRecord.from_dict(d)


def test_events_are_capped() -> None:
    rec = a_record()
    for i in range(pair_config.MAX_EVENTS + 10):
        rec.event("tick", i=i)
    assert len(rec.events) == pair_config.MAX_EVENTS
    assert rec.events[-1]["i"] == pair_config.MAX_EVENTS + 9


# --- RecordStore ------------------------------------------------------------------------------

def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_the_store_saves_loads_and_deletes_leaving_nothing(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    assert store.load_all() == ([], [])
    one = a_record("active", generation=4)
    two = a_record("witness")
    two.config = PairConfig.from_dict(cfg_dict(name="other"))
    store.save(one)
    store.save(two)
    assert files_under(tmp_path) == [PAIRS_DIR, f"{PAIRS_DIR}/other.json",
                                     f"{PAIRS_DIR}/redis-server-4242.json"]
    assert stat.S_IMODE((tmp_path / PAIRS_DIR).stat().st_mode) == 0o700
    recs, broken = store.load_all()
    assert broken == []
    assert {r.config.name: r.role for r in recs} == {"redis-server-4242": "active",
                                                    "other": "witness"}
    by_name = {r.config.name: r for r in recs}
    assert comparable(by_name["redis-server-4242"].to_dict()) == comparable(one.to_dict())
    store.delete("redis-server-4242")
    assert [r.config.name for r in store.load_all()[0]] == ["other"]
    store.delete("other")
    store.delete("other")  # twice: nothing to say
    assert files_under(tmp_path) == []


def test_a_save_replaces_the_record_whole(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    rec = a_record("active")
    for gen in range(1, 6):
        rec.generation = gen
        store.save(rec)
        (loaded,), _ = store.load_all()
        assert loaded.generation == gen
    assert files_under(tmp_path / PAIRS_DIR) == ["redis-server-4242.json"]


def test_a_save_that_dies_half_way_leaves_the_previous_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RecordStore(tmp_path)
    rec = a_record("standby", generation=7)
    store.save(rec)

    def dies(obj: Any, f: Any, **kw: Any) -> None:
        f.write('{"config": {"name": "redis-ser')  # half a record, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", dies)
    rec.generation = 8
    with pytest.raises(OSError, match="No space left"):
        store.save(rec)
    monkeypatch.undo()
    (loaded,), broken = store.load_all()
    assert broken == [] and loaded.generation == 7


def test_delete_after_a_save_that_died_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pair's end must remove all of its record, also the half-written copy of a save that
    failed (a full disk, the case the pair reports as degraded)."""
    store = RecordStore(tmp_path)
    rec = a_record("standby")
    store.save(rec)

    def dies(obj: Any, f: Any, **kw: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", dies)
    with pytest.raises(OSError):
        store.save(rec)
    monkeypatch.undo()
    store.delete(rec.config.name)
    assert files_under(tmp_path) == [], "left after the pair's record was deleted"


def test_unreadable_records_are_reported_and_the_others_loaded(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.save(a_record("active"))
    (tmp_path / PAIRS_DIR / "junk.json").write_text("{not json")
    d = a_record().to_dict()
    d["role"] = "leader"
    (tmp_path / PAIRS_DIR / "leader.json").write_text(json.dumps(d))
    d = a_record().to_dict()
    d["config"]["pid"] = 1
    (tmp_path / PAIRS_DIR / "pid1.json").write_text(json.dumps(d))
    recs, broken = store.load_all()
    assert [r.config.name for r in recs] == ["redis-server-4242"]
    assert sorted(Path(b.split(":")[0]).name for b in broken) == ["junk.json", "leader.json",
                                                                  "pid1.json"]


def test_a_temporary_file_is_never_loaded_as_a_record(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    store.save(a_record("active"))
    (tmp_path / PAIRS_DIR / "redis-server-4242.tmp").write_text('{"config": {')
    recs, broken = store.load_all()
    assert len(recs) == 1 and broken == []


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "..", "UPPER"])
def test_the_store_never_makes_a_path_of_a_bad_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ProtocolError):
        RecordStore(tmp_path).path(name)
    with pytest.raises(ProtocolError):
        RecordStore(tmp_path).delete(name)


def test_delete_keeps_a_directory_that_holds_other_files(tmp_path: Path) -> None:
    """The witness's book lives in the same directory: deleting a record must not take it."""
    store = RecordStore(tmp_path)
    store.save(a_record("witness"))
    book = tmp_path / PAIRS_DIR / "witness.json"
    book.write_text("{}")
    store.delete("redis-server-4242")
    assert book.read_text() == "{}"


# --- pair status: the view merged from the roles ------------------------------------------------

NOW = 1_700_000_100.0


def role_rec(role: str, **fields: Any) -> dict[str, Any]:
    """What one host's agent answers to ``pair_list`` for ``role``."""
    host = {"active": "alpha", "standby": "beta", "witness": "gamma"}[role]
    rec = a_record(role, state="replicating", generation=5).to_dict()
    rec["host"] = host
    rec.update(fields)
    return rec


def three_roles(**per_role: dict[str, Any]) -> dict[str, dict[str, Any]]:
    act = role_rec("active", committed_at=NOW - 0.3, tree_running=True, tracking="incremental",
                   checkpoints=[{"generation": 5, "full": False}], output_hold=None,
                   events=[{"at": NOW - 5, "what": "checkpoint failed"}])
    sby = role_rec("standby", storage_bytes=123_456, heartbeats={"seen": 10, "missed": 0},
                   newest={"generation": 5, "dir": "redis-server-4242.g000005",
                           "committed_at": NOW - 0.25},
                   events=[{"at": NOW - 10, "what": "begun"}])
    wit = role_rec("witness", events=[{"at": NOW - 1, "what": "registered"}])
    roles = {"active": act, "standby": sby, "witness": wit}
    for role, fields in per_role.items():
        roles[role].update(fields)
    return roles


def test_view_of_a_healthy_pair() -> None:
    v = policy.view("redis-server-4242", three_roles(), [], now=NOW)
    assert v.state == "replicating" and v.reason is None
    assert v.hosts == {"active": "alpha", "standby": "beta", "witness": "gamma"}
    assert v.serving == "alpha"
    assert v.generation == 5
    assert v.generation_age_s == pytest.approx(0.25)  # the standby's commit is the truth
    assert v.storage_bytes == 123_456 and v.heartbeats == {"seen": 10, "missed": 0}
    assert v.checkpoints == [{"generation": 5, "full": False}]
    assert v.tracking == "incremental"
    assert v.failover and v.output_commit and v.epoch == 1
    # Events of every role, oldest first, each with the host it happened on.
    assert [(e["what"], e["host"]) for e in v.events] == [
        ("begun", "beta"), ("checkpoint failed", "alpha"), ("registered", "gamma")]
    assert json.loads(json.dumps(v.to_dict()))["state"] == "replicating"


def test_view_degraded_with_the_actives_reason() -> None:
    roles = three_roles(active={"state": "degraded", "reason": "No space left on device"})
    v = policy.view("redis-server-4242", roles, [], now=NOW)
    assert (v.state, v.reason) == ("degraded", "No space left on device")
    assert v.serving == "alpha" and v.generation == 5


def test_view_degraded_when_the_standby_is_missing() -> None:
    roles = three_roles()
    del roles["standby"]
    v = policy.view("redis-server-4242", roles, ["beta"], now=NOW)
    assert v.state == "degraded" and v.reason == "the standby does not answer"
    assert v.unreachable == ["beta"]
    assert v.serving == "alpha"
    assert v.generation == 5 and v.generation_age_s == pytest.approx(0.3)  # the active's word
    assert v.storage_bytes is None and v.heartbeats is None


def test_view_degraded_when_the_active_is_missing() -> None:
    roles = three_roles()
    del roles["active"]
    v = policy.view("redis-server-4242", roles, ["alpha", "delta"], now=NOW)
    assert v.state == "degraded" and "alpha" in str(v.reason)
    assert v.serving is None and v.unreachable == ["alpha"]  # delta is not of this pair
    assert v.checkpoints == [] and v.generation == 5


def test_view_failed_over_when_the_standby_says_so() -> None:
    roles = three_roles(standby={"state": "failed over", "reason": "the active missed 3 "
                                 "heartbeats", "epoch": 2, "serving_pid": 777},
                        active={"tree_running": False})
    v = policy.view("redis-server-4242", roles, [], now=NOW)
    assert v.state == "failed over" and "missed" in str(v.reason)
    assert v.serving == "beta" and v.epoch == 2


def test_view_failed_over_wins_over_an_active_that_still_thinks_it_serves() -> None:
    roles = three_roles(standby={"state": "failed over", "reason": "x", "epoch": 2})
    del roles["witness"]
    v = policy.view("redis-server-4242", roles, [], now=NOW)
    assert v.state == "failed over" and v.serving == "beta"


def test_view_of_a_pair_whose_tree_is_gone_serves_nowhere() -> None:
    roles = three_roles(active={"state": "degraded", "reason": "the protected tree is gone",
                                "tree_running": False})
    v = policy.view("redis-server-4242", roles, [], now=NOW)
    assert v.state == "degraded" and v.serving is None


def test_view_before_the_first_generation() -> None:
    roles = three_roles(active={"state": "starting", "generation": 0, "committed_at": None},
                        standby={"newest": None, "generation": 0})
    v = policy.view("redis-server-4242", roles, [], now=NOW)
    assert v.state == "starting" and v.generation == 0 and v.generation_age_s is None


def test_view_keeps_the_newest_twenty_events() -> None:
    roles = three_roles(active={"events": [{"at": NOW - 100 + i, "what": f"e{i}"}
                                           for i in range(30)]})
    v = policy.view("redis-server-4242", roles, [], now=NOW)
    assert len(v.events) == 20 and v.events[-1]["what"] == "registered"


# --- fake agents for the controller's side -----------------------------------------------------

class FakePairAgent:
    """An agent as the pair policy sees it: ``status()``, ``request(op, args, timeout=None)``,
    ``tree`` and ``addr_list``; every request is logged as "host:op"."""

    def __init__(self, name: str, log: list[str], *, addrs: tuple[str, ...] = (),
                 down: bool = False) -> None:
        self.name = name
        self.log = log
        self.addrs = addrs
        self.down = down
        self.pairs: dict[str, dict[str, Any]] = {}  # name -> role record
        self.refuse: dict[str, OrthrosError] = {}  # op -> what it raises
        self.first_state = "replicating"  # what pair_status says after pair_open
        self.first_reason: str | None = None

    def _hit(self, op: str) -> None:
        self.log.append(f"{self.name}:{op}")
        if self.down:
            raise AgentUnreachable(f"agent on {self.name} is not reachable", host=self.name)
        if op in self.refuse:
            raise self.refuse[op]

    def status(self) -> dict[str, Any]:
        self._hit("status")
        return {"boot_id": "boot-1", "pid_ns": 1}

    def tree(self, pid: int) -> dict[str, Any]:
        self._hit("tree")
        return {"pid": pid, "processes": [{"pid": pid, "name": "redis-server"}], "conns": [],
                "interfaces": ["eth0"], "agent_netns": True}

    def addr_list(self, *, netns: str | None = None) -> list[dict[str, Any]]:
        self._hit("addr_list")
        return [{"ifname": "lo", "addresses": ["127.0.0.1/8"]},
                {"ifname": "eth0", "addresses": list(self.addrs)}]

    def request(self, op: str, args: Mapping[str, Any] | None = None, *,
                timeout: float | None = None) -> dict[str, Any]:
        self._hit(op)
        args = dict(args or {})
        if op == "pair_open":
            cfg = PairConfig.from_dict(args["config"])  # what the real agent checks
            self.pairs[cfg.name] = {"config": cfg.to_dict(), "role": args["role"],
                                    "state": "starting", "generation": 0, "epoch": 1,
                                    "host": self.name}
            return self.pairs[cfg.name]
        if op == "pair_status":
            rec = self.pairs[args["name"]]
            if rec["role"] == "active":
                rec.update(state=self.first_state, reason=self.first_reason,
                           generation=1 if self.first_state == "replicating" else 0)
            return rec
        if op == "pair_close":
            self.pairs.pop(args["name"])
            return {"host": self.name}
        if op == "pair_list":
            return {"host": self.name, "pairs": list(self.pairs.values())}
        raise AssertionError(f"unexpected op {op}")


def fake_host(agent: FakePairAgent, address: str) -> Host:
    return Host(agent.name, cast(AgentAPI, agent), address, 7070)


@pytest.fixture
def log() -> list[str]:
    return []


@pytest.fixture
def lab3(log: list[str]) -> tuple[FakePairAgent, FakePairAgent, FakePairAgent]:
    return (FakePairAgent("alpha", log, addrs=("10.77.0.11/24", f"{SVC}/32")),
            FakePairAgent("beta", log, addrs=("10.77.0.12/24",)),
            FakePairAgent("gamma", log, addrs=("10.77.0.13/24",)))


def hosts_of(*agents: FakePairAgent) -> list[Host]:
    addr = {"alpha": "10.77.0.11", "beta": "10.77.0.12", "gamma": "10.77.0.13",
            "delta": "10.77.0.14"}
    return [fake_host(a, addr[a.name]) for a in agents]


# --- choose_witness ---------------------------------------------------------------------------

def test_the_named_witness_wins(log: list[str]) -> None:
    g, d = FakePairAgent("gamma", log), FakePairAgent("delta", log)
    others = hosts_of(g, d)
    assert choose_witness(others, ("alpha", "beta"), "delta", "gamma") is others[1]
    assert log == []  # chosen by name: nobody asked


def test_the_inventorys_witness_when_none_is_named(log: list[str]) -> None:
    others = hosts_of(FakePairAgent("gamma", log), FakePairAgent("delta", log))
    assert choose_witness(others, ("alpha", "beta"), None, "delta") is others[1]


def test_else_the_first_other_host_that_answers(log: list[str]) -> None:
    g = FakePairAgent("gamma", log, down=True)
    d = FakePairAgent("delta", log)
    a = FakePairAgent("alpha", log)
    hosts = hosts_of(a, g, d)
    assert choose_witness(hosts, ("alpha", "beta"), None, None) is hosts[2]
    assert log == ["gamma:status", "delta:status"]  # never a pair host


def test_no_witness_when_no_other_host_answers(log: list[str]) -> None:
    hosts = hosts_of(FakePairAgent("alpha", log), FakePairAgent("gamma", log, down=True))
    assert choose_witness(hosts, ("alpha", "beta"), None, None) is None


@pytest.mark.parametrize(("named", "inventory"), [("alpha", None), ("beta", None),
                                                  (None, "beta"), (None, "alpha")])
def test_a_pair_host_is_never_the_witness(log: list[str], named: str | None,
                                          inventory: str | None) -> None:
    hosts = hosts_of(FakePairAgent("alpha", log), FakePairAgent("beta", log),
                     FakePairAgent("gamma", log))
    with pytest.raises(PairError, match=r"witness .* must be a third host") as info:
        choose_witness(hosts, ("alpha", "beta"), named, inventory)
    assert info.value.exit_status == ExitStatus.USAGE


def test_an_unknown_witness_is_refused(log: list[str]) -> None:
    with pytest.raises(PairError, match="no host named 'omega'"):
        choose_witness(hosts_of(FakePairAgent("gamma", log)), ("alpha", "beta"), "omega", None)


# --- default_name -----------------------------------------------------------------------------

@pytest.mark.parametrize(("comm", "pid", "name"), [
    ("redis-server", 4242, "redis-server-4242"), ("nginx", 7, "nginx-7"),
    ("Python3.11", 310, "python3-11-310"), ("my_daemon", 12, "my-daemon-12"),
    ("--weird--", 5, "weird-5"), ("", 9, "tree-9"), ("!!!", 9, "tree-9"),
    ("a" * 30, 123, "a" * 24 + "-123"),
])
def test_default_name(comm: str, pid: int, name: str) -> None:
    assert default_name(comm, pid) == name


@pytest.mark.parametrize("comm", ["redis-server", "X" * 64, "-" * 30, "a" * 23 + "_b",
                                  "ünïcode", "kworker/0:1", " sp ace ", "a.b.c"])
@pytest.mark.parametrize("pid", [2, 4242, 4_194_304])
def test_default_names_are_always_valid_pair_names(comm: str, pid: int) -> None:
    name = default_name(comm, pid)
    assert validate_pair_name(name) == name
    assert name.endswith(f"-{pid}")


# --- pair start, status and stop over fake agents ---------------------------------------------

def test_start_opens_witness_standby_active_in_that_order(
        log: list[str], lab3: tuple[FakePairAgent, FakePairAgent, FakePairAgent]) -> None:
    a, b, g = lab3
    hosts = hosts_of(a, b, g)
    rec = policy.start(hosts[0], hosts[1], 4242,
                       PairOptions(failover=True, output_commit=True, witness="gamma"),
                       others=[hosts[2]], candidates=[f"{SVC}/32"], sleep=lambda s: None)
    opens = [e for e in log if e.endswith(":pair_open")]
    assert opens == ["gamma:pair_open", "beta:pair_open", "alpha:pair_open"]
    cfg = rec["config"]
    assert cfg["name"] == "redis-server-4242" and cfg["witness"]["name"] == "gamma"
    assert cfg["service_ip"] == f"{SVC}/32" and cfg["service_ifname"] == "eth0"
    assert {x.name: x.pairs["redis-server-4242"]["role"] for x in lab3} == {
        "alpha": "active", "beta": "standby", "gamma": "witness"}


def test_failover_without_a_witness_is_refused_before_anything_is_opened(log: list[str]) -> None:
    a = FakePairAgent("alpha", log, addrs=("10.77.0.11/24", f"{SVC}/32"))
    b = FakePairAgent("beta", log, addrs=("10.77.0.12/24",))
    hosts = hosts_of(a, b)
    with pytest.raises(PairError) as info:
        policy.start(hosts[0], hosts[1], 4242, PairOptions(failover=True), others=[],
                     candidates=[f"{SVC}/32"], sleep=lambda s: None)
    msg = sentence(info.value)
    assert "--failover needs a witness" in msg and info.value.exit_status == ExitStatus.USAGE
    assert info.value.hint and "--witness" in info.value.hint
    assert not any(e.endswith(":pair_open") for e in log) and a.pairs == b.pairs == {}


def test_failover_with_every_other_host_down_is_refused(
        log: list[str], lab3: tuple[FakePairAgent, FakePairAgent, FakePairAgent]) -> None:
    a, b, g = lab3
    g.down = True
    hosts = hosts_of(a, b, g)
    with pytest.raises(PairError, match="--failover needs a witness"):
        policy.start(hosts[0], hosts[1], 4242, PairOptions(failover=True), others=[hosts[2]],
                     candidates=[f"{SVC}/32"], sleep=lambda s: None)
    assert not any(x.pairs for x in lab3)


@pytest.mark.parametrize("opts", [PairOptions(failover=True, witness="gamma"),
                                  PairOptions(output_commit=True)])
def test_failover_and_output_commit_need_a_service_address(
        log: list[str], lab3: tuple[FakePairAgent, FakePairAgent, FakePairAgent],
        opts: PairOptions) -> None:
    a, b, g = lab3
    a.addrs = ("10.77.0.11/24",)
    hosts = hosts_of(a, b, g)
    with pytest.raises(PairError, match="service address"):
        policy.start(hosts[0], hosts[1], 4242, opts, others=[hosts[2]], sleep=lambda s: None)
    assert not any(x.pairs for x in lab3)


def test_the_same_host_twice_is_refused(log: list[str]) -> None:
    a = FakePairAgent("alpha", log)
    h = hosts_of(a)[0]
    with pytest.raises(PairError, match="same host"):
        policy.start(h, h, 4242, PairOptions(), sleep=lambda s: None)
    assert log == []


def test_a_refused_open_undoes_the_others_in_reverse(
        log: list[str], lab3: tuple[FakePairAgent, FakePairAgent, FakePairAgent]) -> None:
    a, b, g = lab3
    a.refuse["pair_open"] = OrthrosError("pid 4242 of the tree uses userfaultfd itself",
                                         host="alpha")
    hosts = hosts_of(a, b, g)
    with pytest.raises(OrthrosError, match="userfaultfd"):
        policy.start(hosts[0], hosts[1], 4242, PairOptions(witness="gamma"),
                     others=[hosts[2]], candidates=[f"{SVC}/32"], sleep=lambda s: None)
    closes = [e for e in log if e.endswith(":pair_close")]
    assert closes == ["beta:pair_close", "gamma:pair_close"]
    assert not any(x.pairs for x in lab3)


def test_a_first_checkpoint_that_fails_is_refused_with_its_reason_and_undone(
        log: list[str], lab3: tuple[FakePairAgent, FakePairAgent, FakePairAgent]) -> None:
    a, b, g = lab3
    a.first_state, a.first_reason = "degraded", "CRIU: Some file locks are hold, use --file-locks"
    hosts = hosts_of(a, b, g)
    with pytest.raises(PairError) as info:
        policy.start(hosts[0], hosts[1], 4242, PairOptions(witness="gamma"),
                     others=[hosts[2]], candidates=[f"{SVC}/32"], sleep=lambda s: None)
    assert "first checkpoint" in info.value.msg and "--file-locks" in info.value.msg
    closes = [e for e in log if e.endswith(":pair_close")]
    assert closes == ["alpha:pair_close", "beta:pair_close", "gamma:pair_close"]
    assert not any(x.pairs for x in lab3)


def test_status_and_stop_find_the_pair_on_every_host(
        log: list[str], lab3: tuple[FakePairAgent, FakePairAgent, FakePairAgent]) -> None:
    a, b, g = lab3
    hosts = hosts_of(a, b, g)
    policy.start(hosts[0], hosts[1], 4242, PairOptions(witness="gamma"), others=[hosts[2]],
                 candidates=[f"{SVC}/32"], sleep=lambda s: None)
    (v,) = policy.status(hosts, "redis-server-4242")
    assert v.hosts == {"active": "alpha", "standby": "beta", "witness": "gamma"}
    assert v.state == "replicating"
    g.down = True
    (v,) = policy.status(hosts, "redis-server-4242")
    assert v.unreachable == ["gamma"]
    g.down = False
    out = policy.stop(hosts, "redis-server-4242")
    assert out["closed"] == ["alpha (active)", "beta (standby)", "gamma (witness)"]
    assert out["problems"] == []
    with pytest.raises(PairError, match="no host that answers takes part"):
        policy.status(hosts, "redis-server-4242")
    assert policy.status(hosts) == []


def test_stop_with_a_host_down_says_so(
        log: list[str], lab3: tuple[FakePairAgent, FakePairAgent, FakePairAgent]) -> None:
    a, b, g = lab3
    hosts = hosts_of(a, b, g)
    policy.start(hosts[0], hosts[1], 4242, PairOptions(witness="gamma"), others=[hosts[2]],
                 candidates=[f"{SVC}/32"], sleep=lambda s: None)
    b.down = True
    out = policy.stop(hosts, "redis-server-4242")
    assert out["closed"] == ["alpha (active)", "gamma (witness)"]
    assert len(out["problems"]) == 1 and "beta (standby) did not answer" in out["problems"][0]

