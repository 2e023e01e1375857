"""Pure builders of CRIU RPC requests (``criu_req`` from pycriu's rpc module).

No I/O here: options are typed dataclasses, and ``dump_request``/``restore_request`` turn them
into protobuf messages, so that every flag the CLI offers is unit-tested without root.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pycriu import rpc_pb2 as rpc


class CgroupMode(enum.StrEnum):
    """CRIU's --manage-cgroups modes."""

    NONE = "none"
    PROPS = "props"
    SOFT = "soft"
    FULL = "full"
    STRICT = "strict"
    IGNORE = "ignore"


class CriuNetworkLock(enum.StrEnum):
    """CRIU's own network lock methods. ``skip`` means CRIU locks nothing and the caller must."""

    IPTABLES = "iptables"
    NFTABLES = "nftables"
    SKIP = "skip"


_CG_MODE = {
    CgroupMode.NONE: rpc.CG_NONE,
    CgroupMode.PROPS: rpc.PROPS,
    CgroupMode.SOFT: rpc.SOFT,
    CgroupMode.FULL: rpc.FULL,
    CgroupMode.STRICT: rpc.STRICT,
    CgroupMode.IGNORE: rpc.IGNORE,
}
_NET_LOCK = {
    CriuNetworkLock.IPTABLES: rpc.IPTABLES,
    CriuNetworkLock.NFTABLES: rpc.NFTABLES,
    CriuNetworkLock.SKIP: rpc.SKIP,
}

DUMP_LOG = "dump.log"
GLOBAL_CG_ROOT = "*"  # a cgroup root for every hierarchy not named otherwise
RESTORE_LOG = "restore.log"


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


@dataclass(frozen=True)
class DumpOptions(CommonOptions):
    pid: int = 0
    leave_running: bool = False
    # Keep the tree stopped (SIGSTOP) after a successful dump, its TCP sockets still in repair
    # mode: it can be resumed if what follows fails, or killed without a word to its peers.
    leave_stopped: bool = False
    tcp_skip_in_flight: bool = False
    # Memory goes to a CRIU page server at (address, port) instead of the image directory.
    page_server: tuple[str, int] | None = None
    # Previous image directory, relative to this one, for incremental dumps.
    parent_img: str | None = None
    track_mem: bool = False
    freeze_cgroup: str | None = None
    # Only these cgroup hierarchies (as /proc/PID/cgroup names them; "" is v2) go into the
    # images; the others are left to the restorer. Empty: all.
    cgroup_dump_controllers: tuple[str, ...] = ()


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


def _common(opts: rpc.criu_opts, o: CommonOptions, images_dir_fd: int, log_file: str) -> None:
    opts.images_dir_fd = images_dir_fd
    opts.log_file = log_file
    opts.log_level = o.log_level
    opts.tcp_established = o.tcp_established
    opts.ext_unix_sk = o.ext_unix_sk
    opts.shell_job = o.shell_job
    opts.file_locks = o.file_locks
    opts.manage_cgroups = o.manage_cgroups is not CgroupMode.NONE
    opts.manage_cgroups_mode = _CG_MODE[o.manage_cgroups]
    opts.network_lock = _NET_LOCK[o.network_lock]
    opts.notify_scripts = o.notify
    opts.external.extend(o.external)


def dump_request(o: DumpOptions, images_dir_fd: int) -> Any:
    """A DUMP request for the tree rooted at ``o.pid``."""
    if o.pid <= 0:
        raise ValueError("a dump needs the pid of the tree's root")
    req = rpc.criu_req(type=rpc.DUMP)
    _common(req.opts, o, images_dir_fd, DUMP_LOG)
    req.opts.pid = o.pid
    req.opts.leave_running = o.leave_running
    if o.leave_running and o.leave_stopped:
        raise ValueError("a dump cannot both leave the tree running and leave it stopped")
    req.opts.leave_stopped = o.leave_stopped
    req.opts.tcp_skip_in_flight = o.tcp_skip_in_flight
    req.opts.track_mem = o.track_mem
    if o.page_server is not None:
        req.opts.ps.address, req.opts.ps.port = o.page_server
    if o.parent_img:
        req.opts.parent_img = o.parent_img
    if o.freeze_cgroup:
        req.opts.freeze_cgroup = o.freeze_cgroup
    req.opts.cgroup_dump_controller.extend(o.cgroup_dump_controllers)
    return req


def restore_request(o: RestoreOptions, images_dir_fd: int) -> Any:
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
    return rpc.criu_req(type=rpc.CHECK, opts=rpc.criu_opts(images_dir_fd=-1))


def feature_request() -> Any:
    """Ask which optional features (memory tracking, lazy pages) this kernel gives CRIU."""
    req = rpc.criu_req(type=rpc.FEATURE_CHECK, opts=rpc.criu_opts(images_dir_fd=-1))
    req.features.mem_track = True
    req.features.lazy_pages = True
    req.features.pidfd_store = True
    return req


def notify_ack(success: bool = True) -> Any:
    return rpc.criu_req(type=rpc.NOTIFY, notify_success=success)
