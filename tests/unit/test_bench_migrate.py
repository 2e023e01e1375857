"""The migrate benchmark's pure half on synthetic records: workloads and arms parsed, the plan of
interleaved repetitions, wrk's report and /proc/net/tcp read, one run read from migrate's result
and from CRIU alone's JSON, judged (an orthros run whose clients failed is failed; CRIU alone's
is counted for CRIU's times only), medians, the per-repetition ratio to CRIU alone, the targets
computed from the data, results.json round trip, results.md, the plots and the command's
``--from-json``. No root."""

from __future__ import annotations

import io
import json
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from orthros_py.bench.migrate import (
    CRIU,
    ECHO,
    NGINX,
    ORTHROS,
    BenchConfig,
    BenchResults,
    PlannedRun,
    RunRecord,
    accept_queue,
    compare,
    count_established,
    judge,
    load_results,
    markdown,
    parse_arms,
    parse_workloads,
    parse_wrk,
    plan,
    read_criu_alone,
    read_echo,
    read_migration,
    read_wrk,
    run_line,
    summarize,
    targets,
    write_outputs,
)
from orthros_py.bench.migrate.model import wrk_time_ms

WRK_OK = """\
Running 60m test @ http://10.77.0.100:8080/
  2 threads and 1500 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    25.19ms   14.17ms 412.26ms   97.00%
    Req/Sec    27.15k     5.45k   34.71k    67.39%
  Latency Distribution
     50%   23.17ms
     75%   24.08ms
     90%   29.31ms
     99%  110.00ms
  124278 requests in 4.40s, 31.05MB read
Requests/sec:  28244.98
Transfer/sec:     7.06MB
"""

WRK_ERRORS = """\
Running 60m test @ http://10.77.0.100:8080/
  2 threads and 100 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   631.96us  343.04us   1.20s    75.96%
    Req/Sec    10.00k     1.00k   12.00k    70.00%
  Latency Distribution
     50%  562.00us
     75%  700.00us
     90%    1.00ms
     99%    2.50ms
  50000 requests in 1.00m, 10.00MB read
  Socket errors: connect 0, read 12, write 3, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:    833.33
Transfer/sec:    170.67KB
"""


# --- options and plan --------------------------------------------------------------------------


def test_workloads_and_arms_parse_in_order_and_refuse() -> None:
    assert parse_workloads("nginx, echo,nginx") == (NGINX, ECHO)
    assert parse_arms("criu,ORTHROS") == (CRIU, ORTHROS)
    for bad in ("", " , ", "redis"):
        with pytest.raises(ValueError):
            parse_workloads(bad)
    with pytest.raises(ValueError, match="unknown arm"):
        parse_arms("orthros,lazy")


def test_config_refuses_nonsense_and_round_trips(tmp_path: Path) -> None:
    for kw in ({"reps": 0}, {"echo_clients": 0}, {"nginx_conns": 1, "wrk_threads": 2},
               {"workloads": ("redis",)}):
        with pytest.raises(ValueError):
            BenchConfig(**kw)  # type: ignore[arg-type]
    cfg = BenchConfig(reps=3, workloads=(NGINX,), nginx_conns=100, seed=5, out=tmp_path)
    assert BenchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.clients_of(NGINX) == 100 and cfg.clients_of(ECHO) == 200


def test_plan_interleaves_both_arms_in_every_repetition() -> None:
    cfg = BenchConfig(reps=20)
    runs = plan(cfg, seed=3)
    assert len(runs) == 2 * 20 * 2
    assert [r.workload for r in runs] == [ECHO] * 40 + [NGINX] * 40  # one workload at a time
    for w in (ECHO, NGINX):
        for rep in range(20):
            assert Counter(r.arm for r in runs if r.workload == w and r.rep == rep) == \
                Counter({ORTHROS: 1, CRIU: 1})
    firsts = Counter(runs[i].arm for i in range(0, len(runs), 2))
    assert firsts[ORTHROS] and firsts[CRIU]  # the order is shuffled, not fixed
    assert plan(cfg, seed=3) == runs  # and reproducible from the seed
    assert plan(BenchConfig(reps=1, arms=(CRIU,), workloads=(ECHO,)), 0) == [
        PlannedRun(ECHO, 0, CRIU)]


# --- wrk and /proc/net/tcp -----------------------------------------------------------------------


def test_wrk_times_in_ms() -> None:
    assert wrk_time_ms("631.96us") == pytest.approx(0.63196)
    assert wrk_time_ms("412.26ms") == pytest.approx(412.26)
    assert wrk_time_ms("1.20s") == pytest.approx(1200)
    assert wrk_time_ms("1.00m") == pytest.approx(60_000)
    assert wrk_time_ms("-nan%") is None and wrk_time_ms("nan") is None


def test_wrk_report_without_errors() -> None:
    r = parse_wrk(WRK_OK)
    assert r.complete and r.errors == 0 and r.failures() == []
    assert r.max_ms == pytest.approx(412.26) and r.avg_ms == pytest.approx(25.19)
    assert r.requests == 124278 and r.seconds == pytest.approx(4.4)
    assert r.rps == pytest.approx(28244.98)
    assert r.percentiles_ms == {"p50": 23.17, "p75": 24.08, "p90": 29.31, "p99": 110.0}


def test_wrk_report_with_socket_errors_and_bad_answers() -> None:
    r = parse_wrk(WRK_ERRORS)
    assert (r.connect, r.read, r.write, r.timeout, r.non2xx) == (0, 12, 3, 1, 5)
    assert r.errors == 21
    assert r.failures() == ["12 read errors, 3 write errors, 1 timeouts, 5 non-2xx/3xx answers"]
    assert r.max_ms == pytest.approx(1200) and r.seconds == pytest.approx(60)
    assert r.percentiles_ms["p50"] == pytest.approx(0.562)
    rec = RunRecord(NGINX, CRIU, 0)
    read_wrk(rec, r)
    assert rec.client_errors == 21 and rec.longest_wait_ms == pytest.approx(1200)
    assert rec.wrk is not None and rec.wrk["errors"] == 21


def test_wrk_killed_before_its_report() -> None:
    r = parse_wrk("Running 60m test @ http://10.77.0.100:8080/\n")
    assert not r.complete and r.max_ms is None and r.requests is None


def _tcp_line(i: int, local: str, remote: str, state: str, queue: str = "00000000:00000000") \
        -> str:
    return f"  {i}: {local} {remote} {state} {queue} 00:00000000 00000000  0  0 1 1 0"


def _hex(ip: str, port: int) -> str:
    return f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"


def test_established_connections_and_the_accept_queue() -> None:
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"
    svc, other = _hex("10.77.0.100", 8080), _hex("10.77.0.100", 7000)
    client = [_hex("10.77.0.50", 40000 + i) for i in range(5)]
    text = "\n".join([head,
                      _tcp_line(0, client[0], svc, "01"), _tcp_line(1, client[1], svc, "01"),
                      _tcp_line(2, client[2], svc, "06"),  # TIME_WAIT: not counted
                      _tcp_line(3, client[3], other, "01"),  # another port
                      _tcp_line(4, client[4], svc, "01")])
    assert svc == "64004D0A:1F90"  # the address as the kernel writes it on this host's order
    assert count_established(text, "10.77.0.100", 8080) == 3
    assert count_established(text, "10.77.0.100", 7000) == 1
    server = "\n".join([head, _tcp_line(0, svc, "00000000:0000", "0A", "00000000:00000007"),
                        _tcp_line(1, other, "00000000:0000", "0A")])
    assert accept_queue(server, "10.77.0.100", 8080) == 7
    assert accept_queue(server, "10.77.0.100", 7000) == 0
    assert accept_queue(server, "10.77.0.100", 9999) is None


# --- one run -----------------------------------------------------------------------------------


def migration_result(downtime: float = 300.0, frozen: float = 120.0,
                     restore: float = 60.0) -> dict[str, Any]:
    """What ``MigrationResult.to_dict()`` gives (the keys this benchmark reads)."""
    return {"pid": 300, "new_pid": 300, "source": "alpha", "dest": "beta",
            "timings_ms": {"lock": 20.0, "dump": 180.0, "transfer": 40.0, "criu restore": restore,
                           "restore": restore + 10, "downtime": downtime, "total": 900.0},
            "counts": {"processes": 1, "connections": 200, "pages": 4800},
            "criu_frozen_ms": frozen}


def criu_json(dump: float = 150.0, restore: float = 70.0, frozen: float = 100.0,
              wait: float = 0.5) -> dict[str, Any]:
    return {"pid": 300, "restored_pid": 300, "dump_ms": dump, "pid_wait_ms": wait,
            "restore_ms": restore, "downtime_ms": dump + wait + restore,
            "dump_stats": {"frozen_ms": frozen, "freezing_ms": 15.0, "pages_written": 4800},
            "restore_stats": {"restore_ms": 40.0}}


def orthros_run(rep: int = 0, *, downtime: float = 300.0, wait: float | None = 320.0,
                errors: int = 0, workload: str = ECHO, frozen: float = 120.0,
                restore: float = 60.0) -> RunRecord:
    rec = RunRecord(workload, ORTHROS, rep, source="alpha", dest="beta", clients=200)
    read_migration(rec, migration_result(downtime, frozen, restore))
    read_echo(rec, requests=5000, errors=errors, max_gap_s=(wait or 0) / 1000,
              samples=["conn 3: recv: [Errno 104] Connection reset by peer"] if errors else [])
    rec.answered_after = True
    judge(rec)
    return rec


def criu_run(rep: int = 0, *, dump: float = 150.0, restore: float = 70.0,
             frozen: float = 100.0, wait: float = 260.0, errors: int = 0,
             workload: str = ECHO) -> RunRecord:
    rec = RunRecord(workload, CRIU, rep, source="alpha", dest="alpha", clients=200)
    read_criu_alone(rec, criu_json(dump, restore, frozen))
    read_echo(rec, requests=5000, errors=errors, max_gap_s=wait / 1000,
              samples=["conn 1: recv: reset"] if errors else [])
    rec.answered_after = True
    judge(rec)
    return rec


def test_a_migration_read_from_migrates_result() -> None:
    rec = orthros_run()
    assert rec.ok and rec.error is None
    assert (rec.downtime_ms, rec.lock_window_ms, rec.frozen_ms, rec.restore_ms) == \
        (300.0, 300.0, 120.0, 60.0)
    assert rec.criu_ms == 180.0 and rec.share_ms == 120.0
    assert rec.dump_ms == 180.0 and rec.pages == 4800
    assert rec.dump_restore_ms is None  # only CRIU alone's calls are compared with
    assert rec.wait_ratio == pytest.approx(320 / 300)
    assert "alpha->beta" in run_line(rec) and "downtime 300.0 ms" in run_line(rec)


def test_criu_alone_read_from_its_json() -> None:
    rec = criu_run()
    assert rec.ok
    assert rec.downtime_ms == pytest.approx(220.5)  # dump + pid wait + restore
    assert rec.dump_restore_ms == 220.0  # the calls alone
    assert rec.criu_ms == 170.0 and rec.share_ms == pytest.approx(50.5)
    assert rec.pid_wait_ms == 0.5 and rec.pages == 4800
    assert rec.criu_stats["dump"]["freezing_ms"] == 15.0
    bad = RunRecord(ECHO, CRIU, 0)
    read_criu_alone(bad, {"error": "CRIU refused the dump of pid 300: inet: In-flight",
                          "stage": "dump", "log_tail": ["Error: Dumping FAILED.", ""]})
    judge(bad)
    assert not bad.ok and bad.error == ("CRIU alone, dump: CRIU refused the dump of pid 300: "
                                        "inet: In-flight (Error: Dumping FAILED.)")


def test_judged_clients_fail_an_orthros_run_but_only_the_waits_of_criu_alone() -> None:
    mig = orthros_run(errors=3)
    assert not mig.ok and "the clients saw 3 failure(s): conn 3: recv" in (mig.error or "")
    assert mig.value("downtime_ms") is None  # left out of every median
    base = criu_run(errors=2)
    assert base.ok and base.clients_failed  # CRIU alone has no lock: its honest result
    assert base.value("downtime_ms") == pytest.approx(220.5)
    assert base.value("dump_restore_ms") == 220.0
    assert base.value("longest_wait_ms") is None and base.value("wait_ratio") is None
    assert "CLIENTS FAILED (2: conn 1: recv: reset)" in run_line(base)


def test_judged_failures_of_the_service_and_of_the_migration() -> None:
    rec = orthros_run()
    rec.answered_after = False
    judge(rec)
    assert not rec.ok and "did not answer a fresh connection" in (rec.error or "")
    rec = RunRecord(ECHO, ORTHROS, 0, error="migration failed during lock", stage="migrate")
    read_echo(rec, requests=100, errors=0, max_gap_s=0.01, samples=[])
    judge(rec)
    assert not rec.ok and run_line(rec).endswith("FAILED at migrate: migration failed during "
                                                 "lock")
    rec = RunRecord(NGINX, CRIU, 0)
    read_criu_alone(rec, criu_json())
    read_wrk(rec, parse_wrk("Running 60m test\n"))
    rec.answered_after = True
    judge(rec)
    assert not rec.ok and "no longest wait" in (rec.error or "")


# --- summaries and targets -----------------------------------------------------------------------


def synthetic(clients: int = 200) -> BenchResults:
    cfg = BenchConfig(reps=3, echo_clients=clients, nginx_conns=100, seed=7)
    runs = [orthros_run(0, downtime=100, wait=120), criu_run(0, dump=50, restore=30),
            criu_run(1, dump=60, restore=40), orthros_run(1, downtime=140, wait=160),
            orthros_run(2, downtime=400, errors=1), criu_run(2, dump=55, restore=35, errors=4),
            orthros_run(0, downtime=600, wait=700, workload=NGINX),
            criu_run(0, dump=300, restore=100, workload=NGINX, wait=900, errors=10)]
    for i, r in enumerate(runs, 1):
        r.seq = i
    res = BenchResults(cfg, seed=7, env={"kernel": "6.1", "cpus": 2, "criu": "4.2"},
                       runs=runs, started="2025-01-01T00:00:00", finished="x", wall_s=60.0)
    return res


def test_medians_leave_out_failed_runs_and_failed_clients_waits() -> None:
    cells = {(c.workload, c.arm): c for c in summarize(synthetic().runs)}
    mig, base = cells[(ECHO, ORTHROS)], cells[(ECHO, CRIU)]
    assert (mig.runs, mig.ok, mig.clients_failed) == (3, 2, 1)
    assert mig.figures["downtime_ms"].median == 120.0  # 100 and 140; the failed 400 is out
    assert (mig.figures["downtime_ms"].low, mig.figures["downtime_ms"].high) == (100.0, 140.0)
    assert mig.figures["longest_wait_ms"].median == 140.0
    assert len(mig.errors) == 1 and "FAILED" in mig.errors[0]
    assert (base.runs, base.ok, base.clients_failed) == (3, 3, 1)
    assert base.figures["dump_restore_ms"].median == 90.0  # 80, 100, 90: all counted
    assert base.figures["longest_wait_ms"].n == 2  # but not the failed clients' wait
    assert [k for k in cells] == [(ECHO, ORTHROS), (ECHO, CRIU), (NGINX, ORTHROS),
                                  (NGINX, CRIU)]


def test_the_ratio_to_criu_alone_pairs_repetitions() -> None:
    comps = {c.workload: c for c in compare(synthetic().runs)}
    echo = comps[ECHO]
    # rep 0: 100 / 80, rep 1: 140 / 100; rep 2's migration failed: no pair.
    assert echo.ratio.n == 2
    assert echo.ratio.median == pytest.approx((1.25 + 1.4) / 2)
    assert (echo.ratio.low, echo.ratio.high) == (pytest.approx(1.25), pytest.approx(1.4))
    assert echo.orthros_ms == 120.0 and echo.criu_ms == 90.0
    assert echo.ratio_of_medians == pytest.approx(120 / 90)
    assert comps[NGINX].ratio.median == pytest.approx(600 / 400)


def test_targets_are_computed_from_the_data() -> None:
    res = synthetic()
    got = {t.name: t for t in targets(res.config, res.runs)}
    ratio_t = got["echo, 200 clients: downtime / CRIU alone's dump + restore"]
    assert ratio_t.met is True and ratio_t.value == "x1.32 [1.25-1.40]"
    assert "1 of 3 runs failed" in ratio_t.detail
    down = got["echo, 200 clients: downtime"]
    assert down.met is True and down.value == "120.0 ms [100-140]"
    wait = got["echo, 200 clients: longest client wait"]
    assert wait.met is True and "worst 160 ms" in wait.detail
    # Slower migrations: the same code says not met.
    slow = [orthros_run(0, downtime=170, wait=260), criu_run(0, dump=50, restore=30)]
    got = {t.name: t.met for t in targets(res.config, slow)}
    assert list(got.values()) == [False, False, False]
    # Not the 200 clients: shown, not judged; no echo at all: not measured.
    small = synthetic(clients=20)
    assert all(t.met is None and "for 200 clients" in t.detail
               for t in targets(small.config, small.runs))
    only_nginx = [r for r in res.runs if r.workload == NGINX]
    assert all(t.met is None and t.value == "—" for t in targets(res.config, only_nginx))


# --- results on disk and the command -----------------------------------------------------------


def test_results_round_trip_markdown_and_plots(tmp_path: Path) -> None:
    res = synthetic()
    made = write_outputs(res, tmp_path)
    assert {p.name for p in made} == {"results.json", "results.md", "downtime.png",
                                      "waits.png"}
    for name in ("downtime.png", "waits.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = load_results(tmp_path / "results.json")
    assert back.to_dict() == res.to_dict()
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["benchmark"] == "migrate" and len(data["runs"]) == 8
    assert data["runs"][0]["criu_ms"] == 180.0 and data["runs"][0]["share_ms"] == -80.0
    assert [c["workload"] for c in data["comparisons"]] == [ECHO, NGINX]
    md = markdown(res)
    assert "## Targets" in md and "## echo service, 200 clients" in md
    assert "## nginx under wrk, 100 connections" in md and "## Runs" in md
    assert "**failed**" in md and "clients failed: 4 (conn 1: recv: reset)" in md
    assert "x1.32 [1.25-1.40] over 2 repetition(s)" in md


def test_an_empty_or_interrupted_run_still_renders(tmp_path: Path) -> None:
    res = BenchResults(BenchConfig(), interrupted=True)
    made = write_outputs(res, tmp_path)
    assert [p.name for p in made] == ["results.json", "results.md"]
    assert "interrupted" in markdown(res) and not res.ok


def test_the_command_renders_an_earlier_results_json(tmp_path: Path) -> None:
    from orthros_py.cli import main
    from orthros_py.cli.context import Env

    write_outputs(synthetic(), tmp_path, plots=False)
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "migrate", "--from-json", str(tmp_path / "results.json"), "--json"],
             env=Env(stdout=out, stderr=err))
    assert exc.value.code in (0, None), err.getvalue()
    got: dict[str, Any] = json.loads(out.getvalue())
    assert len(got["runs"]) == 8
    text = err.getvalue()
    assert "orthros migrate against CRIU alone" in text and "targets" in text
    assert "downtime / CRIU alone's dump + restore x1.32" in text
    assert (tmp_path / "downtime.png").exists() and (tmp_path / "waits.png").exists()


# --- the echo clients' process -------------------------------------------------------------------


def test_the_echo_clients_process_speaks_json_lines(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "orthros_py.workloads.echo", "--host",
                               "127.0.0.1", "--port", str(port)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the echo server did not listen"
                time.sleep(0.05)
        res = subprocess.run(
            [sys.executable, "-m", "orthros_py.bench.migrate.echo_clients", "--host",
             "127.0.0.1", "--port", str(port), "--clients", "3", "--interval", "0.001"],
            input="mark\nstop\n", capture_output=True, text=True, timeout=60, check=False)
    finally:
        server.kill()
        server.wait()
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert lines[0] == {"ready": 3} and lines[1] == {"marked": True}
    assert lines[2]["requests"] >= 15 and lines[2]["errors"] == 0 and lines[2]["samples"] == []
    assert lines[2]["max_gap_s"] >= 0
