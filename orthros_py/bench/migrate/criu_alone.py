"""The migrate benchmark's baseline: CRIU alone, a dump of a live tree and a restore of it on the
same host, through CRIU's RPC (``criu swrk``), with nothing of orthros around them: no network
lock (CRIU is told ``skip``), no transfer, no address move, no agent.

``python -m orthros_py.bench.migrate.criu_alone --pid PID --images DIR`` runs inside a lab
host's namespaces (``Lab.run``: its network, PID and mount namespaces, where PID is the tree's
pid and its PIDs come back), prints one JSON object on stdout, and exits 0, or 1 with
``{"error", "stage", ...}`` when CRIU refused. The restored tree is this process's child
(``rst_sibling``) and goes to the host's init when it exits.

CRIU is given the options orthros's agents give it for the same tree (tcp_established, cgroups
``soft`` with only the hierarchies the tree has groups of its own in, the host's mounted
hierarchies as its cgroup yard, the same log level), so that the baseline is CRIU's own time
and not a slower CRIU. Interfaces: CRIU's RPC (``orthros_py.criu.session``), its stats images,
/proc. Needs root.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from orthros_py.cgroup.fs import CgroupFs
from orthros_py.criu.images import read_dump_stats, read_restore_stats
from orthros_py.criu.request import (
    CgroupMode,
    CriuNetworkLock,
    DumpOptions,
    RestoreOptions,
    dump_request,
    restore_request,
)
from orthros_py.criu.session import CriuSession
from orthros_py.errors import CriuError, OrthrosError

PID_FREE_TIMEOUT = 30.0


def tree_pids(pid: int) -> list[int]:
    """The tree's PIDs, root first."""
    root = psutil.Process(pid)
    return [pid, *(p.pid for p in root.children(recursive=True))]


def wait_free(pids: list[int], timeout: float = PID_FREE_TIMEOUT) -> None:
    """Until the dumped PIDs are free (the host's init reaps the killed tree): the restore
    needs them back. A restore on another host would not wait; the time is recorded apart."""
    deadline = time.monotonic() + timeout
    while any(psutil.pid_exists(p) for p in pids):
        if time.monotonic() > deadline:
            raise OrthrosError(f"the dumped PIDs {pids} are not free after {timeout:g} s",
                               stage="restore")
        time.sleep(0.001)


def dump_and_restore(pid: int, images: Path, *, log_level: int = 2,
                     timeout: float = 120.0) -> dict[str, Any]:
    """Dump the tree of ``pid`` into ``images`` (killing it), wait for its PIDs, restore it;
    the times (ms, ``time.perf_counter``) and CRIU's statistics."""
    pids = tree_pids(pid)
    # Before the clock starts, as the agent does before its dump: which hierarchies the tree
    # has groups of its own in, and the yard.
    cgfs = CgroupFs.here()
    hierarchies = tuple(sorted({g.hierarchy for g in cgfs.read_tree(pids).groups}))
    yard = cgfs.yard()
    images.mkdir(parents=True, exist_ok=True)
    dopts = DumpOptions(pid=pid, tcp_established=True, manage_cgroups=CgroupMode.SOFT,
                        network_lock=CriuNetworkLock.SKIP, log_level=log_level,
                        cgroup_dump_controllers=hierarchies)
    ropts = RestoreOptions(tcp_established=True, manage_cgroups=CgroupMode.SOFT,
                           network_lock=CriuNetworkLock.SKIP, log_level=log_level,
                           cgroup_yard=yard)
    out: dict[str, Any] = {"pid": pid, "pids": pids, "images": str(images),
                           "options": {"log_level": log_level, "hierarchies": list(hierarchies),
                                       "cgroup_yard": yard}}
    stage = "dump"
    try:
        t0 = time.perf_counter()
        out["started_at"] = time.time()
        CriuSession(timeout=timeout).call(dump_request(dopts, -1), images_dir=images, pid=pid)
        t1 = time.perf_counter()
        stage = "pid wait"
        wait_free(pids)
        t2 = time.perf_counter()
        stage = "restore"
        resp = CriuSession(timeout=timeout).call(restore_request(ropts, -1), images_dir=images)
        t3 = time.perf_counter()
        out["ended_at"] = time.time()
    except OrthrosError as err:
        out.update(error=err.msg, stage=stage,
                   log_tail=list(err.log_tail) if isinstance(err, CriuError) else [])
        return out
    dstats, rstats = read_dump_stats(images), read_restore_stats(images)
    out.update(restored_pid=int(resp.restore.pid), dump_ms=(t1 - t0) * 1000,
               pid_wait_ms=(t2 - t1) * 1000, restore_ms=(t3 - t2) * 1000,
               downtime_ms=(t3 - t0) * 1000,
               dump_stats=dstats.to_dict() if dstats else None,
               restore_stats=rstats.to_dict() if rstats else None)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orthros_py.bench.migrate.criu_alone",
                                 description="CRIU dump and restore of a tree, nothing else")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--log-level", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    try:
        out = dump_and_restore(args.pid, args.images.resolve(), log_level=args.log_level,
                               timeout=args.timeout)
    except (OrthrosError, psutil.Error, OSError) as err:
        out = {"pid": args.pid, "error": f"{type(err).__name__}: {err}", "stage": "setup"}
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 1 if "error" in out else 0


if __name__ == "__main__":
    sys.exit(main())
