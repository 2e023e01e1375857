"""The lazy benchmark's pure half on synthetic records: sizes and methods parsed, the plan of
interleaved rounds, one migration read from migrate's result (the contract of the lazy and
pre-copy keys) and from the client's log, medians and per-round ratios to eager, the targets,
the paging standby's records (memory against the hot fraction, failovers paging against
eager: the promotion's event read, judged, summarized, its targets), results.json round trip, results.md and the plots. No root."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from orthros_py.bench.lazy import (
    BenchConfig,
    BenchResults,
    FailoverRun,
    MigrationRun,
    PagingMemoryRun,
    config_for,
    failover_line,
    failover_plan,
    load_results,
    markdown,
    memory_line,
    parse_fractions,
    parse_methods,
    parse_sizes,
    plan,
    run_line,
    summarize,
    summarize_failovers,
    summarize_memory,
    targets,
    write_outputs,
)
from orthros_py.bench.lazy.model import (
    EAGER,
    LAZY,
    PRECOPY,
    PRECOPY_LAZY,
    growth,
    judge,
    read_client,
    read_result,
    round_ratios,
)
from orthros_py.bench.lazy.paging import (
    EAGER_PAIR,
    MIB,
    PAGING,
    PAIR_MODES,
    PlannedFailover,
    hot_set_bytes,
    judge_failover,
    memory_bound_bytes,
    paging_markdown,
    paging_targets,
    read_promotion,
    rep_ratios,
    sample_of,
)
from orthros_py.workloads.memhog import ClientError, ClientLog, Reply


def test_parse_sizes() -> None:
    assert parse_sizes("1024, 256,2g,256") == (256, 1024, 2048)
    assert parse_sizes("512m,1gib") == (512, 1024)
    for bad in ("", "0", "x", "1.5g"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_parse_methods_and_their_config() -> None:
    assert parse_methods("lazy, eager,lazy") == ("lazy", "eager")
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("eager,postcopy")
    assert config_for(EAGER) == {"lazy": False, "precopy": False}
    assert config_for(PRECOPY) == {"lazy": False, "precopy": True}
    assert config_for(LAZY) == {"lazy": True, "precopy": False}
    assert config_for(PRECOPY_LAZY) == {"lazy": True, "precopy": True}


def test_plan_interleaves_every_method_once_per_round_per_size() -> None:
    cfg = BenchConfig(sizes=(256, 1024), reps=3)
    p = plan(cfg, seed=11)
    assert len(p) == 2 * 3 * 4
    assert [x.size_mib for x in p] == [256] * 12 + [1024] * 12  # one workload per size
    for size in (256, 1024):
        for rnd in range(3):
            got = [x.method for x in p if x.size_mib == size and x.round == rnd]
            assert sorted(got) == sorted(cfg.methods)
    orders = {tuple(x.method for x in p if x.size_mib == 256 and x.round == r)
              for r in range(3)}
    assert len(orders) > 1  # shuffled, not the same order every round
    assert plan(cfg, seed=11) == p  # the seed reproduces it


def result(*, downtime: float = 50.0, total: float = 900.0, lazy: dict[str, Any] | None = None,
           precopy: list[dict[str, Any]] | None = None, bytes_total: int | None = None,
           bytes_transferred: int = 1 << 20) -> dict[str, Any]:
    d: dict[str, Any] = {
        "pid": 100, "new_pid": 100, "source": "alpha", "dest": "beta",
        "timings_ms": {"lock": 1.0, "dump": 30.0, "downtime": downtime, "total": total},
        "counts": {"processes": 1, "pages": 10, "bytes_transferred": bytes_transferred}}
    if bytes_total is not None:
        d["counts"]["bytes_total"] = bytes_total
    if lazy is not None:
        d["lazy"] = lazy
    if precopy is not None:
        d["precopy"] = {"rounds": precopy}
    return d


def test_read_result_eager() -> None:
    r = MigrationRun(256, 0, EAGER)
    read_result(r, result(downtime=800.0, total=1200.0, bytes_transferred=300 << 20))
    assert (r.source, r.dest, r.downtime_ms, r.total_ms) == ("alpha", "beta", 800.0, 1200.0)
    assert r.bytes_total == (300 << 20) + 10 * 4096 and r.bytes_summed  # + counts.pages
    assert r.pages_faulted is None and r.last_page_ms is None and r.precopy_rounds is None


def test_read_result_lazy_and_precopy() -> None:
    r = MigrationRun(1024, 1, PRECOPY_LAZY)
    read_result(r, result(downtime=40.0, lazy={"pages_faulted": 100, "pages_pushed": 900,
                                               "last_page_ms": 2500.0, "downtime_ms": 41.0},
                          precopy=[{"pages": 1000, "bytes": 4096000, "ms": 300.0},
                                   {"pages": 50, "bytes": 204800, "ms": 20.0}],
                          bytes_transferred=8192))
    assert r.downtime_ms == 40.0  # timings_ms["downtime"] first
    assert (r.pages_faulted, r.pages_pushed, r.last_page_ms) == (100, 900, 2500.0)
    assert r.precopy_rounds == 2 and r.precopy[1] == {"pages": 50, "bytes": 204800, "ms": 20.0}
    assert r.bytes_total == 8192 + 10 * 4096 + 4096000 + 204800 + 1000 * 4096
    # migrate's own sum wins when it gives one
    read_result(r, result(bytes_total=123, lazy={"pages_faulted": 1}))
    assert r.bytes_total == 123 and not r.bytes_summed


def test_read_result_downtime_from_lazy_when_timings_lack_it() -> None:
    d = result(lazy={"downtime_ms": 12.5})
    del d["timings_ms"]["downtime"]
    r = MigrationRun(256, 0, LAZY)
    read_result(r, d)
    assert r.downtime_ms == 12.5


def test_read_client() -> None:
    # Migrate ran 10.0 -> 12.0 (the lock at 10.5); PINGs every 0.1 s; the one sent at 10.55
    # waited until 11.3.
    replies = [Reply(t, t + 0.001, 0) for t in (9.9, 10.0, 10.1, 10.2, 10.3, 10.4, 10.45)]
    replies += [Reply(10.55, 11.3, 0), Reply(11.31, 11.312, 0), Reply(11.9, 11.901, 0)]
    log = ClientLog(replies, [ClientError(11.0, 0, "boom")], 1)
    r = MigrationRun(256, 0, LAZY)
    read_client(r, log, start=10.0, end=12.5, locked_at=10.5)
    assert r.ttfr_from == "locked"
    assert r.ttfr_ms == pytest.approx(800.0)
    assert r.client_gap_ms == pytest.approx((11.3 - 10.451) * 1000)
    assert r.client_max_latency_ms == pytest.approx(750.0)
    assert r.client_replies == 9 and len(r.client_errors) == 1
    assert "connection 0: boom" in r.client_errors[0]
    read_client(r, log, start=10.0, end=12.5, locked_at=None)
    assert r.ttfr_from == "migrate start" and r.ttfr_ms == pytest.approx(1.0)
    # nothing after the last reply: the gap runs to the window's end
    read_client(r, log, start=11.5, end=14.0, locked_at=None)
    assert r.client_gap_ms == pytest.approx((14.0 - 11.901) * 1000)


def test_judge_fails_wrong_memory_and_broken_connections() -> None:
    ok = MigrationRun(256, 0, EAGER, verify="OK 65536", mismatches=0)
    judge(ok)
    assert ok.ok and ok.error is None
    bad = MigrationRun(256, 0, LAZY, verify="BAD 3 17", mismatches=2,
                       client_errors=["5 ms, connection 0: reset"])
    judge(bad)
    assert not bad.ok
    assert bad.error is not None
    assert "BAD 3 17" in bad.error and "2 wrong hot pages" in bad.error and "reset" in bad.error
    failed = MigrationRun(256, 0, LAZY, error="CRIU refused", verify="OK 1")
    judge(failed)
    assert not failed.ok and failed.error == "CRIU refused"
    unanswered = MigrationRun(256, 0, LAZY)
    judge(unanswered)
    assert not unanswered.ok and "None" in str(unanswered.error)


def mk(size: int, rnd: int, method: str, downtime: float, *, ok: bool = True,
       ttfr: float | None = None, total: float = 1000.0) -> MigrationRun:
    return MigrationRun(size, rnd, method, "alpha", "beta", ok=ok,
                        error=None if ok else "boom", downtime_ms=downtime,
                        total_ms=total, ttfr_ms=ttfr if ttfr is not None else downtime + 200,
                        bytes_total=size * 2**20, verify="OK 1" if ok else None)


def synthetic() -> list[MigrationRun]:
    runs = []
    for rnd in range(3):
        for size, eager in ((256, 200.0), (1024, 800.0), (2048, 1600.0)):
            runs.append(mk(size, rnd, EAGER, eager + rnd * 10))
            runs.append(mk(size, rnd, LAZY, 40.0 + rnd + size / 1024))
            runs.append(mk(size, rnd, PRECOPY, eager / 4))
    runs.append(mk(1024, 3, LAZY, 5.0, ok=False))  # a failed run: no figure, no ratio
    return runs


def test_round_ratios_pair_runs_of_the_same_round() -> None:
    runs = synthetic()
    q = round_ratios(runs, 1024, LAZY, "downtime_ms")
    assert q == pytest.approx([41.0 / 800, 42.0 / 810, 43.0 / 820])
    # a round whose eager failed gives no ratio
    runs[0 * 9 + 3].ok = False  # round 0, 1024 MiB, eager
    assert len(round_ratios(runs, 1024, LAZY, "downtime_ms")) == 2


def test_summarize_medians_spreads_and_ratios() -> None:
    cells = summarize(synthetic())
    assert [(c.size_mib, c.method) for c in cells][:3] == [(256, EAGER), (256, PRECOPY),
                                                          (256, LAZY)]
    lazy1g = next(c for c in cells if c.size_mib == 1024 and c.method == LAZY)
    assert (lazy1g.runs, lazy1g.ok) == (4, 3)
    assert lazy1g.errors == ["boom"]
    f = lazy1g.figures["downtime_ms"]
    assert (f.median, f.low, f.high, f.n) == (42.0, 41.0, 43.0, 3)
    assert lazy1g.ratios["downtime_ms"].median == pytest.approx(42.0 / 810)
    eager = next(c for c in cells if c.size_mib == 1024 and c.method == EAGER)
    assert eager.ratios == {}
    assert lazy1g.figures["pages_faulted"].median is None


def test_targets_met_and_not() -> None:
    cells = summarize(synthetic())
    t = targets(cells)
    assert t[0].name == "lazy downtime at 1,024 MiB" and t[0].met is True
    assert t[1].met is True and "256 to 2,048" in t[1].value and "eager: x" in t[1].detail
    g = growth(cells, EAGER)
    assert g is not None and g[2] == pytest.approx(1610 / 210)
    # lazy as slow as eager: not met
    slow = [mk(1024, 0, EAGER, 800.0), mk(1024, 0, LAZY, 400.0), mk(256, 0, LAZY, 40.0)]
    t = targets(summarize(slow))
    assert t[0].met is False and "5.0 x the goal" in t[0].detail
    assert t[1].met is False
    t = targets(summarize([mk(256, 0, EAGER, 1.0)]))
    assert [x.met for x in t] == [None, None]


def test_parse_fractions() -> None:
    assert parse_fractions("0.3, 0.1,60%,0.3") == (0.1, 0.3, 0.6)
    for bad in ("", "0", "1.5", "x", "-0.1"):
        with pytest.raises(ValueError):
            parse_fractions(bad)


def test_failover_plan_interleaves_paging_and_eager() -> None:
    p = failover_plan((256, 2048), 3, seed=5)
    assert len(p) == 2 * 3 * 2 + 1
    for size in (256, 2048):
        for rep in range(3):
            got = sorted(x.mode for x in p if x.size_mib == size and x.rep == rep
                         and not x.read_only_hot)
            assert got == sorted(PAIR_MODES)
    assert p[-1] == PlannedFailover(2048, 0, PAGING, read_only_hot=True)
    orders = {tuple(x.mode for x in p if x.size_mib == 2048 and x.rep == r
                    and not x.read_only_hot) for r in range(3)}
    assert len(orders) > 1 or len(p) < 8  # shuffled (seed 5 gives both orders)
    assert failover_plan((256, 2048), 3, seed=5) == p
    assert failover_plan((256,), 1, seed=5, read_only_check=False) == [
        x for x in failover_plan((256,), 1, seed=5) if not x.read_only_hot]
    assert failover_plan((256,), 0, seed=1) == []


def tier(hot: float, memory: float, **kw: float) -> dict[str, Any]:
    """A pair status paging record (bytes in MiB)."""
    d = {"hot_bytes": hot * MIB, "memory_bytes": memory * MIB,
         "settled_tmpfs_bytes": (memory - 5) * MIB, "peak_tmpfs_bytes": 2 * memory * MIB,
         "disk_cached_bytes": 5 * MIB, "disk_bytes": 1100 * MIB, "tmpfs_bytes": memory * MIB,
         "hot_pages": int(hot * 256), "aged_in_place": 2, "aged_by_merge": 0,
         "young_generations": 20, "hot_window_s": 20.0, "tmpfs": "/x", "notes": []}
    d.update({k: v * MIB for k, v in kw.items()})
    return d


def memory_runs() -> list[PagingMemoryRun]:
    out = []
    for frac, mem in ((0.1, 110.0), (0.3, 320.0), (0.6, 800.0)):
        out.append(PagingMemoryRun(1024, frac, ok=True, hot_window_s=20.0, interval_s=1.0,
                                   rate=20000.0,
                                   samples=[sample_of(tier(frac * 1000, mem + d))
                                            for d in (-2.0, 0.0, 3.0)]))
    out.append(PagingMemoryRun(2048, 0.3, True, part="failover", ok=True,
                               samples=[sample_of(tier(0.1, 12.0))]))
    out.append(PagingMemoryRun(1024, 0.6, rep=1, error="pair start: refused"))
    return out


def test_memory_summary_bound_and_targets() -> None:
    assert hot_set_bytes(1024, 0.3) == round(262144 * 0.3) * 4096
    assert memory_bound_bytes(1024, 0.3) == pytest.approx(hot_set_bytes(1024, 0.3)
                                                          + 0.1 * 1024 * MIB)
    runs = memory_runs()
    assert sample_of(tier(1, 2)).keys() >= {"hot_bytes", "memory_bytes", "disk_bytes"}
    assert "tmpfs" not in sample_of(tier(1, 2))
    sums = summarize_memory(runs)
    # The memory part's rows first, then those sampled before a failover.
    assert [(s.size_mib, s.hot_fraction, s.read_only_hot, s.part) for s in sums] == [
        (1024, 0.1, False, "memory"), (1024, 0.3, False, "memory"),
        (1024, 0.6, False, "memory"), (2048, 0.3, True, "failover")]
    s30 = sums[1]
    assert (s30.samples, s30.ok, s30.runs) == (3, 1, 1)
    assert s30.memory.median == 320 * MIB and s30.memory.low == 318 * MIB
    assert s30.share == pytest.approx(320 / 1024)
    assert s30.met is True
    s60 = sums[2]
    assert s60.met is False and s60.runs == 2 and s60.errors == ["pair start: refused"]
    t = paging_targets(runs, [])
    # One per written hot fraction of the memory part; the failover part's rows are not.
    assert [x.met for x in t] == [True, True, False]
    assert "30 % hot" not in t[1].name and "30% hot of 1,024 MiB" in t[1].name
    assert "69% less" in t[1].value


def fo(rep: int, mode: str, *, restore: float, first: float, all_in: float | None = None,
       ok: bool = True, read_only: bool = False, size: int = 2048) -> FailoverRun:
    """A failover: died at 100.0 s, promoted 1.2 s later, restore of ``restore`` ms; the first
    PONG ``first`` ms after the restore began."""
    r = FailoverRun(size, 0.3, rep, mode, read_only, died_at=100.0)
    lazy = {"state": "complete", "eager_pages": 1000, "lazy_pages": 9000,
            "pages_faulted": 300, "pages_pushed": 8700, "pages_copied": 9000,
            "pages_total": 9000, "elapsed_ms": 5000.0,
            "finished_at": 101.2 + (all_in or 0) / 1000}
    ev = {"what": "promoted", "at": 101.2 + restore / 1000, "detected_at": 101.2,
          "restore_ms": restore, "total_ms": restore + 3, "generation": 40, "fence_ms": 1.0,
          "address_ms": 2.0,
          "generation_age_ms": 300.0, **({"lazy_plan_ms": 20.0} if mode == PAGING else {})}
    read_promotion(r, ev, lazy if mode == PAGING else None)
    r.first_reply_ms = 1200.0 + first
    r.verify, r.mismatches = ("OK 524288", 0) if ok else ("BAD 3 17", 0)
    judge_failover(r)
    return r


def failover_runs() -> list[FailoverRun]:
    out = []
    for rep in range(3):
        out.append(fo(rep, EAGER_PAIR, restore=4000.0 + rep * 100, first=4050.0 + rep * 100))
        out.append(fo(rep, PAGING, restore=300.0, first=350.0 + rep * 10, all_in=6000.0))
    out.append(fo(0, PAGING, restore=100.0, first=900.0, all_in=7000.0, read_only=True))
    out.append(fo(3, PAGING, restore=300.0, first=350.0, ok=False))
    return out


def test_read_promotion_and_judge() -> None:
    e = fo(0, EAGER_PAIR, restore=4000.0, first=4100.0)
    assert e.detected_ms == pytest.approx(1200.0)
    assert e.restore_start_ms == pytest.approx(1200.0) and e.restore_end_ms == pytest.approx(5200)
    assert e.pre_restore_ms == pytest.approx(0.0) and (e.fence_ms, e.address_ms) == (1.0, 2.0)
    assert e.ttfr_ms == pytest.approx(4100.0)
    # An eager restore has every page when it ends.
    assert e.all_pages_ms == e.restore_end_ms and e.all_pages_from_restore_ms == pytest.approx(4000)
    assert e.ok and e.pages_faulted is None and e.lazy_state is None
    p = fo(0, PAGING, restore=300.0, first=350.0, all_in=6000.0)
    assert p.ok and (p.pages_faulted, p.pages_pushed, p.eager_pages) == (300, 8700, 1000)
    assert p.all_pages_from_restore_ms == pytest.approx(6000.0)
    assert p.lazy_plan_ms == 20.0 and p.generation == 40
    bad = fo(0, PAGING, restore=300.0, first=350.0, ok=False)
    assert not bad.ok and bad.error is not None and "BAD 3 17" in bad.error
    # Lazy pages that did not all arrive fail the run, and so does a wrong hot page.
    r = FailoverRun(2048, 0.3, 0, PAGING, died_at=1.0, first_reply_ms=5.0, verify="OK 1",
                    lazy_state="complete", pages_copied=10, pages_total=12)
    judge_failover(r)
    assert not r.ok and "10 of 12" in str(r.error)
    r = FailoverRun(2048, 0.3, 0, EAGER_PAIR, first_reply_ms=5.0, verify="OK 1", mismatches=2)
    judge_failover(r)
    assert not r.ok and "2 wrong hot pages" in str(r.error)
    r = FailoverRun(2048, 0.3, 0, PAGING, verify="OK 1", lazy_state="failed")
    judge_failover(r)
    assert "no response" in str(r.error) and "ended failed" in str(r.error)
    # Without the event's times nothing is invented.
    r = FailoverRun(2048, 0.3, 0, PAGING, died_at=100.0)
    read_promotion(r, {"what": "promoted"}, {"state": "crossing"})
    assert r.restore_start_ms is None and r.ttfr_ms is None and r.all_pages_ms is None


def test_failover_summary_ratios_and_target() -> None:
    runs = failover_runs()
    assert rep_ratios(runs, 2048, 0.3, "ttfr_ms") == pytest.approx(
        [350 / 4050, 360 / 4150, 370 / 4250])  # rep 3 failed: no ratio
    ro = rep_ratios(runs, 2048, 0.3, "ttfr_ms", read_only_hot=True)
    assert ro == pytest.approx([900 / 4150])  # against eager's median
    sums = summarize_failovers(runs)
    assert [(s.mode, s.read_only_hot) for s in sums] == [
        (PAGING, False), (EAGER_PAIR, False), (PAGING, True)]
    p = sums[0]
    assert (p.ok, p.runs) == (3, 4) and p.figures["ttfr_ms"].median == pytest.approx(360.0)
    assert p.ratio.median == pytest.approx(360 / 4150)
    assert p.all_pages_ratio.median == pytest.approx(6000 / 4100)
    assert sums[1].ratio.median is None and sums[2].label.endswith("(read-only hot set)")
    t = paging_targets([], runs)
    assert len(t) == 1 and t[0].met is True and "2,048 MiB" in t[0].name
    # Slow paging: not met, and how far; a smaller size says where the target is stated.
    slow = [fo(0, EAGER_PAIR, restore=1000.0, first=1000.0, size=256),
            fo(0, PAGING, restore=500.0, first=500.0, all_in=900.0, size=256)]
    t = paging_targets([], slow)
    assert t[0].met is False and "5.0 x the goal" in t[0].detail
    assert "stated at 2,048 MiB" in t[0].detail
    t = paging_targets([], [fo(0, PAGING, restore=1.0, first=1.0, ok=False, size=256)])
    assert t[0].met is None


def test_paging_markdown_round_trip_and_plot(tmp_path: Path) -> None:
    mem, fos = memory_runs(), failover_runs()
    md = "\n".join(paging_markdown(mem, fos))
    assert "## Paging standby: memory against the hot fraction" in md
    assert "| 1,024 | 30% | writes | 3 (1/1 runs) |" in md
    assert "| 2,048 | 30% | reads (failover) |" in md and "known limitation" in md
    assert "## Failover: paging standby against eager standby" in md
    assert "### 2,048 MiB, 30% hot" in md
    assert "| ok | 3/4 | 3/3 | 1/1 |" in md
    assert "| restore start to first response ms | 360 [350-370] |" in md
    assert "Failed failovers:" in md and "BAD 3 17" in md
    assert paging_markdown([], []) == []
    res = BenchResults(BenchConfig(out=tmp_path, migrations=False, paging_reps=1), seed=1,
                       paging_memory=mem, failovers=fos)
    assert not res.ok  # failed runs
    made = write_outputs(res, tmp_path)
    assert tmp_path / "paging.png" in made and "downtime.png" not in {p.name for p in made}
    back = load_results(tmp_path / "results.json")
    assert [r.to_dict() for r in back.failovers] == [r.to_dict() for r in fos]
    assert [r.to_dict() for r in back.paging_memory] == [r.to_dict() for r in mem]
    assert back.config == res.config
    full = markdown(res)
    # A paging-only run lists no migration target as "not measured".
    assert "lazy downtime" not in full and "paging standby memory" in full
    assert "## Migrations" not in full and "Paging standby: the same workload" in full
    line = failover_line(fos[1])
    assert line.startswith("2,048 MiB hot 30% rep 1 paging:")
    assert "faulted" in line and line.endswith("OK 524288")
    assert "standby memory: 320.0 MiB" in memory_line(mem[1])
    assert "FAILED: pair start: refused" in memory_line(mem[-1])


def test_results_round_trip_markdown_and_plots(tmp_path: Path) -> None:
    runs = synthetic()
    runs[0].bytes_summed = True
    res = BenchResults(BenchConfig(out=tmp_path, seed=3), seed=3, env={"cpus": 2},
                       runs=runs, started="now", wall_s=60.0)
    made = write_outputs(res, tmp_path)
    names = {p.name for p in made}
    assert {"results.json", "results.md", "downtime.png", "total.png"} <= names
    assert "paging.png" not in names
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["benchmark"] == "lazy" and data["seed"] == 3
    back = BenchResults.from_dict(data)
    assert [r.to_dict() for r in back.runs] == [r.to_dict() for r in runs]
    assert back.config == res.config
    md = markdown(res)
    assert "### 1,024 MiB" in md and "| downtime ms |" in md and "**met**" in md
    assert "## Failures" in md and "FAILED: boom" in md
    assert Counter(line.startswith("| ok |") for line in md.splitlines())[True] == 3


def test_run_line() -> None:
    r = mk(1024, 0, PRECOPY_LAZY, 33.0)
    r.pages_faulted, r.pages_pushed, r.last_page_ms = 10, 20, 1500.0
    r.precopy = [{"pages": 1.0, "bytes": 1.0, "ms": 1.0}]
    line = run_line(r)
    assert line.startswith("1,024 MiB round 1 precopy+lazy alpha->beta: downtime 33.0 ms")
    assert "faulted 10, pushed 20" in line and "1 pre-copy rounds" in line
    assert "FAILED: boom" in run_line(mk(256, 0, LAZY, 1.0, ok=False))


def test_migrate_options_follow_what_migrate_config_has() -> None:
    import dataclasses

    from orthros_py.bench.lazy.runner import migrate_options
    from orthros_py.errors import OrthrosError
    from orthros_py.policies.migrate import MigrateConfig

    known = {f.name for f in dataclasses.fields(MigrateConfig)}
    eager = migrate_options(EAGER)
    assert set(eager) == {"lazy", "precopy"} & known
    assert not any(eager.values())
    MigrateConfig(**eager)
    if "lazy" in known:
        assert migrate_options(LAZY)["lazy"] is True
    else:
        with pytest.raises(OrthrosError, match="no lazy"):
            migrate_options(LAZY)
