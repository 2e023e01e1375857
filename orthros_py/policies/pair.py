"""Protecting a service: ``pair start`` / ``status`` / ``stop`` and the planned ``failover``.

The work is the agents' (``orthros_py.agent.pair``): this module checks what the caller asked
against what the hosts say, chooses the witness and the service address, hands the pair's
configuration to the witness, the standby and the active (in that order, undone in reverse if
one refuses), and waits for the first committed generation so that a tree that cannot be
checkpointed is refused at once, with CRIU's reason, and nothing is left. ``status`` and
``stop`` find a pair by asking every inventory host's agent.

A planned failover moves the live tree with the migration policy (frozen once, every
connection kept, the service address moved), not from the newest generation: a generation is
up to one interval old, and a planned switch need not lose that interval. The standby then
serves it, and the old active has stopped.

No privileges here; never prints.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from orthros_py.agent.errors import AgentUnreachable
from orthros_py.errors import ExitStatus, OrthrosError
from orthros_py.policies.hosts import (
    Host,
    HostFacts,
    PlanError,
    TreeFacts,
    parse_service_ip,
    service_ifname,
)

FIRST_GENERATION_TIMEOUT_S = 120.0  # the first checkpoint may wait for the XDP program's build
_NAME_RE = re.compile(r"[^a-z0-9-]+")


class PairError(OrthrosError):
    """A pair cannot be started, found or stopped as asked."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.USAGE


@dataclass(frozen=True)
class PairOptions:
    name: str | None = None
    interval: float = 0.2
    keep: int = 3
    service_ip: str | None = None
    output_commit: bool = False
    failover: bool = False
    heartbeat: float = 0.1
    misses: int = 3
    witness: str | None = None
    shell_job: bool = False
    file_locks: bool = False
    fence: Mapping[str, str] | None = None  # how the standby fences the active
    paging: bool = False  # the standby keeps only the hot pages in memory
    hot_window: float = 30.0


@dataclass
class PairView:
    """One pair as ``pair status`` shows it, merged from what its hosts say."""

    name: str
    hosts: dict[str, str]  # role -> host
    state: str
    reason: str | None
    generation: int
    generation_age_s: float | None
    checkpoints: list[dict[str, Any]]
    storage_bytes: int | None
    heartbeats: dict[str, int] | None
    tracking: str | None
    output_commit: bool
    failover: bool
    epoch: int
    events: list[dict[str, Any]]
    output_hold: dict[str, Any] | None = None
    unreachable: list[str] = field(default_factory=list)
    serving: str | None = None  # the host serving the service now
    # A paging standby: hot set, tmpfs, disk, page cache (``agent.pair.tiers.TierStats``),
    # and after a paging promotion how its lazy pages crossed.
    paging: dict[str, Any] | None = None
    lazy: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def default_name(comm: str, pid: int) -> str:
    base = _NAME_RE.sub("-", comm.lower()).strip("-")[:24] or "tree"
    return f"{base}-{pid}"


def _peer(host: Host) -> dict[str, Any]:
    return {"name": host.name, "address": host.address, "port": host.agent_port}


def choose_witness(hosts: Sequence[Host], pair: Sequence[str], named: str | None,
                   inventory_witness: str | None) -> Host | None:
    """The witness: the one named, else the inventory's, else the first other host whose
    agent answers."""
    by_name = {h.name: h for h in hosts}
    for choice in (named, inventory_witness):
        if choice is None:
            continue
        if choice in pair:
            raise PairError(f"the witness {choice} must be a third host, neither the active "
                            "nor the standby")
        if choice not in by_name:
            raise PairError(f"no host named {choice!r} in the inventory to be the witness")
        return by_name[choice]
    for h in hosts:
        if h.name in pair:
            continue
        try:
            h.agent.status()
        except OrthrosError:
            continue
        return h
    return None


def start(active: Host, standby: Host, pid: int, opts: PairOptions, *,
          others: Sequence[Host] = (), inventory_witness: str | None = None,
          candidates: Sequence[str] = (), wait_s: float = FIRST_GENERATION_TIMEOUT_S,
          sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Start protecting the tree of ``pid`` on ``active`` with ``standby``; the active's
    record once the first generation is committed."""
    if active.name == standby.name:
        raise PairError(f"the active and the standby are the same host ({active.name})")
    if opts.paging and opts.hot_window < opts.interval:
        raise PairError(f"the hot window ({opts.hot_window:g} s) must be at least one interval "
                        f"({opts.interval:g} s)")
    if opts.failover:
        from orthros_py.agent.pair.guard import GuardTimings

        try:
            GuardTimings(opts.heartbeat, opts.misses).check()
        except OrthrosError as err:
            raise PairError(str(err.msg)) from err
    tree_data = active.agent.tree(pid)
    tree = TreeFacts.from_agent(tree_data)
    if not tree.in_agent_netns:
        raise PairError(f"pid {pid} lives in another network namespace than {active.name}'s "
                        "agent: orthros protects trees of the host's own network namespace")
    a_facts = HostFacts.from_agent(active.name, active.address, active.agent.status(),
                                   active.agent.addr_list())
    b_facts = HostFacts.from_agent(standby.name, standby.address, standby.agent.status(),
                                   standby.agent.addr_list())
    service = _service(a_facts, tree, opts, candidates)
    if service is None and (opts.failover or opts.output_commit):
        raise PairError("automatic failover and output commit need a service address that "
                        f"{active.name} holds and the standby can take: name it with "
                        "--service-ip")
    witness = choose_witness(others, (active.name, standby.name), opts.witness,
                             inventory_witness)
    if opts.failover and witness is None:
        raise PairError("--failover needs a witness (a third host whose agent only votes), and "
                        "no other inventory host's agent answers: without a third vote a "
                        "standby cannot tell a dead active from a cut link, and both would "
                        "serve", hint="name one with --witness, or [cluster] witness in the "
                        "inventory")
    comm = str((tree_data.get("processes") or [{}])[0].get("name") or "tree")
    name = opts.name or default_name(comm, pid)
    config = {
        "name": name, "pid": pid, "active": _peer(active), "standby": _peer(standby),
        "witness": _peer(witness) if witness is not None else None,
        "interval": opts.interval, "keep": opts.keep,
        "service_ip": service.with_prefixlen if service else None,
        "service_ifname": service_ifname(b_facts, service) if service else None,
        "output_commit": opts.output_commit, "failover": opts.failover,
        "heartbeat": opts.heartbeat, "misses": opts.misses,
        "shell_job": opts.shell_job, "file_locks": opts.file_locks,
        "fence": dict(opts.fence) if opts.fence else None,
        **({"paging": True, "hot_window": opts.hot_window} if opts.paging else {}),
    }
    opened: list[Host] = []
    try:
        for host, role in ((witness, "witness"), (standby, "standby"), (active, "active")):
            if host is None:
                continue
            # The active builds its lock program first (~10 s the first time on a host).
            host.agent.request("pair_open", {"config": config, "role": role}, timeout=180.0)
            opened.append(host)
        rec = _first_generation(active, name, wait_s, sleep)
    except BaseException:
        for host in reversed(opened):
            with contextlib.suppress(OrthrosError):
                host.agent.request("pair_close", {"name": name})
        raise
    return rec


def _service(a: HostFacts, tree: TreeFacts, opts: PairOptions,
             candidates: Sequence[str]) -> ipaddress.IPv4Interface | None:
    if opts.service_ip is not None:
        wanted = parse_service_ip(opts.service_ip)
        held = a.holder_of(wanted.ip)
        if held is None:
            raise PlanError(f"{a.name} does not hold the service address {wanted.ip}")
        return held[1]
    for cidr in candidates:
        ip = ipaddress.IPv4Interface(cidr).ip
        held = a.holder_of(ip)
        if held is not None:
            return held[1]
    return None


def _first_generation(active: Host, name: str, wait_s: float,
                      sleep: Callable[[float], None]) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            rec = active.agent.request("pair_status", {"name": name})
        except AgentUnreachable:
            # The first checkpoint may build the lock's BPF program (~10 s of a busy CPU
            # here): an agent slow to accept meanwhile is not a failed pair.
            if time.monotonic() > deadline:
                raise
            sleep(0.5)
            continue
        if int(rec.get("generation") or 0) >= 1:
            return rec
        if rec.get("state") == "degraded":
            cause = rec.get("reason_error")
            if isinstance(cause, dict):
                # As the checkpoint failed (a CRIU refusal keeps its exit status and reason).
                err = OrthrosError.from_dict(cause)
                err.msg = f"the first checkpoint of pair {name} failed: {err.msg}"
                err.host, err.stage = err.host or active.name, err.stage or "pair start"
                raise err
            raise PairError(f"the first checkpoint of pair {name} failed: {rec.get('reason')}",
                            host=active.name, stage="pair start")
        if time.monotonic() > deadline:
            raise PairError(f"pair {name} committed no generation within {wait_s:g} s",
                            host=active.name, stage="pair start")
        sleep(0.2)


def find(hosts: Sequence[Host], name: str | None = None
         ) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """Every pair (or ``name``) the hosts' agents take part in: name -> role -> record; and
    the hosts that did not answer."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    unreachable = []
    for h in hosts:
        try:
            listed = h.agent.request("pair_list", timeout=5.0).get("pairs") or []
        except OrthrosError:
            unreachable.append(h.name)
            continue
        for rec in listed:
            n = rec["config"]["name"]
            if name is None or n == name:
                found.setdefault(n, {})[rec["role"]] = rec
    return found, unreachable


def view(name: str, roles: Mapping[str, dict[str, Any]], unreachable: Sequence[str],
         now: float | None = None) -> PairView:
    now = time.time() if now is None else now
    any_rec = next(iter(roles.values()))
    cfg = any_rec["config"]
    act, sby = roles.get("active"), roles.get("standby")
    hosts = {r: cfg[r]["name"] for r in ("active", "standby", "witness") if cfg.get(r)}
    state = "unknown"
    reason = None
    if sby is not None and sby.get("state") == "failed over":
        state, reason = "failed over", sby.get("reason")
    elif act is not None:
        state, reason = act.get("state", "unknown"), act.get("reason")
        if sby is None and state == "replicating":
            state, reason = "degraded", "the standby does not answer"
    elif sby is not None:
        state, reason = "degraded", f"the active ({hosts['active']}) does not answer"
    newest = (sby or {}).get("newest") or {}
    committed_at = newest.get("committed_at") or (act or {}).get("committed_at")
    events = sorted((dict(e, host=r["host"]) for r in roles.values()
                     for e in r.get("events") or []), key=lambda e: e.get("at", 0))
    serving = None
    if state == "failed over":
        serving = hosts.get("standby")
    elif act is not None and act.get("tree_running"):
        serving = hosts.get("active")
    return PairView(
        name=name, hosts=hosts, state=state, reason=reason,
        generation=int(newest.get("generation") or (act or {}).get("generation") or 0),
        generation_age_s=(now - committed_at) if committed_at else None,
        checkpoints=list((act or {}).get("checkpoints") or []),
        storage_bytes=(sby or {}).get("storage_bytes"),
        heartbeats=(sby or {}).get("heartbeats"),
        tracking=(act or {}).get("tracking"),
        output_commit=bool(cfg.get("output_commit")), failover=bool(cfg.get("failover")),
        epoch=max(int(r.get("epoch") or 0) for r in roles.values()),
        events=events[-20:], output_hold=(act or {}).get("output_hold"),
        unreachable=[h for h in unreachable if h in hosts.values()], serving=serving,
        paging=(sby or {}).get("paging"), lazy=(sby or {}).get("lazy"))


def status(hosts: Sequence[Host], name: str | None = None) -> list[PairView]:
    found, unreachable = find(hosts, name)
    if name is not None and name not in found:
        raise PairError(f"no host that answers takes part in a pair named {name!r}"
                        + (f" ({', '.join(unreachable)} did not answer)" if unreachable else ""))
    return [view(n, roles, unreachable) for n, roles in sorted(found.items())]


def stop(hosts: Sequence[Host], name: str, *, keep_images: bool = False) -> dict[str, Any]:
    """Stop protecting ``name``: the active first (its output released, the tree left
    running where it is), then the standby (its generations removed unless kept), then the
    witness."""
    found, unreachable = find(hosts, name)
    roles = found.get(name)
    if not roles:
        raise PairError(f"no host that answers takes part in a pair named {name!r}"
                        + (f" ({', '.join(unreachable)} did not answer)" if unreachable else ""))
    cfg = next(iter(roles.values()))["config"]
    by_name = {h.name: h for h in hosts}
    closed, problems = [], []
    for role in ("active", "standby", "witness"):
        peer = cfg.get(role)
        if not peer:
            continue
        host = by_name.get(peer["name"])
        if host is None or role not in roles:
            problems.append(f"{peer['name']} ({role}) did not answer: its agent keeps the "
                            "pair's record; run 'orthros pair stop' again when it is back")
            continue
        try:
            host.agent.request("pair_close", {"name": name, "keep_images": keep_images})
            closed.append(f"{peer['name']} ({role})")
        except OrthrosError as err:
            problems.append(f"{peer['name']} ({role}): {err}")
    return {"name": name, "closed": closed, "problems": problems, "keep_images": keep_images}


def planned_failover(hosts: Sequence[Host], name: str, *,
                     migrate: Callable[[Host, Host, int, str | None], Any]) -> dict[str, Any]:
    """Switch ``name`` to its standby now: the active's checkpoints pause, the live tree moves
    (``migrate(active, standby, pid, service_ip)``, which rolls back on failure), the standby
    serves it, the old active stands down."""
    found, _unreachable = find(hosts, name)
    roles = found.get(name)
    if not roles:
        raise PairError(f"no host that answers takes part in a pair named {name!r}")
    cfg = next(iter(roles.values()))["config"]
    if "active" not in roles or "standby" not in roles:
        missing = [r for r in ("active", "standby") if r not in roles]
        raise PairError(f"pair {name}: the {' and the '.join(missing)} did not answer: a "
                        "planned failover needs both")
    if roles["standby"].get("state") == "failed over":
        raise PairError(f"pair {name} failed over already")
    by_name = {h.name: h for h in hosts}
    act, sby = by_name[cfg["active"]["name"]], by_name[cfg["standby"]["name"]]
    act.agent.request("pair_pause", {"name": name}, timeout=90.0)
    try:
        result = migrate(act, sby, int(cfg["pid"]), cfg.get("service_ip"))
    except BaseException:
        with contextlib.suppress(OrthrosError):
            act.agent.request("pair_resume", {"name": name})
        raise
    epoch = max(int(r.get("epoch") or 1) for r in roles.values()) + 1
    new_pid = int(getattr(result, "new_pid", 0) or 0)
    ev = sby.agent.request("pair_adopt", {"name": name, "pid": new_pid,
                                          "reason": "a planned failover", "epoch": epoch})
    # The tree is gone from there already; a host that does not answer learns the new epoch
    # when it is back.
    with contextlib.suppress(OrthrosError):
        act.agent.request("pair_stand_down", {"name": name,
                                              "reason": "a planned failover moved the service "
                                                        f"to {sby.name}"})
    return {"name": name, "from": act.name, "to": sby.name, "pid": new_pid, "event": ev,
            "migration": result.to_dict() if hasattr(result, "to_dict") else None}
