"""Pure builders of CRIU RPC requests (``criu_req`` from pycriu's rpc module).

No I/O here: options are typed dataclasses, and ``dump_request``/``restore_request`` turn them
into protobuf messages, so that every flag the CLI offers is unit-tested without root.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orthros_py.errors import MissingFeatureError

if TYPE_CHECKING:
    from pycriu import rpc_pb2


class CgroupMode(enum.StrEnum):
    """CRIU's --manage-cgroups modes."""

    NONE = "none"
    PROPS = "props"
    SOFT = "soft"
    FULL = "full"
    STRICT = "strict"
    IGNORE = "ignore"


class CriuNetworkLock(enum.StrEnum):
    """What CRIU itself is told to do about the tree's connections (its ``network_lock``):
    its own iptables or nftables method, or nothing (``skip``) when orthros locks or nobody does.
    orthros's choice of lock (``orthros_py.netlock.method.NetworkLock``) maps onto this."""

    IPTABLES = "iptables"
    NFTABLES = "nftables"
    SKIP = "skip"




@functools.cache
def pycriu_rpc() -> Any:
    """pycriu's ``rpc_pb2``."""
    # Imported on first use: ``orthros --help`` and the unit tests of the option types run on a
    # host without pycriu.
    from pycriu import rpc_pb2

    return rpc_pb2


def _cg_mode(mode: CgroupMode) -> int:
    rpc = pycriu_rpc()
    return int({CgroupMode.NONE: rpc.CG_NONE, CgroupMode.PROPS: rpc.PROPS,
                CgroupMode.SOFT: rpc.SOFT, CgroupMode.FULL: rpc.FULL,
                CgroupMode.STRICT: rpc.STRICT, CgroupMode.IGNORE: rpc.IGNORE}[mode])


def _net_lock(method: CriuNetworkLock) -> int:
    rpc = pycriu_rpc()
    return int({CriuNetworkLock.IPTABLES: rpc.IPTABLES, CriuNetworkLock.NFTABLES: rpc.NFTABLES,
                CriuNetworkLock.SKIP: rpc.SKIP}[CriuNetworkLock(method)])


DUMP_LOG = "dump.log"
PRE_DUMP_LOG = "pre-dump.log"
GLOBAL_CG_ROOT = "*"  # a cgroup root for every hierarchy not named otherwise
RESTORE_LOG = "restore.log"
# criu_opts.ghost_limit is a uint32; CRIU's own default is 1 MiB.
GHOST_LIMIT_MAX = 0xFFFFFFFF
_SIZE = re.compile(r"(?P<n>\d+)\s*(?P<unit>[KMG]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
# The --external forms CRIU 4.2.1 knows (criu/mount.c, files-reg.c, sk-unix.c, tty.c, net.c,
# namespaces.c), dump-side and restore-side; anything else CRIU would take as a typo only at
# the end of a long dump. No control characters: the log and the image keep them verbatim.
_V = r"[^\x00-\x1f]+"
_EXTERNAL = re.compile("|".join((
    rf"mnt\[[^\]\x00-\x1f]*\](?::{_V})?",         # mnt[MOUNTPOINT]:KEY, mnt[KEY]:PATH, mnt[]
    rf"dev\[[^\]\x00-\x1f]+\]:{_V}",              # dev[MAJ/MIN]:KEY, dev[KEY]:DEVPATH
    r"file\[[0-9a-fA-F]+:[0-9a-fA-F]+\]",           # file[MNT_ID:INODE]
    r"unix\[\d+\]",                                 # unix[INODE]
    r"tty\[[0-9a-fA-F]+:[0-9a-fA-F]+\]",            # tty[RDEV:DEV]
    rf"(?:net|pid)\[\d+\]:{_V}",                     # net[INODE]:KEY, pid[INODE]:KEY
    rf"(?:veth|macvlan)\[[^\]\x00-\x1f/]+\]:{_V}",  # veth[IF]:OUTER[@BRIDGE], macvlan[IF]:OUTER
)))


def parse_size(text: str) -> int:
    """A size as CRIU's --ghost-limit takes it: bytes, or K, M, G (powers of 1024)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a size (e.g. 4096, 512K, 10M, 1G)")
    return int(m["n"]) * _UNITS[m["unit"].upper()]


def check_external(res: str) -> str:
    """``res`` if it is one of CRIU's --external forms, ValueError naming them otherwise."""
    if not _EXTERNAL.fullmatch(res):
        raise ValueError(
            f"{res!r} is not an external resource CRIU knows: mnt[MOUNTPOINT]:KEY, "
            "mnt[KEY]:PATH, dev[MAJ/MIN]:KEY, dev[KEY]:PATH, file[MNT_ID:INODE], unix[INODE], "
            "tty[RDEV:DEV], net[INODE]:KEY, pid[INODE]:KEY, veth[IF]:OUTER, macvlan[IF]:OUTER")
    return res


@dataclass(frozen=True)
class CommonOptions:
    tcp_established: bool = False
    ext_unix_sk: bool = False
    shell_job: bool = False
    file_locks: bool = False
    manage_cgroups: CgroupMode = CgroupMode.SOFT
    network_lock: CriuNetworkLock = CriuNetworkLock.IPTABLES
    log_level: int = 2
    # External resources, in CRIU's --external syntax (e.g. "mnt[/path]:key").
    external: tuple[str, ...] = ()
    # Ask CRIU to send notifications (network-lock, post-dump, pre-resume, ...) over the RPC.
    notify: bool = False
    # Dump: punch the pages the parent images share out of them; restore: punch each page out
    # of the images once restored (the image directory shrinks as the tree comes back).
    auto_dedup: bool = False

    def __post_init__(self) -> None:
        # Options also arrive from the network (agent ops): check them here, once.
        if not 0 <= self.log_level <= 4:
            raise ValueError(f"log_level must be 0-4, not {self.log_level}")
        for res in self.external:
            check_external(res)


@dataclass(frozen=True)
class DumpOptions(CommonOptions):
    pid: int = 0
    leave_running: bool = False
    # Keep the tree stopped (SIGSTOP) after a successful dump, its TCP sockets still in repair
    # mode: it can be resumed if what follows fails, or killed without a word to its peers.
    leave_stopped: bool = False
    tcp_skip_in_flight: bool = False
    # Hard-link files that are open but unlinked (and still linked elsewhere) back into their
    # directory, for the restore to reopen (CRIU's --link-remap).
    link_remap: bool = False
    # The largest deleted-but-open file CRIU copies into the images, in bytes (None: CRIU's
    # default, 1 MiB).
    ghost_limit: int | None = None
    # Accept a device opened by a path that now names another node of the same device.
    evasive_devices: bool = False
    # Memory goes to a CRIU page server at (address, port) instead of the image directory.
    page_server: tuple[str, int] | None = None
    # Previous image directory, relative to this one, for incremental dumps.
    parent_img: str | None = None
    track_mem: bool = False
    # Post-copy: the private anonymous memory stays behind, and the dump ends as a page server
    # that serves it to the destination's lazy-pages daemon (on the socket CriuSession's
    # ``ps_fd`` names), returning once the last page has gone.
    lazy_pages: bool = False
    # A pre-dump (a pre-copy round): memory only, the tree runs on while it is sent.
    pre_dump: bool = False
    freeze_cgroup: str | None = None
    # Only these cgroup hierarchies (as /proc/PID/cgroup names them; "" is v2) go into the
    # images; the others are left to the restorer. Empty: all.
    cgroup_dump_controllers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ghost_limit is not None and not 0 <= self.ghost_limit <= GHOST_LIMIT_MAX:
            raise ValueError(f"ghost_limit must be 0-{GHOST_LIMIT_MAX} bytes (CRIU keeps it in "
                             f"32 bits), not {self.ghost_limit}")


# Half of PAWS' 2^31 ms window: a peer must still see the advanced timestamps as later.
TCP_TS_ADVANCE_MAX_MS = 1 << 30


@dataclass(frozen=True)
class RestoreOptions(CommonOptions):
    # The restored root becomes orthros's own child (swrk only), so that orthros can wait for it.
    sibling: bool = True
    leave_stopped: bool = False
    lazy_pages: bool = False
    tcp_close: bool = False
    # Restore cgroups under these roots instead of the dumped paths: {hierarchy: path}, where
    # a hierarchy is named by its controllers ("cpu,cpuacct"), "" is cgroup v2 and "*" all.
    cgroup_roots: dict[str, str] = field(default_factory=dict)
    # Root filesystem for a tree that has its own mount namespace (CRIU's --root).
    root: str | None = None
    # Where CRIU finds every cgroup hierarchy mounted (a dir per hierarchy, "unified" for v2)
    # instead of mounting its own yard for each restore.
    cgroup_yard: str | None = None
    # How far the restored connections' TCP timestamp clock moves on from the dump, in ms: at
    # least the time since the dump (orthros's CRIU patch 0009; not an RPC option: criu's
    # environment). None: ``restore_tree`` takes it from the dump's own record.
    tcp_ts_advance_ms: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tcp_ts_advance_ms is not None and not (
                0 <= self.tcp_ts_advance_ms <= TCP_TS_ADVANCE_MAX_MS):
            raise ValueError(f"tcp_ts_advance_ms must be 0-{TCP_TS_ADVANCE_MAX_MS}, not "
                             f"{self.tcp_ts_advance_ms}")


def _common(opts: rpc_pb2.criu_opts, o: CommonOptions, images_dir_fd: int, log_file: str) -> None:
    opts.images_dir_fd = images_dir_fd
    opts.log_file = log_file
    opts.log_level = o.log_level
    opts.tcp_established = o.tcp_established
    opts.ext_unix_sk = o.ext_unix_sk
    opts.shell_job = o.shell_job
    opts.file_locks = o.file_locks
    opts.manage_cgroups = o.manage_cgroups is not CgroupMode.NONE
    opts.manage_cgroups_mode = _cg_mode(o.manage_cgroups)
    opts.network_lock = _net_lock(o.network_lock)
    opts.notify_scripts = o.notify
    opts.external.extend(o.external)
    opts.auto_dedup = o.auto_dedup


def dump_request(o: DumpOptions, images_dir_fd: int) -> Any:
    """A DUMP request for the tree rooted at ``o.pid``."""
    rpc = pycriu_rpc()
    if o.pid <= 0:
        raise ValueError("a dump needs the pid of the tree's root")
    if o.pre_dump and (o.lazy_pages or o.leave_stopped):
        raise ValueError("a pre-dump only copies memory: it cannot be lazy or stop the tree")
    req = rpc.criu_req(type=rpc.PRE_DUMP if o.pre_dump else rpc.DUMP)
    _common(req.opts, o, images_dir_fd, PRE_DUMP_LOG if o.pre_dump else DUMP_LOG)
    req.opts.pid = o.pid
    req.opts.leave_running = o.leave_running
    if o.leave_running and o.leave_stopped:
        raise ValueError("a dump cannot both leave the tree running and leave it stopped")
    req.opts.leave_stopped = o.leave_stopped
    req.opts.tcp_skip_in_flight = o.tcp_skip_in_flight
    req.opts.link_remap = o.link_remap
    req.opts.evasive_devices = o.evasive_devices
    if o.ghost_limit is not None:
        req.opts.ghost_limit = o.ghost_limit
    req.opts.track_mem = o.track_mem
    req.opts.lazy_pages = o.lazy_pages
    if o.page_server is not None:
        req.opts.ps.address, req.opts.ps.port = o.page_server
    if o.parent_img:
        req.opts.parent_img = o.parent_img
    if o.freeze_cgroup:
        req.opts.freeze_cgroup = o.freeze_cgroup
    req.opts.cgroup_dump_controller.extend(o.cgroup_dump_controllers)
    return req


def set_dirty_track_sk(opts: Any, fd: int) -> None:
    """Name in ``opts`` (a dump's ``criu_opts``) the socket, inherited by swrk, that CRIU sends
    the userfaultfds tracking the tree's memory over (orthros's CRIU patch 0002: without soft-dirty
    bits CRIU tracks writes with them, and the tracking lasts only while one is open)."""
    if "dirty_track_sk" not in opts.DESCRIPTOR.fields_by_name:
        raise MissingFeatureError(
            "this pycriu has no criu_opts.dirty_track_sk: it was not built from orthros's patched "
            "CRIU", hint="run 'make setup'")
    if fd < 0:
        raise ValueError(f"dirty_track_sk must be a file descriptor, not {fd}")
    opts.dirty_track_sk = fd


def restore_request(o: RestoreOptions, images_dir_fd: int) -> Any:
    rpc = pycriu_rpc()
    req = rpc.criu_req(type=rpc.RESTORE)
    _common(req.opts, o, images_dir_fd, RESTORE_LOG)
    req.opts.rst_sibling = o.sibling
    req.opts.leave_stopped = o.leave_stopped
    req.opts.lazy_pages = o.lazy_pages
    req.opts.tcp_close = o.tcp_close
    if o.root:
        req.opts.root = o.root
    if o.cgroup_yard:
        req.opts.cgroup_yard = o.cgroup_yard
    for ctrl, path in sorted(o.cgroup_roots.items()):
        root = req.opts.cg_root.add()
        root.path = path
        if ctrl != GLOBAL_CG_ROOT:
            root.ctrl = ctrl  # "" names CRIU's cgroup v2 hierarchy
    return req


def check_request() -> Any:
    rpc = pycriu_rpc()
    return rpc.criu_req(type=rpc.CHECK, opts=rpc.criu_opts(images_dir_fd=-1))


def feature_request() -> Any:
    """Ask which optional features (memory tracking, lazy pages) this kernel gives CRIU."""
    rpc = pycriu_rpc()
    req = rpc.criu_req(type=rpc.FEATURE_CHECK, opts=rpc.criu_opts(images_dir_fd=-1))
    req.features.mem_track = True
    req.features.lazy_pages = True
    req.features.pidfd_store = True
    return req


def notify_ack(success: bool = True) -> Any:
    rpc = pycriu_rpc()
    return rpc.criu_req(type=rpc.NOTIFY, notify_success=success)


# --- the page channel's TLS (orthros_py/agent/pagechan.py) --------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for CRIU's TLS on a page-server connection (gnutls inside CRIU reads them)."""

    cacert: str
    cert: str
    key: str


def apply_tls(opts: Any, files: TlsFiles) -> None:
    """Turn on CRIU's TLS in ``opts`` (a ``criu_opts``). The peer is trusted by the CA file
    alone, not by its name: every host of the cluster holds the same certificate, so the
    identity that matters is "holds the cluster key", and the hostname check is off."""
    opts.tls = True
    opts.tls_cacert = files.cacert
    opts.tls_cert = files.cert
    opts.tls_key = files.key
    opts.tls_no_cn_verify = True


def page_server_request(address: str, port: int, log_level: int, *, fd: int | None = None,
                        log_file: str = "page-server.log") -> Any:
    """A PAGE_SERVER_CHLD request: CRIU's page server receiving one dump into the images dir.

    PAGE_SERVER_CHLD, not PAGE_SERVER: in CRIU 4.2.1 the daemon-mode PAGE_SERVER answers pid 0
    (``cr_page_server`` returns 0 instead of the daemon's pid), and without the pid the agent
    could not tell its page server apart from any other process. The CHLD server is forked by
    ``criu swrk`` and left to init when swrk exits after answering; it serves one connection
    and exits. With ``fd`` (a connected socket passed into swrk) it listens nowhere and serves
    that connection: CRIU honours ``ps.fd`` only in swrk mode.
    """
    rpc = pycriu_rpc()
    req = rpc.criu_req(type=rpc.PAGE_SERVER_CHLD)
    req.opts.images_dir_fd = -1  # set by CriuSession.call
    req.opts.log_file = log_file
    req.opts.log_level = log_level
    req.opts.ps.SetInParent()
    req.opts.ps.port = port
    if address:
        req.opts.ps.address = address
    if fd is not None:
        req.opts.ps.fd = fd
    return req
