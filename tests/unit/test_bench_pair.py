"""The pair benchmark's pure half: redis-benchmark's report, the plan of interleaved rounds,
medians, spreads and per-round ratios, checkpoint costs, deaths, the targets and the markdown.
No root, no processes."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from orthros_py.bench.pair import (
    Arm,
    BenchConfig,
    BenchResults,
    DeathRun,
    MemoryRun,
    RedisTest,
    ThroughputRun,
    arms,
    fmt_bytes,
    markdown,
    parse_intervals,
    parse_redis_benchmark,
    plan,
    requests_for,
    summarize,
    summarize_deaths,
    write_outputs,
)
from orthros_py.bench.pair.model import (
    UNPROTECTED,
    Figure,
    RespError,
    arm_order,
    death_plan,
    merge_checkpoints,
    parse_info,
    parse_snmp,
    read_reply,
    resp_command,
    targets,
)
from orthros_py.bench.stats import fmt_pct, fmt_ratio, ratio, spread

# redis-benchmark 7.0.15 --csv, as it printed here.
CSV7 = """\
"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"SET","68965.52","0.094","0.016","0.087","0.151","0.271","0.399"
"GET","100000.00","0.064","0.016","0.055","0.079","0.191","1.799"
"""
# redis 6's --csv: no header, requests per second only.
CSV6 = '"SET","41322.31"\n"GET","43478.26"\n'
# -q, with the progress line it overwrites with \r.
QUIET = (" SET: rps=0.0 (overall: inf) avg_msec=0.273 (overall: 0.273)\r"
         " SET: 74074.07 requests per second, p50=0.087 msec                    \n"
         " GET: 90909.09 requests per second, p50=0.063 msec\n\n")


def test_redis_benchmark_csv_of_redis_7() -> None:
    got = parse_redis_benchmark(CSV7)
    assert set(got) == {"SET", "GET"}
    assert got["SET"] == RedisTest("SET", 68965.52, avg_ms=0.094, min_ms=0.016, p50_ms=0.087,
                                   p95_ms=0.151, p99_ms=0.271, max_ms=0.399)
    assert got["GET"].rps == 100000.0 and got["GET"].max_ms == 1.799


def test_redis_benchmark_csv_of_redis_6_and_quiet_output() -> None:
    old = parse_redis_benchmark(CSV6)
    assert old["SET"].rps == 41322.31 and old["SET"].p99_ms is None
    quiet = parse_redis_benchmark(QUIET)
    assert quiet["SET"] == RedisTest("SET", 74074.07, p50_ms=0.087)
    assert quiet["GET"].rps == 90909.09
    assert parse_redis_benchmark("Could not connect to Redis at 10.77.0.100:6379") == {}


def test_intervals_parse_and_refuse() -> None:
    assert parse_intervals("1000,50, 200ms,0.1s") == (50, 100, 200, 1000)
    for bad in ("", "5", "fast", "1.5", "0.0005s"):
        with pytest.raises(ValueError):
            parse_intervals(bad)


def test_plan_runs_every_arm_once_per_round_in_a_seeded_order() -> None:
    cfg = BenchConfig(intervals=(50, 200), reps=4)
    runs = plan(cfg, seed=7)
    assert len(arms(cfg.intervals)) == 5
    assert Counter(r.round for r in runs) == {0: 5, 1: 5, 2: 5, 3: 5}
    for rnd in range(4):
        assert sorted((r.arm for r in runs if r.round == rnd), key=arm_order) == \
            list(arms(cfg.intervals))
    orders = {tuple(r.arm for r in runs if r.round == rnd) for rnd in range(4)}
    assert len(orders) > 1  # shuffled anew each round
    assert plan(cfg, seed=7) == runs and plan(cfg, seed=8) != runs
    deaths = death_plan(BenchConfig(death_reps=3), seed=7)
    assert sorted(deaths) == [(0, False), (0, True), (1, False), (1, True), (2, False),
                              (2, True)]


def test_output_commit_runs_are_sized_in_checkpoints() -> None:
    cfg = BenchConfig(requests=50_000, clients=50, oc_seconds=3.0)
    assert requests_for(cfg, UNPROTECTED) == 50_000
    assert requests_for(cfg, Arm(200, False)) == 50_000
    assert requests_for(cfg, Arm(200, True)) == 50 * 15  # 3 s of 200 ms checkpoints
    assert requests_for(cfg, Arm(1000, True)) == 50 * 5  # never fewer than 5 checkpoints
    assert requests_for(BenchConfig(requests=300), Arm(50, True)) == 300  # capped


def run(rnd: int, arm: Arm, set_rps: float, get_rps: float, *, ok: bool = True,
        checkpoints: list[dict[str, Any]] | None = None) -> ThroughputRun:
    r = ThroughputRun(rnd, 0, arm, 1000, ok=ok, error=None if ok else "boom")
    r.tests = {"SET": RedisTest("SET", set_rps, p50_ms=0.1 * rnd + 0.1, p99_ms=1.0 + rnd),
               "GET": RedisTest("GET", get_rps, p50_ms=0.2, p99_ms=2.0)}
    r.checkpoints = checkpoints or []
    r.bench_s, r.generations = 2.0, 10
    return r


def test_ratios_are_medians_of_per_round_ratios() -> None:
    a = Arm(200, False)
    runs = [run(0, UNPROTECTED, 1000, 2000), run(0, a, 900, 1000),
            run(1, UNPROTECTED, 500, 2000), run(1, a, 400, 1500),
            run(2, UNPROTECTED, 1000, 2000), run(2, a, 700, 1600),
            run(3, UNPROTECTED, 1000, 2000, ok=False), run(3, a, 999, 999)]
    base, paired = summarize(runs)
    assert base.arm == UNPROTECTED and base.ok == 3 and base.runs == 4
    assert base.tests["SET"].ratio.median == 1.0
    s = paired.tests["SET"]
    # 0.9, 0.8, 0.7 (round 3 has no unprotected figure): not the ratio of the medians
    assert s.ratio.median == pytest.approx(0.8)
    assert (s.ratio.low, s.ratio.high, s.ratio.n) == (pytest.approx(0.7), pytest.approx(0.9), 3)
    assert s.rps.median == pytest.approx(800) and (s.rps.low, s.rps.high) == (400, 999)
    assert s.p99_ms.median == pytest.approx(2.5)
    assert paired.tests["GET"].ratio.median == pytest.approx(0.75)
    assert base.errors == ["boom"] and paired.errors == []


def test_checkpoint_costs_full_against_incremental_under_load() -> None:
    def cp(gen: int, full: bool, frozen: float, pages: int, loaded: bool) -> dict[str, Any]:
        return {"generation": gen, "full": full, "frozen_ms": frozen, "pages_written": pages,
                "page_bytes": pages * 4096, "file_bytes": 1000, "duration_ms": 30.0,
                "loaded": loaded}

    a = Arm(100, True)
    runs = [run(0, UNPROTECTED, 1, 1),
            run(0, a, 1, 1, checkpoints=[cp(1, True, 20.0, 3000, False),
                                         cp(2, False, 5.0, 100, True),
                                         cp(3, False, 7.0, 300, True),
                                         cp(4, False, 1.0, 1, False)])]
    c = summarize(runs)[1].checkpoints
    assert c is not None
    assert c.full_frozen_ms.median == 20.0 and c.full_bytes.median == 3000 * 4096 + 1000
    assert c.incr_frozen_ms.median == 6.0 and c.incr_frozen_ms.n == 2  # idle one left out
    assert c.incr_pages.median == 200
    assert c.achieved_interval_ms.median == 200.0  # 2 s over 10 generations
    merged = merge_checkpoints([{"generation": 2, "a": 1}], [{"generation": 1},
                                                              {"generation": 2, "b": 2}])
    assert merged == [{"generation": 1}, {"generation": 2, "a": 1, "b": 2}]


def death(oc: bool, died: float, pong: float, *, ok: bool = True) -> DeathRun:
    d = DeathRun(0, oc, 200, 100, 3, ok=ok, died_at=died, first_pong_at=pong,
                 first_get_at=pong + 0.001, granted_at=died + 0.35, keys_acked=1000,
                 acked_after_freeze=0 if oc else 40, lost=0 if oc else 40, resets=0 if oc else 2)
    d.promoted = {"at": died + 0.5, "detected_at": died + 0.36, "fence_ms": 2.0,
                  "address_ms": 5.0, "restore_ms": 120.0, "total_ms": 135.0,
                  "generation_age_ms": 420.0, "generation_frozen_at": died - 0.15}
    return d


def test_death_phases_and_summary() -> None:
    d = death(False, 100.0, 100.6)
    assert d.death_to_serving_ms == pytest.approx(600.0)
    ph = d.phases()
    assert ph["detect + grant"] == pytest.approx(350.0)
    assert ph["grant -> promote"] == pytest.approx(10.0)
    # the promotion ended at its start + its total (360 + 135 ms after the death)
    assert ph["restore"] == 120.0 and ph["promoted -> reply"] == pytest.approx(105.0)
    assert d.loss_window_ms == pytest.approx(150.0)
    runs = [death(False, 0.0, 0.6), death(False, 0.0, 0.4), death(False, 0.0, 0.5),
            death(True, 0.0, 0.7), death(True, 0.0, 9.9, ok=False)]
    plain, oc = summarize_deaths(runs)
    assert not plain.output_commit and plain.ok == 3
    assert plain.serving_ms.median == pytest.approx(500.0)
    assert (plain.serving_ms.low, plain.serving_ms.high) == (pytest.approx(400.0),
                                                             pytest.approx(600.0))
    assert plain.lost.median == 40 and oc.lost.median == 0
    assert oc.ok == 1 and oc.runs == 2 and oc.serving_ms.median == pytest.approx(700.0)


def test_targets_met_or_not_and_by_how_much() -> None:
    a, o = Arm(200, False), Arm(200, True)
    tp = summarize([run(0, UNPROTECTED, 1000, 1000), run(0, a, 850, 790),
                    run(0, o, 100, 100)])
    mem = MemoryRun(256, 10 * 2**20, 1000, ok=True,
                    full={"page_bytes": 300 * 2**20, "file_bytes": 2**20},
                    written=[{"page_bytes": 12 * 2**20, "file_bytes": 2**20}])
    got = {t.name.split(" (")[0]: t for t in targets(tp, mem, summarize_deaths(
        [death(False, 0.0, 0.45), death(True, 0.0, 0.61)]))}
    t200 = got["throughput at 200 ms"]
    assert t200.met is False and "1.0%" in t200.detail  # GET at 79 % is the lower one
    assert got["throughput at 200 ms + output commit"].met is False
    assert got["bytes per checkpoint"].met is True and got["bytes per checkpoint"].value == \
        "1.30 x"
    assert mem.full_over_incremental == pytest.approx(301 / 13)
    assert got["death to serving"].met is True
    oc = got["death to serving + output commit"]
    assert oc.met is False and oc.detail == "110 ms over"
    none = targets([], None, [])
    assert [t.met for t in none] == [None, None, None]


def results() -> BenchResults:
    a = Arm(200, False)
    res = BenchResults(BenchConfig(intervals=(200,), reps=1), seed=42,
                       env={"kernel": "6.18", "cpus": 2, "redis": "Redis server v=7.0.15"},
                       started="2026-11-27T20:00:00+00:00", wall_s=321.0)
    res.throughput = [run(0, UNPROTECTED, 1000, 1000), run(0, a, 900, 950),
                      run(0, Arm(200, True), 50, 60, ok=False)]
    res.memory = MemoryRun(256, 10 * 2**20, 1000, ok=True, full={"page_bytes": 3 * 2**28},
                           idle=[{"page_bytes": 2**20}], written=[{"page_bytes": 11 * 2**20}])
    res.deaths = [death(False, 0.0, 0.62), death(True, 0.0, 0.55)]
    res.notes = ["a note"]
    return res


def test_markdown_and_results_round_trip(tmp_path: Path) -> None:
    res = results()
    made = write_outputs(res, tmp_path, plots=False)
    assert [p.name for p in made] == ["results.json", "results.md"]
    md = (tmp_path / "results.md").read_text()
    assert "| throughput at 200 ms | >= 80% of unprotected | SET 90.0%, GET 95.0% | **met**" \
        in md
    assert "| 200 ms | 1/1 | 1,000 | 900 | 90.0% |" in md  # then p50, p99, max
    assert "| 200 ms + output commit | 0/1 |" in md
    assert "Bytes sent per byte written: **1.10**" in md
    assert "| **death to serving** | **620** | **550** |" in md
    assert "| acked keys missing afterwards | 40 | 0 |" in md
    assert "- 200 ms + output commit: boom" in md and "- a note" in md
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["seed"] == 42 and data["targets"][0]["met"] is True
    back = BenchResults.from_dict(data)
    assert markdown(back) == md
    assert back.throughput == res.throughput and back.deaths == res.deaths


def test_plots_are_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    made = write_outputs(results(), tmp_path)
    names = sorted(p.name for p in made if p.suffix == ".png")
    assert names == ["checkpoint_bytes.png", "death_to_serving.png", "p99.png",
                     "throughput_ratio.png"]
    for p in made[2:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resp_commands_and_replies() -> None:
    assert resp_command("SET", "k", b"\x00v") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\x00v\r\n"
    f = io.BytesIO(b"+PONG\r\n$5\r\nal\r\no\r\n$-1\r\n:42\r\n*2\r\n+OK\r\n$1\r\nx\r\n"
                   b"-ERR no\r\n")
    assert read_reply(f) == "PONG"
    assert read_reply(f) == b"al\r\no"
    assert read_reply(f) is None
    assert read_reply(f) == 42
    assert read_reply(f) == ["OK", b"x"]
    with pytest.raises(RespError, match="ERR no"):
        read_reply(f)
    with pytest.raises(EOFError):
        read_reply(f)
    assert parse_info("# Memory\r\nused_memory:123\r\nused_memory_rss:456\r\n") == {
        "used_memory": "123", "used_memory_rss": "456"}
    snmp = ("Ip: Forwarding DefaultTTL\nIp: 1 64\n"
            "Tcp: RtoAlgorithm RtoMin ActiveOpens RetransSegs InErrs\n"
            "Tcp: 1 200 57 1234 0\nUdp: InDatagrams\nUdp: 3\n")
    assert parse_snmp(snmp) == {"RtoAlgorithm": 1, "RtoMin": 200, "ActiveOpens": 57,
                                "RetransSegs": 1234, "InErrs": 0}
    assert parse_snmp("") == {}


def test_shared_figures_helpers() -> None:
    assert ratio(1.0, 4.0) == 0.25 and ratio(None, 1.0) is None and ratio(1.0, 0.0) is None
    assert spread([3.0, None, 1.0]) == (1.0, 3.0) and spread([None]) is None
    assert fmt_pct(0.8123) == "81.2%" and fmt_pct(None) == "—"
    assert fmt_ratio(0.25) == "0.250 (1 : 4.0)"
    assert fmt_bytes(1536) == "1.5 KiB" and fmt_bytes(100) == "100 B"
    assert Figure.of([2.0, None, 4.0, 3.0]) == Figure(3.0, 2.0, 4.0, 3)
