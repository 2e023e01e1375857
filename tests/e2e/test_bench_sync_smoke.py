"""A tiny real run of the sync benchmark through the ``orthros bench sync`` command: a btrfs
volume, a lab of three hosts, a 3-member etcd cluster at heartbeat 100 ms with one round of a
save left running and a restore, then one round of the stagger sweep (stagger 0) on a cluster
of its own. It must write its three kinds of output with sane numbers and leave nothing behind:
no lab, no etcd, no snapshot, no mount, no loop device, no volume file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import run_orthros

from orthros_py.bench.sync.volume import PREFIX, ROOT, mount_points, parse_losetup
from orthros_py.run import run

# The volume and the lab (~10 s), two clusters (~3 s each), a warm-up and two rounds (~3 s each).
TIMEOUT = 90


@pytest.fixture
def sync_run(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path / "sync"
    res = run_orthros("bench", "sync", "--heartbeats", "100", "--reps", "1", "--staggers", "0",
                      "--stagger-reps", "1", "--seed", "1", "--out", str(out), "--json",
                      timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads(res.stdout)


def leftovers(data: dict[str, Any]) -> list[str]:
    found = []
    if Path("/run/orthros/lab/state.json").exists():
        found.append("the lab")
    tokens = {c.get("token") for c in data["clusters"]} - {None}
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["name"] == "etcd" and any(t in cmd for t in tokens):
            found.append(f"etcd {p.pid}")
    found += [f"mount {m}" for m in mount_points(Path("/proc/self/mountinfo").read_text())
              if m.startswith(str(ROOT / PREFIX))]
    loops = run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                check=False).stdout
    found += [f"loop {dev}" for dev, back in parse_losetup(loops).items()
              if back.startswith(str(ROOT / PREFIX))]
    if ROOT.is_dir():
        found += [str(p) for p in ROOT.iterdir() if p.name.startswith(PREFIX)]
    return found


def test_sync_smoke_run_writes_sane_results(sync_run: tuple[Path, dict[str, Any]]) -> None:
    out, data = sync_run
    assert leftovers(data) == []
    assert data["leftovers"] == [], data["leftovers"]
    assert json.loads((out / "results.json").read_text()) == data

    rounds = data["rounds"]
    assert [(r["part"], r["heartbeat_ms"], r["stagger_ms"]) for r in rounds] == [
        ("heartbeat", 100, 0), ("stagger", 100, 0)]
    for r in rounds:
        assert r["ok"], r
        assert r["election_ms"] == 500
        assert r["save_ms"] > 0 and r["restore_ms"] > 0, r
        assert set(r["save_stages_ms"]) == {"clock", "prepare", "freeze", "dump", "resume"}
        assert set(r["restore_stages_ms"]) == {"check", "clock", "replace", "restore", "resume"}
        for key in ("freeze_skew_us", "save_resume_skew_us", "resume_skew_us",
                    "restore_clock_error_us"):
            assert r[key] is not None and r[key] >= 0, (key, r[key])
        assert len(r["resume_stamps_us"]) == 3
        # Whether an election happened is for the report to say: here only that it was known.
        assert r["term_before"] is not None and r["term_settled"] is not None
        assert isinstance(r["save_election"], bool) and isinstance(r["restore_election"], bool)
        assert len(r["members"]) == 3
        for m in r["members"]:
            assert m["timens"] is True, m
            assert m["image_bytes"] > 0 and m["data_bytes"] > 0, m
            assert set(m["data_methods"]) <= {"reflink", "btrfs-subvolume"}, m
        assert r["gap_save_s"] is not None and r["gap_restore_s"] is not None
        assert r["acked_between"] > 0  # the writer wrote between the save and the restore
    assert [c["tag"] for c in data["clusters"]] == ["hb100", "stagger-hb100"]
    assert [h["heartbeat_ms"] for h in data["heartbeats"]] == [100]
    assert [s["stagger_ms"] for s in data["staggers"]] == [0]
    met = {t["name"]: t["met"] for t in data["targets"]}
    assert set(met) == {"resume skew after a restore",
                        "resume skew after a save (--leave-running)",
                        "100 ms heartbeat through every save and restore"}
    assert all(isinstance(v, bool) for v in met.values()), met
    assert data["shortest_surviving_heartbeat_ms"] in (100, None)

    md = (out / "results.md").read_text()
    assert "## Targets" in md and "**Result:**" in md and "## 2. Stagger sweep" in md
    for name in ("skews.png", "times.png", "elections_heartbeat.png", "elections_stagger.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out / "logs" / "hb100" / "alpha.log").exists()  # etcd's own log is kept
