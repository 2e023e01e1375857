"""Do and undo steps that more than one policy takes, each a few agent calls on one host (two
for a transfer): lock a tree's connections on N hosts and lift the lock, take an address off a
host or onto one (with a gratuitous ARP), resume or release a tree held stopped after a dump,
push image files from one host's agent to another's, ask a host whether it restored an image.

A policy records what a step may do (its journal state) and wraps the call in ``Policy.on`` for
the host; these functions only talk to the agents. No privileges here.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable, Iterable, Sequence

from orthros_py.agent.messages import FileInfo
from orthros_py.errors import NoSuchProcessError, OrthrosError
from orthros_py.net.conn import Conn
from orthros_py.policies.engine import Policy, is_transport
from orthros_py.policies.hosts import Host


def prepare_locks(policy: Policy, hosts: Sequence[Host], backend: str, *,
                  timeout: float) -> None:
    """Load the lock backend on every host ahead of the freeze (XDP compiles, ~10 s once)."""
    for host in hosts:
        with policy.on(host):
            info = host.agent.netlock_prepare(backend, timeout=timeout)
        if info.get("compiled"):
            policy.note(f"compiled the {backend} lock on {host.name} in "
                        f"{info.get('compile_seconds') or 0:.1f} s", host=host.name)


def lock(host: Host, backend: str, *, conns: Iterable[str | Conn] = (),
         pids: Iterable[int] = (), ifaces: Iterable[str] = (), timeout: float,
         inbound_only: bool = False) -> list[str]:
    """Silence connections on ``host`` (those given, and the current ones of ``pids``);
    ``inbound_only``: what arrives only (XDP), for a tree not frozen yet."""
    if inbound_only:
        return host.agent.netlock_lock(backend, conns=conns, pids=pids, ifaces=ifaces,
                                       timeout=timeout, inbound_only=True)
    return host.agent.netlock_lock(backend, conns=conns, pids=pids, ifaces=ifaces,
                                   timeout=timeout)


def unlock(host: Host, backend: str, conns: Iterable[str | Conn],
           detach: Iterable[str], *, tidy: bool = True, detach_after: float = 0.0) -> None:
    """Lift the lock of ``conns`` on ``host`` and take the lock programs off ``detach``
    (``tidy=False`` and no ``detach``: only the connections, the quickest; tidy up later;
    ``detach_after``: that many seconds later, by the agent)."""
    if detach_after:
        host.agent.netlock_unlock(backend, conns, detach=detach, tidy=tidy,
                                  detach_after=detach_after)
    else:
        host.agent.netlock_unlock(backend, conns, detach=detach, tidy=tidy)


def drop_address(host: Host, ifname: str, address: ipaddress.IPv4Interface) -> None:
    host.agent.addr_del(ifname, address.with_prefixlen)


def take_address(host: Host, ifname: str, address: ipaddress.IPv4Interface, *,
                 garp_count: int) -> None:
    """Put ``address`` on ``host`` and announce it (switches learn where it went)."""
    host.agent.addr_add(ifname, address.with_prefixlen)
    if garp_count > 0:
        host.agent.garp(ifname, str(address.ip), count=garp_count)


def holds(host: Host, pid: int) -> bool:
    """Whether ``host`` holds the tree of ``pid`` stopped after a dump; True if it cannot
    say (so that an undo still tries to resume it)."""
    with contextlib.suppress(BaseException):
        held = host.agent.status().get("held", [])
        return any(int(t["pid"]) == pid for t in held)
    return True


def resume_held(host: Host, pid: int) -> int:
    """Resume the tree ``host`` holds stopped (TCP repair off, SIGCONT); its pid."""
    try:
        host.agent.resume(pid)
    except NoSuchProcessError:
        # Not held: the dump failed and CRIU resumed it, or it was never stopped.
        host.agent.tree(pid)  # raises if it does not run either
    return pid


def release_held(host: Host, pid: int, *, wait: float, stage: str) -> None:
    """Kill the held tree (its sockets are in repair mode: its peers hear nothing)."""
    killed = host.agent.kill(pid, wait=wait)
    if not killed.exited:
        raise OrthrosError(f"the stopped tree of pid {pid} did not exit after SIGKILL",
                           host=host.name, pid=pid, stage=stage)


def push_images(src: Host, dst: Host, image: str, *, timeout: float, overwrite: bool = False,
                prefixes: Iterable[str] | None = None, scratch: bool = False) -> list[FileInfo]:
    """Have ``src``'s agent send image files straight to ``dst``'s agent (``scratch``: into
    memory there, where it can)."""
    if scratch:
        return src.agent.push_images(image, dst.address, dst.agent_port, dest_name=dst.name,
                                     overwrite=overwrite, timeout=timeout, prefixes=prefixes,
                                     scratch=True)
    return src.agent.push_images(image, dst.address, dst.agent_port, dest_name=dst.name,
                                 overwrite=overwrite, timeout=timeout, prefixes=prefixes)


def restored_on(host: Host, image: str, *, clock: Callable[[], float],
                sleep: Callable[[float], None], retry_s: float,
                interval: float) -> tuple[bool, int | None]:
    """(whether ``host`` could be asked, the pid of a running tree it restored from
    ``image``); asked again while it does not answer or is still restoring."""
    deadline = clock() + retry_s
    while True:
        try:
            status = host.agent.status()
        except Exception as err:
            if not is_transport(err) or clock() >= deadline:
                return False, None
            sleep(interval)
            continue
        for t in status.get("restored", []):
            if t.get("image") == image and t.get("running"):
                return True, int(t["pid"])
        busy = image in (status.get("busy") or {})  # the restore still runs
        if not busy or clock() >= deadline:
            return True, None
        sleep(interval)
