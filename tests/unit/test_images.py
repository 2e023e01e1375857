"""Reading CRIU image directories (orthros_py.criu.images) without root.

The dict fixtures have the shapes pycriu gives for real CRIU 4.2.1 dumps made on the project's
test machine; the synthetic directories are written with pycriu's own image writer.
"""

from __future__ import annotations

import io
import json
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from pycriu import images as pimages

from orthros_py.cli import main
from orthros_py.cli.context import Env
from orthros_py.criu.images import (
    PAGE_SIZE,
    FdRef,
    ImageSet,
    core_cg_set,
    fd_owners,
    inet_address,
    parse_cgroups,
    parse_memory,
    parse_namespaces,
    parse_processes,
    parse_tcp,
    parse_unix,
    read_images,
    unix_name,
)
from orthros_py.errors import BadImageError, ExitStatus

ROOT_IDS = {"vm_id": 1, "files_id": 1, "fs_id": 1, "sighand_id": 1, "pid_ns_id": 1,
            "net_ns_id": 2, "ipc_ns_id": 3, "uts_ns_id": 4, "mnt_ns_id": 6, "user_ns_id": 7,
            "cgroup_ns_id": 8, "time_ns_id": 5}


def words(addr: str) -> list[int]:
    """An address as CRIU stores it: network-order bytes read as native 32-bit words."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    raw = socket.inet_pton(family, addr)
    return list(struct.unpack(f"={len(raw) // 4}I", raw))


def ids(files_id: int, **ns: int) -> dict[str, int]:
    return {**ROOT_IDS, "vm_id": files_id, "files_id": files_id, "fs_id": files_id,
            "sighand_id": files_id, **ns}


def core(comm: str, cg_set: int | None = None, *, old: bool = False,
         state: int = 1) -> dict[str, Any]:
    tc: dict[str, Any] = {"task_state": state, "exit_code": 0, "personality": 0, "flags": 0,
                          "blk_sigset": 0, "comm": comm}
    thread: dict[str, Any] = {"futex_rla": 0, "futex_rla_len": 0}
    if cg_set is not None:
        (tc if old else thread)["cg_set"] = cg_set
    return {"mtype": "X86_64", "tc": tc, "thread_core": thread}


# A v1 cpu hierarchy with a nested group, cpuset co-mounted with nothing, and the cgroup2
# hierarchy (controller ""), as CRIU 4.2.1 wrote them with --manage-cgroups full.
CGROUP = {
    "sets": [
        {"id": 2, "ctls": [
            {"name": "", "path": "/orthros-t"},
            {"name": "cpu", "path": "/orthros-t"},
            {"name": "cpuset", "path": "/orthros-t"},
            {"name": "memory", "path": "/process_api/abc"},
        ]},
        {"id": 3, "ctls": [
            {"name": "", "path": "/"},
            {"name": "cpu", "path": "/orthros-t/sub"},
            {"name": "cpuset", "path": "/"},
            {"name": "memory", "path": "/process_api/abc"},
        ]},
    ],
    "controllers": [
        {"cnames": ["cpu"], "is_threaded": True, "dirs": [
            {"dir_name": "orthros-t", "dir_perms": {"mode": 0o40755, "uid": 0, "gid": 0},
             "properties": [
                 {"name": "cpu.shares", "value": "512"},
                 {"name": "cpu.cfs_quota_us", "value": "50000"},
                 {"name": "cgroup.procs", "value": ""},
                 {"name": "tasks", "value": ""},
             ],
             "children": [
                 {"dir_name": "sub", "properties": [{"name": "cpu.shares", "value": "1024"}],
                  "children": [{"dir_name": "leaf"}]},
             ]},
        ]},
        {"cnames": ["cpuset"], "is_threaded": True, "dirs": [
            {"dir_name": "orthros-t", "properties": [{"name": "cpuset.cpus", "value": "0"},
                                                     {"name": "cpuset.mems", "value": "0"}]},
        ]},
        {"cnames": ["memory"], "is_threaded": True, "dirs": [
            # A top-level dir_name may hold several path components.
            {"dir_name": "process_api/abc",
             "properties": [{"name": "memory.limit_in_bytes", "value": "9223372036854771712"}]},
        ]},
        {"cnames": [""], "is_threaded": False, "dirs": [
            {"dir_name": "", "dir_perms": {"mode": 0o40555, "uid": 0, "gid": 0},
             "properties": [{"name": "cgroup.max.depth", "value": "max"}],
             "children": [{"dir_name": "orthros-t", "properties": [
                 {"name": "cgroup.max.descendants", "value": "5"}]}]},
        ]},
    ],
}


# ------------------------------------------------------------------------------------------
# Pure parsing


def test_processes_join_pstree_core_and_ids() -> None:
    pstree = [{"pid": 100, "ppid": 0, "pgid": 100, "sid": 100, "threads": [100, 102]},
              {"pid": 101, "ppid": 100, "pgid": 100, "sid": 100, "threads": [101]}]
    procs = parse_processes(
        pstree,
        {100: core("server", 2), 101: core("worker", 3, old=True, state=3)},
        {100: ids(2, net_ns_id=9), 101: ids(3)},
    )
    assert [(p.pid, p.ppid, p.command, p.threads) for p in procs] == [
        (100, 0, "server", (100, 102)), (101, 100, "worker", (101,))]
    assert procs[0].namespaces["net"] == 9 and procs[1].namespaces["net"] == 2
    assert (procs[0].cg_set, procs[1].cg_set) == (2, 3)
    assert (procs[0].state, procs[1].state) == ("alive", "zombie")


def test_cg_set_prefers_the_per_thread_field() -> None:
    c = core("x", 5)
    c["tc"]["cg_set"] = 1  # deprecated task-wide field, stale
    assert core_cg_set(c) == 5
    assert core_cg_set(core("x", 4, old=True)) == 4
    assert core_cg_set(core("x")) is None


def test_namespaces_own_versus_root_and_uts_names() -> None:
    procs = parse_processes(
        [{"pid": 10, "ppid": 0, "pgid": 10, "sid": 10},
         {"pid": 11, "ppid": 10, "pgid": 10, "sid": 10}],
        {10: core("a"), 11: core("b")},
        {10: ids(2, uts_ns_id=11, net_ns_id=9), 11: ids(3, uts_ns_id=11)},
    )
    ns = {(n.kind, n.id): n for n in parse_namespaces(
        procs, ROOT_IDS, {11: {"nodename": "insp-host", "domainname": "insp.dom"}})}
    assert ns[("uts", 11)].own is True and ns[("uts", 11)].pids == (10, 11)
    assert ns[("uts", 11)].uts == {"nodename": "insp-host", "domainname": "insp.dom"}
    assert ns[("net", 9)].own is True and ns[("net", 9)].pids == (10,)
    assert ns[("net", 2)].own is False and ns[("net", 2)].pids == (11,)
    assert ns[("mnt", 6)].own is False and ns[("mnt", 6)].uts is None
    # Without root_ids (old images) nobody can tell.
    assert all(n.own is None for n in parse_namespaces(procs, None, {}))


def test_cgroup_part1_hierarchy_walks_children_with_full_paths() -> None:
    cg = parse_cgroups(CGROUP, {}, 1)
    tree = {h.name: [g.path for g in h.groups] for h in cg.hierarchies}
    assert tree == {
        "cpu": ["/orthros-t", "/orthros-t/sub", "/orthros-t/sub/leaf"],
        "cpuset": ["/orthros-t"],
        "memory": ["/process_api/abc"],
        "": ["/", "/orthros-t"],
    }
    versions = {h.name: h.version for h in cg.hierarchies}
    assert versions["cpu"] == 1 and versions[""] == 2


def test_cgroup_part2_membership_by_set() -> None:
    cg = parse_cgroups(CGROUP, {100: 2, 101: 3, 102: 1, 103: None}, 1)
    m = {x.pid: x for x in cg.membership}
    assert m[100].groups == {"": "/orthros-t", "cpu": "/orthros-t", "cpuset": "/orthros-t",
                             "memory": "/process_api/abc"}
    assert m[101].groups["cpu"] == "/orthros-t/sub" and m[101].groups[""] == "/"
    assert not m[100].in_criu_cgroups
    # Set 1 is the dumping CRIU's own: CRIU does not record it.
    assert m[102].groups == {} and m[102].in_criu_cgroups
    assert m[103].groups == {} and not m[103].in_criu_cgroups


def test_cgroup_part3_limits_leave_out_membership_files() -> None:
    cg = parse_cgroups(CGROUP, {}, 1)
    top = cg.group("cpu", "/orthros-t")
    assert top is not None
    assert top.limits == {"cpu.shares": "512", "cpu.cfs_quota_us": "50000"}
    sub = cg.group("cpu", "/orthros-t/sub")
    assert sub is not None and sub.limits == {"cpu.shares": "1024"}
    cpuset = cg.group("cpuset", "/orthros-t")
    assert cpuset is not None and cpuset.limits == {"cpuset.cpus": "0", "cpuset.mems": "0"}
    v2 = cg.group("", "/orthros-t")
    assert v2 is not None and v2.limits == {"cgroup.max.descendants": "5"}
    d = cg.to_dict()
    assert d["recorded"] is True
    assert {(x["hierarchy"], x["path"]) for x in d["limits"] if x["root"]} == {("", "/")}
    assert next(x for x in d["limits"] if x["path"] == "/orthros-t")["mode"] == "0755"
    json.dumps(d)


def test_cgroup_comounted_controllers_match_their_hierarchy() -> None:
    cg = parse_cgroups(
        {"sets": [{"id": 2, "ctls": [{"name": "cpu,cpuacct", "path": "/g"}]}],
         "controllers": [{"cnames": ["cpu", "cpuacct"], "dirs": [{"dir_name": "g"}]}]},
        {7: 2}, 1)
    assert cg.hierarchies[0].name == "cpu,cpuacct"
    assert cg.membership[0].groups == {"cpu,cpuacct": "/g"}


def test_no_cgroup_image() -> None:
    cg = parse_cgroups(None, {100: 1, 101: 1}, 1)
    assert not cg.recorded and cg.hierarchies == ()
    assert all(m.in_criu_cgroups for m in cg.membership)


@pytest.mark.parametrize("addr", ["127.0.0.1", "10.1.2.3", "0.0.0.0", "::1", "fe80::1:2",
                                  "::ffff:127.0.0.1", "2001:db8::8a2e:370:7334"])
def test_inet_addresses_round_trip(addr: str) -> None:
    family = 10 if ":" in addr else 2
    assert inet_address(words(addr), family) == addr


def test_inet_address_as_seen_in_a_real_dump() -> None:
    # src_addr of a socket bound to 127.0.0.1 in a dump on this (little-endian) machine.
    if struct.pack("=I", 1) == b"\x01\0\0\0":
        assert inet_address([16777343], 2) == "127.0.0.1"


def test_unix_names() -> None:
    # pycriu hands the name over quoted-printable: a path with its terminating NUL ...
    assert unix_name("/tmp/insp/named.sock=00") == "/tmp/insp/named.sock"
    assert unix_name("/run/x.sock") == "/run/x.sock"
    # ... an abstract name, whose NULs are shown as "@" like ss does ...
    assert unix_name("=00orthros=00x") == "@orthros@x"
    # ... and an unnamed socket.
    assert unix_name("") == ""


def _isk(fid: int, ino: int, state: int, src: str, sport: int, dst: str, dport: int,
         proto: int = 6) -> dict[str, Any]:
    return {"id": fid, "type": "INETSK", "isk": {
        "id": fid, "ino": ino, "family": 10 if ":" in src else 2, "type": 1, "proto": proto,
        "state": state, "src_port": sport, "dst_port": dport, "flags": 2, "backlog": 0,
        "src_addr": words(src), "dst_addr": words(dst)}}


def _usk(fid: int, ino: int, peer: int, name: str = "", stype: int = 1,
         state: int = 1) -> dict[str, Any]:
    return {"id": fid, "type": "UNIXSK", "usk": {
        "id": fid, "ino": ino, "type": stype, "state": state, "flags": 2, "uflags": 0,
        "backlog": 0, "peer": peer, "name": name}}


FILES = [
    {"id": 1, "type": "REG", "reg": {"id": 1, "name": "/usr/bin/python3.11"}},
    _isk(12, 27070, 10, "127.0.0.1", 47817, "0.0.0.0", 0),
    _isk(15, 27074, 1, "127.0.0.1", 47817, "127.0.0.1", 52838),
    _isk(20, 26624, 1, "::1", 52838, "::1", 47817),
    _isk(30, 30000, 7, "0.0.0.0", 53, "0.0.0.0", 0, proto=17),  # UDP: not shown
    _usk(13, 27071, 0, "/tmp/insp/named.sock=00", stype=2, state=7),
    _usk(21, 27073, 27072),
    _usk(14, 27072, 27073),
    _usk(22, 27080, 99999, "=00abstract"),  # peer outside the tree
]
FDINFO = {2: [{"id": 12, "fd": 3, "type": "INETSK", "flags": 1},
              {"id": 15, "fd": 6, "type": "INETSK", "flags": 1},
              {"id": 13, "fd": 4, "type": "UNIXSK", "flags": 1},
              {"id": 14, "fd": 5, "type": "UNIXSK", "flags": 1}],
          3: [{"id": 20, "fd": 3, "type": "INETSK", "flags": 1},
              {"id": 21, "fd": 6, "type": "UNIXSK", "flags": 1},
              {"id": 22, "fd": 7, "type": "UNIXSK", "flags": 1}]}


def test_fd_owners_follow_shared_fd_tables() -> None:
    owners = fd_owners({100: 2, 101: 3, 102: 3}, FDINFO)
    assert owners[12] == [FdRef(100, 3)]
    assert owners[21] == [FdRef(101, 6), FdRef(102, 6)]


def test_tcp_four_tuples_states_and_queues() -> None:
    owners = fd_owners({100: 2, 101: 3}, FDINFO)
    streams = {26624: {"inq_len": 1234, "outq_len": 10, "unsq_len": 4},
               27074: {"inq_len": 0, "outq_len": 0}}
    tcp = {t.id: t for t in parse_tcp(FILES, streams, owners)}
    assert set(tcp) == {12, 15, 20}
    assert (tcp[12].state, tcp[12].local, tcp[12].remote) == (
        "LISTEN", ("127.0.0.1", 47817), ("0.0.0.0", 0))
    assert tcp[12].inq is None and tcp[12].owners == (FdRef(100, 3),)
    assert (tcp[15].state, tcp[15].remote, tcp[15].inq, tcp[15].unsent) == (
        "ESTABLISHED", ("127.0.0.1", 52838), 0, 0)
    six = tcp[20]
    assert (six.family, six.local, six.remote) == ("ipv6", ("::1", 52838), ("::1", 47817))
    assert (six.inq, six.outq, six.unsent, six.owners) == (1234, 10, 4, (FdRef(101, 3),))


def test_unix_sockets_resolve_peers() -> None:
    owners = fd_owners({100: 2, 101: 3}, FDINFO)
    unix = {u.id: u for u in parse_unix(FILES, owners)}
    assert set(unix) == {13, 14, 21, 22}
    named = unix[13]
    assert (named.type, named.state, named.name, named.peer_ino) == (
        "dgram", "CLOSE", "/tmp/insp/named.sock", 0)
    assert not named.external_peer
    assert (unix[21].peer_id, unix[14].peer_id) == (14, 21)
    assert unix[21].peer_name == "" and unix[21].owners == (FdRef(101, 6),)
    assert unix[22].name == "@abstract" and unix[22].external_peer
    assert unix[22].to_dict()["external_peer"] is True


def test_memory_counts_pages_by_flags() -> None:
    mem = parse_memory(7, [
        {"pages_id": 3},
        {"vaddr": 0x1000, "compat_nr_pages": 0, "nr_pages": 10, "flags": 4},  # present
        {"vaddr": 0x9000, "compat_nr_pages": 0, "nr_pages": 5, "flags": 6},  # present, lazy
        {"vaddr": 0xf000, "compat_nr_pages": 0, "nr_pages": 2, "flags": 2},  # lazy, remote
        {"vaddr": 0x20000, "compat_nr_pages": 0, "nr_pages": 3, "flags": 1},  # in parent
        {"vaddr": 0x30000, "compat_nr_pages": 4},  # old image: no flags, present
        {"vaddr": 0x40000, "compat_nr_pages": 1, "in_parent": True},  # old, in parent
    ])
    assert (mem.pages_id, mem.pages, mem.present, mem.lazy, mem.in_parent) == (3, 25, 19, 7, 4)
    assert mem.to_dict()["bytes"] == 25 * PAGE_SIZE


# ------------------------------------------------------------------------------------------
# Whole directories, written with pycriu's image writer


def write(dir_: Path, name: str, magic: str, entries: list[dict[str, Any]]) -> None:
    with (dir_ / name).open("wb") as f:
        pimages.dump({"magic": magic, "entries": entries}, f)


def make_checkpoint(d: Path) -> Path:
    write(d, "inventory.img", "INVENTORY", [{
        "img_version": 2, "fdinfo_per_id": True, "ns_per_id": True, "root_cg_set": 1,
        "root_ids": ROOT_IDS, "lsmtype": "NO_LSM", "network_lock_method": 2,
        "dump_criu_run_id": "test-run"}])
    write(d, "pstree.img", "PSTREE", [
        {"pid": 100, "ppid": 0, "pgid": 100, "sid": 100, "threads": [100]},
        {"pid": 101, "ppid": 100, "pgid": 100, "sid": 100, "threads": [101]}])
    write(d, "core-100.img", "CORE", [core("server", 2)])
    write(d, "core-101.img", "CORE", [core("worker", 3)])
    write(d, "ids-100.img", "IDS", [ids(2, uts_ns_id=11)])
    write(d, "ids-101.img", "IDS", [ids(3, uts_ns_id=11)])
    write(d, "utsns-11.img", "UTSNS", [{"nodename": "insp-host", "domainname": "(none)"}])
    write(d, "cgroup.img", "CGROUP", [CGROUP])
    write(d, "fdinfo-2.img", "FDINFO", FDINFO[2])
    write(d, "fdinfo-3.img", "FDINFO", FDINFO[3])
    files = json.loads(json.dumps(FILES))
    fown = {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0}
    opts = {"so_sndbuf": 212992, "so_rcvbuf": 212992, "so_snd_tmo_sec": 0,
            "so_snd_tmo_usec": 0, "so_rcv_tmo_sec": 0, "so_rcv_tmo_usec": 0}
    for f in files:  # pycriu's writer wants the required fields a real dump has
        if "isk" in f:
            f["isk"].update(fown=fown, opts=opts)
        if "usk" in f:
            f["usk"].update(fown=fown, opts=opts)
        if "reg" in f:
            f["reg"].update(flags=0, pos=0, fown=fown)
    write(d, "files.img", "FILES", files)
    stream = {"inq_len": 3, "inq_seq": 1, "outq_len": 0, "outq_seq": 2, "opt_mask": 7,
              "snd_wscale": 10, "mss_clamp": 65495, "extra": {"inq": "eHh4\n", "outq": ""}}
    write(d, f"tcp-stream-{26624:x}.img", "TCP_STREAM", [stream])
    write(d, "pagemap-100.img", "PAGEMAP", [
        {"pages_id": 1}, {"vaddr": 4096, "compat_nr_pages": 0, "nr_pages": 8, "flags": 6}])
    write(d, "pagemap-101.img", "PAGEMAP", [
        {"pages_id": 2}, {"vaddr": 4096, "compat_nr_pages": 0, "nr_pages": 2, "flags": 4}])
    write(d, "stats-dump", "STATS", [{"dump": {
        "freezing_time": 219, "frozen_time": 75631, "memdump_time": 4680,
        "memwrite_time": 3707, "pages_scanned": 12, "pages_written": 10,
        "pages_skipped_parent": 0, "pages_lazy": 0}}])
    return d


def test_read_a_whole_checkpoint(tmp_path: Path) -> None:
    im = read_images(make_checkpoint(tmp_path))
    assert isinstance(im, ImageSet) and im.root_pid == 100
    assert [(p.pid, p.command) for p in im.processes] == [(100, "server"), (101, "worker")]
    assert im.checkpoint.network_lock == "skip" and im.checkpoint.criu_run_id == "test-run"
    uts = next(n for n in im.namespaces if n.kind == "uts")
    assert uts.own and uts.uts == {"nodename": "insp-host", "domainname": "(none)"}
    member = {m.pid: m.groups for m in im.cgroups.membership}
    assert member[100]["cpu"] == "/orthros-t" and member[101]["cpu"] == "/orthros-t/sub"
    six = next(t for t in im.tcp if t.ino == 26624)
    assert six.inq == 3 and six.owners == (FdRef(101, 3),)
    assert {u.id: u.peer_id for u in im.unix}[21] == 14
    assert [(m.pid, m.pages) for m in im.memory] == [(100, 8), (101, 2)]
    assert sum(m.present for m in im.memory) == im.dump_stats.pages_written  # type: ignore[union-attr]
    assert im.restore_stats is None
    data = im.to_dict()
    assert json.loads(json.dumps(data)) == data


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exc:
        main(list(args), env=Env(stdout=out, stderr=err))
    return int(exc.value.code or 0), out.getvalue(), err.getvalue()


def test_cli_json_and_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich would fold long cells at 80 columns
    d = make_checkpoint(tmp_path)
    code, out, _ = run_cli("inspect", str(d), "--json")
    assert code == ExitStatus.OK
    assert json.loads(out)["cgroups"]["limits"][0]["limits"]["cpu.shares"] == "512"
    code, out, err = run_cli("inspect", str(d))
    assert code == ExitStatus.OK and out == ""  # tables go to stderr
    for text in ("server", "cgroup limits (3/3)", "cpu.cfs_quota_us", "50000", "insp-host",
                 "[::1]:52838", "/tmp/insp/named.sock", "outside the tree"):
        assert text in err, text


# ------------------------------------------------------------------------------------------
# Errors


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="does not exist"):
        read_images(tmp_path / "nope")


def test_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadImageError, match="is not a directory"):
        read_images(tmp_path / "f")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match=r"holds no checkpoint: inventory.img is missing"):
        read_images(tmp_path)


def test_incomplete_checkpoint(tmp_path: Path) -> None:
    (make_checkpoint(tmp_path) / "core-101.img").unlink()
    with pytest.raises(BadImageError, match=r"incomplete: core-101.img is missing"):
        read_images(tmp_path)


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda b: b[:-3], "protobuf data is damaged"),  # truncated inside the last entry
    (lambda b: b[:6], "cut short"),  # truncated inside the magic
    (lambda b: b"", "cut short"),
    (lambda b: b"\x13\x37\xbe\xef" * 8, "unknown image magic"),
    (lambda b: b[:8] + b"\xff" * (len(b) - 8), "corrupt"),  # garbage after a good magic
])
def test_corrupt_image(tmp_path: Path, damage: Any, reason: str) -> None:
    d = make_checkpoint(tmp_path)
    f = d / "files.img"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(BadImageError, match=reason) as exc:
        read_images(d)
    assert "files.img" in str(exc.value)
    assert exc.value.exit_status == ExitStatus.BAD_IMAGE


def test_image_of_the_wrong_kind(tmp_path: Path) -> None:
    d = make_checkpoint(tmp_path)
    (d / "pstree.img").write_bytes((d / "ids-100.img").read_bytes())
    with pytest.raises(BadImageError, match=r"pstree.img .* holds an image of type IDS"):
        read_images(d)


def test_cli_reports_bad_images_with_their_exit_status(tmp_path: Path) -> None:
    code, out, err = run_cli("inspect", str(tmp_path))
    assert code == ExitStatus.BAD_IMAGE and out == ""
    assert "holds no checkpoint" in err and "Traceback" not in err
