"""A process in limited cgroups comes back in groups of the same paths with the same limits
after its groups were removed (real CRIU, ``--manage-cgroups full``, root).

Where the hierarchies are comes from /proc/self/mounts (``helpers.host_cgroups``): the
development VM is hybrid (v1 under /sys/fs/cgroup/*, cgroup2 at /sys/fs/cgroup/unified, whose
only controller is hugetlb), users' hosts are mostly pure cgroup v2 at /sys/fs/cgroup. A test
that needs a layout the host lacks skips, saying which. The v2 variant limits what v2 itself
offers and CRIU saves for every v2 group: cgroup.max.descendants and cgroup.max.depth.

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
from helpers import (
    Spawner,
    dump_cli,
    host_cgroups,
    orthros_json,
    read_lines,
    restore_cli,
    run_orthros,
    wait_for,
)

from orthros_py.proc.tree import read_cgroups


def v1_mount(controller: str) -> Path:
    mount = host_cgroups()[0].get(controller)
    if mount is None:
        pytest.skip(f"no cgroup v1 {controller} hierarchy on this host (pure cgroup v2?)")
    return mount


def v2_mount() -> Path:
    mount = host_cgroups()[1]
    if mount is None or not (mount / "cgroup.procs").exists():
        pytest.skip("no cgroup2 hierarchy on this host")
    return mount


def remove_group(path: Path) -> None:
    """Kill whatever is left in a cgroup and its children, then remove them, deepest first.
    Goes on past a group it cannot remove, and raises at the end with every failure."""
    if not path.is_dir():
        return
    failed: list[str] = []
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            remove_group(d)
        except (OSError, AssertionError) as err:
            failed.append(f"{d}: {err}")
    try:
        procs = path / "cgroup.procs"
        for pid in (int(x) for x in procs.read_text().split()):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        # A task leaves its cgroup when it exits, before anyone reaps it.
        wait_for(lambda: not procs.read_text().split(), timeout=10, what=f"{path} to empty")
        path.rmdir()
    except (OSError, AssertionError) as err:
        failed.append(f"{path}: {err}")
    if failed:
        raise AssertionError("cgroups left behind: " + "; ".join(failed))


@pytest.fixture
def cgroups() -> Iterator[list[Path]]:
    """Cgroup directories the test creates (or CRIU recreates); all removed at the end, each
    tried even when removing an earlier one failed."""
    made: list[Path] = []
    try:
        yield made
    finally:
        failed: list[str] = []
        for path in reversed(made):
            try:
                remove_group(path)
            except (OSError, AssertionError) as err:
                failed.append(str(err))
        if failed:
            raise AssertionError("; ".join(failed))


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
    cpuset_root, cpu_root = v1_mount("cpuset"), v1_mount("cpu")
    name = group_name()
    cpuset, cpu = cpuset_root / name, cpu_root / name
    for g in (cpuset, cpu):
        cgroups.append(g)
        g.mkdir()
    cpus = (cpuset_root / "cpuset.effective_cpus").read_text().strip()
    one_cpu = cpus.replace(",", "-").split("-")[-1]  # the last CPU this host offers
    mems = (cpuset_root / "cpuset.effective_mems").read_text().strip()
    one_mem = mems.replace(",", "-").split("-")[0]  # a memory node this host has
    limits = {
        cpuset / "cpuset.cpus": one_cpu,
        cpuset / "cpuset.mems": one_mem,
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
    unified = v2_mount()
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


def test_v2_controller_limits_travel_in_the_migration_file_to_a_new_root(
    v2_hugetlb: Path, spawner: Spawner, images: Path, tmp_path: Path, cgroups: list[Path]
) -> None:
    """CRIU 4.2.1 keeps no v2 controller limit (hugetlb.2MB.max here; cpu.max, memory.max on
    pure v2 hosts): orthros's cgroup file carries it, and the restore recreates the group under
    another root, as a destination with another layout would."""
    old, new = group_name(), group_name()
    src, dst = v2_hugetlb / old, v2_hugetlb / new
    cgroups += [dst, src]
    write(v2_hugetlb / "cgroup.subtree_control", "+hugetlb")
    src.mkdir()
    write(src / "cgroup.subtree_control", "+hugetlb")
    (src / "inner").mkdir()
    limits = {"hugetlb.2MB.max": "4194304", "cgroup.max.descendants": "5"}
    for f, v in limits.items():
        write(src / f, v)
    write(src / "inner" / "hugetlb.2MB.max", "2097152")

    out = tmp_path / "counter.out"
    proc = spawner.workload("counter", "0.02", stdout=out)
    write(src / "inner" / "cgroup.procs", str(proc.pid))
    wait_for(lambda: len(counts(out)) >= 5, what="the counter to count")

    dumped = dump_cli(proc.pid, images)
    assert dumped["cgroups"]["groups"] >= 1
    text = (images / "orthros-cgroups.txt").read_text()
    assert f"unified /{old}/inner hugetlb.2MB.max = 2097152" in text, text
    assert proc.wait(timeout=10) < 0
    remove_group(src)

    restored = restore_cli(spawner, images, "--cgroup-root", f"unified=/{new}/inner")
    pid = int(restored["pid"])
    assert read_cgroups(pid)[""] == f"/{new}/inner"
    assert (dst / "inner" / "hugetlb.2MB.max").read_text().strip() == "2097152"
    assert restored["cgroups"]["mismatches"] == []
    back = (images / "orthros-cgroups-restored.txt").read_text()
    assert f"unified /{new}/inner hugetlb.2MB.max = 2097152" in back, back
    assert not src.exists()
    # inspect shows the file's three parts and compares the restored groups with them
    data = orthros_json("inspect", str(images), "--json")
    assert {"hierarchy": "", "path": f"/{old}/inner", "file": "hugetlb.2MB.max",
            "value": "2097152"} in data["cgroup_file"]["limits"]
    assert data["cgroup_file_restored"]["roots"] == {"": f"/{new}/inner"}
    shown = run_orthros("inspect", str(images))
    assert "membership (2/3)" in shown.stderr and "restored groups: the same limits" in \
        shown.stderr, shown.stderr


@pytest.fixture
def cpuset_hierarchy() -> Iterator[tuple[Path, str]]:
    """(mount point, label for --cgroup-root) of the hierarchy that has cpuset: v1's where the
    host mounts one, else cgroup v2's with cpuset enabled below its root (put back as found).
    Request it before ``cgroups``, so that it is torn down after the groups are gone."""
    v1, v2 = host_cgroups()
    if "cpuset" in v1:
        yield v1["cpuset"], "cpuset"
        return
    if v2 is None or "cpuset" not in (v2 / "cgroup.controllers").read_text().split():
        pytest.skip("no cgroup hierarchy with the cpuset controller on this host")
    before = (v2 / "cgroup.subtree_control").read_text().split()
    if "cpuset" not in before:
        write(v2 / "cgroup.subtree_control", "+cpuset")
    try:
        yield v2, "unified"
    finally:
        if "cpuset" not in before:
            with contextlib.suppress(OSError):
                write(v2 / "cgroup.subtree_control", "-cpuset")


def test_restore_refuses_cpus_the_destination_cannot_give(
    cpuset_hierarchy: tuple[Path, str], spawner: Spawner, images: Path, tmp_path: Path,
    cgroups: list[Path]
) -> None:
    root, label = cpuset_hierarchy
    cpus = (root / "cpuset.effective_cpus").read_text().strip()
    from orthros_py.cgroup.model import parse_cpu_list

    have = sorted(parse_cpu_list(cpus))
    if len(have) < 2:
        pytest.skip("needs two CPUs: one for the destination's narrower cpuset")
    src, narrow = root / group_name(), root / group_name()
    for g in (src, narrow):
        cgroups.append(g)
        g.mkdir()
        if label != "unified":  # a v1 cpuset group starts with no memory node (v2 inherits)
            write(g / "cpuset.mems", (root / "cpuset.effective_mems").read_text().strip())
    write(src / "cpuset.cpus", cpus)
    write(narrow / "cpuset.cpus", str(have[-1]))  # a "host" with one CPU
    wanted = (src / "cpuset.cpus").read_text().strip()  # as the kernel writes the list back

    out = tmp_path / "counter.out"
    proc = spawner.workload("counter", "0.02", stdout=out)
    write(src / "cgroup.procs", str(proc.pid))
    wait_for(lambda: len(counts(out)) >= 5, what="the counter to count")
    dump_cli(proc.pid, images)
    assert proc.wait(timeout=10) < 0

    r = run_orthros("restore", "-D", str(images), "--detach",
                    "--cgroup-root", f"{label}=/{narrow.name}/ctr")
    assert r.returncode == 10, r.stderr
    assert "cannot honour" in r.stderr and f"CPUs {wanted}" in r.stderr, r.stderr
    assert not (narrow / "ctr").exists()
    assert not psutil.pid_exists(proc.pid)  # CRIU was never asked: nothing restored
