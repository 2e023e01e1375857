"""The etcd workload on the lab: a 3-member cluster, one member per host, each etcd in a time
namespace of its own; a writer on the client host whose every acknowledged key is read back;
the leader frozen and a follower killed under the writer, which goes on and sees the election
in the raft term; a data dir the hosts cannot see and a member dying at start, both refused
with the reason; and nothing of the cluster left after ``stop_cluster``."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import wait_for

from orthros_py.lab import Lab
from orthros_py.run import run
from orthros_py.workloads.etcd import (
    EtcdCluster,
    EtcdError,
    Writer,
    WriterReport,
    cluster_processes,
    elections_between,
    get_all,
    key_name,
    log_tail,
    member_list,
    member_pid,
    memory,
    start_cluster,
    status,
    stop_cluster,
    time_namespace,
)

pytestmark = pytest.mark.lab(hosts=3)


@pytest.fixture
def data_root() -> Iterator[Path]:
    # Not under /tmp or the test's tmp_path: the data dirs stand for those `orthros sync`
    # snapshots, which live under /var/lib/orthros.
    root = Path("/var/lib/orthros") / f"test-etcd-{secrets.token_hex(4)}"
    root.mkdir(parents=True)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def etcd_processes() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "status"]):
        if p.info["name"] == "etcd" and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def start(lab: Lab, data_root: Path) -> EtcdCluster:
    hosts = [h.name for h in lab.hosts]
    return start_cluster(lab, hosts, data_root=data_root,
                         data_dirs={h: data_root / "data" / h for h in hosts})


def check_acked_readable(lab: Lab, cluster: EtcdCluster, report: WriterReport) -> None:
    """Every acknowledged key is in the cluster with its value; the keys acknowledged are
    1..N without a hole; anything else under the prefix is only the key in flight at the
    end."""
    n = len(report.acked)
    assert report.acked_keys == [key_name(i) for i in range(1, n + 1)]
    got = get_all(lab, cluster, "k/")
    want = report.values()
    missing = {k: v for k, v in want.items() if got.get(k) != v}
    assert not missing, f"{len(missing)} acknowledged keys lost, e.g. {list(missing)[:5]}"
    extra = set(got) - set(want)
    assert extra <= {report.pending}, f"keys nobody acknowledged: {sorted(extra)[:5]}"


def test_cluster_writer_and_cleanup(lab: Lab, data_root: Path) -> None:
    assert not etcd_processes(), "an etcd runs already: the test could not tell them apart"
    cluster = start(lab, data_root)
    try:
        assert cluster.start_seconds is not None
        print(f"\ncluster healthy {cluster.start_seconds:.2f} s after the first spawn")
        st = status(lab, cluster)
        assert st.healthy(), st.describe()
        leader = st.leader_name()
        assert leader in cluster.names
        assert {m.leader_id for m in st.members} == {st.leader()}
        assert {n: st.member(n).member_id for n in cluster.names} == member_list(lab, cluster)

        # Each etcd is the process spawned (unshare exec'd it: no fork), in a time namespace
        # that is neither this machine's nor its host's.
        machine_ns = time_namespace(os.getpid())
        for m in cluster.members:
            pid = member_pid(lab, cluster, m)
            assert m.process is not None and pid == m.process.machine_pid
            assert psutil.Process(pid).cmdline()[0] == "etcd"
            host_init = lab.host(m.host).init_pid
            assert host_init is not None
            assert time_namespace(pid) != machine_ns
            assert time_namespace(pid) != time_namespace(host_init)
            assert (m.data_dir / "member" / "wal").is_dir()
        assert len({time_namespace(p) for p in (member_pid(lab, cluster, m)
                                                for m in cluster.members) if p}) == 3

        with Writer(lab, cluster) as writer:
            time.sleep(1.0)
            # paused: nothing in flight, nothing more acknowledged
            writer.pause()
            n = writer.acked_so_far()
            time.sleep(0.3)
            assert writer.acked_so_far() == n
            writer.resume()
            time.sleep(1.0)
        report = writer.stop()
        n = len(report.acked)
        print(f"writer: {n} keys acknowledged in ~2 s, {len(report.failures)} failures, "
              f"longest gap {report.max_gap() * 1000:.0f} ms")
        assert n > 50, f"only {n} puts in 2 s"
        assert not report.failures, report.failures[:5]
        assert {a.member for a in report.acked} == set(cluster.names)  # it rotates
        assert report.pending is None
        check_acked_readable(lab, cluster, report)

        after = status(lab, cluster)
        assert after.healthy(), after.describe()
        assert elections_between(st, after) == 0, (st.describe(), after.describe())
        assert after.leader() == st.leader()
        for name, mem in memory(lab, cluster).items():
            print(f"{name}: RSS {mem.rss_kib / 1024:.1f} MiB, VmSize "
                  f"{mem.vmsize_kib / 1024:.0f} MiB, {mem.threads} threads")
    finally:
        killed = stop_cluster(lab, cluster)
    assert len(killed) == 3
    assert not cluster_processes(cluster)
    assert not etcd_processes()
    assert stop_cluster(lab, cluster) == []  # idempotent


def test_writer_survives_a_frozen_leader_and_a_killed_follower(lab: Lab,
                                                              data_root: Path) -> None:
    cluster = start(lab, data_root)
    try:
        before = status(lab, cluster)
        leader = before.leader_name()
        assert leader is not None
        follower = next(n for n in cluster.names if n != leader)
        writer = Writer(lab, cluster).start()
        writer.wait_acked(20)

        # The leader frozen past the election timeout: the others elect one of them, the
        # writer's puts through the frozen member time out and go on through the others.
        lpid = member_pid(lab, cluster, leader)
        assert lpid is not None
        os.kill(lpid, signal.SIGSTOP)
        try:
            frozen_at = time.time()
            wait_for(lambda: status(lab, cluster).leader_name() not in (None, leader),
                     timeout=15, what="a new leader")
            n = writer.acked_so_far()
            writer.wait_acked(n + 20, timeout=15)
        finally:
            os.kill(lpid, signal.SIGCONT)
        during = status(lab, cluster)
        assert elections_between(before, during) >= 1
        wait_for(lambda: status(lab, cluster).healthy(), timeout=15, what="the old leader back")

        # A follower killed: two of three still make a quorum.
        fpid = member_pid(lab, cluster, follower)
        assert fpid is not None
        os.kill(fpid, signal.SIGKILL)
        wait_for(lambda: member_pid(lab, cluster, follower) is None, timeout=10,
                 what="the follower gone")
        n = writer.acked_so_far()
        writer.wait_acked(n + 20, timeout=15)
        report = writer.stop()

        assert report.acked_between(frozen_at, time.time())
        failed_on = {f.member for f in report.failures}
        assert leader in failed_on and follower in failed_on, report.failures[:5]
        print(f"\n{len(report.acked)} acked, {len(report.failures)} failures, longest gap "
              f"{report.max_gap() * 1000:.0f} ms, terms {before.term()} -> "
              f"{status(lab, cluster).term()}")
        for f in report.failures[:3]:
            print(f"  {f.key} on {f.member}: {f.error}")
        check_acked_readable(lab, cluster, report)
        end = status(lab, cluster)
        assert not end.healthy() and not end.member(follower).reachable
        for m in cluster.members:
            print(f"--- {m.name} log:\n{log_tail(m.log, 8)}")
    finally:
        stop_cluster(lab, cluster)
    assert not cluster_processes(cluster)
    assert not etcd_processes()


def test_start_refuses_a_late_mount_and_reports_a_dying_member(lab: Lab,
                                                               data_root: Path) -> None:
    hosts = [h.name for h in lab.hosts]
    # A file system mounted on the machine after `lab up` is not in the hosts' private mount
    # namespaces: etcd there would write under it, not to it. start_cluster says so.
    late = data_root / "late"
    late.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=1m", "orthros-test-etcd", str(late)])
    try:
        with pytest.raises(EtcdError, match="sees another directory"):
            start_cluster(lab, hosts, data_root=data_root, data_dirs={hosts[0]: late})
    finally:
        run(["umount", str(late)])
    assert not etcd_processes()

    # A member that dies at start: the error carries its log; nothing is left running.
    with pytest.raises(EtcdError, match="unknown level") as err:
        start_cluster(lab, hosts, data_root=data_root / "bad", timeout=20,
                      log_level="bogus")
    assert "exited" in str(err.value)
    assert not etcd_processes()
