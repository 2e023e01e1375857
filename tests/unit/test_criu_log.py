"""Picking the reason out of a CRIU log: the first real error, without CRIU's noise."""

from __future__ import annotations

from pathlib import Path

from orthros_py.criu.log import log_tail, main_reason

DUMP_LOG = """\
(00.000010) Version: 4.2.1
Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.003000) Seizing
Error (criu/pstree.c:304): The root process 15363 is not a session leader. Consider using --shell-job option
Error (criu/cr-dump.c:1975): Dumping FAILED.
"""

RESTORE_LOG = """\
Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
 15520: Error (criu/files-reg.c:2175): File tmp/cnt.out has bad size 582 (expect 562)
 15520: Error (criu/files.c:1221): Unable to open fd=1 id=0xa
Error (criu/cr-restore.c:2331): Restoring FAILED.
"""


def test_reason_is_first_real_error(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(DUMP_LOG)
    assert main_reason(log_tail(log)) == (
        "The root process 15363 is not a session leader. Consider using --shell-job option")


def test_reason_strips_pid_prefix(tmp_path: Path) -> None:
    log = tmp_path / "restore.log"
    log.write_text(RESTORE_LOG)
    assert main_reason(log_tail(log)) == "File tmp/cnt.out has bad size 582 (expect 562)"


def test_missing_log_gives_no_reason(tmp_path: Path) -> None:
    assert log_tail(tmp_path / "nothing.log") == []
    assert main_reason([]) == ""


def test_tail_without_errors_is_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("\n".join(f"line {i}" for i in range(20)))
    assert log_tail(log, lines=3) == ["line 17", "line 18", "line 19"]


def test_a_peer_outside_the_tree_is_explained_with_the_option_that_allows_it(
        tmp_path: Path) -> None:
    from pycriu import rpc_pb2 as rpc

    from orthros_py.criu.request import DumpOptions, dump_request
    from orthros_py.criu.session import CriuSession

    (tmp_path / "dump.log").write_text(
        "(00.010000) Error (criu/sk-unix.c:860): unix: Unix socket 0x37a without peer 0x379\n")
    req = dump_request(DumpOptions(pid=42), -1)
    resp = rpc.criu_resp(type=rpc.DUMP, success=False)
    session = CriuSession.__new__(CriuSession)  # no binary needed to word an error
    err = session._error(req, resp, "dump", tmp_path, 42)
    assert "Unix socket 0x37a without peer 0x379" in str(err)
    assert "--ext-unix-sk" in str(err)
