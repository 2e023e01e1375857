"""The network lock benchmark's pure half: ab's report, the run plan, phase splitting, medians,
ratios, the paper's figures and the markdown table. No root, no processes."""

from __future__ import annotations

import ipaddress
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from orthros_py.bench import netlock as nb
from orthros_py.bench.netlock import (
    PAPER,
    AbReport,
    BenchConfig,
    BenchResults,
    Method,
    MicroResult,
    Phase,
    RunRecord,
    fmt_ratio,
    markdown,
    parse_ab,
    parse_concurrency,
    parse_methods,
    pick_subnet,
    plan,
    ratios,
    split_phase,
    summarize,
    synthetic_conns,
)
from orthros_py.bench.netlock import host as nb_host
from orthros_py.errors import OrthrosError

# ab -k stopped with SIGINT 1 s after a restore (a real report from this benchmark).
AB_SIGINT = """\
This is ApacheBench, Version 2.3 <$Revision$>
Copyright 1996 Adam Twiss, Zeus Technology Ltd, http://www.zeustech.net/
Licensed to The Apache Software Foundation, http://www.apache.org/

Benchmarking 10.99.200.1 (be patient)


Server Software:        nginx/1.22.1
Server Hostname:        10.99.200.1
Server Port:            8080

Document Path:          /
Document Length:        26 bytes

Concurrency Level:      20
Time taken for tests:   1.910 seconds
Complete requests:      127209
Failed requests:        0
Keep-Alive requests:    127209
Total transferred:      33328758 bytes
HTML transferred:       3307434 bytes
Requests per second:    66611.58 [#/sec] (mean)
Time per request:       0.300 [ms] (mean)
Time per request:       0.015 [ms] (mean, across all concurrent requests)
Transfer rate:          17043.20 [Kbytes/sec] received

Connection Times (ms)
              min  mean[+/-sd] median   max
Connect:        0    0   0.0      0       0
Processing:     0    0  10.1      0     807
Waiting:        0    0  10.1      0     807
Total:          0    0  10.1      0     807

Percentage of the requests served within a certain time (ms)
  50%      0
  66%      0
  75%      0
  80%      0
  90%      0
  95%      0
  98%      0
  99%      0
 100%    807 (longest request)
"""


def test_ab_report_after_sigint() -> None:
    rep = parse_ab(AB_SIGINT, "", 1)
    assert rep.complete == 127209
    assert (rep.failed, rep.non_2xx, rep.write_errors) == (0, 0, 0)
    assert rep.rps == pytest.approx(66611.58)
    assert rep.seconds == pytest.approx(1.91)
    assert rep.longest_ms == 807.0
    assert rep.aborted is None
    assert rep.exit_code == 1


def test_ab_failures_and_non_2xx() -> None:
    text = AB_SIGINT.replace(
        "Failed requests:        0\n",
        "Failed requests:        37\n   (Connect: 2, Receive: 30, Length: 5, Exceptions: 0)\n"
        "Write errors:           3\nNon-2xx responses:      4\n")
    rep = parse_ab(text)
    assert rep.failed == 37
    assert rep.failed_kinds == {"connect": 2, "receive": 30, "length": 5, "exceptions": 0}
    assert (rep.write_errors, rep.non_2xx) == (3, 4)


def test_ab_longest_from_connection_times_without_percentiles() -> None:
    text = AB_SIGINT.split("Percentage of the requests")[0].replace("807\n", "1234\n")
    assert parse_ab(text).longest_ms == 1234.0


def test_ab_that_gave_up_by_itself() -> None:
    out = ("This is ApacheBench, Version 2.3\n\nBenchmarking 10.99.200.1 (be patient)\n"
           "Total of 5120 requests completed\n")
    err = "\nTest aborted after 10 failures\n\napr_socket_connect(): Connection refused (111)\n"
    rep = parse_ab(out, err, 111)
    assert rep.complete == 5120
    assert rep.aborted == "Test aborted after 10 failures; " \
                          "apr_socket_connect(): Connection refused (111)"
    assert rep.longest_ms is None


def test_ab_that_printed_nothing() -> None:
    rep = parse_ab("", "", -9)
    assert rep.complete == 0
    assert rep.aborted == "ab printed no report"


# --- plan ---------------------------------------------------------------------------------------

def test_plan_shuffles_each_round_and_keeps_every_method() -> None:
    cfg = BenchConfig(concurrency=(0, 500), reps=3, seed=7)
    runs = plan(cfg)
    assert len(runs) == 2 * 3 * 4
    rounds: dict[tuple[int, int], list[Method]] = {}
    for r in runs:
        rounds.setdefault((r.concurrency, r.rep), []).append(r.method)
    assert all(sorted(ms) == sorted(Method) for ms in rounds.values())
    assert len({tuple(ms) for ms in rounds.values()}) > 1  # not one fixed order
    assert plan(cfg) == runs  # a seed reproduces the order
    assert [r.concurrency for r in runs] == sorted(r.concurrency for r in runs)


def test_plan_runs_fewer_slow_iptables() -> None:
    cfg = BenchConfig(concurrency=(0, 500, 1000, 1500), reps=3, reps_slow=1, slow_from=1000,
                      seed=1)
    count = Counter((r.concurrency, r.method) for r in plan(cfg))
    assert count[(500, Method.IPTABLES)] == 3
    assert count[(1000, Method.IPTABLES)] == 1
    assert count[(1500, Method.IPTABLES)] == 1
    assert count[(1500, Method.XDP)] == 3
    assert sum(count.values()) == 4 * 3 * 4 - 2 * 2


def test_plan_only_the_chosen_methods() -> None:
    cfg = BenchConfig(concurrency=(0, 20), reps=1, methods=(Method.XDP, Method.NONE))
    assert {r.method for r in plan(cfg)} == {Method.XDP, Method.NONE}


def test_method_locks() -> None:
    assert Method.NONE.lock.value == "skip"
    assert Method.NONE.lock.criu.value == "skip"
    assert Method.XDP.lock.criu.value == "skip"  # CRIU locks nothing: orthros does
    assert Method.IPTABLES.lock.criu.value == "iptables"
    assert Method.NFTABLES.criu_locks and not Method.XDP.criu_locks


# --- splitting a phase --------------------------------------------------------------------------

def test_split_iptables_uses_criu_log_spans() -> None:
    p = split_phase(Method.IPTABLES, "dump", 2700.0, 2650.0, spans_ms=2500.0, spans_calls=1000,
                    stats={"frozen_ms": 2600.0})
    assert (p.total_ms, p.criu_ms, p.lock_ms, p.lock_calls) == (2700.0, 150.0, 2500.0, 1000)
    assert p.frozen_ms == 2600.0


def test_split_xdp_uses_map_timings() -> None:
    report = {"method": "xdp", "conns": 500, "lock_ms": 1.25, "unlock_ms": 0.75}
    dump = split_phase(Method.XDP, "dump", 140.0, 78.0, spans_ms=99.0, lock_report=report)
    assert (dump.lock_ms, dump.criu_ms, dump.lock_calls) == (1.25, 76.75, 500)
    restore = split_phase(Method.XDP, "restore", 190.0, 91.0, lock_report=report)
    assert (restore.lock_ms, restore.criu_ms) == (0.75, 90.25)


def test_split_xdp_without_connections() -> None:
    report = {"method": "xdp", "conns": 0, "lock_ms": None, "unlock_ms": None}
    p = split_phase(Method.XDP, "dump", 60.0, 45.0, lock_report=report)
    assert (p.lock_ms, p.criu_ms) == (0.0, 45.0)


def test_split_none_has_no_lock() -> None:
    p = split_phase(Method.NONE, "restore", 50.0, 40.0, spans_ms=12.0, spans_calls=3)
    assert (p.lock_ms, p.criu_ms, p.lock_calls) == (0.0, 40.0, 0)


# --- aggregation --------------------------------------------------------------------------------

def run(conc: int, method: str, dump: float, restore: float, *, lock: float = 0.0,
        ok: bool = True, rep: int = 0, longest: float | None = 100.0, failed: int = 0,
        error: str | None = None) -> RunRecord:
    rec = RunRecord(conc, method, rep, 0, ok=ok, conns=conc)
    if ok:
        rec.dump = Phase(dump, dump - lock - 10, lock, dump - 10)
        rec.restore = Phase(restore, restore - lock - 5, lock, restore - 5)
        rec.ab = AbReport(complete=1000, failed=failed, longest_ms=longest)
    else:
        rec.stage, rec.error = "dump", error
    return rec


def test_summarize_takes_medians_of_successful_runs() -> None:
    runs = [run(500, "xdp", 100, 200, lock=1, rep=0), run(500, "xdp", 300, 100, lock=3, rep=1),
            run(500, "xdp", 200, 150, lock=2, rep=2),
            run(500, "xdp", 0, 0, ok=False, rep=3, error="boom")]
    (cell,) = summarize(runs)
    assert (cell.runs, cell.ok) == (4, 3)
    assert cell.dump_total_ms == 200
    assert cell.dump_lock_ms == 2
    assert cell.restore_total_ms == 150
    # The median of per-run sums (300, 400, 350), not the sum of the medians (350).
    assert cell.sum_ms == 350
    assert cell.errors == ["dump: boom"]
    assert cell.ab_longest_ms == 100


def test_summarize_orders_and_counts_failures() -> None:
    runs = [run(1000, "none", 10, 10), run(0, "xdp", 10, 10), run(0, "iptables", 10, 10),
            run(1000, "nftables", 0, 0, ok=False, error="CRIU exited"),
            run(1000, "nftables", 0, 0, ok=False, error="CRIU exited"),
            run(1000, "none", 12, 10, failed=7, longest=None)]
    cells = summarize(runs)
    assert [(c.concurrency, c.method) for c in cells] == [
        (0, "iptables"), (0, "xdp"), (1000, "nftables"), (1000, "none")]
    nft = cells[2]
    assert (nft.ok, nft.runs, nft.dump_total_ms) == (0, 2, None)
    assert nft.errors == ["dump: CRIU exited"]  # distinct reasons only
    none = cells[3]
    assert none.ab_failed == 7
    assert none.ab_longest_ms == 100  # the run without a longest request is left out


def test_ratios() -> None:
    runs = [run(500, "xdp", 100, 50), run(500, "iptables", 2000, 1000),
            run(500, "none", 90, 60), run(1500, "xdp", 300, 200)]
    r500, r1500 = ratios(summarize(runs))
    assert r500.xdp_iptables == pytest.approx(150 / 3000)
    assert r500.xdp_none == pytest.approx(1.0)
    assert (r1500.xdp_ms, r1500.iptables_ms, r1500.xdp_iptables) == (500, None, None)
    assert fmt_ratio(0.05) == "0.050 (1 : 20.0)"
    assert fmt_ratio(1.25) == "1.250"
    assert fmt_ratio(None) == "—"


def test_paper_figures_match_the_seed_text() -> None:
    # "About 170 ms end to end with no connections, about 18 s at 1,500."
    assert PAPER[0].total == pytest.approx(169.16)
    assert PAPER[1500].total == pytest.approx(18954.65)
    assert PAPER[0].restore_lock is None  # "—" in the paper
    assert PAPER[500].dump_lock == pytest.approx(1260.40 + 533.51)
    # The seed says "iptables + sh are 52-60 % of dump time and 85-92 % of restore time"; its
    # own figures give 51-60 % and 87-94 % (at 1,000: 3,893.05 of 4,142.99 ms).
    for c in (500, 1000, 1500):
        p = PAPER[c]
        assert 0.51 <= (p.dump_lock or 0) / p.dump_total <= 0.61
        assert 0.87 <= (p.restore_lock or 0) / p.restore_total <= 0.94


def results() -> BenchResults:
    res = BenchResults(BenchConfig(concurrency=(0, 500), reps=1),
                       env={"kernel": "Linux 6.18", "cpus": 2, "criu": "4.2.1"},
                       started="2026-11-23T10:00:00+00:00")
    res.runs = [run(0, "xdp", 60, 50), run(500, "xdp", 140, 190, lock=1.2),
                run(500, "iptables", 2700, 19700, lock=2500),
                run(500, "nftables", 0, 0, ok=False, error="CRIU exited in the middle")]
    res.micro = MicroResult(1000, 7, 1.1, 0.9, [1.1] * 7, [0.9] * 7)
    return res


def test_markdown_has_our_rows_the_papers_and_the_failures() -> None:
    md = markdown(results())
    assert "| 500 | xdp | 1/1 | 140.00 |" in md
    assert "| 500 | *paper: iptables* | | *2,966.98* | *1,173.07* | *1,793.91* |" in md
    assert "| 0 | *paper: iptables* | | *135.14* | *121.63* | *13.51* | *34.02* | *34.02* | *—*" \
        in md
    assert "| 500 | nftables | 0/1 ✗ | — |" in md
    assert "- 500 connections, nftables: dump: CRIU exited in the middle" in md
    assert "xdp : iptables" in md
    assert "1,000 synthetic connections" in md
    assert "lock + unlock, best of 7: 2.000 ms" in md  # the figure no test asserts a limit on


def test_results_round_trip_through_json() -> None:
    res = results()
    data = res.to_dict()
    back = BenchResults.from_dict(data)
    assert back.to_dict() == data
    assert data["medians"][0]["method"] == "xdp"
    assert data["ratios"][1]["xdp_iptables"] == pytest.approx(330 / 22400)


def test_write_outputs_without_plots(tmp_path: Path) -> None:
    made = nb.write_outputs(results(), tmp_path, plots=False)
    assert {p.name for p in made} == {"results.json", "results.md"}
    assert nb.load_results(tmp_path / "results.json").runs[1].dump is not None


# --- small parsers and helpers ------------------------------------------------------------------

def test_parse_concurrency_and_methods() -> None:
    assert parse_concurrency("0, 500,1_000,500") == (0, 500, 1000)
    with pytest.raises(ValueError, match="not a number"):
        parse_concurrency("0,lots")
    with pytest.raises(ValueError, match="no concurrency"):
        parse_concurrency(" , ")
    assert parse_methods("xdp,none,xdp") == (Method.XDP, Method.NONE)
    with pytest.raises(ValueError, match="unknown method 'ebpf'"):
        parse_methods("xdp,ebpf")


def test_pick_subnet_avoids_taken_networks() -> None:
    taken = [ipaddress.IPv4Network("10.99.200.0/24"), ipaddress.IPv4Network("10.99.201.0/25")]
    assert pick_subnet(taken) == ipaddress.IPv4Network("10.99.202.0/24")
    with pytest.raises(OrthrosError, match="no free"):
        pick_subnet([ipaddress.IPv4Network("10.0.0.0/8")])


def test_synthetic_conns_are_distinct_documentation_addresses() -> None:
    conns = synthetic_conns(120_000)
    assert len(set(conns)) == 120_000
    docs = [ipaddress.IPv4Network("203.0.113.0/24"), ipaddress.IPv4Network("198.51.100.0/24")]
    for c in (conns[0], conns[-1]):
        assert ipaddress.IPv4Address(c.local_ip) in docs[0]
        assert ipaddress.IPv4Address(c.remote_ip) in docs[1]


def test_criu_iptables_rules_are_found_by_mark_and_address(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    save = """\
*filter
:INPUT ACCEPT [0:0]
-A INPUT -s 10.99.200.2/32 -d 10.99.200.1/32 -p tcp -m tcp --sport 40000 --dport 8080 -m mark ! --mark 0xc114 -j DROP
-A INPUT -s 10.5.0.2/32 -d 10.5.0.1/32 -p tcp -m tcp --sport 1 --dport 2 -m mark ! --mark 0xc114 -j DROP
-A INPUT -s 10.99.200.2/32 -j ACCEPT
COMMIT
"""

    def fake_run(argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 0, save, "")

    # Patched where they are looked up: the host module, not the package that re-exports.
    monkeypatch.setattr(nb_host, "run", fake_run)
    monkeypatch.setattr(nb_host, "_tool", lambda name: name)
    rules = nb_host.criu_iptables_rules(["10.99.200.1", "10.99.200.2"])
    assert len(rules) == 1 and "--sport 40000" in rules[0]  # another test's rule is left alone
