"""A tiny real run of the migrate benchmark through the ``orthros bench migrate`` command: a lab
of two hosts, the unrecorded warm-up of each arm, then one repetition of each workload (the
echo service with 20 clients, nginx under wrk with 100 connections), orthros migrate and CRIU
alone each once. It must write its three kinds of output with every figure present and not
negative, and leave nothing behind: no lab, no namespace, no service, no wrk, no images. How
fast anything was is for the report to say, not for this test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import run_orthros

from orthros_py.inventory import load_inventory

# The lab (~10 s), two warm-up runs and four runs (~4 s each), the teardown.
TIMEOUT = 120
FIGURES = ("downtime_ms", "frozen_ms", "restore_ms", "criu_ms", "longest_wait_ms",
           "wait_ratio")


@pytest.fixture
def migrate_run(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path / "migrate"
    res = run_orthros("bench", "migrate", "--reps", "1", "--clients", "20", "--connections",
                      "100", "--warm", "0.5", "--settle", "0.5", "--seed", "1", "--out",
                      str(out), "--json", timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads(res.stdout)


def leftovers(out: Path) -> list[str]:
    inv = load_inventory(None)
    found = []
    if (inv.lab.state_dir / "state.json").exists() or inv.lab.state_dir.exists():
        found.append(f"the lab's state {inv.lab.state_dir}")
    netns = Path("/run/netns")
    names = {f"{inv.lab.netns_prefix}{n}" for n in ("alpha", "beta", "client")}
    if netns.is_dir():
        found += [f"namespace {p.name}" for p in netns.iterdir() if p.name in names]
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["name"] == "wrk" or str(out) in cmd or "orthros_py.bench.migrate" in cmd \
                or ("orthros_py.workloads.echo" in cmd and "--port 7000" in cmd):
            found.append(f"process {p.pid}: {cmd[:120]}")
    return found


def test_migrate_smoke_run_writes_sane_results(migrate_run: tuple[Path, dict[str, Any]]) \
        -> None:
    out, data = migrate_run
    assert leftovers(out) == []
    assert data["leftovers"] == [], data["leftovers"]
    assert json.loads((out / "results.json").read_text()) == data
    assert data["benchmark"] == "migrate" and not data["interrupted"]

    runs = data["runs"]
    assert sorted((r["workload"], r["arm"]) for r in runs) == [
        ("echo", "criu"), ("echo", "orthros"), ("nginx", "criu"), ("nginx", "orthros")]
    assert [r["ok"] for r in data["warmup"]] == [True, True], data["warmup"]
    for r in runs:
        assert r["ok"], r
        assert r["leftovers"] == [], r
        assert r["answered_after"] is True
        assert r["connected"] == r["clients"] == (20 if r["workload"] == "echo" else 100)
        for key in FIGURES:
            assert r[key] is not None and r[key] >= 0, (key, r)
        assert r["share_ms"] is not None
        assert r["client_requests"] > 0 and r["client_errors"] >= 0
        if r["arm"] == "orthros":
            assert r["source"] != r["dest"] and r["lock_window_ms"] == r["downtime_ms"]
            assert {"lock", "dump", "criu restore", "downtime"} <= set(r["timings_ms"])
        else:
            assert r["source"] == r["dest"] and r["dump_restore_ms"] >= 0
            assert r["pid_wait_ms"] >= 0 and r["criu_stats"]["dump"]["pages_written"] > 0
            name = f"{r['seq']:03d}-{r['workload']}-criu"
            assert (out / "runs" / name / "criu-dump.log").exists()
            assert (out / "runs" / name / "criu-restore.log").exists()
        if r["workload"] == "nginx":
            assert r["wrk"]["requests"] > 0 and r["wrk"]["max_ms"] == r["longest_wait_ms"]
    for c in data["comparisons"]:
        assert c["ratio"]["n"] == 1 and c["ratio"]["median"] >= 0
    # 20 clients are not the 200: the targets are shown, not judged.
    assert len(data["targets"]) == 3
    assert all(t["met"] is None and t["value"] != "—" for t in data["targets"]), \
        data["targets"]

    md = (out / "results.md").read_text()
    assert "## Targets" in md and "## echo service, 20 clients" in md
    assert "## nginx under wrk, 100 connections" in md and "## Runs" in md
    for name in ("downtime.png", "waits.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out / "logs" / "alpha-agent.log").exists()
