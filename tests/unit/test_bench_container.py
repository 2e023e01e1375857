"""The container benchmark's arithmetic: parts from one migration, medians, the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from orthros_py.bench.container import (
    PARTS_LOG_LEVEL,
    WHOLE_LOG_LEVEL,
    Run,
    load_runs,
    markdown,
    summarize,
    write_outputs,
)


def run(sockets: int, level: int, whole: float, cg_criu: float = 2.0, ok: bool = True) -> Run:
    r = Run(sockets, 1, "alpha", "beta", level, ok=ok,
            timings_ms={"dump": whole / 2, "transfer": 10.0, "address move": 0.0,
                        "restore": whole / 2 - 10.0, "downtime": whole + 5, "total": whole + 50},
            cgroup_orthros={"read": 1.0, "check": 0.5, "create": 0.25, "verify": 0.25})
    if level == PARTS_LOG_LEVEL:
        r.criu_parts = {"dump": {"cgroup": cg_criu, "namespaces": 0.1, "mounts": 3.0, "unix": 4.0},
                        "restore": {"cgroup": cg_criu, "namespaces": 0.2, "mounts": 5.0,
                                    "unix": 6.0}}
    return r


def test_parts_of_one_migration() -> None:
    r = run(500, PARTS_LOG_LEVEL, 400.0)
    assert r.whole_ms == pytest.approx(400.0)
    assert r.part("cgroup") == pytest.approx(2.0 + 4.0)  # orthros 2.0 + CRIU 2 x 2.0
    assert r.part("namespaces") == pytest.approx(0.3 + 8.0)  # mount namespace included
    assert r.part("unix") == pytest.approx(10.0)
    assert r.part("container") == pytest.approx(6.0 + 8.3 + 10.0)
    assert run(500, WHOLE_LOG_LEVEL, 300.0).part("cgroup") is None  # no level-4 log


def test_summary_takes_whole_from_the_quiet_runs_and_parts_from_the_logged_ones() -> None:
    runs = [run(500, PARTS_LOG_LEVEL, 500.0, cg_criu=c) for c in (1.0, 2.0, 3.0)] + \
        [run(500, WHOLE_LOG_LEVEL, w) for w in (300.0, 310.0, 320.0)] + \
        [run(500, WHOLE_LOG_LEVEL, 9999.0, ok=False)]
    (s,) = summarize(runs)
    assert s.medians["whole"] == pytest.approx(310.0)
    assert s.medians["cgroup"] == pytest.approx(2.0 + 4.0)
    assert s.detail["whole at level 4"] == pytest.approx(500.0)
    assert s.share("unix") == pytest.approx(10.0 / 310.0)
    assert s.migrations == 6


def test_outputs_round_trip(tmp_path: Path) -> None:
    runs = [run(500, PARTS_LOG_LEVEL, 500.0), run(500, WHOLE_LOG_LEVEL, 300.0),
            run(5000, PARTS_LOG_LEVEL, 900.0), run(5000, WHOLE_LOG_LEVEL, 700.0)]
    made = write_outputs(runs, {"host": "test"}, tmp_path, plots=False)
    text = (tmp_path / "results.md").read_text()
    assert "| whole migration | 783.05 | 300.00 |" in text
    assert "From 500 to 5,000 sockets per process" in text and "whole migration x2.3" in text
    back, meta = load_runs(made[0])
    assert back == runs and meta == {"host": "test"}
    assert markdown(back, meta) == text
