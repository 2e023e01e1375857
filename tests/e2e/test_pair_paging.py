"""``orthros pair start --paging`` on the lab: a paging standby and its lazy failover, real.

memhog on alpha (128 MiB in a checksummed pattern, a worker rewriting 30 % of it) paired to beta
with ``--paging --hot-window 4s``, gamma the witness. The standby's memory for the replica (its
tmpfs and the page cache of its disk base) must come close to the hot set, not the service's
size. Then alpha dies (agent and service SIGKILLed, link down): beta restores lazily, and a
client that PINGs all along gets its first answer before the last cold page has arrived (the
daemon's own finishing time); every page arrives, and VERIFY finds every page of the service
as the last generation left it.

Pages only read are cold by design (the hot set is the pages *written* within the window):
this workload's hot set is written, so they do not show here; the linux tier measures both.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for
from migrate_kit import SERVICE_IP, Service
from test_pair import kill_host, pair_start, pair_status, pair_stop, promoted_event, revive

from orthros_py.lab import Lab
from orthros_py.workloads.memhog import PAGE, MemClient, MemConn, wait_ready

PORT = 7300
MIB = 128
HOT = 0.3
WINDOW_S = 4.0
INTERVAL_S = 0.5

pytestmark = pytest.mark.lab(hosts=3)


def paging(name: str) -> dict[str, Any]:
    view = pair_status(name)
    assert view.get("paging"), view
    out: dict[str, Any] = view["paging"]
    return out


def test_paging_standby_keeps_the_hot_set_and_fails_over_lazily(lab: Lab,
                                                                tmp_path: Path) -> None:
    log = tmp_path / "memhog.out"
    svc = Service(lab, "alpha", [sys.executable, "-m", "orthros_py.workloads.memhog",
                                 "--mib", str(MIB), "--host", SERVICE_IP, "--port", str(PORT),
                                 "--hot-fraction", str(HOT), "--hot-layout", "spread",
                                 "--rate", "20000"], log=log)
    wait_ready(log, timeout=60)
    region = MIB << 20
    hot_set = HOT * region

    def connect() -> Any:
        return lab.connect((SERVICE_IP, PORT), timeout=10)

    rec = pair_start(svc.pid, "--failover", "--interval", f"{INTERVAL_S * 1000:.0f}ms",
                     "--paging", "--hot-window", f"{WINDOW_S:g}s")
    name = rec["config"]["name"]
    assert rec["config"]["paging"] and rec["config"]["hot_window"] == WINDOW_S
    # A window's worth of generations, and at least one aged out of it into the disk base.
    wait_for(lambda: paging(name)["aged_in_place"] + paging(name)["aged_by_merge"] >= 2,
             timeout=120, what="the standby to fill its hot window and age generations out")
    # Measured in steady state: a full generation (one after a checkpoint that failed under
    # this load) counts every page as written, so the whole memory is hot for one window;
    # that is waited out, a few windows at most. Memory that never comes down fails here.
    samples: list[dict[str, Any]] = []

    def steady() -> bool:
        samples.append(paging(name))
        return bool(samples[-1]["memory_bytes"] <= hot_set + 0.1 * region)

    wait_for(steady, timeout=6 * WINDOW_S,
             what=f"the standby's memory to come down to the hot set (last: {samples[-1:]})")
    p = samples[-1]
    if len(samples) > 1:
        print(f"\n{len(samples)} samples until the standby's memory came down: first "
              f"{samples[0]['memory_bytes'] / 2**20:.1f} MiB")
    print(f"\npaging standby: hot set {p['hot_bytes'] / 2**20:.1f} MiB written within "
          f"{WINDOW_S:g} s (the service's hot fraction: {hot_set / 2**20:.1f} MiB of "
          f"{MIB} MiB); memory {p['memory_bytes'] / 2**20:.1f} MiB between checkpoints "
          f"(tmpfs {p['settled_tmpfs_bytes'] / 2**20:.1f}, disk base cached "
          f"{p['disk_cached_bytes'] / 2**20:.1f}), tmpfs at most "
          f"{p['peak_tmpfs_bytes'] / 2**20:.1f} MiB while a generation is committed; disk "
          f"{p['disk_bytes'] / 2**20:.1f} MiB; "
          f"{p['young_generations']} young generations, aged in place {p['aged_in_place']}, "
          f"by merge {p['aged_by_merge']}")
    assert p["hot_bytes"] >= 0.5 * hot_set, p  # the worker's pages are in it...
    assert p["memory_bytes"] <= hot_set + 0.1 * region, p  # ...and not much else
    assert p["settled_tmpfs_bytes"] >= p["hot_bytes"]
    assert p["disk_bytes"] >= region  # the base: the whole memory, on disk

    client = MemClient(connect, rate=200, timeout=10, clock=time.time).start()
    try:
        wait_for(lambda: len(client.snapshot().replies) > 20, what="the client to PING")
        with MemConn(connect) as c:
            assert c.stat()["mismatches"] == 0  # nothing wrong before the failover
        died = time.time()
        kill_host(lab, svc, "alpha")
        wait_for(lambda: (pair_status(name).get("lazy") or {}).get("state")
                 in ("complete", "failed"), timeout=120,
                 what="the promotion's lazy pages to be in")
        wait_for(lambda: client.snapshot().first_reply_after(died) is not None, timeout=30,
                 what="the client to be answered at beta")
    finally:
        seen = client.stop()
    view = pair_status(name)
    ev = promoted_event(view)
    lazy = view["lazy"]
    assert view["state"] == "failed over" and view["serving"] == "beta", view
    assert lazy["state"] == "complete", lazy
    first = seen.first_reply_after(died)
    assert first is not None
    print(f"failover: promoted {ev['at'] - died:.3f} s after the kill (restore "
          f"{ev.get('restore_ms')} ms, plan {ev.get('lazy_plan_ms')} ms); first PONG "
          f"{first - died:.3f} s after the kill; {lazy['eager_pages']} pages placed before "
          f"the tree resumed, {lazy['lazy_pages']} lazy: all in at "
          f"{lazy['finished_at'] - died:.3f} s ({lazy['pages_faulted']} on fault, "
          f"{lazy['pages_pushed']} pushed, {lazy['elapsed_ms']:.0f} ms)")
    # The first request was served while cold pages were still crossing.
    assert first < lazy["finished_at"], (first - died, lazy["finished_at"] - died)
    # Every page arrived, and the service's data is intact.
    assert lazy["pages_copied"] == lazy["pages_total"] == lazy["lazy_pages"], lazy
    assert lazy["lazy_pages"] >= 0.5 * region / PAGE, lazy
    with MemConn(connect, timeout=120) as c:
        checked = c.verify()
        st = c.stat()
    assert checked.ok and checked.pages == region // PAGE, checked
    assert st["mismatches"] == 0, st
    back = revive(lab, name)
    assert back["state"] == "failed over", back
    pair_stop(name)
