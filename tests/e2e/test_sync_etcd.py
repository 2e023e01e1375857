"""``orthros sync`` on a real 3-member etcd cluster (Debian's etcd-server), one member per lab
host, heartbeat 100 ms and election timeout 500 ms, data directories on a loop-mounted btrfs,
under a client writing keys: saved, written on, restored, restored again; the cluster wakes up
with the leader and the raft term it had at the save, with exactly the keys it had then.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for
from migrate_kit import host

from orthros_py.lab import Lab, teardown
from orthros_py.policies.sync import SyncRestore, SyncSave, delete_snapshot, parse_members
from orthros_py.workloads import etcd

HOSTS = ("alpha", "beta", "gamma")
PREFIX = "k/"


@contextlib.contextmanager
def btrfs_volume(size_mib: int = 1024) -> Iterator[Path]:
    """A btrfs filesystem on a loop device, mounted under /var/lib/orthros (where agents take
    data directories from); always unmounted, detached and removed."""
    base = Path("/var/lib/orthros") / f"test-etcd-{uuid.uuid4().hex[:8]}"
    image = base.with_suffix(".img")
    base.mkdir(parents=True)
    loop = None
    try:
        with open(image, "wb") as f:
            f.truncate(size_mib << 20)
        subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
        loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                              capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", loop, str(base)], check=True, capture_output=True)
        yield base
    finally:
        subprocess.run(["umount", "-l", str(base)], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            base.rmdir()


@pytest.fixture
def etcd_lab() -> Iterator[tuple[Lab, Path]]:
    # The volume is mounted before the lab: lab hosts see the mounts made before they were.
    with btrfs_volume() as vol:
        teardown()
        try:
            yield Lab.up(3, agents=True, rebuild=True), vol
        finally:
            teardown()


def keys(lab: Lab, cluster: etcd.EtcdCluster) -> list[str]:
    return sorted(etcd.get_all(lab, cluster, PREFIX))


def assert_snapshot_state(got: list[str], before: list[str], sent_by: float,
                          report: etcd.WriterReport) -> None:
    """The keys are a prefix k/1..k/M of what the writer wrote: every key acknowledged before
    the save began, and nothing sent after it ended (the one key in flight at the freeze may go
    either way)."""
    assert got == [etcd.key_name(i, PREFIX) for i in range(1, len(got) + 1)], got[-5:]
    assert set(before) <= set(got), sorted(set(before) - set(got))[:5]
    late = [a.key for a in report.acked if a.sent > sent_by]
    assert not set(late) & set(got), sorted(set(late) & set(got))[:5]


def test_etcd_cluster_wakes_up_as_it_was_saved(etcd_lab: tuple[Lab, Path]) -> None:
    lab, vol = etcd_lab
    dirs = {h: vol / h for h in HOSTS}
    # Logs in VOL/logs: outside the data directories (which a restore rolls back).
    cluster = etcd.start_cluster(lab, HOSTS, data_root=vol, data_dirs=dirs,
                                 heartbeat_ms=100, election_ms=500)
    hs = {h.name: host(lab, h.name) for h in lab.hosts}
    # Named as the inventory's [[group]] "etcd" names them: by process name on each host.
    members = parse_members([f"{m.host}:etcd" for m in cluster.members],
                            [f"{m.host}:{dirs[m.host]}" for m in cluster.members])
    writer = etcd.Writer(lab, cluster).start()
    try:
        writer.wait_acked(200, timeout=30)
        at_save = etcd.status(lab, cluster)
        assert at_save.healthy(), at_save.describe()

        # Snapshot A, left running: no election, and the writer goes on.
        acked_a = list(writer.report().acked_keys)
        rep_a = SyncSave(hs, "a", members, leave_running=True).run()
        end_a = time.time()
        assert all(m["timens"] for m in rep_a.members)
        assert sorted(m["pid"] for m in rep_a.members) == sorted(
            m.process.host_pid for m in cluster.members if m.process is not None)
        assert all(d["method"] in ("reflink", "btrfs-subvolume")
                   for m in rep_a.members for d in m["data"]), rep_a.members
        n = writer.acked_so_far()
        writer.wait_acked(n + 200, timeout=30)
        after_a = etcd.status(lab, cluster)
        assert after_a.term() == at_save.term(), (at_save.describe(), after_a.describe())
        assert after_a.leader() == at_save.leader()

        # Snapshot B, later, also left running; then more writes.
        acked_b = list(writer.report().acked_keys)
        SyncSave(hs, "b", members, leave_running=True).run()
        end_b = time.time()
        writer.wait_acked(writer.acked_so_far() + 200, timeout=30)

        for name, t1, acked in (("a", end_a, acked_a), ("b", end_b, acked_b),
                                ("a", end_a, acked_a)):
            writer.pause()
            SyncRestore(hs, name).run()
            # Healthy at once, with the leader and term of the save: no election happened.
            now = etcd.status(lab, cluster)
            assert now.healthy(), (name, now.describe())
            assert now.leader() == at_save.leader(), (name, now.describe())
            assert now.term() == at_save.term(), (name, now.describe())
            assert_snapshot_state(keys(lab, cluster), acked, t1, writer.report())
            writer.resume()
            n = writer.acked_so_far()
            writer.wait_acked(n + 50, timeout=30)  # the client can write again
            settled = etcd.status(lab, cluster)
            assert settled.term() == at_save.term(), (name, settled.describe())

        # Control: the same restore with the members resumed 1.5 s apart, in turn (the seed
        # left ~0.4 s of skew; a 500 ms election timeout cannot ride out 3 s): an election.
        writer.pause()
        SyncRestore(hs, "a", stagger_ms=1500).run()
        writer.resume()
        wait_for(lambda: etcd.status(lab, cluster).healthy(), timeout=30,
                 what="the cluster to elect a leader again")
        assert etcd.status(lab, cluster).term() > at_save.term(), "no election without sync"
    finally:
        report = writer.stop()
        with contextlib.suppress(Exception):
            for snap in ("a", "b"):
                delete_snapshot(list(hs.values()), snap)
        etcd.stop_cluster(lab, cluster)
    assert report.acked, "the writer never wrote"
    wait_for(lambda: not etcd.cluster_processes(cluster), timeout=10, what="etcd to go")
