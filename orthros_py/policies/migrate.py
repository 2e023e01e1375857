"""Live migration of a process tree, its TCP connections and its service address between two
hosts, through their agents: the policy behind ``orthros migrate``.

The stages, in order (``Stage``)::

    PREPARE   ask both agents what they are and hold; find the tree, its connections and the
              service address; plan (``plan``, pure); refuse a destination that cannot honour
              the tree's cgroup limits, or cannot give it its PIDs (a tree of its host's own
              PID namespace gets every process and thread id back); load the lock on both
              hosts, attach it on the source; open the destination's page channel
              (``agent.pagechan``)
    PRE-COPY  (``--precopy``; by default for a tree of ``precopy_auto_bytes`` or more where the
              source's CRIU tracks memory) rounds of CRIU pre-dumps while the tree runs, each
              sending only the pages written since the previous one (orthros's CRIU patch 0002:
              userfaultfd write-protection where soft-dirty is missing) into an image of its
              own on the destination, until a round no longer shrinks (``precopy_*``); the
              final dump is then incremental to the last round
    LOCK      silence the tree's connections on the source (XDP: map writes only)
    DUMP      CRIU dump on the source, memory streamed to the destination's page server over
              the page channel (proven with the cluster key, then TLS), the tree left
              *stopped* (``leave_stopped``), its sockets in TCP repair mode
    TRANSFER  the source's agent pushes the other image files to the destination's agent
    ADDRESS   lock the connections on the destination too, move the service address (off the
              source's interface, onto the destination's, gratuitous ARP)
    RESTORE   free the tree's PIDs if both hosts share a PID space (kill the stopped source
              tree), CRIU restore on the destination
              --- point of no return: the tree runs on the destination ---
    UNLOCK    unlock both hosts, take the lock programs off their interfaces (the downtime
              ends here), then kill the stopped source tree (silently: its sockets are in
              repair mode)
    VERIFY    the restored tree runs and holds its connections, established
    MEMORY    (``--lazy``) wait until the last lazy page has reached the destination
    CLEANUP   remove the images on both hosts

Post-copy (``lazy``): the dump leaves the tree's private anonymous memory in its page pipes and
serves it from there (``agent.ops.lazy``); the destination restores with CRIU's lazy pages, so
the tree runs there before its memory has arrived, faulting pages in on demand while the rest is
pushed. The frozen time no longer grows with the memory; the risk moves instead: until the last
page has crossed, the tree's memory is split between two hosts, and the death of either loses
the service. Where the hosts share a PID space the stopped source tree must go before the
restore, and with it the last copy of its memory outside the dump's page pipes: the point of no
return moves to the start of the lazy restore (a failure from there on is reported as the
service lost, and both hosts are cleaned; a source whose clients may have talked to the
destination is never resumed).

Why the source tree is left stopped rather than killed by the dump: its memory went to the
destination only (written once, as the page server receives it), so the source has no complete
checkpoint. Keeping the stopped tree keeps what a rollback needs: resuming it (TCP repair off,
SIGCONT: ``orthros_py.agent.held``) undoes the dump in a few milliseconds, without a restore.
Hosts that share a PID space (the lab's network-namespace hosts) cannot keep it that long: the
destination's restore needs the very PIDs the stopped tree holds, so the tree is killed just
before the restore, and a failed restore is rolled back by fetching the pages back from the
destination (the source kept every other image file) and restoring on the source.

Any failure before the point of no return rolls back (``rollback_plan``, pure): the page server
stops, the address returns to the source, the tree is resumed (or restored) there, both locks
are lifted, the images are removed. Steps on a destination that cannot be reached are retried
for ``MigrateConfig.dest_retry_s`` after the source's own steps are done, so that the service
comes back first. ``MigrationError`` then says in one sentence what failed where and what the
rollback did; failures after the point of no return leave the tree on the destination and are
reported as warnings (unlock, cleanup) or as an error that says so (verify).

The stages run on ``orthros_py.policies.engine`` (events, timings, the journal record before
every agent call, the retrying undo); the hosts are ``policies.hosts``, the steps shared with
other policies ``policies.steps``. A coordinator that died leaves a journal record of kind
``migrate``, which ``recover`` (registered with the engine) finishes or rolls back.

No privileges here and no I/O but the agent calls: the agents do the work (see
``orthros_py.agent.ops``). Never prints: progress goes to an observer callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import ipaddress
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from orthros_py.agent.messages import FileInfo, PageServerInfo, RemoteDump, RemoteRestore
from orthros_py.agent.protocol import options_to_args
from orthros_py.cgroup.fs import CgroupError
from orthros_py.cgroup.model import CgroupFile
from orthros_py.criu.request import (
    TCP_TS_ADVANCE_MAX_MS,
    CgroupMode,
    CriuNetworkLock,
    DumpOptions,
    RestoreOptions,
)
from orthros_py.errors import (
    CriuError,
    ExitStatus,
    NoSuchProcessError,
    OrthrosError,
    PidsInUseError,
)
from orthros_py.net.conn import Conn
from orthros_py.netlock.method import NetworkLock
from orthros_py.policies import steps
from orthros_py.policies.engine import (
    Event,
    Observer,
    Policy,
    PolicyError,
    PolicyStage,
    Recovery,
    UndoOutcome,
    is_transport,
    reason,
    register_recover,
)
from orthros_py.policies.hosts import (
    Host,
    HostFacts,
    PlanError,
    TreeFacts,
    parse_service_ip,
    service_ifname,
    shared_pid_space,
)
from orthros_py.policies.journal import Journal, Record

# Re-exported: what callers of this module used to find here.
__all__ = ["Event", "Facts", "Host", "HostFacts", "MigrateConfig", "Migration",
           "MigrationError", "MigrationResult", "Observer", "Plan", "PlanError", "Recovery",
           "Stage", "TreeFacts", "Undo", "new_image_name", "plan", "recover", "rollback_plan",
           "shared_pid_space"]

KIND = "migrate"  # its journal records' kind
PAGE_BYTES = 4096
# How long the cleanup waits for the restored tree's first reply if none came yet (a service
# nobody talks to gets no "first response" figure).
FIRST_REPLY_WAIT_S = 0.5
# Added to the time since the lock for the TCP timestamp advance: the restore's own duration
# until CRIU sets the clocks.
TS_ADVANCE_MARGIN_MS = 1000
# How long after the unlock the destination's agent takes the lock programs off (see
# ``_detach_locks``); the restored connections have RTT estimates by then.
DEST_DETACH_GRACE_S = 2.0

# --- stages, methods, configuration --------------------------------------------------------------


class Stage(PolicyStage):
    """Where a migration is. The forward stages run in this order; ROLLBACK replaces the rest
    when one of them before the point of no return fails."""

    PREPARE = "prepare"
    PRECOPY = "pre-copy"
    LOCK = "lock"
    DUMP = "dump"
    TRANSFER = "transfer"
    ADDRESS = "address move"
    RESTORE = "restore"
    UNLOCK = "unlock"
    VERIFY = "verify"
    MEMORY = "memory"
    CLEANUP = "cleanup"
    # The engine's names (``engine.DONE``, ...), which its events carry.
    DONE = "done"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled back"
    FAILED = "failed"

    @property
    def before_point_of_no_return(self) -> bool:
        return self in _BEFORE_PONR


# A failure in one of these rolls back. RESTORE is the last: only its success passes the point
# of no return.
_BEFORE_PONR = frozenset({Stage.PREPARE, Stage.PRECOPY, Stage.LOCK, Stage.DUMP, Stage.TRANSFER,
                          Stage.ADDRESS, Stage.RESTORE})


@dataclass(frozen=True)
class MigrateConfig:
    """The thresholds and choices of one migration."""

    # Every method runs as orthros's own backend on both hosts, never CRIU's: the lock must span
    # dump, move and restore on two hosts, which CRIU's per-process methods cannot.
    network_lock: NetworkLock = NetworkLock.XDP
    service_ip: str | None = None  # None: found from the tree's connections (see ``plan``)
    # CRIU options for the dump and the restore.
    tcp_established: bool = True
    ext_unix_sk: bool = False
    shell_job: bool = False
    file_locks: bool = False
    # Dump only: unlinked-but-linked files, deleted files up to this many bytes, hidden
    # devices, connections not yet accepted (see DumpOptions).
    link_remap: bool = False
    ghost_limit: int | None = None
    evasive_devices: bool = False
    skip_in_flight: bool = False
    # CRIU --external resources: the dump's on the source, the restore's on the destination
    # (where a mount dumped as KEY is found, mnt[KEY]:PATH).
    dump_external: tuple[str, ...] = ()
    restore_external: tuple[str, ...] = ()
    manage_cgroups: CgroupMode = CgroupMode.SOFT
    criu_log_level: int = 2
    # Kill the stopped source tree before the restore (True), after it (False), or decide from
    # whether the two hosts share a PID space (None).
    release_source_first: bool | None = None
    garp_count: int = 1
    # Give the restored tree what its peers sent while locked (caught by the XDP lock on both
    # hosts), so that they need not wait out a retransmission backoff; off: experiments only.
    give_back: bool = True
    prepare_timeout_s: float = 120.0  # the first XDP load compiles for ~10 s
    dump_timeout_s: float = 120.0
    transfer_timeout_s: float = 60.0
    restore_timeout_s: float = 120.0
    verify_timeout_s: float = 5.0  # for the restored connections to show as established
    kill_wait_s: float = 10.0
    # How long a rollback keeps trying to reach a destination that does not answer.
    dest_retry_s: float = 15.0
    retry_interval_s: float = 0.5
    keep_images: bool = False  # leave the images on both hosts, after a rollback too
    # Post-copy: the tree runs on the destination before its memory has arrived (see above).
    lazy: bool = False
    # Pre-copy rounds: True, False, or None to decide (the source's CRIU tracks memory, the
    # tree holds at least precopy_auto_bytes and has no userfaultfd of its own).
    precopy: bool | None = None
    # At most this many rounds (P.Haul's 8); stop once a round sends fewer pages than
    # precopy_min_pages (P.Haul's 64), or more than precopy_shrink times the round before: a
    # round that no longer shrinks (P.Haul stopped only on 10 % growth; measured here, a tree
    # that writes steadily reaches its plateau in 3-4 rounds and every round after costs a
    # pre-dump's freeze of 15-20 ms for nothing).
    precopy_max_rounds: int = 8
    precopy_min_pages: int = 64
    precopy_shrink: float = 0.9
    # Below this, a round costs more (a CRIU run, a page channel) than it saves.
    precopy_auto_bytes: int = 64 << 20
    # How long the last lazy page may take to arrive after the restore.
    lazy_timeout_s: float = 1800.0
    # Keep the images in memory on both hosts (the agents' scratch roots, a tmpfs) for trees
    # of at most this many resident bytes: the dump and the transfer write hundreds of small
    # files, which a slow disk made the larger part of the downtime. 0: always on disk.
    scratch_max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for name in ("prepare_timeout_s", "dump_timeout_s", "transfer_timeout_s",
                     "restore_timeout_s", "verify_timeout_s", "kill_wait_s", "dest_retry_s",
                     "lazy_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 0 <= self.criu_log_level <= 4:
            raise ValueError("criu_log_level must be 0-4")
        if not 1 <= self.precopy_max_rounds <= 64:
            raise ValueError("precopy_max_rounds must be 1-64")
        if self.precopy_min_pages < 0 or not 0 < self.precopy_shrink <= 1.0:
            raise ValueError("precopy_min_pages must not be negative, precopy_shrink must be "
                             "in (0, 1]")
        if self.service_ip is not None:
            parse_service_ip(self.service_ip)
        # Refuse bad CRIU options here, before anything stops the tree.
        self.dump_options(("", 0))
        self.restore_options()

    def precopy_options(self, page_server: tuple[str, int], parent: str | None) -> DumpOptions:
        """One pre-copy round: a pre-dump (memory only, the tree runs on) tracking the tree's
        memory from now on, incremental to the previous round."""
        return DumpOptions(
            pre_dump=True, track_mem=True, parent_img=f"../{parent}" if parent else None,
            page_server=page_server, network_lock=CriuNetworkLock.SKIP,
            log_level=self.criu_log_level, shell_job=self.shell_job,
            manage_cgroups=CgroupMode.IGNORE)

    def dump_options(self, page_server: tuple[str, int] | None,
                     parent: str | None = None) -> DumpOptions:
        """The final dump's options; ``parent``: the last pre-copy round, which it is
        incremental to (only the pages written since then are sent)."""
        # CRIU is told skip whatever the method: orthros's agents hold the lock (see network_lock).
        return DumpOptions(
            track_mem=parent is not None, parent_img=f"../{parent}" if parent else None,
            tcp_established=self.tcp_established, ext_unix_sk=self.ext_unix_sk,
            shell_job=self.shell_job, file_locks=self.file_locks,
            manage_cgroups=self.manage_cgroups, network_lock=CriuNetworkLock.SKIP,
            log_level=self.criu_log_level, leave_stopped=True, page_server=page_server,
            link_remap=self.link_remap, ghost_limit=self.ghost_limit,
            evasive_devices=self.evasive_devices, tcp_skip_in_flight=self.skip_in_flight,
            external=self.dump_external)

    def restore_options(self) -> RestoreOptions:
        return RestoreOptions(
            tcp_established=self.tcp_established, ext_unix_sk=self.ext_unix_sk,
            shell_job=self.shell_job, file_locks=self.file_locks,
            manage_cgroups=self.manage_cgroups, network_lock=CriuNetworkLock.SKIP,
            log_level=self.criu_log_level, external=self.restore_external)


# --- facts and the plan (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    source: HostFacts
    dest: HostFacts
    tree: TreeFacts
    # Service addresses the inventory lets both hosts hold (used when neither the caller nor
    # the tree's connections name one).
    candidates: tuple[str, ...] = ()



@dataclass(frozen=True)
class Plan:
    pid: int
    image: str
    source: str
    dest: str
    service: ipaddress.IPv4Interface | None  # with the prefix it has on the source
    src_ifname: str | None  # where the service address is on the source
    dst_ifname: str  # where it goes on the destination, and where its lock attaches
    src_lock_ifaces: tuple[str, ...]  # where the source's lock attaches
    lock: NetworkLock
    release_first: bool
    conns: tuple[Conn, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "image": self.image, "source": self.source, "dest": self.dest,
                "service_ip": self.service.with_prefixlen if self.service else None,
                "src_ifname": self.src_ifname, "dst_ifname": self.dst_ifname,
                "src_lock_ifaces": list(self.src_lock_ifaces), "network_lock": self.lock.value,
                "release_source_first": self.release_first, "conns": len(self.conns),
                "notes": list(self.notes)}


def plan(facts: Facts, config: MigrateConfig, image: str) -> Plan:
    """Decide the migration from what the agents said; PlanError if it cannot work."""
    src, dst, tree = facts.source, facts.dest, facts.tree
    if src.name == dst.name:
        raise PlanError(f"the source and the destination are the same host ({src.name})")
    if not tree.in_agent_netns:
        raise PlanError(f"pid {tree.pid} lives in another network namespace than {src.name}'s "
                        "agent: orthros migrates trees of the host's own network namespace")
    notes: list[str] = []
    local_ips = {ipaddress.ip_address(c.local_ip) for c in tree.conns}
    movable = {ip for ip in local_ips if not ip.is_loopback}

    service: ipaddress.IPv4Interface | None = None
    if config.service_ip is not None:
        wanted = parse_service_ip(config.service_ip)
        held = src.holder_of(wanted.ip)
        if held is None:
            raise PlanError(f"{src.name} does not hold the service address {wanted.ip}")
        service = held[1]
    elif movable:
        if len(movable) > 1:
            raise PlanError(f"the tree of pid {tree.pid} has connections on several addresses "
                            f"({', '.join(sorted(map(str, movable)))}): name the one to move "
                            "with --service-ip")
        (ip,) = movable
        held = src.holder_of(ipaddress.IPv4Address(str(ip)))
        if held is None:
            raise PlanError(f"the connections of pid {tree.pid} use {ip}, which no interface "
                            f"of {src.name} holds")
        service = held[1]
    else:
        options = []
        for cand in facts.candidates:
            held = src.holder_of(parse_service_ip(cand).ip)
            if held is not None:
                options.append(held[1])
        if len(options) > 1:
            raise PlanError(f"{src.name} holds several service addresses "
                            f"({', '.join(a.with_prefixlen for a in options)}): name the one "
                            "to move with --service-ip")
        if options:
            service = options[0]
        else:
            notes.append("no service address to move: the tree has no connections and "
                         f"{src.name} holds none that {dst.name} may take")

    if service is not None:
        if str(service.ip) == src.address:
            raise PlanError(f"{service.ip} is {src.name}'s own address, which cannot move; give "
                            "the service an address of its own (a [[service]] in the inventory)")
        if dst.holder_of(service.ip) is not None:
            raise PlanError(f"{dst.name} already holds {service.ip}")
        stray = [c for c in tree.conns if not ipaddress.ip_address(c.local_ip).is_loopback
                 and ipaddress.ip_address(c.local_ip) != service.ip]
        if stray:
            raise PlanError(f"the connection {stray[0]} of pid {tree.pid} uses {stray[0].local_ip}"
                            f", which stays on {src.name}: only connections to the service "
                            f"address {service.ip} can move")
    elif movable:  # pragma: no cover - the branches above always chose one
        raise PlanError("no service address for the tree's connections")

    src_if = src.holder_of(service.ip)[0] if service is not None else None  # type: ignore[index]
    dst_if = service_ifname(dst, service)
    lock_ifaces = tuple(sorted({*tree.interfaces, *([src_if] if src_if else [])}))
    shared = shared_pid_space(src, dst)
    if config.release_source_first is not None:
        release = config.release_source_first
    elif config.file_locks:
        # The locked files must be there for the restore, so mostly on storage both hosts
        # share: the stopped source would hold their locks and the restore would wait forever.
        release = True
        notes.append("file locks: the source tree is killed before the restore, which takes "
                     "its locks again")
    else:
        release = shared is not False  # unknown: the safe choice for the restore
        if shared is None:
            notes.append("the agents did not say whether they share a PID space: the source "
                         "tree is killed before the restore")
    if config.network_lock is NetworkLock.SKIP and tree.conns:
        notes.append(f"no network lock: packets meanwhile may reset the {len(tree.conns)} "
                     "connections")
    return Plan(pid=tree.pid, image=image, source=src.name, dest=dst.name, service=service,
                src_ifname=src_if, dst_ifname=dst_if, src_lock_ifaces=lock_ifaces,
                lock=config.network_lock, release_first=release, conns=tree.conns,
                notes=tuple(notes))


def new_image_name(pid: int) -> str:
    return f"migrate-{pid}-{secrets.token_hex(4)}"


# --- what has been done, and how to undo it (pure) -----------------------------------------------


@dataclass
class Done:
    """What the forward path has done so far: the rollback undoes exactly this."""

    page_server: bool = False  # started on the destination (may still wait there)
    dest_image: bool = False  # the destination has an image directory for this migration
    src_image: bool = False
    src_attached: tuple[str, ...] = ()  # interfaces of the source the lock was attached to
    src_locked: tuple[str, ...] = ()
    dst_attached: tuple[str, ...] = ()
    dst_locked: tuple[str, ...] = ()
    held: bool = False  # the dumped tree is held stopped on the source
    address_off_source: bool = False
    address_on_dest: bool = False
    released: bool = False  # the held source tree was killed
    restored_pid: int | None = None
    restore_in_doubt: bool = False  # the destination may have restored it: it did not say
    # Pre-copy: its rounds' images (on both hosts) and the source's tracker of the tree's memory.
    precopy_images: tuple[str, ...] = ()
    tracker: str | None = None
    # Post-copy: the destination listens for the lazy dump; the source dumped lazily (its
    # memory lives in that dump's page pipes until the destination has it); the destination
    # restored lazily.
    lazy_listen: bool = False
    lazy_dump: bool = False
    lazy_restore: bool = False


class Undo(enum.Enum):
    """One rollback step, and the host that performs it."""

    STOP_PAGE_SERVER = ("dest", "stop the page server")
    STOP_LAZY_DEST = ("dest", "close the lazy restore's page channel")
    STOP_LAZY_SOURCE = ("source", "end the lazy dump")
    STOP_TRACKING = ("source", "stop tracking the tree's memory")
    ADDRESS_OFF_DEST = ("dest", "take the service address off the destination")
    ADDRESS_ON_SOURCE = ("source", "put the service address back on the source")
    RESUME_SOURCE = ("source", "resume the stopped tree on the source")
    RESTORE_SOURCE = ("source", "restore the tree on the source")
    UNLOCK_SOURCE = ("source", "unlock the connections on the source")
    UNLOCK_DEST = ("dest", "unlock the connections on the destination")
    REMOVE_IMAGE_DEST = ("dest", "remove the images on the destination")
    REMOVE_IMAGE_SOURCE = ("source", "remove the images on the source")

    @property
    def side(self) -> str:
        return str(self.value[0])

    @property
    def sides(self) -> frozenset[str]:
        # The restore on the source fetches the memory from the destination: it needs both.
        return frozenset({"source", "dest"}) if self is Undo.RESTORE_SOURCE else \
            frozenset({self.side})

    @property
    def what(self) -> str:
        return str(self.value[1])

    @property
    def brings_tree(self) -> bool:
        """Brings the tree back on the source."""
        return self in (Undo.RESUME_SOURCE, Undo.RESTORE_SOURCE)

    @property
    def needs_tree(self) -> bool:
        """Only once the tree runs on the source again: unlocked before, its connections would
        meet an address without a socket (resets); the images are all there is of it."""
        return self in (Undo.UNLOCK_SOURCE, Undo.UNLOCK_DEST, Undo.REMOVE_IMAGE_DEST,
                        Undo.REMOVE_IMAGE_SOURCE)

    @property
    def leaves_litter(self) -> bool:
        """Failing it leaves files or records, not a lock, an address or a stopped tree."""
        return self in (Undo.STOP_PAGE_SERVER, Undo.REMOVE_IMAGE_DEST, Undo.REMOVE_IMAGE_SOURCE,
                        Undo.STOP_LAZY_DEST, Undo.STOP_LAZY_SOURCE, Undo.STOP_TRACKING)


def rollback_plan(done: Done) -> list[Undo]:
    """The steps that undo ``done``, in order: address back and tree back first (the service
    returns), locks lifted after that (its connections flow again only once it is there),
    images last. The images stay if the tree cannot be brought back (see ``Migration``)."""
    steps: list[Undo] = []
    if done.page_server or done.precopy_images:
        steps.append(Undo.STOP_PAGE_SERVER)
    if done.lazy_listen or done.lazy_restore:
        steps.append(Undo.STOP_LAZY_DEST)
    if done.lazy_dump:
        steps.append(Undo.STOP_LAZY_SOURCE)
    if done.tracker:
        steps.append(Undo.STOP_TRACKING)
    if done.address_on_dest:
        steps.append(Undo.ADDRESS_OFF_DEST)
    if done.address_off_source:
        steps.append(Undo.ADDRESS_ON_SOURCE)
    if done.held and done.released:
        # After a lazy dump the memory was never anywhere but in its page pipes: nothing can
        # bring the tree back (the point of no return was its release).
        if not done.lazy_dump:
            steps.append(Undo.RESTORE_SOURCE)
    elif done.held:
        steps.append(Undo.RESUME_SOURCE)
    if done.src_locked or done.src_attached:
        steps.append(Undo.UNLOCK_SOURCE)
    if done.dst_locked or done.dst_attached:
        steps.append(Undo.UNLOCK_DEST)
    if done.dest_image:
        steps.append(Undo.REMOVE_IMAGE_DEST)
    if done.src_image:
        steps.append(Undo.REMOVE_IMAGE_SOURCE)
    return steps



# --- progress, results, errors -------------------------------------------------------------------



@dataclass
class MigrationResult:
    pid: int
    new_pid: int
    source: str
    dest: str
    plan: Plan
    timings_ms: dict[str, float]
    processes: int
    connections: int
    established: int
    pages: int
    bytes_transferred: int
    frozen_ms: float | None
    warnings: list[str] = field(default_factory=list)
    # The cgroups carried: the dump's and the restore's reports (groups, timings, mismatches).
    cgroups: dict[str, Any] = field(default_factory=dict)
    # Pre-copy rounds ({pages, bytes, ms} each) and, after a lazy restore, how its memory came
    # (pages faulted on demand and pushed, when the last one arrived, bytes).
    precopy: dict[str, Any] | None = None
    lazy: dict[str, Any] | None = None
    # What the locks caught and the restored tree was given at the unlock (``net/replay``):
    # caught on the source and on the destination, given back, refused (reasons).
    give_back: dict[str, Any] | None = None

    @property
    def bytes_total(self) -> int:
        """Everything that crossed: the image files, the frozen dump's pages, the pre-copy
        rounds' pages and the lazy pages (page data only: the channel's framing aside)."""
        total = self.bytes_transferred + self.pages * 4096
        if self.precopy:
            total += int(self.precopy.get("pages", 0)) * 4096
        if self.lazy:
            total += int(self.lazy.get("pages_copied") or self.lazy.get("pages_total") or 0) * 4096
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid, "new_pid": self.new_pid, "source": self.source, "dest": self.dest,
            "service_ip": self.plan.service.with_prefixlen if self.plan.service else None,
            "network_lock": self.plan.lock.value, "image": self.plan.image,
            "release_source_first": self.plan.release_first,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "counts": {"processes": self.processes, "connections": self.connections,
                       "established_after": self.established, "pages": self.pages,
                       "bytes_transferred": self.bytes_transferred,
                       "bytes_total": self.bytes_total},
            "criu_frozen_ms": None if self.frozen_ms is None else round(self.frozen_ms, 3),
            "warnings": list(self.warnings), "notes": list(self.plan.notes),
            "cgroups": self.cgroups, "precopy": self.precopy, "lazy": self.lazy,
            "give_back": self.give_back,
        }



class MigrationError(PolicyError):
    """A migration failed. ``rolled_back``: the tree runs on the source again with its address
    and no lock is left; ``problems`` lists what the rollback could not undo of those,
    ``leftovers`` the files it could not remove (images on a host that does not answer)."""


class ServiceLostError(MigrationError):
    """A post-copy migration failed past its point of no return: the tree's memory was split
    between the two hosts, so no copy can run again. Both hosts are cleaned."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.SERVICE_LOST


# --- the journal state (migrate's own part of its record) ----------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Conn):
        return str(value)
    if isinstance(value, ipaddress.IPv4Interface):
        return value.with_prefixlen
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class MigrateState:
    """What a migration records to go on after its coordinator died."""

    pid: int
    config: MigrateConfig
    plan: Plan | None
    done: Done
    cgroup_roots: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        plan = None
        if self.plan is not None:
            plan = {f.name: _plain(getattr(self.plan, f.name))
                    for f in dataclasses.fields(self.plan)}
        return {"pid": self.pid,
                "config": {f.name: _plain(getattr(self.config, f.name))
                           for f in dataclasses.fields(self.config)},
                "plan": plan, "done": _plain(dataclasses.asdict(self.done)),
                "cgroup_roots": dict(self.cgroup_roots)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MigrateState:
        """The state of ``to_dict``; ValueError (or KeyError) on anything else."""
        cfg = dict(d["config"])
        cfg["network_lock"] = NetworkLock(cfg["network_lock"])
        cfg["manage_cgroups"] = CgroupMode(cfg["manage_cgroups"])
        for name in ("dump_external", "restore_external"):  # JSON has lists only
            if name in cfg:
                cfg[name] = tuple(cfg[name])
        names = {f.name for f in dataclasses.fields(MigrateConfig)}
        config = MigrateConfig(**{k: v for k, v in cfg.items() if k in names})
        plan = None
        if d.get("plan") is not None:
            p = d["plan"]
            plan = Plan(pid=int(p["pid"]), image=str(p["image"]), source=str(p["source"]),
                        dest=str(p["dest"]),
                        service=ipaddress.IPv4Interface(p["service"]) if p["service"] else None,
                        src_ifname=p["src_ifname"], dst_ifname=str(p["dst_ifname"]),
                        src_lock_ifaces=tuple(p["src_lock_ifaces"]), lock=NetworkLock(p["lock"]),
                        release_first=bool(p["release_first"]),
                        conns=tuple(Conn.parse(c) for c in p["conns"]),
                        notes=tuple(p.get("notes", ())))
        done_names = {f.name for f in dataclasses.fields(Done)}
        raw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                               for k, v in dict(d["done"]).items() if k in done_names}
        done = Done(**raw)
        return cls(int(d["pid"]), config, plan, done, dict(d.get("cgroup_roots", {})))


# --- the state machine ---------------------------------------------------------------------------


class Migration(Policy):
    """One migration of the tree of ``pid`` from ``source`` to ``dest``; ``run()`` once."""

    kind = KIND
    # Every stage there is; an instance drops those its options do not use (``__init__``).
    stages: tuple[PolicyStage, ...] = (
        Stage.PREPARE, Stage.PRECOPY, Stage.LOCK, Stage.DUMP, Stage.TRANSFER, Stage.ADDRESS,
        Stage.RESTORE, Stage.UNLOCK, Stage.VERIFY, Stage.MEMORY, Stage.CLEANUP)
    # Only the restore's success passes it: the tree runs on the destination.
    point_of_no_return = Stage.RESTORE
    # Its destination lock counts as "lock", the move itself as "address move".
    self_timed = frozenset({Stage.ADDRESS})

    def __init__(self, pid: int, source: Host, dest: Host,
                 config: MigrateConfig | None = None, *, observer: Observer | None = None,
                 candidates: Sequence[str] = (), image: str | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep,
                 journal: Journal | None = None) -> None:
        super().__init__({"source": source, "dest": dest}, observer=observer, clock=clock,
                         sleep=sleep, journal=journal)
        self.pid = pid
        self.source = source
        self.dest = dest
        self.config = config or MigrateConfig()
        self.candidates = tuple(candidates)
        self.image = image or new_image_name(pid)
        self.stages = tuple(
            st for st in Migration.stages
            if (st is not Stage.PRECOPY or self.config.precopy is not False)
            and (st is not Stage.MEMORY or self.config.lazy))
        self.done = Done()
        self.plan: Plan | None = None
        self._dumped: RemoteDump | None = None
        self._restored: RemoteRestore | None = None  # None if learnt of from a status
        self._restored_pid: int | None = None
        self._bytes = 0
        self._established = 0
        self._lock_started: float | None = None
        self._page_server: PageServerInfo | None = None
        self._cgroup_roots: dict[str, str] = {}  # where the destination recreates the groups
        self._tree: TreeFacts | None = None
        self._src_criu: Mapping[str, Any] = {}
        self._parent: str | None = None  # the last pre-copy round's image
        self._rounds: list[dict[str, Any]] = []
        self._lazy: dict[str, Any] | None = None
        self._restore_answered: float | None = None
        self._precopy_why_not: str | None = None
        self._give_back: dict[str, Any] | None = None

    # -- what the engine asks of a policy ----------------------------------------------------

    @property
    def id(self) -> str:
        return self.image

    def title(self) -> str:
        return f"pid {self.pid} from {self.source.name} to {self.dest.name}"

    def tree_pid(self) -> int:
        return self.pid

    def journal_state(self) -> dict[str, Any]:
        return MigrateState(self.pid, self.config, self.plan, self.done,
                            dict(self._cgroup_roots)).to_dict()

    def step(self, stage: PolicyStage) -> Callable[[], None]:
        return {Stage.PREPARE: self._prepare, Stage.PRECOPY: self._precopy,
                Stage.LOCK: self._lock_source, Stage.MEMORY: self._memory,
                Stage.DUMP: self._dump, Stage.TRANSFER: self._transfer,
                Stage.ADDRESS: self._address, Stage.RESTORE: self._restore,
                Stage.UNLOCK: self._unlock_stage, Stage.VERIFY: self._verify,
                Stage.CLEANUP: self._cleanup}[Stage(stage)]

    @property
    def _backend(self) -> str | None:
        assert self.plan is not None
        return self.plan.lock.backend

    # -- the forward path -------------------------------------------------------------------

    def run(self) -> MigrationResult:
        """Migrate; MigrationError (after a rollback, when one is possible) if it fails."""
        self.run_stages()
        return self._result()

    # -- recovery of a migration whose coordinator died ------------------------------------

    @classmethod
    def resume(cls, record: Record, source: Host, dest: Host, *,
               journal: Journal | None = None, observer: Observer | None = None,
               clock: Callable[[], float] = time.perf_counter,
               sleep: Callable[[float], None] = time.sleep) -> Migration:
        """The migration a journal record describes, picked up where its coordinator stopped."""
        state = MigrateState.from_dict(record.state)
        m = cls(state.pid, source, dest, state.config, observer=observer, image=record.id,
                clock=clock, sleep=sleep, journal=journal)
        m.stage = Stage(record.stage)
        m.plan = state.plan
        m.done = state.done
        m._cgroup_roots = dict(state.cgroup_roots)
        return m

    def recover(self) -> Recovery:
        """Finish the migration if the destination runs the restored tree (the coordinator
        died past the point of no return), else roll it back. The journal goes once nothing
        is left to do; if the destination cannot be asked, nothing is touched (OrthrosError).
        """
        died_in = Stage(self.stage)
        if self.done.src_image and not self.done.held and steps.holds(self.source, self.pid):
            self.done.held = True  # the dump succeeded but its answer was lost with us
        known, found = self._restored_on_dest()
        if self.done.lazy_dump and (self.done.released or found is not None):
            return self._recover_lazy(died_in, known, found)
        if found is not None:
            self._restored_pid = found
            self.done.restored_pid = found
            self.note(f"{self.dest.name} runs the tree as pid {found}: finishing the migration")
            for stage in (Stage.UNLOCK, Stage.VERIFY, Stage.CLEANUP):
                with self.enter(stage):
                    self.step(stage)()
            self.stage = Stage.DONE
            self.forget()
            return Recovery(self.image, self.pid, died_in.value, "completed", found,
                            self.dest.name, warnings=list(self.warnings))
        if not known and (self.done.restore_in_doubt or died_in is Stage.RESTORE):
            raise OrthrosError(
                f"cannot tell whether {self.dest.name} restored the tree of pid {self.pid} "
                f"(image {self.image}): it does not answer; nothing was touched",
                host=self.dest.name, pid=self.pid, stage="recover",
                hint="run orthros recover again once its agent answers")
        self.stage = Stage.ROLLBACK
        self.emit(Stage.ROLLBACK, "start", f"the coordinator stopped during {died_in.value}")
        out = self._undo_all()
        complete = out.tree_back and not out.problems
        self.stage = Stage.ROLLED_BACK if complete else Stage.FAILED
        self.emit(self.stage, "done" if complete else "failed",
                  "; ".join(out.problems + out.leftovers))
        if complete and not out.leftovers:
            self.forget()
        return Recovery(self.image, self.pid, died_in.value,
                        "rolled back" if complete else "failed",
                        out.pid if out.tree_back else None, self.source.name,
                        problems=out.problems, leftovers=out.leftovers)

    def _recover_lazy(self, died_in: Stage, known: bool, found: int | None) -> Recovery:
        """A lazy migration past its point of no return: finished if the destination runs the
        tree and has all its memory (or gets it now), else the service is lost and both hosts
        are cleaned. The source is never resumed: its clients may have talked to the copy."""
        if found is not None:
            self._restored_pid = found
            self.done.restored_pid = found
            self.note(f"{self.dest.name} runs the tree as pid {found}: waiting for its memory")
            try:
                for stage in (Stage.UNLOCK, Stage.VERIFY, Stage.MEMORY, Stage.CLEANUP):
                    with self.enter(stage):
                        self.step(stage)()
            except MigrationError as lost:
                return Recovery(self.image, self.pid, died_in.value, "lost", None,
                                self.dest.name, problems=[str(lost), *lost.problems])
            self.stage = Stage.DONE
            self.forget()
            return Recovery(self.image, self.pid, died_in.value, "completed", found,
                            self.dest.name, warnings=list(self.warnings))
        why = (f"{self.dest.name} does not answer" if not known
               else f"{self.dest.name} does not run the restored tree")
        gone = self._lost(why)
        return Recovery(self.image, self.pid, died_in.value, "lost", None, self.dest.name,
                        problems=[str(gone), *gone.problems])

    def _prepare(self) -> None:
        cfg, src, dst = self.config, self.source, self.dest
        with self.on(src):
            src_status = src.agent.status()
            tree_data = src.agent.tree(self.pid)
            tree = TreeFacts.from_agent(tree_data)
            src_ifaces = src.agent.addr_list()
        with self.on(dst):
            dst_status = dst.agent.status()
            dst_ifaces = dst.agent.addr_list()
        for host, status in ((src, src_status), (dst, dst_status)):
            criu = status.get("criu") or {}
            if not criu.get("version"):
                raise OrthrosError(f"CRIU is not usable on {host.name}: "
                                   f"{criu.get('error') or 'not found'}", host=host.name,
                                   stage=str(self.stage), hint="run scripts/setup.sh there")
        facts = Facts(HostFacts.from_agent(src.name, src.address, src_status, src_ifaces),
                      HostFacts.from_agent(dst.name, dst.address, dst_status, dst_ifaces),
                      tree, self.candidates)
        self.plan = plan(facts, cfg, self.image)
        self._tree, self._src_criu = tree, src_status.get("criu") or {}
        self._tree_uffd = tree_data.get("userfaultfd")
        if cfg.lazy and not self._src_criu.get("lazy_pages", True):
            raise PlanError(f"CRIU on {src.name} cannot restore lazily (no userfaultfd for "
                            "it there): migrate without --lazy", host=src.name,
                            stage=str(self.stage))
        if cfg.lazy and not (dst_status.get("criu") or {}).get("lazy_pages", True):
            raise PlanError(f"CRIU on {dst.name} cannot restore lazily (no userfaultfd for "
                            "it there): migrate without --lazy", host=dst.name,
                            stage=str(self.stage))
        for note in self.plan.notes:
            self.note(note)
        if cfg.manage_cgroups is not CgroupMode.IGNORE:
            with self.timed("cgroup check"):
                self._check_cgroups(tree_data.get("cgroups"), src_status, dst_status)
        with self.timed("pid check"):
            self._check_pids(tree, shared_pid_space(facts.source, facts.dest), dst_status)
        self.note(f"{len(tree.pids)} processes, {len(tree.conns)} connections"
                  + (f", service address {self.plan.service.with_prefixlen}"
                     if self.plan.service else ""))
        backend = self._backend
        if backend is not None:
            steps.prepare_locks(self, (src, dst), backend, timeout=cfg.prepare_timeout_s)
            if self.plan.src_lock_ifaces and backend == "xdp":
                self.done.src_attached = self.plan.src_lock_ifaces
                with self.on(src):
                    steps.lock(src, backend, ifaces=self.plan.src_lock_ifaces,
                               timeout=cfg.prepare_timeout_s)
        # Decided here, with the tree's facts: without pre-copy rounds the page channel is
        # part of the preparation, as it always was.
        self._precopy_why_not = (self._precopy_wanted() if Stage.PRECOPY in self.stages
                                 else "not asked for")
        if self._precopy_why_not is not None:
            self._open_page_channel()

    def _open_page_channel(self) -> None:
        """The destination's page channel for the final dump: a page server, or for a lazy
        dump the listener its lazy restore takes the connection from; incremental to the last
        pre-copy round if there was one."""
        cfg, dst = self.config, self.dest
        self.done.dest_image = True
        with self.on(dst):
            if cfg.lazy:
                self.done.lazy_listen = True
                args: dict[str, Any] = {"image": self.image, "address": dst.address}
                if self._parent:
                    args["parent"] = self._parent
                info = dst.agent.request("lazy_listen", args)
                self._page_server = PageServerInfo(self.image, 0, int(info["port"]),
                                                   str(info["address"] or dst.address), False,
                                                   str(info["nonce"]), "waiting")
            else:
                self.done.page_server = True
                if self._scratch:
                    self._page_server = dst.agent.page_server(
                        self.image, address=dst.address, log_level=cfg.criu_log_level,
                        scratch=True)
                else:
                    self._page_server = dst.agent.page_server(
                        self.image, address=dst.address, log_level=cfg.criu_log_level,
                        parent=self._parent)

    @property
    def _scratch(self) -> bool:
        """Whether this migration's images stay in memory on both hosts (where the agents
        have a scratch root): not for post-copy, not incremental to pre-copy rounds (their
        images are on disk), not for a tree too large for memory twice over, not for a tree
        with a mount namespace of its own (a container): CRIU archives its tmpfs mounts, and
        the one holding a scratch root would be among them, being written meanwhile."""
        tree = self._tree
        return (not self.config.lazy and self._parent is None and tree is not None
                and tree.in_agent_mntns and 0 < tree.rss <= self.config.scratch_max_bytes)

    def _precopy_wanted(self) -> str | None:
        """Why pre-copy is off for this migration (None: it runs)."""
        cfg, tree = self.config, self._tree
        assert tree is not None
        tracks = bool(self._src_criu.get("mem_track"))
        if cfg.precopy is True:
            if not tracks:
                raise PlanError(f"CRIU on {self.source.name} cannot track memory, which "
                                "pre-copy needs: migrate without --precopy",
                                hint="run 'make setup' there (orthros's CRIU patch 0002 "
                                "tracks memory where the kernel has no soft-dirty bits)",
                                host=self.source.name, stage=str(self.stage))
            if self._tree_uffd:
                raise PlanError(f"pid {self._tree_uffd} of the tree uses userfaultfd itself, "
                                "which the memory tracking of pre-copy would clash with: "
                                "migrate without --precopy", host=self.source.name,
                                pid=self.pid, stage=str(self.stage))
            return None
        if not tracks:
            return f"CRIU on {self.source.name} cannot track memory"
        if self._tree_uffd:
            return f"pid {self._tree_uffd} of the tree uses userfaultfd itself"
        if tree.rss < cfg.precopy_auto_bytes:
            return (f"the tree holds {tree.rss >> 20} MiB, under "
                    f"{cfg.precopy_auto_bytes >> 20} MiB")
        return None

    def _precopy(self) -> None:
        """Pre-copy rounds while the tree runs (see the module's docstring), then the page
        channel for the final dump."""
        cfg, src, dst = self.config, self.source, self.dest
        if self._precopy_why_not is not None:
            self.note(f"no pre-copy: {self._precopy_why_not}")
            return
        tracker = f"{self.image}.track"
        self.done.tracker = tracker
        prev_pages: int | None = None
        for k in range(1, cfg.precopy_max_rounds + 1):
            img = f"{self.image}.pre{k}"
            self.done.precopy_images = (*self.done.precopy_images, img)
            start = self.clock()
            with self.on(dst):
                ps = dst.agent.page_server(img, address=dst.address,
                                           log_level=cfg.criu_log_level, parent=self._parent)
            opts = cfg.precopy_options((str(ps.address or dst.address), int(ps.port)),
                                       self._parent)
            with self.on(src):
                d = src.agent.dump(self.pid, img, opts, timeout=cfg.dump_timeout_s,
                                   page_nonce=str(ps.nonce), dirty_track=tracker)
            stats = d.stats or {}
            pages = int(stats.get("pages_written", 0))
            ms = (self.clock() - start) * 1000
            self._rounds.append({"round": k, "pages": pages, "bytes": pages * PAGE_BYTES,
                                 "ms": round(ms, 3),
                                 "frozen_ms": stats.get("frozen_ms")})
            self._parent = img
            self.note(f"pre-copy round {k}: {pages} pages ({pages * PAGE_BYTES >> 20} MiB) "
                      f"in {ms:.0f} ms")
            if pages < cfg.precopy_min_pages:
                break  # converged: the final dump's share is small
            if prev_pages is not None and pages > prev_pages * cfg.precopy_shrink:
                self.note(f"pre-copy stops: round {k} no longer shrinks ({pages} pages after "
                          f"{prev_pages}): the tree writes as fast as the rounds copy")
                break
            prev_pages = pages
        self._open_page_channel()

    def _check_cgroups(self, text: str | None, src_status: Mapping[str, Any],
                       dst_status: Mapping[str, Any]) -> None:
        """Refuse, before anything is frozen, a destination that cannot honour the tree's
        cgroup limits (``text``: the source's migration file of the live tree); decide where
        there the groups go (below the destination's own cgroup root)."""
        dst = self.dest
        if text is None:
            return  # the tree went while the agent looked: the dump will say so
        cgf = CgroupFile.from_text(text)
        if cgf.empty:
            return
        self._cgroup_roots = cgf.relocated(str(src_status.get("cgroup_root") or "/"),
                                           str(dst_status.get("cgroup_root") or "/"))
        with self.on(dst):
            problems = dst.agent.cgroup_check(text, self._cgroup_roots)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CgroupError(f"{dst.name} cannot honour the cgroup limits of pid {self.pid}: "
                              f"{problems[0]}{more}", host=dst.name, pid=self.pid,
                              stage=str(self.stage),
                              hint="migrate where the limits fit, or change them on the source")
        self.note(f"{len(cgf.groups)} cgroups with {len(cgf.limits())} limits go to "
                  f"{dst.name}" + (f" below {dst_status.get('cgroup_root')}"
                                   if self._cgroup_roots else ""))

    def _check_pids(self, tree: TreeFacts, shared: bool | None,
                    dst_status: Mapping[str, Any]) -> None:
        """Refuse, before anything is frozen, a destination where live processes hold PIDs the
        restore must give the tree back: every process and thread id of a tree in its host's
        own PID namespace (a tree that is the init of a PID namespace of its own, a container,
        is restored into a new one and needs none). Hosts that share one PID space are not
        asked: the tree itself holds those PIDs there, and gives them up before the restore."""
        dst = self.dest
        if tree.in_agent_pidns is not True or shared is not False:
            return
        ops = dst_status.get("ops")
        if ops is not None and "pids_in_use" not in ops:
            self.note(f"{dst.name}'s agent cannot say whether the tree's PIDs are free there "
                      "(an older orthros): the restore will find out")
            return
        with self.on(dst):
            held = dst.agent.pids_in_use(tree.tids or tree.pids)
        if held:
            pid, name = held[0]
            more = f" (and {len(held) - 1} more)" if len(held) > 1 else ""
            raise PidsInUseError(
                f"{dst.name} cannot give pid {self.pid}'s tree its PIDs: pid {pid} is held "
                f"there by {name}{more}; nothing was frozen", host=dst.name, pid=self.pid,
                stage=str(self.stage),
                hint="run the service in a PID namespace of its own (as containers are), or "
                     "give each host a PID range of its own (kernel.ns_last_pid), or migrate "
                     "where those PIDs are free")

    def _lock_source(self) -> None:
        assert self.plan is not None
        started = self._lock_started = self.clock()
        backend = self._backend
        if backend is None:
            return
        # Found again by the agent now: the connections of this very moment.
        self.done.src_locked = tuple(str(c) for c in self.plan.conns)  # at least these
        with self.on(self.source):
            # XDP: what arrives only. The tree is not frozen yet, and what it still answers
            # must reach its clients rather than wait in the restored socket for a one-second
            # retransmission timeout (its acknowledgements are caught and given back). Once
            # dumped its sockets are in repair mode: the kernel may still retransmit from them,
            # data the clients have or take, but sends no FIN or RST.
            got = self.source.agent.netlock_engage(
                backend, pids=[self.pid], ifaces=self.plan.src_lock_ifaces,
                timeout=self.config.prepare_timeout_s,
                inbound_only=backend == NetworkLock.XDP.value)
        locked = [str(c) for c in got["locked"]]
        self.done.src_locked = tuple(dict.fromkeys([*locked, *self.done.src_locked]))
        # The clients' wait starts when the lock takes hold, after the agent found the
        # connections (the tree served meanwhile); early by the request's one-way delay.
        self._lock_started = started + float(got.get("engaged_after_ms") or 0.0) / 1000

    def _dump(self) -> None:
        cfg, src = self.config, self.source
        ps = self._page_server
        assert ps is not None
        where = (str(ps.address or self.dest.address), int(ps.port))
        opts = cfg.dump_options(None if cfg.lazy else where, self._parent)
        self.done.src_image = True
        if cfg.lazy:
            self._dump_lazy(opts, where, str(ps.nonce))
            return
        try:
            with self.on(src):
                # The nonce opens the destination's page channel: only an agent holding the
                # cluster key gets its memory there, and over TLS.
                self._dumped = src.agent.dump(self.pid, self.image, opts,
                                              timeout=cfg.dump_timeout_s,
                                              page_nonce=str(ps.nonce),
                                              dirty_track=self.done.tracker,
                                              scratch=self._scratch)
        except BaseException as err:
            # A dump that failed leaves the tree running (CRIU resumes it). One whose answer
            # was lost may have succeeded: ask whether the tree is held stopped.
            if is_transport(err):
                self.done.held = steps.holds(src, self.pid)
            raise
        self.done.held = True
        # The page server serves one dump and exits.
        self.done.page_server = False
        stats = self._dumped.stats or {}
        self.note(f"dumped {len(self._dumped.pids)} processes, "
                  f"{stats.get('pages_written', 0)} pages sent to {self.dest.name}")

    def _dump_lazy(self, opts: DumpOptions, where: tuple[str, int], nonce: str) -> None:
        """The source's lazy dump: the images without the anonymous memory, which the dump
        keeps in its page pipes and serves to the destination's page channel from now on."""
        cfg, src = self.config, self.source
        args: dict[str, Any] = {
            "pid": self.pid, "image": self.image, "page_host": where[0],
            "page_port": where[1], "page_nonce": nonce,
            "options": options_to_args(opts, exclude=("pid", "notify")),
            "ready_timeout": cfg.dump_timeout_s}
        if self.done.tracker:
            args["dirty_track"] = self.done.tracker
        self.done.lazy_dump = True
        try:
            with self.on(src):
                self._dumped = RemoteDump.from_dict(
                    src.agent.request("dump_lazy", args, timeout=cfg.dump_timeout_s + 30))
        except BaseException as err:
            if is_transport(err):
                self.done.held = steps.holds(src, self.pid)
            raise
        self.done.held = True
        self.note(f"dumped {len(self._dumped.pids)} processes lazily: their memory waits on "
                  f"{self.source.name} for {self.dest.name} to ask for it")

    def _transfer(self) -> None:
        src, dst = self.source, self.dest
        with self.on(src):
            sent: list[FileInfo] = steps.push_images(src, dst, self.image,
                                                     timeout=self.config.transfer_timeout_s,
                                                     scratch=self._scratch)
        self._bytes = sum(f.size for f in sent)
        self.note(f"{len(sent)} image files ({self._bytes} bytes) sent to {dst.name}")

    def _lock_dest(self) -> None:
        assert self.plan is not None
        backend = self._backend
        if backend is None or not self.done.src_locked:
            return
        ifaces = (self.plan.dst_ifname,) if backend == "xdp" else ()
        self.done.dst_attached = ifaces
        self.done.dst_locked = self.done.src_locked
        with self.timed("lock"), self.on(self.dest):
            # XDP: what arrives only (it would meet no socket before the restore, and be
            # answered with a reset). What the restored tree sends must go out at once: a
            # restored socket has no RTT estimate, and one answer dropped here would wait for
            # a retransmission timeout of a second.
            steps.lock(self.dest, backend, conns=self.done.src_locked, ifaces=ifaces,
                       timeout=self.config.prepare_timeout_s,
                       inbound_only=backend == NetworkLock.XDP.value)

    def _address(self) -> None:
        self._lock_dest()
        with self.timed("address move"):
            self._move_address()

    def _move_address(self) -> None:
        p, src, dst = self.plan, self.source, self.dest
        assert p is not None
        if p.service is None:
            return
        assert p.src_ifname is not None
        self.done.address_off_source = True
        with self.on(src):
            steps.drop_address(src, p.src_ifname, p.service)
        self.done.address_on_dest = True
        with self.on(dst):
            steps.take_address(dst, p.dst_ifname, p.service, garp_count=self.config.garp_count)

    def _restore(self) -> None:
        assert self.plan is not None
        cfg, dst = self.config, self.dest
        if self.plan.release_first:
            self._release_source()
        try:
            with self.on(dst):
                opts = dataclasses.replace(cfg.restore_options(), cgroup_roots=self._cgroup_roots,
                                           tcp_ts_advance_ms=self._ts_advance_ms())
                if cfg.lazy:
                    self.done.lazy_restore = True
                    self._restored = RemoteRestore.from_dict(dst.agent.request(
                        "restore_lazy",
                        {"image": self.image,
                         "options": options_to_args(opts, exclude=("notify", "sibling"))},
                        timeout=cfg.restore_timeout_s))
                else:
                    self._restored = dst.agent.restore(self.image, opts,
                                                       timeout=cfg.restore_timeout_s)
        except BaseException as err:
            if not (is_transport(err) or isinstance(err, KeyboardInterrupt)):
                raise
            # No answer (or we stopped listening): the restore may have happened all the same,
            # or still be under way there. Ask before undoing.
            known, found = self._restored_on_dest()
            if found is None:
                self.done.restore_in_doubt = not known
                raise
            self.note(f"{dst.name} did not answer the restore, but runs the tree as pid "
                      f"{found}: going on", host=dst.name)
            self._restored_pid = found
        else:
            self._restored_pid = self._restored.pid
            self._restore_answered = self.clock()
            # The restore call also waits for the tree's PIDs to be free (one PID space).
            self.timings["criu restore"] = self._restored.elapsed_ms
        self.done.restored_pid = self._restored_pid
        self.note(f"restored on {dst.name} as pid {self._restored_pid}")

    def _ts_advance_ms(self) -> int | None:
        """How far the restored connections' TCP timestamp clock moves on (CRIU patch 0009):
        the time since the lock, on this coordinator's clock, plus a margin for the restore.
        The source's held sockets go on retransmitting with their running clock, and a client
        that saw one of those drops whatever is stamped earlier (PAWS)."""
        if self._lock_started is None:
            return None
        ms = int((self.clock() - self._lock_started) * 1000) + TS_ADVANCE_MARGIN_MS
        return max(0, min(ms, TCP_TS_ADVANCE_MAX_MS))

    def _release_source(self) -> None:
        """Kill the held source tree (its sockets are in repair mode: its peers hear nothing)."""
        self.done.released = True  # SIGKILL is on its way: from now on it cannot be resumed
        with self.timed("release source"), self.on(self.source):
            steps.release_held(self.source, self.pid, wait=self.config.kill_wait_s,
                               stage=str(self.stage))

    def _restored_on_dest(self) -> tuple[bool, int | None]:
        return steps.restored_on(self.dest, self.image, clock=self.clock, sleep=self.sleep,
                                 retry_s=self.config.dest_retry_s,
                                 interval=self.config.retry_interval_s)

    # -- after the point of no return -------------------------------------------------------

    def _release_source_after(self) -> None:
        assert self.plan is not None
        if self.plan.release_first or not self.done.held:
            return
        try:
            self._release_source()
        except Exception as err:
            self.warn(f"killing the stopped tree of pid {self.pid}", err, self.source)

    def _unlock_stage(self) -> None:
        self._unlock()
        if self._lock_started is not None:
            self.timings["downtime"] = (self.clock() - self._lock_started) * 1000
        # Off the clients' wait: the address announced once more, the stopped source tree
        # killed (its sockets are in repair mode, so it answers nothing meanwhile, and its
        # address is on the destination), the lock programs taken off the interfaces.
        self._announce()
        self._release_source_after()
        self._detach_locks()

    def _unlock(self) -> None:
        """Let the connections through: map entries only (the quickest); the programs come
        off later (``_detach_locks``). With the XDP lock, the restored tree is then given what
        its peers sent while locked, caught on the source (before the address moved) and on
        the destination (after): their retransmission timers backed off, and would have kept
        them waiting up to twice the lock window."""
        backend = self._backend
        pid = self._restored_pid
        give_back = (backend == NetworkLock.XDP.value and self.config.give_back
                     and pid is not None and bool(self.done.dst_locked))
        segments: list[str] = []
        if give_back and self.done.src_locked:
            try:
                segments = self.source.agent.netlock_caught(backend or "", self.done.src_locked)
            except Exception as err:
                self.warn("taking what the lock caught on the source", err, self.source)
        # The destination first: the restored tree talks as soon as its side is open.
        for host, conns in ((self.dest, self.done.dst_locked),
                            (self.source, self.done.src_locked)):
            if backend is None or not conns:
                continue
            try:
                if give_back and host is self.dest:
                    assert pid is not None
                    back = host.agent.netlock_unlock_giving_back(backend, conns, pid, segments)
                    self._give_back = {"caught_source": len(segments),
                                       "caught_dest": int(back.get("caught", 0)),
                                       "given_back": int(back.get("given_back", 0)),
                                       "refused": list(back.get("refused", []))}
                    if self._give_back["refused"]:
                        self.warnings.append(
                            f"{host.name} refused to give back some caught segments (their "
                            f"peers retransmit instead), e.g. {self._give_back['refused'][0]}")
                else:
                    steps.unlock(host, backend, conns, (), tidy=False)
            except Exception as err:
                self.warn("unlocking the connections", err, host)

    def _detach_locks(self) -> None:
        """Take the lock programs off the interfaces (and tidy nftables' and iptables' own),
        once nothing of the migration is locked any more."""
        backend = self._backend
        for host, ifaces in ((self.dest, self.done.dst_attached),
                             (self.source, self.done.src_attached)):
            if backend is None:
                continue
            try:
                # On the destination a while later: taking a program off a veth can drop a
                # packet on its way, and a restored socket, with no RTT estimate yet, sends
                # it again only a second later (seen: 1 in 3 migrations of the echo service
                # had a client wait 1.3-2.5 s).
                later = DEST_DETACH_GRACE_S if host is self.dest and ifaces else 0.0
                steps.unlock(host, backend, (), ifaces, detach_after=later)
            except Exception as err:
                self.warn("taking the lock off the interfaces", err, host)

    def _announce(self) -> None:
        # Announce the address once more, now that nothing is in a hurry (one frame went out
        # with the move; a switch that missed it learns it now).
        p = self.plan
        if p is not None and p.service is not None and self.config.garp_count > 0:
            try:
                self.dest.agent.garp(p.dst_ifname, str(p.service.ip), count=1)
            except Exception as err:
                self.warn("announcing the address again", err, self.dest)

    def _verify(self) -> None:
        assert self._restored_pid is not None
        new_pid = self._restored_pid
        assert self.plan is not None
        # What was locked (found again at the lock), or without a lock what the plan found.
        expected = {str(c) for c in (self.done.src_locked or self.plan.conns)}
        deadline = self.clock() + self.config.verify_timeout_s
        while True:
            try:
                tree = self.dest.agent.tree(new_pid)
            except NoSuchProcessError as err:
                if self.done.lazy_restore:
                    raise self._lost(self._lazy_failure(f"the restored tree (pid {new_pid}) "
                                                        f"died on {self.dest.name}"), err) from err
                raise MigrationError(
                    f"pid {self.pid} was restored on {self.dest.name} as pid {new_pid} but is "
                    f"not running there any more; there is no going back (the source tree is "
                    f"gone)", cause=err, host=self.dest.name, pid=new_pid,
                    stage=Stage.VERIFY.value) from err
            except Exception as err:
                self.warn(f"checking the restored tree of pid {new_pid}", err, self.dest)
                return
            established = set(tree.get("established", []))
            missing = expected - established
            if not missing or self.clock() >= deadline:
                break
            self.sleep(0.05)
        self._established = len(expected & established)
        procs = tree.get("processes", [])
        if self._dumped is not None and len(procs) < len(self._dumped.pids):
            self.warnings.append(f"{len(procs)} of {len(self._dumped.pids)} processes run "
                                 f"on {self.dest.name}")
        if missing:
            self.warnings.append(f"{len(missing)} of {len(expected)} connections are not "
                                 f"established on {self.dest.name} (closed meanwhile?), e.g. "
                                 f"{sorted(missing)[0]}")
        self.note(f"pid {new_pid} runs on {self.dest.name} with {self._established} "
                  "established connections")

    def _memory(self) -> None:
        """Wait until the destination has the last lazy page (the source's dump then ends). A
        transfer that fails loses the service: the tree's memory was split between the hosts."""
        cfg, src, dst = self.config, self.source, self.dest
        try:
            with self.on(dst):
                st = dst.agent.request("lazy_status",
                                       {"image": self.image, "wait": cfg.lazy_timeout_s},
                                       timeout=cfg.lazy_timeout_s + 30)
        except Exception as err:
            raise self._lost(f"{dst.name} did not say whether the tree's memory arrived "
                             f"({reason(err)})", err) from err
        if st.get("state") != "done":
            why = st.get("error") or f"the transfer is still {st.get('state')}"
            raise self._lost(f"the tree's memory did not all reach {dst.name}: {why}")
        src_st: Mapping[str, Any] = {}
        try:
            with self.on(src):
                src_st = src.agent.request("lazy_source_status",
                                           {"image": self.image, "wait": 30.0}, timeout=60)
        except Exception as err:
            self.warn("asking the source how its lazy dump ended", err, src)
        dump = src_st.get("dump") or {}
        if self._dumped is not None and dump.get("stats"):
            self._dumped = dataclasses.replace(self._dumped, stats=dump["stats"])
        started, done_at = st.get("restore_done_at"), st.get("finished_at")
        self._lazy = {
            "pages_faulted": int(st.get("pages_faulted", 0)),
            "pages_pushed": int(st.get("pages_pushed", 0)),
            "pages_total": int(st.get("pages_total", 0)),
            "pages_copied": int(st.get("pages_copied", 0)),
            "bytes_received": int(st.get("bytes_received", 0)),
            # From the tree running on the destination to the last page there (its clock).
            "last_page_ms": (round((float(done_at) - float(started)) * 1000, 3)
                             if started and done_at else None),
            "downtime_ms": self.timings.get("downtime"),
            "source": src_st.get("state")}
        self.note(f"every page is on {dst.name}: {self._lazy['pages_faulted']} faulted on "
                  f"demand, {self._lazy['pages_pushed']} pushed")

    def _lazy_failure(self, what: str) -> str:
        """``what``, with the destination's word on its lazy pages when it has one."""
        with contextlib.suppress(Exception):
            st = self.dest.agent.request("lazy_status", {"image": self.image}, timeout=10)
            if st.get("error"):
                return f"{what}: {st['error']}"
        return what

    def _lost(self, why: str, cause: BaseException | None = None) -> MigrationError:
        """The service is lost (a lazy transfer failed past the point of no return): nothing
        can bring the tree back on either host. Clean both hosts of everything of it (the
        destination's half-restored tree, whose missing memory would read as zeros, first);
        the error says so."""
        src, dst = self.source, self.dest
        problems: list[str] = []

        def attempt(what: str, host: Host, fn: Callable[[], object]) -> None:
            try:
                fn()
            except NoSuchProcessError:
                pass  # gone already (a second pass: orthros recover)
            except Exception as err:
                problems.append(f"{what} on {host.name}: {reason(err)}")

        new_pid = self._restored_pid
        if new_pid is not None:
            attempt(f"killing the restored tree (pid {new_pid})", dst,
                    lambda: dst.agent.kill(new_pid, wait=self.config.kill_wait_s))
        attempt("closing the lazy restore", dst,
                lambda: dst.agent.request("lazy_stop", {"image": self.image}))
        attempt("ending the lazy dump", src,
                lambda: src.agent.request("lazy_stop", {"image": self.image}))
        if self.done.held and not self.done.released:
            # Its clients may have talked to the destination already: never resumed.
            attempt("killing the stopped source tree", src, self._release_source)
        backend = self._backend if self.plan is not None else None
        if backend is not None:
            for host, conns, ifaces in ((dst, self.done.dst_locked, self.done.dst_attached),
                                        (src, self.done.src_locked, self.done.src_attached)):
                if conns or ifaces:
                    attempt("unlocking the connections", host,
                            functools.partial(steps.unlock, host, backend, conns, ifaces))
        if self.done.tracker:
            attempt("stopping the memory tracking", src, lambda: src.agent.request(
                "dirty_track_close", {"name": self.done.tracker}))
        for host in (dst, src):
            for img in (self.image, *self.done.precopy_images):
                attempt(f"removing image {img}", host,
                        functools.partial(host.agent.remove_image, img))
        self.stage = Stage.FAILED
        self.emit(Stage.FAILED, "failed", why)
        if not problems:
            self.forget()  # nothing is left for orthros recover to do
        state = ("both hosts were cleaned" if not problems
                 else "cleaning failed: " + "; ".join(problems))
        return ServiceLostError(
            f"migration of pid {self.pid} from {src.name} to {dst.name} lost the service: "
            f"{why}; with post-copy the tree's memory was split between the two hosts, so "
            f"nothing can bring it back; {state}", cause=cause, rolled_back=False,
            problems=problems, service_down=True, pid=self.pid, stage=Stage.MEMORY.value)

    def _first_response(self) -> None:
        """``first response``: from the lock to the first reply of the restored tree that a
        client acknowledged (its agent watches from the restore on: ``first_reply``); each of
        the two spans measured on one clock. None if no client was waiting."""
        if self._lock_started is None or self._restore_answered is None:
            return
        try:
            fr = self.dest.agent.request("first_reply", {"image": self.image,
                                                         "wait": FIRST_REPLY_WAIT_S}, timeout=10)
        except Exception:
            return  # a figure, not a step: nothing to warn about
        after = fr.get("after_restore_ms")
        if after is not None:
            self.timings["first response"] = (
                (self._restore_answered - self._lock_started) * 1000 + float(after))

    def _cleanup(self) -> None:
        self._first_response()
        # The page server exited after the dump; this only drops the agent's record of it.
        with contextlib.suppress(Exception):
            self.dest.agent.page_server_stop(self.image)
        if self.config.lazy:
            for host in (self.dest, self.source):
                try:
                    host.agent.request("lazy_stop", {"image": self.image})
                except Exception as err:
                    self.warn("closing the lazy migration's records", err, host)
        if self.done.tracker:
            try:
                self.source.agent.request("dirty_track_close", {"name": self.done.tracker})
            except Exception as err:
                self.warn("stopping the memory tracking", err, self.source)
        if self.config.manage_cgroups is not CgroupMode.IGNORE:
            # The source's groups are empty now that its tree is gone (its own record of them
            # is in its image: before the image goes).
            try:
                released = self.source.agent.cgroup_release(self.image)
                for why in released.get("left", []):
                    self.warnings.append(f"cgroup left on {self.source.name}: {why}")
            except Exception as err:
                self.warn("removing the tree's old cgroups", err, self.source)
        if self.config.keep_images:
            return
        for host in (self.dest, self.source):
            for img in (self.image, *self.done.precopy_images):
                try:
                    # Renamed out of the way at once, deleted by the agent afterwards: the
                    # service runs already, and thousands of files need not hold the command.
                    host.agent.remove_image(img, background=True)
                except Exception as err:
                    self.warn(f"removing image {img}", err, host)

    def _result(self) -> MigrationResult:
        assert self.plan is not None and self._dumped is not None
        assert self._restored_pid is not None
        stats = self._dumped.stats or {}
        raw = self._dumped.raw or {}
        return MigrationResult(
            pid=self.pid, new_pid=self._restored_pid, source=self.source.name,
            dest=self.dest.name, plan=self.plan, timings_ms=dict(self.timings),
            processes=len(self._dumped.pids),
            connections=len(raw.get("tcp", [])) or len(self.done.src_locked),
            established=self._established, pages=int(stats.get("pages_written", 0)),
            bytes_transferred=self._bytes,
            frozen_ms=float(stats["frozen_ms"]) if "frozen_ms" in stats else None,
            warnings=list(self.warnings),
            cgroups={"dump": raw.get("cgroups"),
                     "restore": (self._restored.raw if self._restored else {}).get("cgroups"),
                     "roots": dict(self._cgroup_roots)},
            precopy={"rounds": list(self._rounds),
                     "pages": sum(int(r["pages"]) for r in self._rounds)}
            if self._rounds else None,
            lazy=self._lazy, give_back=self._give_back)

    # -- rollback ---------------------------------------------------------------------------

    def rollback(self, err: BaseException) -> BaseException:
        """Undo what ``self.done`` records; the error to raise, saying what happened."""
        failed_stage = Stage(self.stage)
        where = self._failed_on or (err.host if isinstance(err, OrthrosError) else None)
        head = (f"migration of pid {self.pid} from {self.source.name} to {self.dest.name} "
                f"failed during {failed_stage.value}" + (f" on {where}" if where else "")
                + f": {reason(err)}")
        if not rollback_plan(self.done) and not self.done.held:
            return err  # nothing was touched: the plain error says it all
        if self.done.lazy_dump and self.done.released:
            # Past the lazy restore's point of no return: the memory lived only in the dump.
            return self._lost(f"{failed_stage.value} failed"
                              + (f" on {where}" if where else "") + f": {reason(err)}", err)
        self.stage = Stage.ROLLBACK
        self.emit(Stage.ROLLBACK, "start", reason(err))
        start = self.clock()
        out = self._undo_all()
        self.timings["rollback"] = (self.clock() - start) * 1000
        if self.done.restore_in_doubt:
            out.problems.append(f"{self.dest.name} did not answer the restore and could not be "
                                "asked afterwards: it may hold a restored copy of the tree, "
                                "whose connections stay locked there")
        complete = out.tree_back and not out.problems
        self.stage = Stage.ROLLED_BACK if complete else Stage.FAILED
        self.emit(self.stage, "done" if complete else "failed",
                  "; ".join(out.problems + out.leftovers), elapsed_ms=self.timings["rollback"])
        if out.tree_back:
            pid_text = (f"pid {self.pid}" if out.pid in (None, self.pid)
                        else f"pid {self.pid} (now {out.pid})")
            state = f"rolled back: {pid_text} runs on {self.source.name} again"
            if self.plan is not None and self.plan.service is not None:
                state += f" with {self.plan.service.ip}"
        else:
            state = (f"the service is DOWN: the tree could not be brought back on "
                     f"{self.source.name}; its checkpoint is kept as image {self.image}")
        if out.problems:
            state += "; rollback incomplete: " + "; ".join(out.problems)
        if out.leftovers:
            state += "; left behind: " + "; ".join(out.leftovers)
        if complete and not out.leftovers:
            state += (f", its images {self.image} are kept on both hosts"
                      if self.config.keep_images else ", nothing of the migration is left")
        if isinstance(err, CriuError) and err.log_path and not self.config.keep_images:
            state += " (CRIU's log went with the images: --keep-images keeps them)"
        return MigrationError(f"{head}; {state}", cause=err, rolled_back=complete,
                              problems=out.problems, leftovers=out.leftovers,
                              service_down=not out.tree_back, host=where, pid=self.pid,
                              stage=failed_stage.value)

    def _undo_all(self) -> UndoOutcome:
        """Undo what ``self.done`` records (``rollback_plan``), retrying steps on a host that
        does not answer for ``dest_retry_s`` (see ``Policy.undo``). Locks are lifted and
        images removed only once the tree runs on the source again."""
        todo = rollback_plan(self.done)
        if self.config.keep_images:
            todo = [s for s in todo if s not in (Undo.REMOVE_IMAGE_DEST,
                                                 Undo.REMOVE_IMAGE_SOURCE)]
        out = self.undo(todo, self._undo_one,
                        tree_back=not self.done.held,  # never dumped, or CRIU resumed it
                        pid=None if self.done.held else self.pid,
                        retry_s=self.config.dest_retry_s, interval=self.config.retry_interval_s)
        if not out.tree_back and any(s in (Undo.UNLOCK_SOURCE, Undo.UNLOCK_DEST) for s in todo):
            out.problems.append("the connections stay locked, so that a restore from the kept "
                                "checkpoint can still take them over")
        return out

    def _undo_one(self, step: Undo) -> int | None:
        """One rollback step; the tree's pid for the steps that bring it back."""
        p, src, dst, backend = self.plan, self.source.agent, self.dest.agent, None
        if p is not None:
            backend = p.lock.backend
        self.emit(Stage.ROLLBACK, "note", step.what,
                  host=self.dest.name if step.side == "dest" else self.source.name)
        if step is Undo.STOP_PAGE_SERVER:
            with contextlib.suppress(NoSuchProcessError):
                dst.page_server_stop(self.image)
            for img in self.done.precopy_images:
                with contextlib.suppress(NoSuchProcessError):
                    dst.page_server_stop(img)
        elif step is Undo.STOP_LAZY_DEST:
            dst.request("lazy_stop", {"image": self.image})
        elif step is Undo.STOP_LAZY_SOURCE:
            src.request("lazy_stop", {"image": self.image})
        elif step is Undo.STOP_TRACKING:
            assert self.done.tracker is not None
            src.request("dirty_track_close", {"name": self.done.tracker})
        elif step is Undo.ADDRESS_OFF_DEST:
            assert p is not None and p.service is not None
            dst.addr_del(p.dst_ifname, p.service.with_prefixlen)
        elif step is Undo.ADDRESS_ON_SOURCE:
            assert p is not None and p.service is not None and p.src_ifname is not None
            steps.take_address(self.source, p.src_ifname, p.service,
                               garp_count=self.config.garp_count)
        elif step is Undo.RESUME_SOURCE:
            return steps.resume_held(self.source, self.pid)
        elif step is Undo.RESTORE_SOURCE:
            # The source kept every image file but the memory, which only the destination's
            # page server received: fetch it back, then restore here.
            steps.push_images(self.dest, self.source, self.image, overwrite=True,
                              prefixes=("pages-", "pagemap-"),
                              timeout=self.config.transfer_timeout_s)
            restored = src.restore(self.image, self.config.restore_options(),
                                   timeout=self.config.restore_timeout_s)
            return restored.pid
        elif step is Undo.UNLOCK_SOURCE:
            if backend is not None:
                steps.unlock(self.source, backend, self.done.src_locked, self.done.src_attached)
        elif step is Undo.UNLOCK_DEST:
            if backend is not None:
                steps.unlock(self.dest, backend, self.done.dst_locked, self.done.dst_attached)
        elif step is Undo.REMOVE_IMAGE_DEST:
            with contextlib.suppress(NoSuchProcessError):
                dst.page_server_stop(self.image)  # drops the agent's record of it
            for img in (self.image, *self.done.precopy_images):
                dst.remove_image(img)
        elif step is Undo.REMOVE_IMAGE_SOURCE:
            for img in (self.image, *self.done.precopy_images):
                src.remove_image(img)
        return None


@register_recover(KIND)
def recover(record: Record, hosts: Mapping[str, Host], *, journal: Journal,
            observer: Observer | None = None) -> Recovery:
    """Finish or roll back the migration a dead coordinator's journal record describes."""
    return Migration.resume(record, hosts["source"], hosts["dest"], journal=journal,
                            observer=observer).recover()
