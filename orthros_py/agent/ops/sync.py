"""Synchronized save and restore (``orthros sync``): ``sync_clock``, ``sync_prepare``,
``sync_freeze``, ``sync_dump``, ``sync_hold``, ``sync_replace``, ``sync_restore``,
``sync_resume``, ``sync_finish``, ``sync_thaw``, ``sync_abort``, ``sync_list``, ``sync_delete``.

The work is ``orthros_py.agent.sync``'s; this module checks the arguments. Instants arrive in
ns on this host's CLOCK_REALTIME (the coordinator converts with the offset ``sync_clock``
samples gave it); names are held to short plain patterns, data directories to
``orthros_py.agent.sync.data_path``. Privileges: root (cgroups, CRIU, XDP, kill).
"""

from __future__ import annotations

from typing import Any

from orthros_py.agent.state import Agent
from orthros_py.agent.sync import (
    IMAGE_PREFIX,
    Syncs,
    bad,
    check_member,
    check_snap,
    list_members,
    remove_member,
)
from orthros_py.agent.table import Call, op
from orthros_py.host import clock

MAX_AHEAD_NS = 60_000_000_000  # an instant more than a minute ahead is a mistake


def syncs_of(a: Agent) -> Syncs:
    with a.mutex:
        if a.syncs is None:
            a.syncs = Syncs(a)
        return a.syncs  # type: ignore[no-any-return]


def _instant(at_ns: int) -> int:
    if at_ns - clock.now_ns() > MAX_AHEAD_NS:
        raise bad("the instant is more than a minute ahead of this host's clock")
    return at_ns


@op("sync_clock")
def op_sync_clock(call: Call) -> dict[str, Any]:
    """This host's CLOCK_REALTIME when the request arrived and when it answered (ns)."""
    t1 = clock.now_ns()
    return {"t1": t1, "t2": clock.now_ns()}


@op("sync_prepare")
def op_sync_prepare(call: Call, snap: str, member: str, target: str,
                    data: tuple[str, ...] = (), total: int = 1) -> dict[str, Any]:
    """Get member ``member`` (``target``: a pid, or a process name) ready to freeze; the
    snapshot has ``total`` members in all."""
    if not 1 <= total <= 1024:
        raise bad("total must be 1-1024")
    return syncs_of(call.agent).prepare(check_snap(snap), check_member(member), target,
                                        list(data), total)


@op("sync_freeze")
def op_sync_freeze(call: Call, snap: str, member: str, at_ns: int) -> dict[str, Any]:
    """Freeze the member at ``at_ns``, then lock its connections."""
    return syncs_of(call.agent).freeze_at(snap, member, _instant(at_ns))


@op("sync_dump")
def op_sync_dump(call: Call, snap: str, member: str, datagrams: bool = True) -> dict[str, Any]:
    """Checkpoint the frozen member and snapshot its data directories; with ``datagrams``,
    keep what waits in its UDP sockets too."""
    return syncs_of(call.agent).dump(snap, member, datagrams=datagrams)


@op("sync_hold")
def op_sync_hold(call: Call, snap: str, member: str) -> dict[str, Any]:
    """Leave a saved member frozen, its connections unlocked."""
    return syncs_of(call.agent).hold(snap, member)


@op("sync_replace")
def op_sync_replace(call: Call, snap: str, member: str) -> dict[str, Any]:
    """Lock the snapshot's connections, stop the member's current run silently, put its data
    directories back."""
    return syncs_of(call.agent).replace(check_snap(snap), check_member(member))


@op("sync_restore")
def op_sync_restore(call: Call, snap: str, member: str) -> dict[str, Any]:
    """Restore the member frozen, ready to resume."""
    return syncs_of(call.agent).restore(snap, member)


@op("sync_resume")
def op_sync_resume(call: Call, snap: str, member: str, at_ns: int) -> dict[str, Any]:
    """Unlock the member's connections and thaw it at ``at_ns``."""
    return syncs_of(call.agent).resume_at(snap, member, _instant(at_ns))


@op("sync_finish")
def op_sync_finish(call: Call, snap: str, member: str) -> dict[str, Any]:
    """After every member has resumed: give the member's group back, take its lock off."""
    return syncs_of(call.agent).finish(snap, member)


@op("sync_thaw")
def op_sync_thaw(call: Call, snap: str, member: str, at_ns: int) -> dict[str, Any]:
    """Resume at ``at_ns`` a member that a save left frozen."""
    return syncs_of(call.agent).thaw_held(check_snap(snap), check_member(member),
                                          _instant(at_ns))


@op("sync_abort")
def op_sync_abort(call: Call, snap: str, member: str, remove: bool = False) -> dict[str, Any]:
    """Undo this host's part for the member; with ``remove`` its snapshot goes too."""
    return syncs_of(call.agent).abort(check_snap(snap), check_member(member), remove=remove)


@op("sync_list")
def op_sync_list(call: Call) -> dict[str, Any]:
    """The snapshot members kept here."""
    return {"host": call.agent.name, "members": list_members(call.agent)}


@op("sync_delete")
def op_sync_delete(call: Call, snap: str) -> dict[str, Any]:
    """Remove every member of snapshot ``snap`` kept here, with its data snapshots."""
    a = call.agent
    prefix = f"{IMAGE_PREFIX}{check_snap(snap)}."
    removed = [name[len(prefix):] for name in a.image_names()
               if name.startswith(prefix) and remove_member(a, name)]
    return {"host": a.name, "snap": snap, "removed": removed}

