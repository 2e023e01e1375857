"""A process in limited cgroups comes back in groups of the same paths with the same limits
after its groups were removed (real CRIU, ``--manage-cgroups full``, root).

This host mounts cgroup v1 hierarchies under /sys/fs/cgroup/* and cgroup2 at
/sys/fs/cgroup/unified (hybrid). The CPU limits live in v1 (cpuset, cpu). The v2 hierarchy here
has no CPU controller to limit with (cpu is bound to v1; its cgroup.controllers offers only
hugetlb), so the v2 variant limits what v2 itself offers and CRIU saves for every v2 group:
cgroup.max.descendants and cgroup.max.depth.

``full`` also writes back the saved properties of every other group the process sits in, here
the memory group this test runs in and the hierarchies' roots: the same values they had.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import Spawner, dump_cli, read_lines, restore_cli, wait_for

from orthros_py.proc.tree import read_cgroups

CGROOT = Path("/sys/fs/cgroup")


def remove_group(path: Path) -> None:
    """Kill whatever is left in a cgroup and its children, then remove them, deepest first."""
    if not path.is_dir():
        return
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        remove_group(d)
    procs = path / "cgroup.procs"
    for pid in (int(x) for x in procs.read_text().split()):
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    # A task leaves its cgroup when it exits, before anyone reaps it.
    wait_for(lambda: not procs.read_text().split(), timeout=10, what=f"{path} to empty")
    path.rmdir()


@pytest.fixture
def cgroups() -> Iterator[list[Path]]:
    """Cgroup directories the test creates (or CRIU recreates); all removed at the end."""
    made: list[Path] = []
    try:
        yield made
    finally:
        for path in reversed(made):
            remove_group(path)


def group_name() -> str:
    return f"orthros-test-{uuid.uuid4().hex[:8]}"


def write(path: Path, value: str) -> None:
    path.write_text(value)


def counts(path: Path) -> list[int]:
    return [int(ln.split()[1]) for ln in read_lines(path) if len(ln.split()) == 3]


def dump_remove_restore(
    spawner: Spawner, images: Path, out: Path, proc: subprocess.Popen[bytes], groups: list[Path]
) -> int:
    """Dump the counter with its cgroups, remove the groups, restore; return the restored pid."""
    dumped = dump_cli(proc.pid, images, "--manage-cgroups", "full")
    print("\ncgroup dump:", json.dumps(dumped["stats"]))
    assert proc.wait(timeout=10) < 0  # killed by CRIU; reaped so that its PID is free
    last = counts(out)[-1]
    for g in groups:
        remove_group(g)
        assert not g.exists()
    restored = restore_cli(spawner, images, "--manage-cgroups", "full")
    assert restored["pid"] == proc.pid
    wait_for(lambda: counts(out)[-1] > last + 3, what="the restored counter to count")
    # One run of numbers from 0: the restored counter went on from its memory.
    assert counts(out) == list(range(len(counts(out))))
    return int(restored["pid"])


def test_cgroup_v1_cpu_limits_are_restored(
    spawner: Spawner, images: Path, tmp_path: Path, cgroups: list[Path]
) -> None:
    name = group_name()
    cpuset, cpu = CGROOT / "cpuset" / name, CGROOT / "cpu" / name
    for g in (cpuset, cpu):
        cgroups.append(g)
        g.mkdir()
    cpus = (CGROOT / "cpuset" / "cpuset.effective_cpus").read_text().strip()
    one_cpu = cpus.replace(",", "-").split("-")[-1]  # the last CPU this host offers
    limits = {
        cpuset / "cpuset.cpus": one_cpu,
        cpuset / "cpuset.mems": "0",
        cpu / "cpu.cfs_period_us": "100000",
        cpu / "cpu.cfs_quota_us": "50000",
        cpu / "cpu.shares": "512",
    }
    for f, v in limits.items():
        write(f, v)

    out = tmp_path / "counter.out"
    proc = spawner.workload("counter", "0.02", stdout=out)
    for g in (cpuset, cpu):
        write(g / "cgroup.procs", str(proc.pid))
    wait_for(lambda: len(counts(out)) >= 5, what="the counter to count")
    assert read_cgroups(proc.pid)["cpuset"] == f"/{name}"
    assert read_cgroups(proc.pid)["cpu"] == f"/{name}"

    pid = dump_remove_restore(spawner, images, out, proc, [cpuset, cpu])
    cg = read_cgroups(pid)
    assert (cg["cpuset"], cg["cpu"]) == (f"/{name}", f"/{name}")
    for f, v in limits.items():
        assert f.read_text().strip() == v, f
    assert psutil.Process(pid).cpu_affinity() == [int(one_cpu)]


def test_cgroup_v2_group_and_limits_are_restored(
    spawner: Spawner, images: Path, tmp_path: Path, cgroups: list[Path]
) -> None:
    unified = CGROOT / "unified"
    if not (unified / "cgroup.procs").exists():
        pytest.skip("no cgroup2 hierarchy at /sys/fs/cgroup/unified")
    name = group_name()
    group = unified / name
    cgroups.append(group)
    group.mkdir()
    limits = {group / "cgroup.max.descendants": "7", group / "cgroup.max.depth": "3"}
    for f, v in limits.items():
        write(f, v)

    out = tmp_path / "counter.out"
    proc = spawner.workload("counter", "0.02", stdout=out)
    write(group / "cgroup.procs", str(proc.pid))
    wait_for(lambda: len(counts(out)) >= 5, what="the counter to count")
    assert read_cgroups(proc.pid)[""] == f"/{name}"

    pid = dump_remove_restore(spawner, images, out, proc, [group])
    assert read_cgroups(pid)[""] == f"/{name}"
    for f, v in limits.items():
        assert f.read_text().strip() == v, f
    assert os.getpid() not in [int(x) for x in (group / "cgroup.procs").read_text().split()]
