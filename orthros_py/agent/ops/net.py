"""Network locks and service addresses: ``netlock_prepare``, ``netlock_lock``, ``netlock_unlock``,
``netlock_caught``, ``netlock_status``, ``addr_list``, ``addr_add``, ``addr_del``, ``garp``.

Interfaces and privileges: ``orthros_py.netlock`` (XDP through bpf(2), nftables, iptables) and
rtnetlink and raw ARP frames through ``orthros_py.net.addr``: root (CAP_NET_ADMIN, CAP_BPF,
CAP_NET_RAW). Those modules are imported when first called, so that an agent whose orthros lacks
one (BCC, pyroute2) still serves everything else (MissingFeatureError says so).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import socket
import threading
import time
from types import ModuleType
from typing import Any

from orthros_py.agent.state import Agent
from orthros_py.agent.table import Call, bad_request, feature, op

log = logging.getLogger("orthros.agent")


def _netlock(a: Agent, backend: str, netns: str | None) -> Any:
    mod = feature("orthros_py.netlock", "take network locks")
    if backend == "xdp":
        # Kept for the agent's life: the compiled program (~10 s to build) stays loaded.
        if "xdp" not in a.netlocks:
            a.netlocks["xdp"] = mod.backend("xdp")
        return a.netlocks["xdp"]
    try:
        return mod.backend(backend, netns=netns)
    except ValueError as err:
        raise bad_request(str(err)) from err


def _conns(items: tuple[str, ...]) -> list[Any]:
    mod = feature("orthros_py.netlock", "take network locks")
    try:
        return [mod.Conn.parse(c) for c in items]
    except ValueError as err:
        raise bad_request(f"bad connection: {err}") from err


@op("netlock_prepare")
def op_netlock_prepare(call: Call, backend: str = "xdp") -> dict[str, Any]:
    """Load the backend ahead of a migration (XDP: compile or open the pinned program)."""
    with call.agent.netlock_mutex:
        lock = _netlock(call.agent, backend, None)
        info = lock.prepare()
    return {"backend": backend, **info}


@op("netlock_lock")
def op_netlock_lock(call: Call, backend: str, conns: tuple[str, ...] = (),
                    pids: tuple[int, ...] = (), ifaces: tuple[str, ...] = (),
                    netns: str | None = None, inbound_only: bool = False) -> dict[str, Any]:
    """Silence connections (``SRC:PORT,DST:PORT``, and those of ``pids``' tree, found here);
    ``inbound_only`` (XDP): only what arrives, for a tree not frozen yet."""
    started = time.perf_counter()
    wanted = _conns(conns)
    names = list(ifaces)
    if pids:
        found = feature("orthros_py.net.conns", "find a tree's connections").discover(list(pids))
        wanted += list(found.conns)
        names += [i for i in found.interfaces if i not in names]
        netns = netns or found.netns
    with call.agent.netlock_mutex:
        call.agent.netlock_epoch += 1
        lock = _netlock(call.agent, backend, netns)
        lock.prepare()
        if names and hasattr(lock, "attach"):
            lock.attach(names, netns=netns)
        # Until here the tree ran and answered: finding its connections is not its clients' wait.
        engaged_after = time.perf_counter() - started
        if inbound_only and hasattr(lock, "lock_inbound"):
            # A running tree's connections (pids): a first lock, which catches afresh.
            locked = lock.lock_inbound(wanted, fresh=bool(pids))
        else:
            locked = lock.lock(wanted)
    return {"backend": backend, "locked": [str(c) for c in locked], "ifaces": names,
            "netns": netns, "engaged_after_ms": round(engaged_after * 1000, 3)}


# A caught segment is one IP packet (bpf/netlock.c keeps at most 1,500 bytes of it).
SEGMENT_MAX = 1500


def _segments(items: tuple[str, ...]) -> list[bytes]:
    out = []
    for item in items:
        try:
            raw = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as err:
            raise bad_request(f"a segment is not base64: {err}") from err
        if len(raw) > SEGMENT_MAX:
            raise bad_request(f"a segment of {len(raw)} bytes (at most {SEGMENT_MAX})")
        out.append(raw)
    return out


@op("netlock_caught")
def op_netlock_caught(call: Call, backend: str, conns: tuple[str, ...]) -> dict[str, Any]:
    """Take what the lock caught of ``conns`` here (the segments their peers sent while
    locked; XDP only, else none), for the host the tree is restored on to give back."""
    wanted = _conns(conns)
    segments: list[str] = []
    with call.agent.netlock_mutex:
        lock = _netlock(call.agent, backend, None)
        if hasattr(lock, "take_caught"):
            segments = [base64.b64encode(p).decode() for p in lock.take_caught(wanted).values()]
    return {"backend": backend, "segments": segments}


@op("netlock_unlock")
def op_netlock_unlock(call: Call, backend: str, conns: tuple[str, ...],
                      netns: str | None = None, detach: tuple[str, ...] = (),
                      tidy: bool = False, give_back_pid: int | None = None,
                      segments: tuple[str, ...] = (), detach_after: float = 0.0
                      ) -> dict[str, Any]:
    """Let connections through again (locked here or by any earlier process). With
    ``give_back_pid`` (the restored tree's, XDP only), then give that tree what the lock caught
    of them here, after ``segments`` (caught on another host, base64 IP packets): each must be
    a segment of one of ``conns``, towards its local end. Then, unless a connection of this
    host is still locked: XDP takes its programs off the interfaces in ``detach`` (the map is
    shared by every namespace of the machine, so "of this host" means with an address of this
    namespace); with ``tidy``, nftables and iptables remove what holds their rules
    (nftables' table). ``detach_after`` (seconds, XDP): take the programs off that much later,
    on a thread of the agent's, and answer now: taking a program off a veth can drop a packet
    on its way, and a just-restored socket, without an RTT estimate yet, would wait a second
    to send it again."""
    wanted = _conns(conns)
    given = _segments(segments)
    if not 0 <= detach_after <= 60:
        raise bad_request("detach_after must be 0-60 s")
    if give_back_pid is not None and give_back_pid <= 0:
        raise bad_request(f"give_back_pid {give_back_pid} is not a process id")
    detached: list[str] = []
    tidied = False
    back: dict[str, Any] = {}
    with call.agent.netlock_mutex:
        lock = _netlock(call.agent, backend, netns)
        if give_back_pid is not None and hasattr(lock, "unlock_taking"):
            caught = lock.unlock_taking(wanted)
            unlocked = wanted
            back = _give_back([*given, *caught.values()], wanted, give_back_pid)
            back["caught"] = len(caught)
        else:
            unlocked = lock.unlock(wanted)
        if hasattr(lock, "detach"):
            if detach and detach_after > 0:
                timer = threading.Timer(detach_after, _detach_if_idle,
                                        (call.agent, lock, list(detach), netns),
                                        {"epoch": call.agent.netlock_epoch})
                timer.daemon = True
                timer.start()
            elif detach:
                detached = _detach_if_idle(call.agent, lock, list(detach), netns, locked=True)
        elif tidy and not lock.status().conns:
            lock.flush()
            tidied = True
    return {"backend": backend, "unlocked": [str(c) for c in unlocked], "detached": detached,
            "tidied": tidied, **back}


def _detach_if_idle(agent: Agent, lock: Any, ifaces: list[str], netns: str | None, *,
                    locked: bool = False, epoch: int | None = None) -> list[str]:
    """Take the XDP programs off ``ifaces`` unless a connection of this host is locked (the
    map is shared by every namespace of the machine); the interfaces detached. ``locked``:
    the caller holds the agent's netlock mutex. ``epoch``: a deferred detach, void if a lock
    was asked for since (its programs may be attached before its connections are written:
    a detach in between would leave them unlocked through a dump)."""
    with contextlib.nullcontext() if locked else agent.netlock_mutex:
        if epoch is not None and epoch != agent.netlock_epoch:
            return []
        try:
            here = _addresses(netns)
            busy = [lc for lc in lock.locked()
                    if lc.conn.local_ip in here or lc.conn.remote_ip in here]
            if busy:
                return []
            return [att.iface for att in lock.detach(ifaces, netns=netns).detached]
        except Exception:
            if locked:
                raise
            log.exception("taking the lock programs off %s later", ", ".join(ifaces))
            return []


def _give_back(packets: list[bytes], conns: list[Any], pid: int) -> dict[str, Any]:
    """Send ``packets`` to the tree of ``pid``, in its network namespace; a failure is
    reported in the answer, never raised: the peers then only retransmit later."""
    replay = feature("orthros_py.net.replay", "give caught segments back")
    if not packets:
        return {"given_back": 0, "refused": []}
    try:
        sent, refused = replay.give_back(packets, conns, f"/proc/{pid}/ns/net")
    except OSError as err:
        sent, refused = 0, [f"cannot give the caught segments back: {err}"]
    except Exception as err:  # e.g. the tree's namespace is gone (OrthrosError)
        sent, refused = 0, [f"cannot give the caught segments back: {err}"]
    return {"given_back": sent, "refused": refused[:5]}


def _addresses(netns: str | None) -> set[str]:
    """Every IP address (v4 and v6, compressed text) on an interface of the namespace."""
    import ipaddress

    mod = _addr()
    with mod.iproute(netns) as ipr:
        return {ipaddress.ip_address(str(a.get("IFA_ADDRESS"))).compressed
                for a in ipr.get_addr()}


@op("netlock_status")
def op_netlock_status(call: Call, backend: str, netns: str | None = None) -> dict[str, Any]:
    """What the backend holds locked, and where it is attached."""
    with call.agent.netlock_mutex:
        status = _netlock(call.agent, backend, netns).status()
    data: dict[str, Any] = status.to_dict()
    return data


def _addr() -> ModuleType:
    return feature("orthros_py.net.addr", "manage service addresses")


@op("addr_list")
def op_addr_list(call: Call, netns: str | None = None) -> dict[str, Any]:
    """This host's interfaces and their IPv4 addresses (address/prefix)."""
    mod = _addr()
    out = []
    with mod.iproute(netns) as ipr:
        links = list(ipr.get_links())
        names = {int(link["index"]): str(link.get("IFLA_IFNAME")) for link in links}
        states = {int(link["index"]): str(link.get("IFLA_OPERSTATE")) for link in links}
        addrs: dict[int, list[str]] = {}
        for a in ipr.get_addr(family=socket.AF_INET):
            addrs.setdefault(int(a["index"]), []).append(
                f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
    for idx, name in sorted(names.items()):
        out.append({"ifname": name, "index": idx, "state": states.get(idx, "UNKNOWN"),
                    "addresses": addrs.get(idx, [])})
    return {"interfaces": out}


@op("addr_add")
def op_addr_add(call: Call, ifname: str, address: str,
                netns: str | None = None) -> dict[str, Any]:
    """Put a service address (``IP`` or ``IP/PREFIX``) on an interface of this host."""
    mod = _addr()
    try:
        added = mod.add_address(netns, ifname, address)
    except ValueError as err:
        raise bad_request(str(err)) from err
    return {"ifname": ifname, "address": address, "added": bool(added)}


@op("addr_del")
def op_addr_del(call: Call, ifname: str, address: str,
                netns: str | None = None) -> dict[str, Any]:
    """Take a service address off an interface of this host."""
    mod = _addr()
    try:
        removed = mod.remove_address(netns, ifname, address)
    except ValueError as err:
        raise bad_request(str(err)) from err
    return {"ifname": ifname, "address": address, "removed": bool(removed)}


@op("garp")
def op_garp(call: Call, ifname: str, address: str, count: int = 1,
            netns: str | None = None) -> dict[str, Any]:
    """Announce a service address from this host with gratuitous ARP."""
    if not 1 <= count <= 100:
        raise bad_request("count must be 1-100")
    mod = _addr()
    try:
        sent = mod.Link(netns, ifname).gratuitous_arp(address, count=count)
    except ValueError as err:
        raise bad_request(str(err)) from err
    return {"ifname": ifname, "address": address, "sent": int(sent)}
