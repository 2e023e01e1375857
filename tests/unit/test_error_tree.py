"""The exception tree: sentences, exit statuses, and the round trip over the agent RPC."""

from __future__ import annotations

import json

from orthros_py.errors import (
    BadImageError,
    CriuError,
    ExitStatus,
    NoSuchProcessError,
    OrthrosError,
)


def test_sentence_carries_context() -> None:
    err = CriuError("CRIU refused the dump of pid 7: no such file", host="alpha", stage="dump",
                    pid=7, errno=2, hint="see /x/dump.log")
    assert str(err) == "[on alpha during dump] CRIU refused the dump of pid 7: no such file " \
                       "(see /x/dump.log)"
    assert err.exit_status == ExitStatus.CRIU_FAILED


def test_plain_sentence_without_context() -> None:
    assert str(NoSuchProcessError("no process with pid 9 exists")) == \
        "no process with pid 9 exists"


def test_round_trip_keeps_type_and_context() -> None:
    sent = BadImageError("the checkpoint is corrupt", host="beta", stage="restore")
    got = OrthrosError.from_dict(json.loads(json.dumps(sent.to_dict())))
    assert type(got) is BadImageError
    assert (got.msg, got.host, got.stage) == (sent.msg, "beta", "restore")
    assert got.exit_status == ExitStatus.BAD_IMAGE


def test_unknown_type_becomes_base_error() -> None:
    got = OrthrosError.from_dict({"type": "EvilError", "msg": "x"})
    assert type(got) is OrthrosError


def test_exit_statuses_are_distinct() -> None:
    values = [s.value for s in ExitStatus]
    assert len(values) == len(set(values))
