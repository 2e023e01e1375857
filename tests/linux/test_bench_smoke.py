"""A tiny real run of the network lock benchmark through the ``orthros bench netlock`` command:
nginx, ab in a client namespace, dump and restore with the xdp lock and with none, at 0 and 20
connections, once each. It must write its three kinds of output with sane numbers (the lock
window and the longest client wait among them) and leave nothing behind (namespace, veth,
processes, locked connections).

And one of the pair benchmark (``orthros bench pair``): redis on a lab of three hosts, one round
of unprotected, paired at 200 ms and paired with output commit, a few thousand requests, no
deaths and no memory experiment; the lab must be gone afterwards."""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import run_orthros

from orthros_py.bench.netlock import IF_PREFIX, NS_PREFIX

# 4 runs of ~1.5 s each, plus a compile of the XDP program (~10 s) if nothing is pinned yet.
TIMEOUT = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def leftovers(out: Path) -> list[str]:
    found = [p.name for p in Path("/run/netns").glob(NS_PREFIX + "*")] \
        if Path("/run/netns").is_dir() else []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["name"] in ("nginx", "ab") and ("orthros-bench-" in cmd or str(out) in cmd):
            found.append(f"{p.info['name']} {p.pid}")
    return found


@pytest.fixture
def bench_run(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path / "bench"
    res = run_orthros("bench", "netlock", "--concurrency", "0,20", "--reps", "1",
                      "--methods", "xdp,none", "--port", str(free_port()), "--micro-conns",
                      "200", "--micro-reps", "3", "--out", str(out), "--json", timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads(res.stdout)


def test_smoke_run_writes_sane_results(bench_run: tuple[Path, dict[str, Any]]) -> None:
    out, data = bench_run
    assert leftovers(out) == []
    # The XDP map is shared with whoever else runs here (a lab, a test): none of ours is left.
    ours = ipaddress.IPv4Network(data["env"]["subnet"])
    status = json.loads(run_orthros("netlock", "status", "--json").stdout)
    assert not [c for c in status["conns"]
                if ipaddress.IPv4Address(c["local"][0]) in ours
                or ipaddress.IPv4Address(c["remote"][0]) in ours], status
    assert not [a for a in status["attachments"] if a["iface"].startswith(IF_PREFIX)], status

    # results.json: every run succeeded, each figure measured and its parts consistent, medians
    # for each cell. How fast is for the benchmark's report to say, not for a test to assert.
    assert json.loads((out / "results.json").read_text()) == data
    runs = data["runs"]
    assert sorted((r["concurrency"], r["method"]) for r in runs) == [
        (0, "none"), (0, "xdp"), (20, "none"), (20, "xdp")]
    for r in runs:
        assert r["ok"], r
        for phase in ("dump", "restore"):
            p = r[phase]
            assert p["total_ms"] > 0, r
            assert 0 < p["criu_ms"] <= p["elapsed_ms"] <= p["total_ms"], r
            assert p["lock_ms"] >= 0
        assert r["conns"] == r["concurrency"]
        # The lock window: measured for every method, its parts on one clock, inside the wall
        # (dump call to restore return) and around the gap between the calls.
        w = r["window"]
        assert w is not None, r
        assert all(w[k] >= 0 for k in ("window_ms", "before_ms", "after_ms", "between_ms",
                                       "wall_ms")), w
        assert w["between_ms"] <= w["window_ms"] <= w["wall_ms"], w
        assert w["wall_ms"] == pytest.approx(w["before_ms"] + w["window_ms"] + w["after_ms"])
        assert w["window_ms"] <= r["dump"]["total_ms"] + w["between_ms"] \
            + r["restore"]["total_ms"], w
        # An ok run's clients saw nothing go wrong.
        assert r["client_failures"] == [], r
        if r["concurrency"]:
            ab = r["ab"]
            assert (ab["failed"], ab["non_2xx"], ab["write_errors"]) == (0, 0, 0), ab
            assert ab["stopped"] is True and ab["stderr_errors"] == [] and not ab["aborted"], ab
            assert ab["longest_ms"] is not None and ab["longest_ms"] >= 0, ab
    xdp20 = next(r for r in runs if r["method"] == "xdp" and r["concurrency"] == 20)
    assert xdp20["dump"]["lock_calls"] == 20  # the map held every connection
    assert xdp20["dump"]["lock_ms"] > 0
    assert xdp20["ab"]["complete"] > 0 and xdp20["ab"]["failed"] == 0, xdp20["ab"]
    none0 = next(r for r in runs if r["method"] == "none" and r["concurrency"] == 0)
    assert none0["dump"]["lock_ms"] == 0 and none0["ab"] is None
    assert {(m["concurrency"], m["method"]) for m in data["medians"]} == {
        (0, "xdp"), (0, "none"), (20, "xdp"), (20, "none")}
    for m in data["medians"]:
        assert m["ok"] == m["runs"] == 1 and m["failures"] == [], m
        assert m["window_ms"] is not None and m["wall_ms"] is not None, m
        assert (m["ab_longest_ms"] is not None) == (m["concurrency"] > 0), m
    assert data["ratios"][1]["xdp_none"] is not None
    assert data["ratios"][1]["window_xdp_none"] is not None
    assert "longest_xdp_none" in data["ratios"][1]
    micro = data["micro"]
    assert micro["conns"] == 200 and len(micro["lock_samples"]) == micro["reps"] == 3
    assert micro["lock_ms"] > 0 and micro["unlock_ms"] > 0
    assert micro["round_best_ms"] == min(a + b for a, b in zip(
        micro["lock_samples"], micro["unlock_samples"], strict=True))
    assert "lock + unlock, best of 3" in (out / "results.md").read_text()

    # The markdown table and the plots.
    md = (out / "results.md").read_text()
    assert "| 20 | xdp | 1/1 |" in md and "| 20 | *paper: iptables* |" not in md
    assert "*paper: iptables*" in md  # the 0-connection row of the paper
    assert "## What the clients waited through" in md
    for name in ("dump.png", "restore.png", "total.png", "window.png", "longest.png"):
        head = (out / name).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n", name
    # CRIU's logs stay for inspection, its bulky images do not.
    run_dir = next((out / "runs").glob("*-c20-xdp-r0"))
    assert (run_dir / "images" / "dump.log").exists()
    assert not list((run_dir / "images").glob("pages-*.img"))


# --- orthros bench pair ---------------------------------------------------------------------

# A lab of three hosts, three short redis-benchmark runs, two pairs (about 10-30 s).
PAIR_TIMEOUT = 150


@pytest.fixture
def pair_run(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path / "pair"
    res = run_orthros("bench", "pair", "--intervals", "200", "--reps", "1", "--requests",
                      "2000", "--oc-seconds", "1", "--skip-death", "--memory-mib", "0",
                      "--seed", "1", "--out", str(out), "--json", timeout=PAIR_TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads(res.stdout)


def test_pair_smoke_run_writes_sane_results(pair_run: tuple[Path, dict[str, Any]]) -> None:
    out, data = pair_run
    # The lab is gone, and so is every redis of the run.
    assert not Path("/run/orthros/lab/state.json").exists()
    assert not [p.pid for p in psutil.process_iter(["cmdline"])
                if str(out) in " ".join(p.info["cmdline"] or [])]

    assert json.loads((out / "results.json").read_text()) == data
    runs = data["runs"]["throughput"]
    assert sorted((r["arm"]["interval_ms"] or 0, r["arm"]["output_commit"]) for r in runs) == [
        (0, False), (200, False), (200, True)]
    for r in runs:
        assert r["ok"], r
        for test in ("SET", "GET"):
            t = r["tests"][test]
            assert t["rps"] > 0 and t["p50_ms"] is not None and t["p99_ms"] is not None, t
        if r["arm"]["interval_ms"]:
            first = r["checkpoints"][0]
            assert first["generation"] == 1 and first["full"], first
            assert first["frozen_ms"] > 0 and first["page_bytes"] > 0, first
            assert all(not c["full"] for c in r["checkpoints"][1:]), r["checkpoints"]
            assert r["pair_state"] == "replicating"
    # How fast is for the report to say: each target is only measured or not.
    met = {t["name"]: t["met"] for t in data["targets"]}
    assert isinstance(met["throughput at 200 ms"], bool)
    assert met["bytes per checkpoint"] is None  # not run
    assert not [name for name in met if name.startswith("death")]  # skipped
    assert data["deaths"] == [] and data["memory"] is None and data["leftovers"] == []
    md = (out / "results.md").read_text()
    assert "## Targets" in md and "| 200 ms + output commit | 1/1 |" in md
    for name in ("throughput_ratio.png", "p99.png", "checkpoint_bytes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
