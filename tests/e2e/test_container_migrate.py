"""The Orthros paper's container workload migrated between lab hosts with its cgroups,
namespaces and UNIX sockets (real CRIU, real cgroups, root).

Two processes, the init (pid 1) of their own PID namespace and its child (pid 2), with their own
UTS, IPC and mount namespaces, each hold 500 accepted UNIX stream sockets to the other and
exchange numbered messages on all of them; any gap or reorder is counted. They sit in cgroups
that limit CPU cores and CPU time (v1 cpuset and cpu here; the v2 variant limits what v2 offers
on this hybrid host). The lab hosts share one cgroup filesystem, so each keeps its containers'
groups below its own root (/orthros-lab/NAME): a migrated container's groups are made anew
under beta's root, from the cgroup migration file, and alpha's are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import run_orthros
from migrate_kit import client, migrate_cli

from orthros_py.cgroup.fs import mounts, remove_dirs, wait_empty
from orthros_py.cgroup.model import V2
from orthros_py.lab import Lab
from orthros_py.lab.lab import cgroup_root
from orthros_py.proc.tree import read_cgroups
from orthros_py.workloads import unixpair

SOCKETS = 500
HOSTNAME = "orthros-ctr"


def mount_of(hierarchy: str) -> Path:
    m = mounts().get(hierarchy)
    if m is None:
        pytest.skip(f"no cgroup hierarchy {hierarchy or 'v2'} on this host")
    return m


def a_mem() -> str:
    """A memory node this host has (the first that cpuset offers), not an assumed node 0."""
    mems = (mount_of("cpuset") / "cpuset.effective_mems").read_text().strip()
    return mems.replace(",", "-").split("-")[0]


class Groups:
    """cgroup directories a test makes (parents first); removed, deepest first, at the end."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    def make(self, d: Path, limits: dict[str, str] | None = None) -> Path:
        for p in [*reversed(d.parents), d]:
            if not p.exists():
                p.mkdir()
                self.made.append(p)
                for name in ("cpuset.cpus", "cpuset.mems"):  # v1 cpuset: copy the parent's
                    f = p / name
                    if f.exists() and not f.read_text().strip():
                        f.write_text((p.parent / name).read_text().strip())
        for name, value in (limits or {}).items():
            (d / name).write_text(value)
        return d

    def cleanup(self) -> None:
        dirs = [d for d in self.made if d.exists()]
        for d in dirs:
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(int(pid)).kill()
        wait_empty(dirs)
        remove_dirs(reversed(dirs))


@pytest.fixture
def groups() -> Iterator[Groups]:
    g = Groups()
    try:
        yield g
    finally:
        g.cleanup()


@pytest.fixture
def container(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[unixpair.Container]]:
    """Containers a test starts (in a lab host's network namespace); killed at the end, wherever
    they run by then."""
    started: list[unixpair.Container] = []
    try:
        yield started
    finally:
        for c in started:
            c.stop()


def start_on(lab: Lab, host: str, tmp: Path, cgroup_dirs: list[Path],
             started: list[unixpair.Container], sockets: int = SOCKETS) -> unixpair.Container:
    c = unixpair.start(tmp / f"ctr-{uuid.uuid4().hex[:6]}", sockets=sockets, hostname=HOSTNAME,
                       cgroup_dirs=cgroup_dirs, prefix=lab.argv(host, []))
    started.append(c)
    c.wait_ready(timeout=120)
    return c


def limits_of(d: Path, names: list[str]) -> dict[str, str]:
    return {n: (d / n).read_text().strip() for n in names}


def assert_carried_on(c: unixpair.Container, before: dict[str, dict[str, object]]) -> None:
    """Every socket keeps carrying messages, in order, nothing lost; PIDs, hostname, IPC kept."""
    after = c.wait_progress(20, timeout=60)
    for role, nspid in (("p1", 1), ("p2", 2)):
        s = after[role]
        assert s["errors"] == 0, s["first_error"]
        assert s["sockets"] == 2 * c.sockets
        assert s["nspid"] == nspid and s["hostname"] == HOSTNAME and s["ipc_magic_ok"]
        assert int(s["rounds"]) > int(before[role]["rounds"])  # type: ignore[call-overload]


def migrate_container(lab: Lab, c: unixpair.Container, tmp: Path) -> dict[str, object]:
    before = c.status()
    # orthros migrate takes the pid the host knows; this machine knows the tree by another.
    result = migrate_cli(lab.host_pid("alpha", c.init_pid), "alpha", "beta")
    print("\ncontainer migration:", json.dumps(result["timings_ms"]),
          json.dumps(result["cgroups"]))
    new_pid = int(result["new_pid"])
    machine_pid = lab.machine_pid("beta", new_pid)
    assert machine_pid is not None
    c.adopt(machine_pid)
    assert_carried_on(c, before)
    assert new_pid in {t["pid"] for t in client(lab, "beta").status()["restored"]}
    return result


V1_LIMITS = {"cpu": ["cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.shares"],
             "cpuset": ["cpuset.cpus", "cpuset.mems"]}


def test_container_with_v1_cgroups_migrates_with_every_socket_and_limit(
        lab: Lab, groups: Groups, container: list[unixpair.Container], tmp_path: Path) -> None:
    cpus = sorted(int(x) for x in (mount_of("cpuset") / "cpuset.effective_cpus").read_text()
                  .strip().replace("-", ",").split(","))
    name = f"ctr-{uuid.uuid4().hex[:6]}"
    src = {h: mount_of(h) / cgroup_root("alpha").lstrip("/") / name for h in ("cpu", "cpuset")}
    groups.make(src["cpu"], {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000",
                             "cpu.shares": "512"})
    groups.make(src["cpuset"], {"cpuset.cpus": str(cpus[-1]), "cpuset.mems": a_mem()})
    want = {h: limits_of(src[h], V1_LIMITS[h]) for h in src}
    dst = {h: mount_of(h) / cgroup_root("beta").lstrip("/") / name for h in src}
    groups.made += [d.parent for d in dst.values()] + list(dst.values())  # made by the restore

    c = start_on(lab, "alpha", tmp_path, list(src.values()), container)
    result = migrate_container(lab, c, tmp_path)

    cg = read_cgroups(c.init_pid)
    for h in ("cpu", "cpuset"):
        key = next(k for k in cg if h in k.split(","))
        assert cg[key] == f"{cgroup_root('beta')}/{name}"
        assert limits_of(dst[h], V1_LIMITS[h]) == want[h]
        assert not src[h].exists(), f"alpha's {h} group was left behind"
    assert psutil.Process(c.init_pid).cpu_affinity() == [cpus[-1]]
    assert result["cgroups"]["restore"]["mismatches"] == []  # type: ignore[index]


def test_container_with_v2_cgroups_migrates_with_its_limits(
        v2_hugetlb: Path, lab: Lab, groups: Groups, container: list[unixpair.Container],
        tmp_path: Path) -> None:
    name = f"ctr-{uuid.uuid4().hex[:6]}"
    lab_root = v2_hugetlb / cgroup_root("alpha").lstrip("/")
    (v2_hugetlb / "cgroup.subtree_control").write_text("+hugetlb")
    for d in [p for p in [*reversed(lab_root.parents), lab_root] if v2_hugetlb in p.parents]:
        groups.make(d)
        (d / "cgroup.subtree_control").write_text("+hugetlb")
    src = groups.make(lab_root / name, {"hugetlb.2MB.max": "8388608",
                                        "cgroup.max.descendants": "3", "cgroup.max.depth": "2"})
    names = ["hugetlb.2MB.max", "cgroup.max.descendants", "cgroup.max.depth"]
    want = limits_of(src, names)
    dst = v2_hugetlb / cgroup_root("beta").lstrip("/") / name
    groups.made += [dst.parent, dst]

    c = start_on(lab, "alpha", tmp_path, [src], container)
    result = migrate_container(lab, c, tmp_path)

    assert read_cgroups(c.init_pid)[V2] == f"{cgroup_root('beta')}/{name}"
    assert limits_of(dst, names) == want
    assert not src.exists()
    assert result["cgroups"]["restore"]["mismatches"] == []  # type: ignore[index]


def test_a_destination_without_the_cpus_is_refused_before_anything_is_frozen(
        lab: Lab, groups: Groups, container: list[unixpair.Container], tmp_path: Path) -> None:
    cpuset = mount_of("cpuset")
    cpus = sorted(int(x) for x in (cpuset / "cpuset.effective_cpus").read_text().strip()
                  .replace("-", ",").split(","))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: beta gets one the container does not use")
    name = f"ctr-{uuid.uuid4().hex[:6]}"
    src = groups.make(cpuset / cgroup_root("alpha").lstrip("/") / name,
                      {"cpuset.cpus": str(cpus[-1]), "cpuset.mems": a_mem()})
    groups.make(cpuset / cgroup_root("beta").lstrip("/"), {"cpuset.cpus": str(cpus[0])})

    c = start_on(lab, "alpha", tmp_path, [src], container, sockets=50)
    before = c.status()
    r = run_orthros("migrate", str(lab.host_pid("alpha", c.init_pid)), "--from", "alpha",
                    "--to", "beta", timeout=120)
    assert r.returncode == 10, r.stderr
    assert "beta cannot honour the cgroup limits" in r.stderr, r.stderr
    assert f"CPUs {cpus[-1]}" in r.stderr and f"offers only {cpus[0]}" in r.stderr, r.stderr
    # Nothing was frozen or moved: the container runs on alpha as before, in its group.
    assert_carried_on(c, before)
    assert read_cgroups(c.init_pid)["cpuset"] == f"{cgroup_root('alpha')}/{name}"
    assert not (cpuset / cgroup_root("beta").lstrip("/") / name).exists()
    assert client(lab, "beta").status()["images"] == []
    assert client(lab, "alpha").status()["held"] == []
    assert os.path.exists(c.dir / "p1.sock")
