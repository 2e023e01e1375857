"""Service protection: the pair's operations on the active, the standby and the witness.

``pair_open`` / ``pair_close`` / ``pair_list`` / ``pair_status`` / ``pair_checkpoint`` /
``pair_pause`` / ``pair_resume`` / ``pair_promote`` (any role, as it applies), ``pair_begin`` /
``pair_commit`` / ``pair_abort`` (the standby, called by the active's agent for each
checkpoint), ``pair_heartbeat`` / ``pair_epoch`` (called by the standby's agent),
``witness_renew`` / ``witness_promote`` / ``witness_epoch`` (the witness).

The configuration arrives over the network and is checked field by field
(``orthros_py.agent.pair.config``); nothing in it is executed or used as a path but the pair's
name, which is held to a short plain pattern. Privileges: those of the work (root).
"""

from __future__ import annotations

from typing import Any

from orthros_py.agent.pair.config import PairConfig, bad, validate_pair_name
from orthros_py.agent.pair.pairs import Pairs
from orthros_py.agent.pair.runtime import Role
from orthros_py.agent.state import Agent
from orthros_py.agent.table import Call, op


def pairs_of(a: Agent) -> Pairs:
    with a.mutex:
        if a.pairs is None:
            a.pairs = Pairs(a)
        return a.pairs  # type: ignore[no-any-return]


def _role(call: Call, name: str, kind: str | None = None) -> Any:
    role: Role = pairs_of(call.agent).get(validate_pair_name(name))
    if kind is not None and role.rec.role != kind:
        raise bad(f"this agent is the {role.rec.role} of pair {name!r}, not its {kind}")
    return role


@op("pair_open")
def op_pair_open(call: Call, config: dict[str, Any], role: str, epoch: int = 1
                 ) -> dict[str, Any]:
    """Take part in a pair as its ``role`` (active, standby or witness)."""
    if role not in ("active", "standby", "witness"):
        raise bad(f"unknown pair role {role!r}")
    if epoch < 1:
        raise bad("epoch must be at least 1")
    cfg = PairConfig.from_dict(config)
    return pairs_of(call.agent).open(cfg, role, epoch).status()


@op("pair_close")
def op_pair_close(call: Call, name: str, keep_images: bool = False) -> dict[str, Any]:
    """Stop taking part in pair ``name``; nothing of it is left here but kept images."""
    return pairs_of(call.agent).close(validate_pair_name(name), keep_images=keep_images)


@op("pair_list")
def op_pair_list(call: Call) -> dict[str, Any]:
    return {"host": call.agent.name, "pairs": pairs_of(call.agent).statuses()}


@op("pair_status")
def op_pair_status(call: Call, name: str) -> dict[str, Any]:
    return dict(_role(call, name).status())


@op("pair_checkpoint")
def op_pair_checkpoint(call: Call, name: str) -> dict[str, Any]:
    """One checkpoint now (the active), outside the interval; its figures."""
    info = _role(call, name, "active").checkpoint()
    if info is None:
        role = _role(call, name, "active")
        raise bad(f"the checkpoint of pair {name!r} failed: {role.rec.reason}")
    return dict(info)


@op("pair_pause")
def op_pair_pause(call: Call, name: str) -> dict[str, Any]:
    return dict(_role(call, name, "active").pause())


@op("pair_resume")
def op_pair_resume(call: Call, name: str) -> dict[str, Any]:
    _role(call, name, "active").resume()
    return {"resumed": True}


@op("pair_stand_down")
def op_pair_stand_down(call: Call, name: str, reason: str) -> dict[str, Any]:
    """The active stops its copy now (a planned failover moved the service)."""
    role = _role(call, name, "active")
    role.stand_down(reason[:200], state="failed over")
    return dict(role.beat_answer())


@op("pair_promote")
def op_pair_promote(call: Call, name: str, reason: str = "a planned failover",
                    epoch: int | None = None) -> dict[str, Any]:
    """The standby restores the newest committed generation and takes the address."""
    return dict(_role(call, name, "standby").promote(reason[:200], epoch=epoch, planned=True))


@op("pair_adopt")
def op_pair_adopt(call: Call, name: str, pid: int, reason: str = "a planned failover",
                  epoch: int | None = None) -> dict[str, Any]:
    """The standby serves a tree restored here by a migration (a planned failover)."""
    return dict(_role(call, name, "standby").adopt(pid, reason[:200], epoch=epoch))


@op("pair_begin")
def op_pair_begin(call: Call, name: str, epoch: int, parent: int | None = None
                  ) -> dict[str, Any]:
    """Open the next generation (on ``parent``, if that is the newest committed one) and
    its page channel."""
    if parent is not None and parent < 1:
        raise bad("parent must be a generation number")
    return dict(_role(call, name, "standby").begin(epoch, parent))


@op("pair_commit")
def op_pair_commit(call: Call, name: str, generation: int, epoch: int,
                   stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Verify and commit generation ``generation`` atomically."""
    clean = {k: v for k, v in (stats or {}).items()
             if (isinstance(k, str) and len(k) < 40 and isinstance(v, (int, float, str, bool)))
             or v is None}
    return dict(_role(call, name, "standby").commit(generation, epoch, clean))


@op("pair_abort")
def op_pair_abort(call: Call, name: str, generation: int) -> dict[str, Any]:
    return dict(_role(call, name, "standby").abort(generation))


@op("pair_heartbeat")
def op_pair_heartbeat(call: Call, name: str, epoch: int) -> dict[str, Any]:
    return dict(_role(call, name, "active").heartbeat(epoch))


@op("pair_epoch")
def op_pair_epoch(call: Call, name: str) -> dict[str, Any]:
    role = _role(call, name)
    return {"epoch": role.rec.epoch, "state": role.rec.state,
            "stand_down": role.rec.role == "standby" and role.rec.state == "failed over"}


@op("witness_renew")
def op_witness_renew(call: Call, name: str, epoch: int, role: str = "active"
                     ) -> dict[str, Any]:
    w = _role(call, name, "witness")
    host = w.cfg.active.name if role == "active" else w.cfg.standby.name
    return dict(w.renew(host, epoch))


@op("witness_promote")
def op_witness_promote(call: Call, name: str, epoch: int) -> dict[str, Any]:
    w = _role(call, name, "witness")
    return dict(w.promote(w.cfg.standby.name, epoch))


@op("witness_epoch")
def op_witness_epoch(call: Call, name: str) -> dict[str, Any]:
    w = _role(call, name, "witness")
    return {"epoch": w.pairs.book.epoch_of(name)}
