"""The exception tree: sentences, exit statuses, and the round trip over the agent RPC."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil

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


def _import_every_module() -> None:
    """Load all of orthros_py, so that every error class anywhere has been defined."""
    import orthros_py

    for mod in pkgutil.walk_packages(orthros_py.__path__, "orthros_py."):
        if mod.name.rsplit(".", 1)[-1] != "__main__":  # that one runs the command
            importlib.import_module(mod.name)


def _subclasses(cls: type[OrthrosError]) -> list[type[OrthrosError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


def _instance(cls: type[OrthrosError]) -> OrthrosError:
    """One instance of ``cls`` with context, whatever extra keyword arguments it requires."""
    required = {
        name: p for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.kind == p.KEYWORD_ONLY and p.default is p.empty
    }
    fill: dict[str, object] = {"argv": ["criu", "dump"], "returncode": 1}
    extra = {name: fill.get(name, f"{name}-value") for name in required}
    return cls(f"{cls.__name__} happened", host="beta", pid=42, stage="restore",
               hint="look here", **extra)  # type: ignore[arg-type]


def test_every_error_class_crosses_the_rpc_as_itself() -> None:
    _import_every_module()
    classes = _subclasses(OrthrosError)
    names = {c.__name__ for c in classes}
    # A sample from each corner of the tree, so that a broken walk does not pass vacuously.
    assert {"CriuError", "AgentError", "ReplayError", "CgroupError", "MigrationError",
            "PlanError", "InventoryError", "JournalError", "AddressError"} <= names
    for cls in classes:
        sent = _instance(cls)
        wire = json.loads(json.dumps(sent.to_dict(), default=str))
        got = OrthrosError.from_dict(wire)
        assert type(got) is cls, cls
        assert got.exit_status == cls.exit_status, cls
        assert (got.msg, got.host, got.pid, got.stage, got.hint) == \
            (sent.msg, "beta", 42, "restore", "look here"), cls


def test_extras_and_exit_status_survive() -> None:
    _import_every_module()
    from orthros_py.agent.errors import ReplayError
    from orthros_py.cgroup.fs import CgroupError

    got = OrthrosError.from_dict(CgroupError("beta has no cpuset hierarchy").to_dict())
    assert type(got) is CgroupError and got.exit_status == ExitStatus.CANNOT_HONOUR == 10
    crit = OrthrosError.from_dict(CriuError("refused", errno=5, log_tail=["a", "b"]).to_dict())
    assert isinstance(crit, CriuError) and (crit.errno, crit.log_tail) == (5, ["a", "b"])
    rep = OrthrosError.from_dict(ReplayError("seen before").to_dict())
    assert isinstance(rep, ReplayError) and str(rep.code) == "replay"


def test_unknown_type_keeps_the_senders_exit_status() -> None:
    got = OrthrosError.from_dict({"type": "FromANewerAgentError", "msg": "x",
                                  "exit_status": int(ExitStatus.CANNOT_HONOUR)})
    assert type(got) is OrthrosError and got.exit_status == ExitStatus.CANNOT_HONOUR


def test_a_class_defined_later_registers_itself() -> None:
    class LateTestError(OrthrosError):
        exit_status = ExitStatus.TIMEOUT

    got = OrthrosError.from_dict(LateTestError("late").to_dict())
    assert type(got) is LateTestError and got.exit_status == ExitStatus.TIMEOUT
