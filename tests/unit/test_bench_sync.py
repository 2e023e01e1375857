"""The sync benchmark's pure half: options, the plan, elections across a save and a restore, the
writer's gaps, etcd's log lines, the stamps, summaries, the shortest surviving heartbeat, the
targets, results.json/md and the plots of a synthetic run, the volume's parsers, and the
command's rendering of an earlier results.json. No root, no processes."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from orthros_py.bench.sync import (
    HEARTBEAT,
    STAGGER,
    BenchConfig,
    BenchResults,
    SyncRound,
    config_for,
    headline,
    load_results,
    longest_gap,
    markdown,
    parse_heartbeats,
    parse_staggers,
    plan,
    round_line,
    shortest_surviving,
    summarize_heartbeats,
    summarize_staggers,
    targets,
    write_outputs,
)
from orthros_py.bench.sync.model import (
    count_campaigns,
    leader_position_for,
    log_events,
    member_facts,
    parse_log_time,
    spread_us,
    stamps_us,
)
from orthros_py.bench.sync.runner import watch_s
from orthros_py.bench.sync.volume import is_ours, mount_points, parse_losetup
from orthros_py.policies.sync import check_name

# --- options and the plan ----------------------------------------------------------------------


def test_heartbeats_and_staggers_parse_in_order_and_refuse() -> None:
    assert parse_heartbeats("1000,300, 100ms,0.05s,100") == (1000, 300, 100, 50)
    assert parse_staggers("0,50,0.4s") == (0, 50, 400)
    for bad in ("", "0", "fast", "1.5", "20000"):
        with pytest.raises(ValueError):
            parse_heartbeats(bad)
    with pytest.raises(ValueError):
        parse_staggers("-5")


def test_config_refuses_what_etcd_refuses_and_round_trips() -> None:
    with pytest.raises(ValueError, match="at least 5 heartbeats"):
        BenchConfig(election_factor=4.0)
    with pytest.raises(ValueError, match="largest election timeout"):
        BenchConfig(heartbeats=(9000,), election_factor=6.0)
    cfg = BenchConfig(heartbeats=(300, 20), election_factor=7.5, out=Path("x/y"))
    assert cfg.election_ms(20) == 150 and cfg.election_ms(300) == 2250
    back = BenchConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


def test_quick_and_explicit_options() -> None:
    full = config_for()
    assert (full.heartbeats, full.reps, full.staggers, full.stagger_reps) == (
        (1000, 300, 100, 50, 20), 5, (0, 50, 200, 400, 1000), 3)
    quick = config_for(quick=True)
    assert (quick.heartbeats, quick.reps, quick.staggers, quick.stagger_reps) == (
        (100,), 2, (0, 1000), 1)
    mixed = config_for(quick=True, reps=4, stagger_reps=0, heartbeats=(50,))
    assert (mixed.heartbeats, mixed.reps, mixed.stagger_reps) == ((50,), 4, 0)


def test_plan_runs_each_heartbeat_on_one_cluster_and_shuffles_the_staggers() -> None:
    cfg = BenchConfig(heartbeats=(1000, 100, 20), reps=2, staggers=(0, 50, 400, 1000),
                      stagger_reps=3)
    rounds = plan(cfg, seed=7)
    hb = [r for r in rounds if r.part == HEARTBEAT]
    assert [(r.heartbeat_ms, r.rep) for r in hb] == [(1000, 0), (1000, 1), (100, 0), (100, 1),
                                                     (20, 0), (20, 1)]
    st = [r for r in rounds if r.part == STAGGER]
    assert rounds == hb + st  # the clusters in turn, never back to one
    assert Counter(r.rep for r in st) == {0: 4, 1: 4, 2: 4}
    assert {r.heartbeat_ms for r in st} == {100}
    orders = {tuple(r.stagger_ms for r in st if r.rep == rep) for rep in range(3)}
    assert all(sorted(o) == [0, 50, 400, 1000] for o in orders) and len(orders) > 1
    assert plan(cfg, seed=7) == rounds and plan(cfg, seed=8) != rounds
    names = [r.name for r in rounds]
    assert len(set(names)) == len(names)
    assert all(check_name(n) == n for n in names)  # what the sync policy accepts
    assert plan(BenchConfig(stagger_reps=0, reps=1), 1)[-1].part == HEARTBEAT
    # the leader is moved to the member resumed last, in the middle, then first, in turn
    assert {(r.rep, r.leader_position) for r in st} == {(0, 2), (1, 1), (2, 0)}
    assert all(r.leader_position is None for r in hb)
    assert [leader_position_for(rep) for rep in range(5)] == [2, 1, 0, 2, 1]


def test_watching_lasts_two_election_timeouts_at_least() -> None:
    assert watch_s(0.5, 100) == 0.5
    assert watch_s(0.5, 5000) == 10.0


# --- the writer's gaps, etcd's lines, the stamps ----------------------------------------------------


def test_longest_gap_around_an_operation() -> None:
    acks = [1.0, 1.1, 1.2, 2.5, 2.6, 4.0]
    # the save from 1.25 to 2.0: from the ack at 1.2 to the first after it ends, 2.5
    assert longest_gap(acks, 1.25, 2.0, 5.0) == pytest.approx(1.3)
    # a gap after the operation's end (2.6 -> 4.0) is not its doing
    assert longest_gap(acks, 1.25, 2.55, 5.0) == pytest.approx(1.3)
    # acks go on through the operation: the longest between two of them
    assert longest_gap(acks, 1.05, 1.15, 5.0) == pytest.approx(0.1)
    # nothing acked since: a lower bound up to `until`
    assert longest_gap(acks, 4.5, 4.6, 6.0) == pytest.approx(2.0)
    assert longest_gap([], 1.0, 2.0, 3.0) == pytest.approx(2.0)


def test_etcd_log_lines_about_elections_in_a_window() -> None:
    assert parse_log_time("1970-01-01T00:00:10.500Z") == pytest.approx(10.5)
    assert parse_log_time("1970-01-01T01:00:10.000+0100") == pytest.approx(10.0)
    assert parse_log_time("yesterday") is None
    lines = [
        json.dumps({"level": "info", "ts": "1970-01-01T00:00:09.000Z",
                    "msg": "a1 is starting a new election at term 2"}),
        json.dumps({"level": "info", "ts": "1970-01-01T00:00:10.250Z",
                    "msg": "a1 is starting a new election at term 3"}),
        json.dumps({"level": "info", "ts": "1970-01-01T00:00:10.300Z",
                    "msg": "published local member to cluster through raft"}),
        "not json",
        json.dumps({"level": "warn", "ts": "1970-01-01T00:00:10.400Z",
                    "msg": "leader failed to send out heartbeat on time; took too long"}),
        json.dumps({"level": "info", "ts": "1970-01-01T00:00:12.000Z",
                    "msg": "raft.node: a1 elected leader b2 at term 3"}),
    ]
    got = log_events(lines, 10.0, 11.0, host="alpha")
    assert [t for t, _ in got] == [pytest.approx(0.25), pytest.approx(0.4)]
    assert got[0][1] == "+250 ms alpha: a1 is starting a new election at term 3"
    assert "heartbeat on time" in got[1][1]
    assert len(log_events(lines, 0.0, 20.0, limit=2)) == 2


def test_campaigns_counted_from_etcds_log() -> None:
    def line(t: str, msg: str) -> str:
        return json.dumps({"level": "info", "ts": f"1970-01-01T00:00:{t}Z", "msg": msg})

    lines = [line("09.900", "a1 became candidate at term 4"),  # before the window
             line("10.100", "a1 is starting a new election at term 3"),
             line("10.100", "a1 became candidate at term 4"),
             line("10.200", "b2 became pre-candidate at term 4"),
             line("10.300", "raft.node: c3 elected leader a1 at term 4"),
             "garbage with candidate in it",
             line("11.500", "b2 became candidate at term 5")]
    assert count_campaigns(lines, 10.0, 11.0) == 2
    assert count_campaigns(lines, 0.0, 20.0) == 4
    assert count_campaigns([], 0.0, 1.0) == 0


def test_stamps_on_the_coordinators_clock_and_their_spread() -> None:
    members = [
        {"host": "alpha", "member": "alpha-1",
         "resume": {"requested_ns": 1_000_000, "written_ns": 1_050_000, "settled_ns": 1_060_000}},
        # beta's clock runs 2 ms ahead: its stamps are 2 ms later than the coordinator's
        {"host": "beta", "member": "beta-2",
         "resume": {"requested_ns": 3_300_000, "written_ns": 3_500_000, "settled_ns": 3_600_000}},
        {"host": "gamma", "member": "gamma-3", "resume": None},
    ]
    clocks = {"alpha": {"offset_us": 0.0}, "beta": {"offset_us": 2000.0}}
    st = stamps_us(members, clocks, "resume")
    assert st == {"alpha-1": [0.0, 50.0, 60.0], "beta-2": [300.0, 500.0, 600.0]}
    assert spread_us(st, 0) == 300.0 and spread_us(st, 1) == 450.0
    assert spread_us({"a": [1.0, 2.0, 3.0]}, 1) is None and stamps_us([], {}, "freeze") == {}


def test_member_facts_from_the_reports() -> None:
    saved = {"host": "alpha", "member": "alpha-1", "tasks": 1, "conns": 7, "timens": True,
             "dump_ms": 80.0, "image_bytes": 11 << 20,
             "data": [{"method": "reflink", "bytes": 122 << 20, "files": 9, "elapsed_ms": 4.0}],
             "freeze": {"written_ns": 1_000_000_000}, "resume": {"written_ns": 1_250_000_000}}
    f = member_facts(saved, {"restore_ms": 55.0, "data_ms": 3.0})
    assert f["frozen_ms"] == 250.0 and f["data_bytes"] == 122 << 20
    assert f["data_methods"] == ["reflink"] and f["restore_ms"] == 55.0
    bare = member_facts({"host": "b", "member": "b-2"}, None)
    assert bare["frozen_ms"] is None and bare["data_bytes"] is None


# --- rounds, elections, summaries -------------------------------------------------------------


def rnd(hb: int = 100, rep: int = 0, *, part: str = HEARTBEAT, stagger: int = 0,
        ok: bool = True, terms: tuple[int | None, ...] = (5, 5, 5, 5, 5),
        leaders: tuple[str | None, ...] = ("alpha",) * 5, healthy: bool = True,
        skew: float = 300.0, save_skew: float = 200.0, recovered: float | None = None,
        recovered_term: int | None = None) -> SyncRound:
    r = SyncRound(part, hb, hb * 5, stagger, rep, name=f"{part[:2]}{hb}-{stagger}-r{rep}",
                  ok=ok, error=None if ok else "boom", stage=None if ok else "restore")
    (r.term_before, r.term_after_save, r.term_before_restore, r.term_after_restore,
     r.term_settled) = terms
    (r.leader_before, r.leader_after_save, r.leader_before_restore, r.leader_after_restore,
     r.leader_settled) = leaders
    r.healthy_after_restore = r.healthy_settled = healthy
    r.recovered_s, r.term_recovered = recovered, recovered_term
    r.save_ms, r.restore_ms = 500.0 + rep, 320.0 + rep
    r.save_stages_ms = {"clock": 10.0, "prepare": 50.0, "freeze": 160.0, "dump": 90.0,
                        "resume": 190.0}
    r.restore_stages_ms = {"check": 3.0, "clock": 10.0, "replace": 60.0, "restore": 55.0,
                           "resume": 190.0 + stagger * 2}
    r.freeze_skew_us, r.freeze_settled_skew_us = 250.0, 260.0
    r.save_resume_skew_us, r.save_resume_settled_skew_us = save_skew, save_skew + 5
    r.resume_skew_us, r.resume_settled_skew_us = skew, skew + 5
    r.save_clock_error_us = r.restore_clock_error_us = 40.0
    r.resume_stamps_us = {"alpha-1": [0.0, 30.0, 40.0], "beta-2": [20.0, skew, skew + 5]}
    r.members = [{"host": h, "image_bytes": 11 << 20, "data_bytes": 122 << 20,
                  "data_methods": ["reflink"], "frozen_ms": 250.0 + i}
                 for i, h in enumerate(("alpha", "beta", "gamma"))]
    r.gap_save_s, r.gap_restore_s, r.acked_between = 0.3, 1.05, 120
    r.volume_used_bytes = 400 << 20
    r.resume_order = ["alpha", "beta", "gamma"]
    return r


def test_elections_across_save_and_restore() -> None:
    quiet = rnd()
    assert quiet.save_election is False and quiet.restore_election is False
    assert quiet.survived and quiet.save_term_growth == 0 and quiet.restore_term_growth == 0
    # a term that grew between the save and the restore: an election across the save
    late = rnd(terms=(5, 5, 6, 5, 5))
    assert late.save_election and late.save_term_growth == 1 and not late.restore_election
    # the restore brings the save's term back, then a member campaigns: seen settled
    after = rnd(terms=(5, 5, 5, 5, 7))
    assert after.restore_election and after.restore_term_growth == 2 and not after.survived
    # another leader with the same term (only possible across the restore's rollback)
    moved = rnd(leaders=("alpha", "alpha", "alpha", "beta", "beta"))
    assert moved.restore_leader_changed and moved.restore_election
    assert moved.restore_term_growth == 0
    # not healthy after the restore, healthy again later with a higher term
    back = rnd(terms=(5, 5, 5, 5, 5), healthy=False, recovered=2.0, recovered_term=6)
    assert back.restore_term_growth == 1 and not back.survived
    # campaigns the status' applied term does not show yet: an election all the same
    campaigned = rnd()
    campaigned.campaigns_restore = 3
    assert campaigned.restore_election and not campaigned.survived
    assert "ELECTION (term +0, 3 campaign(s))" in round_line(campaigned)
    calm = rnd()
    calm.campaigns_save = calm.campaigns_restore = 0
    assert calm.survived
    # nothing known: neither yes nor no
    unknown = rnd(terms=(None,) * 5, leaders=(None,) * 5)
    assert unknown.save_election is None and unknown.restore_election is None
    assert not unknown.survived
    assert not rnd(ok=False).survived
    assert rnd(ok=False).value("save_ms") is None and quiet.value("save:dump") == 90.0
    assert quiet.image_bytes == 3 * (11 << 20) and quiet.frozen_ms == 252.0
    assert quiet.resume_requested_skew_us == 20.0


def test_summaries_and_the_shortest_surviving_heartbeat() -> None:
    rounds = [rnd(1000, 0), rnd(1000, 1), rnd(100, 0), rnd(100, 1, skew=900.0),
              rnd(20, 0), rnd(20, 1, terms=(5, 5, 5, 5, 6)), rnd(50, 0), rnd(50, 1, ok=False),
              rnd(100, 0, part=STAGGER, stagger=0),
              rnd(100, 0, part=STAGGER, stagger=1000, terms=(5, 5, 5, 5, 7),
                  leaders=("alpha", "alpha", "alpha", None, "gamma")),
              rnd(100, 1, part=STAGGER, stagger=1000, terms=(5, 5, 5, 5, 5), healthy=False,
                  recovered=1.5, recovered_term=6)]
    hbs = summarize_heartbeats(rounds)
    assert [s.heartbeat_ms for s in hbs] == [1000, 100, 50, 20]  # longest first
    by = {s.heartbeat_ms: s for s in hbs}
    assert by[100].all_survived and by[100].survived == 2
    assert by[100].figures["resume_skew_us"].median == pytest.approx(600.0)
    assert (by[100].figures["resume_skew_us"].low, by[100].figures["resume_skew_us"].high) == (
        300.0, 900.0)
    assert by[100].figures["save:freeze"].median == 160.0
    assert by[20].restore_elections == 1 and not by[20].all_survived
    assert by[50].ok == 1 and by[50].errors == ["he50-0-r1: boom"] and not by[50].all_survived
    # 20 ms had an election and 50 ms a failure: 100 ms is the shortest that survived all
    assert shortest_surviving(hbs) == 100
    text = headline(hbs)
    assert "100 ms" in text and "1,000 ms 2/2" in text and "20 ms 1/2" in text
    assert "but the longer" not in text
    assert "but the longer 1,000 ms" in headline(summarize_heartbeats(
        [rnd(1000, 0, terms=(5, 6, 6, 6, 6)), rnd(100, 0)]))
    assert shortest_surviving(summarize_heartbeats([rnd(20, 0, ok=False)])) is None
    assert "no heartbeat interval survived" in headline(summarize_heartbeats(
        [rnd(20, 0, ok=False)]))
    sts = summarize_staggers(rounds)
    assert [s.stagger_ms for s in sts] == [0, 1000]
    # the first 1000 ms round elected gamma while alpha led (resumed first); the second had
    # alpha lead too, and a term that grew once healthy again
    assert sts[1].by_leader == {0: (2, 2)} and sts[0].by_leader == {0: (0, 1)}
    assert sts[1].to_dict()["by_leader"] == {"first": [2, 2]}
    assert sts[0].restore_elections == 0
    assert sts[1].restore_elections == 2 and sts[1].term_growth.median == pytest.approx(1.5)
    assert sts[1].recovered_s.median == 1.5 and sts[1].healthy_at_once == 1


def test_targets_met_or_not() -> None:
    good = [rnd(100, i, skew=300.0 + i) for i in range(3)] + [rnd(300, 0)]
    tg = {t.name: t for t in targets(good)}
    skew = tg["resume skew after a restore"]
    assert skew.met is True and "4 resumes" in skew.value and "300 µs" in skew.value
    assert tg["100 ms heartbeat through every save and restore"].met is True
    assert tg["100 ms heartbeat through every save and restore"].value == \
        "3/3 rounds without an election"
    bad = [rnd(100, 0, skew=7200.0, save_skew=1500.0), rnd(100, 1, terms=(5, 5, 5, 6, 6)),
           rnd(100, 2, ok=False), rnd(100, 0, part=STAGGER, stagger=1000, skew=2e6)]
    tg = {t.name: t for t in targets(bad)}
    skew = tg["resume skew after a restore"]
    # the staggered restore is left out: it is meant to be apart
    assert skew.met is False and skew.detail == "1 of 2 at 1 ms or more (worst 7,200 µs)"
    assert tg["resume skew after a save (--leave-running)"].met is False
    hb = tg["100 ms heartbeat through every save and restore"]
    assert hb.met is False and "1 round(s) failed" in hb.detail
    assert "1 election(s) across a restore" in hb.detail
    none = {t.name: t for t in targets([rnd(50, 0)])}
    assert none["100 ms heartbeat through every save and restore"].met is None
    assert {t.met for t in targets([])} == {None}


# --- results on disk ------------------------------------------------------------------------------


def synthetic() -> BenchResults:
    cfg = BenchConfig(heartbeats=(1000, 100, 20), reps=2, staggers=(0, 400), stagger_reps=2,
                      seed=3, out=Path("results/sync-test"))
    res = BenchResults(cfg, seed=3, env={"kernel": "6.1.0", "cpus": 2,
                                         "etcd": "etcd Version: 3.4.23",
                                         "criu": {"version": "3.19"}},
                       started="2026-11-28T01:00:00+00:00", finished="2026-11-28T01:10:00+00:00",
                       wall_s=600.0)
    res.rounds = [rnd(1000, 0), rnd(1000, 1), rnd(100, 0), rnd(100, 1), rnd(20, 0),
                  rnd(20, 1, terms=(5, 5, 5, 5, 6)),
                  rnd(100, 0, part=STAGGER, stagger=0), rnd(100, 0, part=STAGGER, stagger=400,
                                                           terms=(5, 5, 5, 5, 6)),
                  rnd(100, 1, part=STAGGER, stagger=0),
                  rnd(100, 1, part=STAGGER, stagger=400, healthy=False, recovered=1.2,
                      recovered_term=7)]
    res.rounds[5].log = ["+120 ms beta: b2 is starting a new election at term 6"]
    res.clusters = [{"tag": "hb1000", "heartbeat_ms": 1000, "election_ms": 5000, "start_s": 7.1,
                     "rss_kib": {"alpha": 40960}, "threads": {"alpha": 14}, "rounds": 2}]
    res.notes = ["a note"]
    return res


def test_results_round_trip_and_markdown(tmp_path: Path) -> None:
    res = synthetic()
    data = json.loads(json.dumps(res.to_dict(), default=str))
    assert data["benchmark"] == "sync" and data["shortest_surviving_heartbeat_ms"] == 100
    assert [h["heartbeat_ms"] for h in data["heartbeats"]] == [1000, 100, 20]
    assert [s["stagger_ms"] for s in data["staggers"]] == [0, 400]
    assert data["rounds"][5]["restore_election"] is True
    back = BenchResults.from_dict(data)
    assert back.to_dict() == data
    md = markdown(res)
    assert "**Result:** the shortest heartbeat interval at which every save and restore went " \
           "without an election: 100 ms" in md
    assert "| 100 ms | 500 ms | 2/2 | **2/2** | 0 | 0 |" in md
    assert "| 20 ms | 100 ms | 2/2 | **1/2** | 0 | 1 |" in md
    assert "| 400 ms | 2/2 | **2/2** | first 2/2 |" in md
    assert "| resume skew after a restore |" in md and "**met**" in md
    assert "etcd: +120 ms beta: b2 is starting a new election at term 6" in md
    assert "restore's resume, µs after the first agent woke" in md
    assert "| hb1000 | 1000 ms | 5000 ms | 7.10 | alpha 40 MiB | alpha 14 | 2 |" in md
    assert "- a note" in md
    made = write_outputs(res, tmp_path)
    names = {p.name for p in made}
    assert {"results.json", "results.md", "skews.png", "times.png", "elections_heartbeat.png",
            "elections_stagger.png"} <= names
    for p in made:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
    assert load_results(tmp_path / "results.json").to_dict() == data
    assert round_line(res.rounds[5]).endswith("writer gap 0.30 s / 1.05 s")
    assert "ELECTION (term +1)" in round_line(res.rounds[5])
    assert "FAILED in restore: boom" in round_line(rnd(ok=False))
    last = rnd(100, 0, part=STAGGER, stagger=400, leaders=("gamma",) * 5)
    assert last.leader_position == 2
    assert "stagger 400 ms, round 1, leader gamma (last to resume):" in round_line(last)
    assert rnd(leaders=("delta",) * 5).leader_position is None


def test_an_empty_or_interrupted_run_still_renders(tmp_path: Path) -> None:
    res = BenchResults(BenchConfig(), interrupted=True)
    assert not res.ok and res.shortest_surviving is None
    md = markdown(res)
    assert "interrupted" in md and "no heartbeat was measured" in md
    assert [p.name for p in write_outputs(res, tmp_path)] == ["results.json", "results.md"]


def test_the_command_renders_an_earlier_results_json(tmp_path: Path) -> None:
    from orthros_py.cli import main
    from orthros_py.cli.context import Env

    write_outputs(synthetic(), tmp_path, plots=False)
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "sync", "--from-json", str(tmp_path / "results.json"), "--json"],
             env=Env(stdout=out, stderr=err))
    assert exc.value.code in (0, None), err.getvalue()
    got: dict[str, Any] = json.loads(out.getvalue())
    assert got["shortest_surviving_heartbeat_ms"] == 100
    text = err.getvalue()
    assert "heartbeat sweep" in text and "stagger sweep" in text and "targets" in text
    assert "the shortest heartbeat interval" in text
    assert (tmp_path / "skews.png").exists()


# --- the volume's parsers ----------------------------------------------------------------------


def test_losetup_and_mountinfo_parsers() -> None:
    text = ("/dev/loop0 /var/lib/orthros/bench-sync-1a2b3c4d.img\n"
            "/dev/loop1 /srv/other image.img (deleted)\n\n/dev/loop2\n")
    assert parse_losetup(text) == {"/dev/loop0": "/var/lib/orthros/bench-sync-1a2b3c4d.img",
                                   "/dev/loop1": "/srv/other image.img"}
    info = ("36 25 0:32 / /var/lib/orthros/bench-sync-1a2b3c4d rw - btrfs /dev/loop0 rw\n"
            "37 25 0:33 / /mnt/with\\040space rw - ext4 /dev/sda1 rw\n")
    assert mount_points(info) == ["/var/lib/orthros/bench-sync-1a2b3c4d", "/mnt/with space"]
    assert is_ours("/var/lib/orthros/bench-sync-1a2b3c4d.img")
    assert is_ours("/var/lib/orthros/bench-sync-1a2b3c4d")
    assert not is_ours("/var/lib/orthros/test-etcd-1a2b3c4d")
    assert not is_ours("/var/lib/orthros/x/bench-sync-1a2b3c4d")
