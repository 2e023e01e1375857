"""The CRIU options for real services: request fields, their checks (also on what arrives at an
agent), and the one sentence that names the option when CRIU refuses without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycriu import rpc_pb2 as rpc

from orthros_py.agent.protocol import ProtocolError, options_from_args, options_to_args
from orthros_py.criu.request import (
    DumpOptions,
    RestoreOptions,
    check_external,
    dump_request,
    parse_size,
    restore_request,
)
from orthros_py.criu.session import CriuSession


def test_dump_request_carries_the_service_options() -> None:
    o = dump_request(DumpOptions(
        pid=7, file_locks=True, link_remap=True, ghost_limit=10 << 20, tcp_skip_in_flight=True,
        evasive_devices=True, auto_dedup=True,
        external=("mnt[/data]:vol", "file[1f:2a3b]")), images_dir_fd=3).opts
    assert o.file_locks and o.link_remap and o.tcp_skip_in_flight and o.evasive_devices
    assert o.auto_dedup
    assert o.ghost_limit == 10 << 20
    assert list(o.external) == ["mnt[/data]:vol", "file[1f:2a3b]"]


def test_dump_defaults_leave_criu_its_own() -> None:
    o = dump_request(DumpOptions(pid=7), images_dir_fd=3).opts
    assert not (o.file_locks or o.link_remap or o.tcp_skip_in_flight or o.evasive_devices
                or o.auto_dedup)
    assert not o.HasField("ghost_limit") and o.ghost_limit == 1 << 20  # CRIU's 1 MiB
    assert list(o.external) == []


def test_restore_request_carries_the_service_options() -> None:
    req = restore_request(RestoreOptions(
        file_locks=True, tcp_close=True, auto_dedup=True, external=("mnt[vol]:/srv/vol",)),
        images_dir_fd=3)
    o = req.opts
    assert req.type == rpc.RESTORE
    assert o.file_locks and o.tcp_close and o.auto_dedup
    assert list(o.external) == ["mnt[vol]:/srv/vol"]


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("512K", 512 << 10), ("10M", 10 << 20), ("1G", 1 << 30), ("10m", 10 << 20),
    ("2MiB", 2 << 20), ("0", 0),
])
def test_sizes_as_criu_takes_them(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "10Q", "-1", "1.5G", "M"])
def test_sizes_that_are_not(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


@pytest.mark.parametrize("res", [
    "mnt[/data]:vol", "mnt[vol]:/srv/vol", "mnt[]", "dev[7/0]:loop", "dev[loop]:/dev/loop0",
    "file[1f:2a3b]", "unix[12345]", "tty[8800:d]", "net[4026531992]:netns", "pid[4026531836]:p",
    "veth[eth0]:veth-host@br0", "macvlan[mv0]:eth0",
])
def test_external_forms_criu_knows(res: str) -> None:
    assert check_external(res) == res
    assert DumpOptions(pid=1, external=(res,)).external == (res,)


@pytest.mark.parametrize("res", [
    "", "/data", "mnt/data:vol", "foo[1]", "file[/etc/passwd]", "unix[abc]", "tty[1]",
    "net[1]", "dev[7/0]", "mnt[/a]:b\nc", "mnt[/a\x00]:b",
])
def test_external_forms_refused(res: str) -> None:
    with pytest.raises(ValueError, match="not an external resource CRIU knows"):
        check_external(res)
    with pytest.raises(ValueError):
        RestoreOptions(external=(res,))


def test_ghost_limit_must_fit_criu_s_32_bits() -> None:
    assert DumpOptions(pid=1, ghost_limit=0xFFFFFFFF).ghost_limit == 0xFFFFFFFF
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError, match="ghost_limit"):
            DumpOptions(pid=1, ghost_limit=bad)


def test_options_cross_the_agent_rpc_and_bad_ones_are_refused_there() -> None:
    opts = DumpOptions(file_locks=True, link_remap=True, ghost_limit=4 << 20,
                       tcp_skip_in_flight=True, evasive_devices=True,
                       external=("mnt[/data]:vol",))
    args = options_to_args(opts, exclude=("pid", "notify"))
    assert options_from_args(DumpOptions, args, where="dump", exclude=("pid", "notify")) == opts
    rst = RestoreOptions(file_locks=True, tcp_close=True, auto_dedup=True)
    assert options_from_args(RestoreOptions, options_to_args(rst), where="restore") == rst
    for bad, words in (({"ghost_limit": 1 << 40}, "ghost_limit must be"),
                       ({"ghost_limit": "10M"}, "ghost_limit"),
                       ({"external": ["mnt[/a]:b", "rm -rf /"]}, "not an external resource"),
                       ({"external": "mnt[/a]:b"}, "external"),
                       ({"link_remap": 1}, "link_remap"),
                       ({"log_level": 9}, "log_level")):
        with pytest.raises(ProtocolError, match=words):
            options_from_args(DumpOptions, bad, where="dump")
    with pytest.raises(ProtocolError, match="tcp_close"):
        options_from_args(DumpOptions, {"tcp_close": True}, where="dump")  # a restore option


# The lines CRIU 4.2.1 wrote here when it refused (tests/linux/test_criu_options.py makes each).
REFUSALS = [
    ("Error (criu/file-lock.c:110): Some file locks are hold by dumping tasks! You can try "
     "--file-locks to dump them.", "pass --file-locks"),
    ("Error (criu/files-reg.c:1031): Can't dump ghost file /tmp/d/scratch of 3149824 size, "
     "increase limit", "raise --ghost-limit"),
    ("Error (criu/files-reg.c:1122): Can't create link remap for /tmp/d/watched. Use "
     "link-remap option.", "pass --link-remap"),
    ("Error (criu/pstree.c:304): The root process 15363 is not a session leader. Consider "
     "using --shell-job option", "start it with setsid, or pass --shell-job"),
    ("Error (criu/cr-dump.c:1528): A session leader of 32129(1) is outside of its pid "
     "namespace", "setsid"),
    ("Error (criu/sk-inet.c:185): In-flight connection (l) for 4a1f2", "pass --skip-in-flight"),
    ("Error (criu/files-reg.c:1444): Unaccessible path opened 39:2, need 65024:2146733",
     "pass --evasive-devices"),
    ("Error (criu/sk-inet.c:200): Connected TCP socket, consider using --tcp-established "
     "option.", "pass --tcp-established"),
]


@pytest.mark.parametrize(("line", "fix"), REFUSALS, ids=[f for _, f in REFUSALS])
def test_a_refusal_orthros_can_name_says_the_fix(tmp_path: Path, line: str, fix: str) -> None:
    (tmp_path / "dump.log").write_text(
        "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not "
        f"permitted\n{line}\nError (criu/cr-dump.c:1975): Dumping FAILED.\n")
    req = dump_request(DumpOptions(pid=42), -1)
    resp = rpc.criu_resp(type=rpc.DUMP, success=False)
    session = CriuSession.__new__(CriuSession)  # no binary needed to word an error
    msg = str(session._error(req, resp, "dump", tmp_path, 42))
    assert fix in msg, msg
    assert msg.count("(") >= 1 and "\n" not in msg


def test_migrate_passes_the_options_to_each_side() -> None:
    from orthros_py.policies.migrate import MigrateConfig

    cfg = MigrateConfig(file_locks=True, link_remap=True, ghost_limit=8 << 20,
                        skip_in_flight=True, evasive_devices=True,
                        dump_external=("mnt[/data]:vol",), restore_external=("mnt[vol]:/srv",))
    d = cfg.dump_options(("10.0.0.2", 27000))
    assert (d.file_locks, d.link_remap, d.ghost_limit, d.tcp_skip_in_flight,
            d.evasive_devices, d.external) == (True, True, 8 << 20, True, True,
                                                ("mnt[/data]:vol",))
    r = cfg.restore_options()
    assert r.file_locks and r.external == ("mnt[vol]:/srv",)
    with pytest.raises(ValueError, match="not an external resource"):
        MigrateConfig(restore_external=("/srv",))  # refused before anything is frozen


def test_migrate_journal_keeps_the_options() -> None:
    from orthros_py.policies.journal import HostRef, Record, from_dict, to_dict
    from orthros_py.policies.migrate import Done, MigrateConfig, MigrateState

    cfg = MigrateConfig(file_locks=True, ghost_limit=1 << 30, dump_external=("mnt[/d]:k",))
    ref = HostRef(name="alpha", address="10.0.0.1", agent_port=7000)
    state = MigrateState(5, cfg, None, Done(), {}).to_dict()
    record = Record(kind="migrate", id="img", hosts={"source": ref, "dest": ref},
                    stage="dump", state=state, coordinator=1, updated=0.0)
    again = from_dict(json.loads(json.dumps(to_dict(record))))
    assert MigrateState.from_dict(again.state).config == cfg
