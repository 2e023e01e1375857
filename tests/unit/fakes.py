"""Fake agents for the policies' unit tests: they keep the state an agent would (addresses,
locks, a held or restored tree, images, page servers) in memory, share a ``World`` (a clock
and a log of every call), fail on demand (``fail``, ``down``) and answer with the typed results
of the real client. Every policy's unit tests can run against them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orthros_py.agent.errors import AgentUnreachable
from orthros_py.agent.messages import (
    FileInfo,
    KillResult,
    PageServerInfo,
    RemoteDump,
    RemoteRestore,
)
from orthros_py.criu.request import DumpOptions, RestoreOptions
from orthros_py.errors import NoSuchProcessError
from orthros_py.net.conn import Conn
from orthros_py.policies.hosts import AgentAPI, Host

SVC = "10.77.0.100"
CLIENT = "10.77.0.50"


def conns(n: int, local: str = SVC, port: int = 7000) -> tuple[Conn, ...]:
    return tuple(Conn.of((local, port), (CLIENT, 40000 + i)) for i in range(n))


@dataclass
class World:
    """What the fake hosts share: the network (who holds which address) and the clock."""

    now: float = 0.0
    log: list[str] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


CGROUP_TEXT = """# orthros cgroup migration file v1
[hierarchy]
root cpu /lab/alpha/ctr
group cpu /lab/alpha/ctr
[membership]
pid 1 cpu:/lab/alpha/ctr
[limits]
cpu /lab/alpha/ctr cpu.cfs_quota_us = 50000
"""


class FakeAgent:
    """Keeps the state an agent would: addresses, locks, images, a held or restored tree."""

    def __init__(self, world: World, name: str, address: str, *, service: bool,
                 tree: tuple[Conn, ...] = (), running: bool = False) -> None:
        self.world = world
        self.name = name
        self.address = address
        self.addrs = {f"{address}/24", *([f"{SVC}/32"] if service else [])}
        self.locked: set[str] = set()
        self.attached: set[str] = set()
        self.images: set[str] = set()
        self.tree_conns = tree
        self.running: set[int] = {4242} if running else set()
        self.held: set[int] = set()
        self.page_servers: set[str] = set()
        self.restored: dict[int, str] = {}
        # method -> exception (or a callable that may raise) for its next calls
        self.fail: dict[str, BaseException] = {}
        self.fail_times: dict[str, int] = {}
        self.down = False  # unreachable: every call raises AgentUnreachable
        self.cgroup_problems: list[str] = []
        self.cgroup_root = "/"
        self.pid_ns = 1  # the same on both: one PID space, as the lab's hosts once had
        self.tree_pidns: bool | None = True  # the tree shares the agent's PID namespace
        self.tree_threads = 1  # task ids of the tree's root: its pid and the ones after it
        self.pids_held: dict[int, str] = {}  # pid -> name of what holds it here

    def _hit(self, method: str, *args: Any) -> None:
        self.world.log.append(f"{self.name}.{method}")
        if self.down:
            raise AgentUnreachable(f"agent on {self.name} is not reachable", host=self.name)
        err = self.fail.get(method)
        if err is not None:
            left = self.fail_times.get(method, 1_000_000) - 1
            self.fail_times[method] = left
            if left <= 0:
                self.fail.pop(method)
            raise err

    def status(self) -> dict[str, Any]:
        self._hit("status")
        return {"criu": {"version": "4.2.1"}, "boot_id": "boot-1", "pid_ns": self.pid_ns,
                "cgroup_root": self.cgroup_root,
                "held": [{"pid": p} for p in self.held],
                "restored": [{"pid": p, "image": i, "running": p in self.running}
                             for p, i in self.restored.items()]}

    def tree(self, pid: int) -> dict[str, Any]:
        self._hit("tree", pid)
        if pid not in self.running or pid in self.held:
            raise NoSuchProcessError(f"no process with pid {pid} exists", pid=pid)
        return {"pid": pid,
                "processes": [{"pid": pid, "tids": list(range(pid, pid + self.tree_threads))}],
                "conns": [str(c) for c in self.tree_conns],
                "established": [str(c) for c in self.tree_conns],
                "interfaces": ["eth0"] if self.tree_conns else [], "agent_netns": True,
                "agent_pidns": self.tree_pidns, "cgroups": CGROUP_TEXT}

    def pids_in_use(self, pids: Iterable[int]) -> list[tuple[int, str]]:
        asked = sorted(set(pids))
        self._hit("pids_in_use", asked)
        self.world.log.append(f"{self.name}.pids_asked={asked}")
        return [(p, self.pids_held[p]) for p in asked if p in self.pids_held]

    def addr_list(self, *, netns: str | None = None) -> list[dict[str, Any]]:
        self._hit("addr_list")
        return [{"ifname": "lo", "addresses": ["127.0.0.1/8"]},
                {"ifname": "eth0", "addresses": sorted(self.addrs)}]

    def netlock_prepare(self, backend: str = "xdp", *, timeout: float = 120.0
                        ) -> dict[str, Any]:
        self._hit("netlock_prepare", backend)
        return {"backend": backend, "compiled": False}

    def netlock_lock(self, backend: str, *, conns: Iterable[str | Conn] = (),
                     pids: Iterable[int] = (), ifaces: Iterable[str] = (),
                     netns: str | None = None, timeout: float = 120.0,
                     inbound_only: bool = False) -> list[str]:
        self._hit("netlock_lock", backend)
        self.attached |= set(ifaces)
        wanted = {str(c) for c in conns}
        if list(pids):
            wanted |= {str(c) for c in self.tree_conns}
        self.locked |= wanted
        return sorted(wanted)

    def netlock_engage(self, backend: str, *, conns: Iterable[str | Conn] = (),
                       pids: Iterable[int] = (), ifaces: Iterable[str] = (),
                       netns: str | None = None, timeout: float = 120.0,
                       inbound_only: bool = False) -> dict[str, Any]:
        return {"locked": self.netlock_lock(backend, conns=conns, pids=pids, ifaces=ifaces,
                                            netns=netns, timeout=timeout),
                "engaged_after_ms": 0.0}

    def netlock_unlock(self, backend: str, conns: Iterable[str | Conn], *,
                       netns: str | None = None, detach: Iterable[str] = (),
                       tidy: bool = False, detach_after: float = 0.0) -> list[str]:
        self._hit("netlock_unlock", backend)
        gone = {str(c) for c in conns}
        self.locked -= gone
        if not self.locked:
            self.attached -= set(detach)
        return sorted(gone)

    def netlock_unlock_giving_back(self, backend: str, conns: Iterable[str | Conn], pid: int,
                                   segments: Iterable[str] = ()) -> dict[str, Any]:
        self._hit("netlock_unlock", backend)
        self.locked -= {str(c) for c in conns}
        given = list(segments)
        self.given_back = [*getattr(self, "given_back", []), *given]
        return {"caught": 0, "given_back": len(given), "refused": []}

    def netlock_caught(self, backend: str, conns: Iterable[str | Conn]) -> list[str]:
        self._hit("netlock_caught", backend)
        return []

    def page_server(self, image: str, *, address: str | None = None, port: int = 0,
                    log_level: int = 2, parent: str | None = None,
                    scratch: bool = False) -> PageServerInfo:
        self._hit("page_server", image)
        self.images.add(image)
        self.page_servers.add(image)
        return PageServerInfo(image, 0, 12345, self.address, True, nonce="ab" * 32)

    def page_server_stop(self, image: str) -> dict[str, Any]:
        self._hit("page_server_stop", image)
        if image not in self.page_servers:
            raise NoSuchProcessError("no page server")
        self.page_servers.discard(image)
        return {}

    def dump(self, pid: int, image: str, opts: DumpOptions | None = None, *,
             timeout: float = 600.0, page_nonce: str | None = None,
             dirty_track: str | None = None, scratch: bool = False) -> RemoteDump:
        self.images.add(image)  # created (with CRIU's log) before CRIU may fail
        self._hit("dump", pid)
        assert opts is not None and opts.leave_stopped and opts.page_server is not None
        self.held.add(pid)
        return RemoteDump(image, pid, 20.0, False, (pid,),
                          {"pages_written": 100, "frozen_ms": 12.5},
                          {"tcp": [{} for _ in self.tree_conns]})

    def restore(self, image: str, opts: RestoreOptions | None = None, *,
                timeout: float = 600.0) -> RemoteRestore:
        self._hit("restore", image)
        assert image in self.images
        self.running.add(4242)
        self.restored[4242] = image
        return RemoteRestore(image, 4242, (4242,), 30.0, None, {})

    def push_images(self, image: str, host: str, port: int, *, dest_image: str | None = None,
                    dest_name: str | None = None, overwrite: bool = False,
                    timeout: float = 600.0, files: Iterable[str] | None = None,
                    prefixes: Iterable[str] | None = None,
                    scratch: bool = False) -> list[FileInfo]:
        self._hit("push_images", image)
        peer = PEERS[dest_name or host]
        if peer.down:
            raise AgentUnreachable(f"agent on {peer.name} is not reachable", host=peer.name)
        peer.images.add(image)
        return [FileInfo(image, "pages-1.img", 1000), FileInfo(image, "core-1.img", 24)]

    def kill(self, pid: int, *, signal: str = "KILL", wait: float = 5.0) -> KillResult:
        self._hit("kill", pid)
        self.held.discard(pid)
        self.running.discard(pid)
        return KillResult(pid, signal, (pid,), True, None)

    def resume(self, pid: int) -> dict[str, Any]:
        self._hit("resume", pid)
        if pid not in self.held:
            raise NoSuchProcessError(f"pid {pid} is not held")
        self.held.discard(pid)
        return {"pid": pid}

    def cgroup_check(self, text: str, roots: Mapping[str, str] | None = None) -> list[str]:
        self._hit("cgroup_check")
        self.world.log.append(f"{self.name}.cgroup_roots={dict(roots or {})}")
        return list(self.cgroup_problems)

    def cgroup_release(self, image: str) -> dict[str, Any]:
        self._hit("cgroup_release", image)
        return {"removed": 1, "left": []}

    def remove_image(self, image: str, *, background: bool = False) -> bool:
        self._hit("remove_image", image)
        present = image in self.images
        self.images.discard(image)
        return present

    def addr_add(self, ifname: str, address: str, *, netns: str | None = None) -> bool:
        self._hit("addr_add", address)
        self.addrs.add(address)
        return True

    def addr_del(self, ifname: str, address: str, *, netns: str | None = None) -> bool:
        self._hit("addr_del", address)
        self.addrs.discard(address)
        return True

    def garp(self, ifname: str, address: str, *, count: int = 1,
             netns: str | None = None) -> int:
        self._hit("garp", address)
        return count

    def clean(self) -> bool:
        return not (self.locked or self.attached or self.images or self.held
                    or self.page_servers)


PEERS: dict[str, FakeAgent] = {}


def pair(world: World, n_conns: int = 3) -> tuple[FakeAgent, FakeAgent]:
    alpha = FakeAgent(world, "alpha", "10.77.0.11", service=True, tree=conns(n_conns),
                      running=True)
    beta = FakeAgent(world, "beta", "10.77.0.12", service=False, tree=conns(n_conns))
    PEERS.clear()
    PEERS.update({"alpha": alpha, "beta": beta, alpha.address: alpha, beta.address: beta})
    return alpha, beta


def host(agent: FakeAgent, port: int = 7070) -> Host:
    """The policy's view of a fake agent's host."""
    api: AgentAPI = agent  # checks, under mypy, that the fake has all the protocol
    return Host(agent.name, api, agent.address, port)
