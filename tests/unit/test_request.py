"""CRIU request builders: every CLI flag lands in the right protobuf field."""

from __future__ import annotations

import pytest
from pycriu import rpc_pb2 as rpc

from orthros_py.criu.binary import parse_version
from orthros_py.criu.request import (
    CgroupMode,
    CriuNetworkLock,
    DumpOptions,
    RestoreOptions,
    dump_request,
    feature_request,
    restore_request,
    set_dirty_track_sk,
)


def test_dump_request_carries_every_option() -> None:
    req = dump_request(
        DumpOptions(pid=42, leave_running=True, tcp_established=True, ext_unix_sk=True,
                    shell_job=True, manage_cgroups=CgroupMode.FULL,
                    network_lock=CriuNetworkLock.SKIP, page_server=("10.0.0.2", 27000),
                    parent_img="../gen1", external=("mnt[/data]:data",), notify=True),
        images_dir_fd=7)
    o = req.opts
    assert req.type == rpc.DUMP
    assert (o.pid, o.images_dir_fd, o.log_file) == (42, 7, "dump.log")
    assert o.leave_running and o.tcp_established and o.ext_unix_sk and o.shell_job
    assert o.manage_cgroups and o.manage_cgroups_mode == rpc.FULL
    assert o.network_lock == rpc.SKIP
    assert (o.ps.address, o.ps.port) == ("10.0.0.2", 27000)
    assert o.parent_img == "../gen1"
    assert list(o.external) == ["mnt[/data]:data"]
    assert o.notify_scripts


def test_dump_defaults_match_criu_cli() -> None:
    o = dump_request(DumpOptions(pid=5), images_dir_fd=3).opts
    assert not o.leave_running and not o.tcp_established
    assert o.manage_cgroups_mode == rpc.SOFT
    assert o.network_lock == rpc.IPTABLES
    assert not o.HasField("ps") and not o.HasField("parent_img")


def test_dump_needs_a_pid() -> None:
    with pytest.raises(ValueError):
        dump_request(DumpOptions(), images_dir_fd=3)


@pytest.mark.parametrize(("mode", "wire", "managed"), [
    (CgroupMode.NONE, rpc.CG_NONE, False), (CgroupMode.PROPS, rpc.PROPS, True),
    (CgroupMode.SOFT, rpc.SOFT, True), (CgroupMode.FULL, rpc.FULL, True),
    (CgroupMode.STRICT, rpc.STRICT, True), (CgroupMode.IGNORE, rpc.IGNORE, True),
])
def test_cgroup_modes(mode: CgroupMode, wire: int, managed: bool) -> None:
    o = restore_request(RestoreOptions(manage_cgroups=mode), images_dir_fd=3).opts
    assert o.manage_cgroups_mode == wire
    assert o.manage_cgroups is managed


def test_restore_request_is_sibling_and_maps_cgroup_roots() -> None:
    req = restore_request(RestoreOptions(tcp_established=True, network_lock=CriuNetworkLock.NFTABLES,
                                         cgroup_roots={"cpu": "/moved", "": "/v2",
                                                       "*": "/all"}),
                          images_dir_fd=9)
    o = req.opts
    assert req.type == rpc.RESTORE
    assert o.rst_sibling and o.tcp_established and o.log_file == "restore.log"
    assert o.network_lock == rpc.NFTABLES
    roots = {(r.ctrl if r.HasField("ctrl") else None, r.path) for r in o.cg_root}
    assert roots == {("cpu", "/moved"), ("", "/v2"), (None, "/all")}


def test_feature_request_asks_for_tracking_and_lazy_pages() -> None:
    req = feature_request()
    assert req.type == rpc.FEATURE_CHECK
    assert req.features.mem_track and req.features.lazy_pages


def test_requests_round_trip_through_the_wire() -> None:
    req = dump_request(DumpOptions(pid=1234, tcp_established=True), images_dir_fd=4)
    again = rpc.criu_req()
    again.ParseFromString(req.SerializeToString())
    assert again == req


@pytest.mark.parametrize(("text", "version"), [
    ("Version: 4.2.1\n", (4, 2, 1)),
    ("Version: 4.2\nGitID: v4.2-12-gabc\n", (4, 2)),
    ("criu: command not understood", None),
])
def test_parse_version(text: str, version: tuple[int, ...] | None) -> None:
    assert parse_version(text) == version


def test_orthros_lock_methods_map_to_criu_methods() -> None:
    from orthros_py.netlock.tree import NetworkLock

    # xdp locks outside CRIU, so CRIU itself must lock nothing; skip means nobody locks.
    assert NetworkLock.XDP.criu is CriuNetworkLock.SKIP
    assert NetworkLock.SKIP.criu is CriuNetworkLock.SKIP
    assert NetworkLock.IPTABLES.criu is CriuNetworkLock.IPTABLES
    assert NetworkLock.NFTABLES.criu is CriuNetworkLock.NFTABLES


def test_cgroup_dump_controllers_and_yard_reach_criu() -> None:
    d = dump_request(DumpOptions(pid=7, cgroup_dump_controllers=("cpu,cpuacct", "")), 3)
    assert list(d.opts.cgroup_dump_controller) == ["cpu,cpuacct", ""]
    r = restore_request(RestoreOptions(cgroup_yard="/sys/fs/cgroup"), 3)
    assert r.opts.cgroup_yard == "/sys/fs/cgroup"
    assert not restore_request(RestoreOptions(), 3).opts.HasField("cgroup_yard")


def test_incremental_dump_and_the_tracking_socket() -> None:
    o = dump_request(DumpOptions(pid=5, leave_running=True, track_mem=True, parent_img="../gen1"),
                     images_dir_fd=3).opts
    assert o.track_mem and o.parent_img == "../gen1"
    # The socket CRIU hands its tracking userfaultfds over is the session's, never an option.
    assert not o.HasField("dirty_track_sk")
    set_dirty_track_sk(o, 9)
    assert o.dirty_track_sk == 9
    wire = rpc.criu_opts()
    wire.ParseFromString(o.SerializeToString())
    assert wire.dirty_track_sk == 9
    with pytest.raises(ValueError):
        set_dirty_track_sk(o, -1)
