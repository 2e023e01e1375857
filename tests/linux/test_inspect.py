"""``orthros inspect`` on real checkpoints: what it reports must agree with what psutil and
/proc said of the live tree just before the dump. Needs root (CRIU dumps)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import Spawner, host_cgroups, kill_tree, run_orthros, wait_for

from orthros_py.proc.tree import read_cgroups

QUEUED = 1234  # bytes insp_tree.py leaves unread in the child's socket
SOCK_TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram",
              socket.SOCK_SEQPACKET: "seqpacket"}


@pytest.fixture
def images(images: Path) -> Iterator[Path]:
    """conftest's image directory, removed afterwards: a dump holds megabytes of the
    workload's memory, and pytest keeps the temporary directories of the last runs."""
    yield images
    shutil.rmtree(images, ignore_errors=True)


def dump_and_inspect(pid: int, images: Path, *dump_args: str) -> dict[str, Any]:
    res = run_orthros("dump", str(pid), "-D", str(images), "--leave-running", "--json",
                      *dump_args)
    assert res.returncode == 0, res.stderr
    res = run_orthros("inspect", str(images), "--json")
    assert res.returncode == 0, res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    # The tables render from the same images without failing.
    human = run_orthros("inspect", str(images))
    assert human.returncode == 0, human.stderr
    assert human.stdout == "" and "processes" in human.stderr
    return data


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_inspect_agrees_with_psutil(spawner: Spawner, images: Path, tmp_path: Path,
                                    family: str) -> None:
    ready = tmp_path / "ready.json"
    named = tmp_path / "named.sock"
    args = [str(ready), str(named)] + (["--ipv6"] if family == "ipv6" else [])
    proc = spawner.workload("insp_tree", *args)
    wait_for(ready.exists, what="insp_tree to connect")
    info = json.loads(ready.read_text())
    assert info["parent"] == proc.pid

    # What the live tree holds, as psutil sees it.
    root = psutil.Process(proc.pid)
    live = [root, *root.children(recursive=True)]
    names = {p.pid: p.name() for p in live}
    ppids = {p.pid: p.ppid() for p in live}
    tcp_live = {(p.pid, c.status, (c.laddr.ip, c.laddr.port),
                 (c.raddr.ip, c.raddr.port) if c.raddr else None)
                for p in live for c in p.net_connections(kind="tcp")}
    unix_live = sorted((p.pid, SOCK_TYPES[c.type], c.laddr or "")
                       for p in live for c in p.net_connections(kind="unix"))
    assert len(names) == 2 and len(tcp_live) == 3 and len(unix_live) == 3

    # Both ends of the connection are in the frozen tree: no lock needed.
    data = dump_and_inspect(proc.pid, images, "--tcp-established", "--network-lock", "skip")

    procs = {p["pid"]: p for p in data["processes"]}
    assert set(procs) == set(names)
    assert data["root_pid"] == proc.pid
    for pid, p in procs.items():
        assert p["command"] == names[pid][:15]  # comm is cut at 15 characters
        assert p["ppid"] == (0 if pid == proc.pid else ppids[pid])
        assert p["threads"] == [pid]

    # The tree lives in the host's namespaces: none is its own.
    assert data["namespaces"] and not any(n["own"] for n in data["namespaces"])
    assert {n["kind"] for n in data["namespaces"]} >= {"net", "pid", "mnt", "uts", "ipc"}

    tcp_image = set()
    for t in data["tcp"]:
        assert t["family"] == family
        status = psutil.CONN_LISTEN if t["state"] == "LISTEN" else t["state"]
        remote = tuple(t["remote"]) if t["state"] != "LISTEN" else None
        for o in t["owners"]:
            tcp_image.add((o["pid"], status, tuple(t["local"]), remote))
    assert tcp_image == tcp_live
    port = info["port"]
    child_side = next(t for t in data["tcp"] if t["remote"][1] == port)
    assert child_side["owners"][0]["pid"] == info["child"]
    assert child_side["inq"] == QUEUED and child_side["outq"] == 0

    unix_image = sorted((o["pid"], u["type"], u["name"]) for u in data["unix"]
                        for o in u["owners"])
    assert unix_image == unix_live
    by_id = {u["id"]: u for u in data["unix"]}
    pair = [u for u in data["unix"] if u["peer_ino"]]
    assert len(pair) == 2
    for u in pair:  # the socketpair's ends name each other, one in each process
        peer = by_id[u["peer_id"]]
        assert peer["peer_id"] == u["id"] and not u["external_peer"]
        assert {u["owners"][0]["pid"], peer["owners"][0]["pid"]} == {info["parent"],
                                                                     info["child"]}
    assert next(u for u in data["unix"] if u["name"])["name"] == str(named)

    # Every page CRIU wrote is accounted for by some process's pagemap.
    assert {m["pid"] for m in data["memory"]} == set(names)
    assert sum(m["present"] for m in data["memory"]) == data["stats"]["dump"]["pages_written"]
    assert data["stats"]["restore"] is None

    # --leave-running: the tree still runs as it was.
    assert all(psutil.pid_exists(pid) for pid in names)


@dataclass
class ScratchCgroups:
    name: str  # the same group name in every hierarchy used
    cpu: Path
    cpuset: Path
    unified: Path

    @property
    def path(self) -> str:
        return f"/{self.name}"


def _remove_cgroup(path: Path) -> None:
    """Kill whatever is left in a test cgroup, then remove it (only an empty one can go)."""
    if not path.exists():
        return
    for line in (path / "cgroup.procs").read_text().split():
        kill_tree(int(line))

    def removed() -> bool:
        try:
            path.rmdir()
        except OSError as err:
            if err.errno == errno.EBUSY:  # a killed task not yet gone from the group
                return False
            raise
        return True

    wait_for(removed, timeout=10, what=f"{path} to become empty")


@pytest.fixture
def test_cgroups() -> Iterator[ScratchCgroups]:
    """One group in v1 cpu, v1 cpuset and cgroup v2 (the hybrid layout this test is about);
    a host without one of them (a pure cgroup v2 host) skips. Every group is removed at the
    end, each tried even when an earlier one could not be."""
    v1, v2 = host_cgroups()
    for want, mount in (("v1 cpu", v1.get("cpu")), ("v1 cpuset", v1.get("cpuset")),
                        ("cgroup2", v2)):
        if mount is None or not (mount / "cgroup.procs").exists():
            pytest.skip(f"no {want} hierarchy on this host (this test needs the hybrid layout)")
    assert v2 is not None
    name = f"orthros-test-{uuid.uuid4().hex[:8]}"
    cg = ScratchCgroups(name, v1["cpu"] / name, v1["cpuset"] / name, v2 / name)
    try:
        cg.cpu.mkdir()
        (cg.cpu / "cpu.cfs_quota_us").write_text("50000")
        (cg.cpu / "cpu.shares").write_text("512")
        cg.cpuset.mkdir()
        # A v1 cpuset group starts with no CPUs and no memory nodes: a task cannot join it.
        # The first of each that the host offers.
        for f in ("cpus", "mems"):
            have = (v1["cpuset"] / f"cpuset.effective_{f}").read_text().strip()
            (cg.cpuset / f"cpuset.{f}").write_text(have.replace(",", "-").split("-")[0])
        # The hybrid layout's cgroup2 hierarchy holds no controllers here; a group in it still
        # shows how CRIU records v2 (controller "") and its few core files.
        cg.unified.mkdir()
        (cg.unified / "cgroup.max.descendants").write_text("5")
        yield cg
    finally:
        failed = []
        for path in (cg.unified, cg.cpuset, cg.cpu):
            try:
                _remove_cgroup(path)
            except (OSError, AssertionError) as err:
                failed.append(f"{path}: {err}")
        assert not failed, "cgroups left behind: " + "; ".join(failed)


def test_inspect_shows_the_three_parts_of_the_cgroup_state(
        spawner: Spawner, images: Path, tmp_path: Path, test_cgroups: ScratchCgroups) -> None:
    cg = test_cgroups
    ready = tmp_path / "ready.json"
    proc = spawner.workload("insp_tree", str(ready), str(tmp_path / "named.sock"))
    wait_for(ready.exists, what="insp_tree to start")
    pids = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in pids:
        for group in (cg.cpu, cg.cpuset, cg.unified):
            (group / "cgroup.procs").write_text(str(pid))
    live = {pid: read_cgroups(pid) for pid in pids}
    assert live[proc.pid]["cpu"] == cg.path and live[proc.pid][""] == cg.path

    data = dump_and_inspect(proc.pid, images, "--tcp-established", "--network-lock", "skip",
                            "--manage-cgroups", "full")
    cgroups = data["cgroups"]
    assert cgroups["recorded"] is True

    # 1. The group hierarchy: our groups, in each hierarchy, with the cgroup2 one as version 2.
    hierarchy = {h["hierarchy"]: h for h in cgroups["hierarchy"]}
    for name in ("cpu", "cpuset", ""):
        assert cg.path in hierarchy[name]["groups"], name
    assert hierarchy[""]["version"] == 2 and hierarchy["cpu"]["version"] == 1

    # 2. Which group each process sits in: what /proc/PID/cgroup said, for the hierarchies
    # where the tree has groups of its own (the only ones orthros has CRIU record: where it
    # shares the host's root group, the restorer's is the right one).
    membership = {m["pid"]: m for m in cgroups["membership"]}
    assert set(membership) == set(pids)
    own = {h for h, path in live[proc.pid].items() if path == cg.path}
    assert own == {"cpu", "cpuset", ""}
    for pid in pids:
        assert membership[pid]["groups"] == {h: live[pid][h] for h in own}
        assert not membership[pid]["in_criu_cgroups"]
    # orthros's migration file agrees, and lists what it left to the restorer
    cgfile = data["cgroup_file"]
    assert {(g["hierarchy"], g["path"]) for g in cgfile["hierarchy"]} == \
        {(h, cg.path) for h in own}
    assert "pids" in cgfile["skipped"] and "cpu" not in cgfile["skipped"]

    # 3. Every group's limit files and values.
    limits = {(g["hierarchy"], g["path"]): g["limits"] for g in cgroups["limits"]}
    assert limits[("cpu", cg.path)]["cpu.cfs_quota_us"] == "50000"
    assert limits[("cpu", cg.path)]["cpu.shares"] == "512"
    for f in ("cpuset.cpus", "cpuset.mems"):
        assert limits[("cpuset", cg.path)][f] == (cg.cpuset / f).read_text().strip()
    assert limits[("", cg.path)]["cgroup.max.descendants"] == "5"
    # Only membership markers are left out, never a limit.
    assert "cgroup.procs" not in limits[("cpu", cg.path)]


def test_inspect_refuses_what_is_not_a_checkpoint(images: Path, tmp_path: Path) -> None:
    res = run_orthros("inspect", str(tmp_path / "missing"))
    assert res.returncode == 6 and "does not exist" in res.stderr and res.stdout == ""
    res = run_orthros("inspect", str(images))
    assert res.returncode == 6 and "holds no checkpoint" in res.stderr
    assert "Traceback" not in res.stderr


def test_inspect_names_a_corrupt_image_of_a_real_dump(spawner: Spawner, images: Path,
                                                      tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = spawner.workload("insp_tree", str(ready), str(tmp_path / "named.sock"))
    wait_for(ready.exists, what="insp_tree to start")
    dump_and_inspect(proc.pid, images, "--tcp-established", "--network-lock", "skip")
    core = images / f"core-{proc.pid}.img"
    data = core.read_bytes()
    core.write_bytes(data[: len(data) // 2])
    res = run_orthros("inspect", str(images), "--json")
    assert res.returncode == 6 and res.stdout == ""
    assert f"core-{proc.pid}.img" in res.stderr and "corrupt" in res.stderr
    os.unlink(images / "pstree.img")
    res = run_orthros("inspect", str(images))
    assert res.returncode == 6 and "pstree.img is missing" in res.stderr
