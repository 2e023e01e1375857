"""The etcd workload's pure parts: the member's command line (the unshare prefix that gives etcd
a time namespace, the cluster string, the flags that keep it small), URLs, base64, prefix
ranges, the gateway's answers and errors, what a status says (leader, term, health, elections)
and what a writer's report computes. Nothing here starts etcd or needs root."""

from __future__ import annotations

from pathlib import Path

import pytest

from orthros_py.lab import HostProcess
from orthros_py.workloads.etcd import (
    Ack,
    ClusterState,
    EtcdCluster,
    EtcdError,
    EtcdMember,
    MemberState,
    WriterReport,
    b64,
    client_url,
    elections_between,
    etcd_argv,
    initial_cluster,
    key_name,
    log_tail,
    parse_reply,
    peer_url,
    prefix_end,
    split_url,
    unb64,
    value_for,
)

HOSTS = {"alpha": "10.77.0.11", "beta": "10.77.0.12", "gamma": "10.77.0.13"}


def cluster() -> EtcdCluster:
    members = tuple(EtcdMember(name=h, host=h, address=a, data_dir=Path(f"/d/{h}"))
                    for h, a in HOSTS.items())
    return EtcdCluster(members, token="orthros-tok", client_host="client")


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, name
    return argv[argv.index(name) + 1]


def test_argv_runs_etcd_under_unshare_time_without_fork() -> None:
    c = cluster()
    argv = etcd_argv(c.members[0], c, heartbeat_ms=100, election_ms=500, data_dir="/d/alpha")
    assert argv[:4] == ["unshare", "--time", "--", "etcd"]
    # no --fork: unshare execs etcd, so the spawned pid is etcd's own
    assert "--fork" not in argv and "-f" not in argv


def test_argv_flags() -> None:
    c = cluster()
    beta = c.member("beta")
    argv = etcd_argv(beta, c, heartbeat_ms=50, election_ms=400, data_dir=Path("/x/beta"))
    assert flag(argv, "--name") == "beta"
    assert flag(argv, "--data-dir") == "/x/beta"
    assert flag(argv, "--listen-peer-urls") == "http://10.77.0.12:2380"
    assert flag(argv, "--initial-advertise-peer-urls") == "http://10.77.0.12:2380"
    assert flag(argv, "--listen-client-urls") == "http://10.77.0.12:2379"
    assert flag(argv, "--advertise-client-urls") == "http://10.77.0.12:2379"
    assert flag(argv, "--initial-cluster") == (
        "alpha=http://10.77.0.11:2380,beta=http://10.77.0.12:2380,gamma=http://10.77.0.13:2380")
    assert flag(argv, "--initial-cluster-state") == "new"
    assert flag(argv, "--initial-cluster-token") == "orthros-tok"
    assert flag(argv, "--heartbeat-interval") == "50"
    assert flag(argv, "--election-timeout") == "400"
    assert flag(argv, "--quota-backend-bytes") == str(64 << 20)
    assert 0 < int(flag(argv, "--snapshot-count")) <= 100000
    assert flag(argv, "--logger") == "zap"
    assert flag(argv, "--log-outputs") == "stderr"
    assert flag(argv, "--log-level") == "warn"
    assert "--pre-vote=false" in argv
    assert all(isinstance(a, str) for a in argv)


def test_argv_options() -> None:
    c = cluster()
    argv = etcd_argv(c.members[2], c, heartbeat_ms=100, election_ms=1000, data_dir="/d",
                     snapshot_count=500, quota_backend_bytes=32 << 20, log_level="error",
                     pre_vote=True, etcd="/usr/bin/etcd")
    assert argv[3] == "/usr/bin/etcd"
    assert flag(argv, "--snapshot-count") == "500"
    assert flag(argv, "--quota-backend-bytes") == str(32 << 20)
    assert flag(argv, "--log-level") == "error"
    assert "--pre-vote=true" in argv


@pytest.mark.parametrize(("hb", "el"), [(100, 499), (0, 500), (100, 60000)])
def test_argv_refuses_timings_etcd_refuses(hb: int, el: int) -> None:
    c = cluster()
    with pytest.raises(ValueError):
        etcd_argv(c.members[0], c, heartbeat_ms=hb, election_ms=el, data_dir="/d")


def test_cluster_lookup_and_urls() -> None:
    c = cluster()
    assert c.names == ["alpha", "beta", "gamma"]
    assert c.member("gamma").client_url == "http://10.77.0.13:2379"
    assert c.member("gamma").peer_url == "http://10.77.0.13:2380"
    assert c.initial_cluster == initial_cluster(c.members)
    with pytest.raises(KeyError):
        c.member("delta")
    assert peer_url("1.2.3.4") == "http://1.2.3.4:2380"
    assert client_url("1.2.3.4") == "http://1.2.3.4:2379"
    assert split_url("http://10.77.0.11:2379") == ("10.77.0.11", 2379)
    for bad in ("https://a:1", "http://a", "a:1", "http://:2379"):
        with pytest.raises(ValueError):
            split_url(bad)


def test_member_keeps_the_spawned_process() -> None:
    m = EtcdMember("alpha", "alpha", "10.77.0.11", Path("/d"), process=HostProcess("alpha", 7, 9))
    assert m.process is not None and m.process.host_pid == 7


def test_base64() -> None:
    assert b64("foo") == "Zm9v"
    assert b64(b"\x00\xff") == "AP8="
    assert unb64("Zm9v") == b"foo"
    assert unb64(b64("k/000001")).decode() == "k/000001"
    with pytest.raises(ValueError):
        unb64("not base64!")


def test_prefix_end() -> None:
    assert prefix_end("k/") == b"k0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\x00"
    assert prefix_end("") == b"\x00"
    assert prefix_end("k/") > b"k/999999" and prefix_end("k/") <= b"k0"


def test_keys_and_values() -> None:
    assert key_name(1) == "k/000001"
    assert key_name(123, "w/", 3) == "w/123"
    assert key_name(1234567) == "k/1234567"
    assert sorted([key_name(i) for i in (10, 9, 100)]) == [key_name(i) for i in (9, 10, 100)]
    assert value_for(7) == "v7-" + "x" * 13 and len(value_for(7)) == 16
    assert value_for(123456, 4) == "v123456-"
    assert len(value_for(1, 1000)) == 1000


def test_parse_reply() -> None:
    ok = parse_reply(200, b'{"header":{"revision":"5"}}')
    assert ok["header"]["revision"] == "5"
    assert parse_reply(200, b"") == {}
    with pytest.raises(EtcdError) as err:
        parse_reply(503, b'{"error":"etcdserver: no leader","message":"etcdserver: no leader",'
                         b'"code":14}', "/v3/kv/put")
    assert err.value.code == 14 and err.value.http_status == 503
    assert "no leader" in str(err.value)
    with pytest.raises(EtcdError):
        parse_reply(200, b'{"error":"x","code":2}')
    with pytest.raises(EtcdError):
        parse_reply(502, b"<html>bad gateway</html>")
    with pytest.raises(EtcdError):
        parse_reply(200, b"[1]")


STATUS = {"header": {"cluster_id": "1", "member_id": "11", "revision": "42", "raft_term": "3"},
          "version": "3.4.23", "dbSize": "20480", "leader": "12", "raftIndex": "77",
          "raftTerm": "3", "raftAppliedIndex": "77", "dbSizeInUse": "16384"}


def state(*members: MemberState) -> ClusterState:
    return ClusterState(tuple(members), 0.0)


def ms(name: str, mid: int, leader: int, term: int) -> MemberState:
    return MemberState(name, True, 0.0, member_id=mid, leader_id=leader, raft_term=term)


def test_member_state_of_a_status_reply() -> None:
    s = MemberState.of_reply("alpha", STATUS, 1.0)
    assert (s.member_id, s.leader_id, s.raft_term, s.raft_index, s.applied_index, s.revision,
            s.db_size, s.version) == (11, 12, 3, 77, 77, 42, 20480, "3.4.23")
    # protobuf's JSON leaves zeros out: a member without a leader has no "leader"
    lost = MemberState.of_reply("alpha", {"header": {"member_id": "11"}, "raftTerm": "4"}, 1.0)
    assert lost.leader_id is None and lost.raft_term == 4
    assert "term 4" in lost.line()


def test_cluster_state_healthy_leader_term() -> None:
    s = state(ms("alpha", 11, 12, 3), ms("beta", 12, 12, 3), ms("gamma", 13, 12, 3))
    assert s.healthy() and s.leader() == 12 and s.leader_name() == "beta" and s.term() == 3


def test_cluster_state_unhealthy() -> None:
    down = MemberState("gamma", False, 0.0, error="timed out")
    s = state(ms("alpha", 11, 12, 3), ms("beta", 12, 12, 3), down)
    assert not s.healthy() and s.leader() == 12 and "unreachable" in s.describe()
    split = state(ms("alpha", 11, 11, 4), ms("beta", 12, 12, 3), ms("gamma", 13, 12, 3))
    assert not split.healthy() and split.leader() is None and split.term() == 4
    leaderless = state(ms("alpha", 11, 0, 5), ms("beta", 12, 0, 5), ms("gamma", 13, 0, 5))
    assert not leaderless.healthy() and leaderless.leader() is None
    stranger = state(ms("alpha", 11, 99, 3), ms("beta", 12, 99, 3), ms("gamma", 13, 99, 3))
    assert not stranger.healthy()  # a leader none of them is
    mixed_terms = state(ms("alpha", 11, 12, 3), ms("beta", 12, 12, 4), ms("gamma", 13, 12, 3))
    assert not mixed_terms.healthy()
    assert state().term() is None and not state().healthy()


def test_elections_between() -> None:
    before = state(ms("alpha", 11, 12, 3), ms("beta", 12, 12, 3))
    same = state(ms("alpha", 11, 12, 3), ms("beta", 12, 12, 3))
    after = state(ms("alpha", 11, 11, 5), ms("beta", 12, 11, 5))
    assert elections_between(before, same) == 0
    assert elections_between(before, after) == 2
    with pytest.raises(ValueError):
        elections_between(before, state(MemberState("alpha", False, 0.0)))


def test_writer_report() -> None:
    acks = tuple(Ack(key_name(i), value_for(i), "alpha", 10 + i, 100.0 + i, 100.1 + i)
                 for i in (1, 2, 3))
    r = WriterReport((*acks, Ack(key_name(4), value_for(4), "beta", 20, 107.0, 108.5)), (),
                     None, 100.0, 109.0)
    assert r.acked_keys == [key_name(i) for i in (1, 2, 3, 4)]
    assert r.last_acked is not None and r.last_acked.key == "k/000004"
    assert r.values()["k/000002"] == value_for(2)
    assert r.max_gap() == pytest.approx(108.5 - 103.1)
    assert [a.key for a in r.acked_between(102.0, 104.0)] == ["k/000002", "k/000003"]
    empty = WriterReport((), (), "k/000001", 100.0, None)
    assert empty.max_gap() == 0.0 and empty.last_acked is None


def test_log_tail_keeps_a_panic_reason(tmp_path: Path) -> None:
    log = tmp_path / "alpha.log"
    log.write_text("panic: unknown level \"bogus\"\n\n" + "".join(f"\tframe {i}\n" for i in range(40)))
    tail = log_tail(log, 5)
    assert tail.splitlines()[0] == 'panic: unknown level "bogus"'
    assert tail.splitlines()[-1] == "\tframe 39" and len(tail.splitlines()) == 7
    log.write_text("a\nb\n")
    assert log_tail(log) == "a\nb"
    assert "cannot read" in log_tail(tmp_path / "none.log")
    assert log_tail(None) == "(no log)"
