"""Attributing CRIU's log time to the parts of a container checkpoint."""

from __future__ import annotations

import pytest

from orthros_py.criu.log import part_times

DUMP = """\
(00.010000) Add uts ns 4 pid 100
(00.010500) Will take mnt namespace in the image
(00.011000) mnt: Building mountpoints tree
(00.013000) cg: Dumping cgroups for thread 100
(00.016000) unix: Dumping unix socket 1
(00.016200) unix: Dumping unix socket 2
(00.017000) Dumping opened files (pid: 100)
(00.020000) cg: Writing CG image
(00.021000) Writing image inventory
""".splitlines()

# Two tasks interleave: each line's time runs to its own task's next line.
RESTORE = """\
(00.100000)      1: Restoring namespaces 1 flags 0x2c028000
(00.101000)      1: kernel/hostname nr 11
(00.102000)      2: unix: Opening slave (stage 2)
(00.102500)      1: mnt: Restoring mount namespace
(00.104000)      2: unix: Opening slave (stage 2)
(00.106000)      1: Restored
(00.107000)      2: Restored
""".splitlines()


def test_dump_parts_count_the_time_between_their_own_lines() -> None:
    t = part_times(DUMP)
    assert t["namespaces"] == pytest.approx(0.5)  # 10.0 -> 10.5; the gap to mnt: is not its
    assert t["unix"] == pytest.approx(0.2)  # 16.0 -> 16.2
    assert t["mounts"] == 0.0 and t["cgroup"] == 0.0  # single lines: no stretch of their own


def test_restore_parts_follow_each_task_and_count_overlaps_once() -> None:
    t = part_times(RESTORE)
    assert t["namespaces"] == pytest.approx(1.0)  # task 1: 100.0 -> 101.0
    assert t["unix"] == pytest.approx(2.0)  # task 2: 102.0 -> 104.0, across task 1's lines
    both = part_times([*RESTORE, "(00.103000)      3: unix: x", "(00.105000)      3: unix: y"])
    assert both["unix"] == pytest.approx(3.0)  # 102 -> 104 and 103 -> 105 overlap: 102 -> 105


def test_lines_without_a_timestamp_are_skipped() -> None:
    assert part_times(["garbage", "(00.1) cg: x", "(00.2) cg: y"])["cgroup"] == pytest.approx(100)
