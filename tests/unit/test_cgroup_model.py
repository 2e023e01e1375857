"""The cgroup migration file: text round trip, rebasing onto another host's layout, diff."""

from __future__ import annotations

import pytest

from orthros_py.cgroup.model import (
    V2,
    CgroupFile,
    Group,
    Member,
    diff,
    format_cpu_list,
    parse_cpu_list,
)

SAMPLE = CgroupFile(
    roots=(("cpu,cpuacct", "/lab/alpha/ctr"), ("cpuset", "/lab/alpha/ctr"), (V2, "/lab/alpha/ctr")),
    groups=(
        Group("cpu,cpuacct", "/lab/alpha/ctr",
              (("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "50000"))),
        Group("cpu,cpuacct", "/lab/alpha/ctr/inner", (("cpu.shares", "512"),)),
        Group("cpuset", "/lab/alpha/ctr", (("cpuset.cpus", "0-1"), ("cpuset.mems", "0"))),
        Group(V2, "/lab/alpha/ctr", (("hugetlb.2MB.max", "4194304"),
                                     ("cgroup.max.descendants", "5"))),
    ),
    members=(Member(1, (("cpu,cpuacct", "/lab/alpha/ctr"), (V2, "/lab/alpha/ctr"))),
             Member(2, (("cpu,cpuacct", "/lab/alpha/ctr/inner"),))),
    skipped=("memory", "name=systemd"),
)


def test_text_round_trip_keeps_all_three_parts() -> None:
    text = SAMPLE.to_text()
    assert "[hierarchy]" in text and "[membership]" in text and "[limits]" in text
    assert "unified /lab/alpha/ctr hugetlb.2MB.max = 4194304" in text
    assert CgroupFile.from_text(text) == SAMPLE


def test_rebase_moves_each_hierarchy_below_its_new_root() -> None:
    moved = SAMPLE.rebased({"cpu,cpuacct": "/lab/beta/ctr", V2: "/lab/beta/ctr"})
    assert moved.root_map == {"cpu,cpuacct": "/lab/beta/ctr", "cpuset": "/lab/alpha/ctr",
                              V2: "/lab/beta/ctr"}
    assert [g.path for g in moved.groups] == ["/lab/beta/ctr", "/lab/beta/ctr/inner",
                                             "/lab/alpha/ctr", "/lab/beta/ctr"]
    assert moved.members[1].path_in("cpu,cpuacct") == "/lab/beta/ctr/inner"
    # limits travel unchanged
    assert moved.groups[0].limits == SAMPLE.groups[0].limits
    # a path that merely shares a prefix is not below the root
    odd = CgroupFile(roots=(("cpu", "/a"),), groups=(Group("cpu", "/ab"),))
    assert odd.rebased({"cpu": "/b"}).groups[0].path == "/ab"


def test_diff_names_changed_and_missing_limits() -> None:
    assert diff(SAMPLE, SAMPLE) == []
    changed = CgroupFile(SAMPLE.roots, (
        Group("cpu,cpuacct", "/lab/alpha/ctr", (("cpu.cfs_period_us", "100000"),
                                                ("cpu.cfs_quota_us", "-1"))),
        *SAMPLE.groups[2:]), SAMPLE.members)
    out = diff(SAMPLE, changed)
    assert "cpu,cpuacct /lab/alpha/ctr: cpu.cfs_quota_us is -1, expected 50000" in out
    assert "cpu,cpuacct /lab/alpha/ctr/inner: cpu.shares is missing (expected 512)" in out
    assert "cpu,cpuacct /lab/alpha/ctr/inner: the group is missing" in out


@pytest.mark.parametrize("text, why", [
    ("hello\n", "first line"),
    ("# orthros cgroup migration file v1\n[bogus]\n", "unknown section"),
    ("# orthros cgroup migration file v1\n[hierarchy]\ngroup cpu relative\n", "absolute"),
    ("# orthros cgroup migration file v1\n[limits]\ncpu /x cpu.shares = 2\n", "not listed"),
    ("# orthros cgroup migration file v1\n[membership]\npid 1 cpu\n", "HIERARCHY:PATH"),
    ("# orthros cgroup migration file v1\ngroup cpu /x\n", "outside any section"),
])
def test_bad_files_are_refused_with_the_line(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        CgroupFile.from_text(text)
    assert "line" in str(info.value) or why == "first line"


@pytest.mark.parametrize("text, cpus", [
    ("0-2,5", {0, 1, 2, 5}), ("0", {0}), ("", set()), ("1-1", {1}), ("0-1\n", {0, 1}),
])
def test_cpu_lists(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus
    if cpus:
        assert parse_cpu_list(format_cpu_list(cpus)) == cpus
    assert format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


def test_new_roots_match_comounted_controllers_and_the_wildcard() -> None:
    assert SAMPLE.new_roots({"cpuacct,cpu": "/x"}) == {"cpu,cpuacct": "/x"}
    assert SAMPLE.new_roots({"*": "/all", "cpuset": "/c"}) == {
        "cpu,cpuacct": "/all", "cpuset": "/c", V2: "/all"}


def test_relocated_moves_only_what_sits_under_the_source_root() -> None:
    f = CgroupFile(roots=(("cpu", "/lab/alpha/ctr"), ("pids", "/elsewhere")))
    assert f.relocated("/lab/alpha", "/lab/beta") == {"cpu": "/lab/beta/ctr"}
    assert f.relocated("/", "/lab/beta") == {"cpu": "/lab/beta/lab/alpha/ctr",
                                             "pids": "/lab/beta/elsewhere"}
    assert f.relocated("/lab/alpha", "/") == {"cpu": "/ctr"}
    assert f.relocated("/same", "/same") == {}


@pytest.mark.parametrize("path", ["/a/../../etc", "/./x", "relative"])
def test_paths_out_of_the_hierarchy_are_refused(path: str) -> None:
    text = f"# orthros cgroup migration file v1\n[hierarchy]\ngroup cpu {path}\n"
    with pytest.raises(ValueError, match="line 3"):
        CgroupFile.from_text(text)


def test_the_yard_is_the_common_parent_when_criu_would_name_the_mounts_alike() -> None:
    from pathlib import Path

    from orthros_py.cgroup.fs import CgroupFs

    hybrid = CgroupFs({"cpu,cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct"),
                       "name=systemd": Path("/sys/fs/cgroup/systemd"),
                       V2: Path("/sys/fs/cgroup/unified")})
    assert hybrid.yard() == "/sys/fs/cgroup"
    assert CgroupFs({V2: Path("/sys/fs/cgroup")}).yard() is None  # pure v2
    assert CgroupFs({"cpu": Path("/sys/fs/cgroup/cpu"), "pids": Path("/x/pids")}).yard() is None
    assert CgroupFs({"cpu,cpuacct": Path("/c/cpu")}).yard() is None  # a symlink's name
