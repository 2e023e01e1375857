"""Post-copy (lazy) migration, both sides: the source's lazy dump that ends as a page server,
the destination's lazy restore fed by CRIU's lazy-pages daemon; and ``dirty_track_close`` for
the trackers a pre-copy keeps between its rounds.

Source: ``dump_lazy`` connects to the destination's page channel (``lazy_listen``), proves
itself with the cluster key, and hands CRIU's lazy dump one end of a socketpair whose other end
the agents' AES-256-GCM records join to that connection (CRIU skips its TLS on a socket it is
handed: see ``agent.pagechan``). The dump writes every image but the private anonymous memory,
puts the tree in its final state (with orthros's CRIU patch 0005: at once, not after the last
page) and serves the memory from its page pipes. The op answers at that moment (CRIU's
``status-ready`` notification); the dump itself returns when the destination has every page,
which ``lazy_source_status`` waits for.

Destination: ``lazy_listen`` waits for that connection; ``restore_lazy`` starts the lazy-pages
daemon on it (``orthros_py.criu.lazy``), then restores with ``lazy_pages``: the tree runs before
its memory has arrived, faulting pages in from the source while the daemon pushes the rest;
``lazy_status`` says how far that is, and when the last page came.

Interfaces and privileges: CRIU (root), TCP and UNIX sockets, threads. Paths are image names of
this agent only; options from the network pass ``optpolicy`` as the eager ops' do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any

from orthros_py.agent import held as held_trees
from orthros_py.agent import pagechan
from orthros_py.agent.ops.criu import (
    DUMP_EXCLUDED,
    RESTORE_EXCLUDED,
    link_parent,
    parse_nonce,
    restore_image,
    vet_dump,
)
from orthros_py.agent.protocol import options_from_args, validate_name
from orthros_py.agent.state import Agent, log
from orthros_py.agent.table import Call, bad_request, op
from orthros_py.checkpoint import DumpResult, dump_tree
from orthros_py.criu.lazy import LazyPagesDaemon, LazyResult
from orthros_py.criu.request import DumpOptions, RestoreOptions
from orthros_py.criu.session import CriuSession
from orthros_py.errors import BadImageError, NoSuchProcessError, OrthrosError
from orthros_py.proc.tree import ProcessRef, snapshot

READY_TIMEOUT = 120.0  # a dump of everything but the anonymous memory
LAZY_TIMEOUT = 3600.0  # a transfer that has not ended in an hour is not going to


def _err_text(err: BaseException) -> str:
    return str(err) or type(err).__name__


# --- the source -----------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class LazySource:
    """A lazy dump under way on this agent: ready once the images are written and the tree let
    go, ended once the last page has crossed (or the transfer failed)."""

    image: str
    pid: int
    pids: list[int]
    peer: str
    joint: pagechan.Joint | None = None
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)
    ended: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: DumpResult | None = None
    error: BaseException | None = None
    started: float = dataclasses.field(default_factory=time.time)
    ready_at: float | None = None
    ended_at: float | None = None

    side = "source"

    @property
    def state(self) -> str:
        if not self.ended.is_set():
            return "serving" if self.ready.is_set() else "dumping"
        return "failed" if self.error is not None else "done"

    def stop(self) -> None:
        """End the transfer: CRIU's page server sees its connection go and the dump ends."""
        if self.joint is not None:
            self.joint.close()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "side": self.side, "image": self.image, "pid": self.pid, "state": self.state,
            "peer": self.peer, "error": None if self.error is None else _err_text(self.error),
            "bytes_sent": self.joint.bytes_out if self.joint is not None else 0,
            "started": self.started, "ready_at": self.ready_at, "ended_at": self.ended_at}
        if self.result is not None:
            data["dump"] = self.result.to_dict()
        return data


@op("dump_lazy")
def op_dump_lazy(call: Call, pid: int, image: str, page_host: str, page_port: int,
                 page_nonce: str, options: dict[str, Any] | None = None,
                 remote_image: str | None = None, dirty_track: str | None = None,
                 ready_timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    """Dump the tree of ``pid`` with lazy pages into image ``image``: everything but its private
    anonymous memory is written here (to be pushed as usual), and the memory is served to the
    destination's ``lazy_listen`` at ``page_host``:``page_port`` (opened with ``page_nonce``,
    into its ``remote_image``). Answers once the tree is in its final state (``leave_stopped``:
    held stopped, as ``dump`` leaves it) and the memory waits to be served."""
    opts = options_from_args(DumpOptions, options or {}, where="dump_lazy",
                             exclude=DUMP_EXCLUDED)
    if opts.leave_running or opts.pre_dump:
        raise bad_request("a lazy dump cannot leave the tree running: its memory is served "
                          "as it was at the freeze")
    if not 0 < ready_timeout <= 3600:
        raise bad_request("ready_timeout must be more than 0 and at most an hour")
    # notify: the status-ready notification is how we learn that the images are written.
    opts = dataclasses.replace(opts, lazy_pages=True, page_server=None, notify=True)
    a = call.agent
    vet_dump(a, opts)
    nonce = parse_nonce(page_nonce)
    path = a.image_path(image)
    with a.mutex:
        if image in a.lazy:
            raise BadImageError(f"a lazy migration of image {image!r} is under way here",
                                hint="lazy_stop it first")
    try:
        live = snapshot(ProcessRef.of(pid))
    except OrthrosError as err:
        err.stage = err.stage or "dump"
        raise
    try:
        # Always the agents' records: CRIU's TLS is skipped on a socket it is handed.
        chan = pagechan.connect(page_host, int(page_port), a.key, remote_image or image, nonce,
                                tls=False)
    except pagechan.PageChannelError as err:
        err.stage, err.pid = "dump", pid
        raise
    conn, joint = pagechan.criu_end(chan, f"lazy image {image}")
    assert joint is not None  # records: a Joint always
    src = LazySource(image, pid, list(live.pids), f"{page_host}:{page_port}", joint)
    dump_kw: dict[str, Any] = {}
    if dirty_track is not None:
        dump_kw["dirty_track"] = a.tracker(validate_name(dirty_track, "dirty_track"))

    def on_notify(name: str, _pid: int) -> None:
        # status-ready: the images are written, the tree is in its final state (patch 0005),
        # and the page server waits on the socket.
        if name == "status-ready" and not src.ready.is_set():
            src.ready_at = time.time()
            src.ready.set()

    def run() -> None:
        try:
            src.result = dump_tree(pid, path, opts, session=CriuSession(ps_fd=conn.fileno()),
                                   on_notify=on_notify, **dump_kw)
        except BaseException as err:
            src.error = err
            log.warning("lazy dump of pid %d (image %s) failed: %s", pid, image, err)
        finally:
            conn.close()
            joint.close()
            src.ended_at = time.time()
            src.ended.set()
            src.ready.set()

    with a.mutex:
        a.lazy[image] = src
    joint.start()
    with a.busy(image, "lazy dump"):
        threading.Thread(target=run, name=f"lazy-dump-{image}", daemon=True).start()
        if not src.ready.wait(ready_timeout):
            src.stop()
            src.ended.wait(10)
            with a.mutex:
                a.lazy.pop(image, None)
            raise OrthrosError(f"the lazy dump of pid {pid} wrote no images within "
                               f"{ready_timeout:g} s", pid=pid, stage="dump")
    if src.error is not None and src.ended.is_set() and src.ready_at is None:
        with a.mutex:
            a.lazy.pop(image, None)
        raise src.error
    if opts.leave_stopped:
        with a.mutex:
            a.held[pid] = held_trees.HeldTree.of(pid, image, src.pids)
    log.info("lazy dump of pid %d: images of %s written, memory served to %s", pid, image,
             src.peer)
    # Shaped as ``dump``'s answer (``RemoteDump``); the dump's statistics come when it ends.
    return {**src.to_dict(), "held": opts.leave_stopped, "channel": chan.protection,
            "leave_running": False, "stats": None,
            "elapsed_ms": round(((src.ready_at or time.time()) - src.started) * 1000, 3),
            "processes": [{"pid": p} for p in src.pids],
            "tcp": [{"local": list(c.local), "remote": list(c.remote), "pid": c.pid}
                    for c in live.tcp]}


def _side(a: Agent, image: str) -> LazySource | LazyDest:
    validate_name(image)
    with a.mutex:
        side = a.lazy.get(image)
    if side is None:
        raise NoSuchProcessError(f"no lazy migration of image {image!r} on this agent")
    assert isinstance(side, (LazySource, LazyDest))
    return side


@op("lazy_source_status")
def op_lazy_source_status(call: Call, image: str, wait: float = 0.0) -> dict[str, Any]:
    """How the lazy dump of ``image`` stands; waits up to ``wait`` s for it to end."""
    if not 0 <= wait <= LAZY_TIMEOUT:
        raise bad_request(f"wait must be 0-{LAZY_TIMEOUT:g} s")
    src = _side(call.agent, image)
    if not isinstance(src, LazySource):
        raise bad_request(f"image {image!r} is the destination of a lazy migration here")
    src.ended.wait(wait)
    return src.to_dict()


# --- the destination --------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class LazyDest:
    """A lazy restore on this agent: the page channel it waits for, the daemon, the result."""

    image: str
    listener: pagechan.Listener | None = None
    chan: pagechan.Channel | None = None
    arrived: threading.Event = dataclasses.field(default_factory=threading.Event)
    daemon: LazyPagesDaemon | None = None
    joint: pagechan.Joint | None = None
    ended: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: LazyResult | None = None
    error: BaseException | None = None
    restored_pid: int | None = None
    restored_pids: list[int] = dataclasses.field(default_factory=list)
    restore_done_at: float | None = None

    side = "destination"

    def kill_tree(self) -> None:
        """The daemon failed: the pages it did not place would now read as zeros (its
        userfaultfds closed with it), so the tree must not run one more instruction."""
        for pid in self.restored_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @property
    def state(self) -> str:
        if self.daemon is None:
            return "connected" if self.arrived.is_set() else "listening"
        if not self.ended.is_set():
            return "transferring"
        return "failed" if self.error is not None else "done"

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self.daemon is not None:
            self.daemon.stop()
        if self.joint is not None:
            self.joint.close()
        elif self.chan is not None:
            with contextlib.suppress(OSError):
                self.chan.sock.close()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "side": self.side, "image": self.image, "state": self.state,
            "error": None if self.error is None else _err_text(self.error),
            "restored_pid": self.restored_pid, "restore_done_at": self.restore_done_at,
            "bytes_received": self.joint.bytes_in if self.joint is not None else 0}
        if self.result is not None:
            data.update(self.result.stats.to_dict(), elapsed_ms=round(self.result.elapsed_ms, 3),
                        finished_at=self.result.finished_at)
        elif self.daemon is not None:
            data.update(self.daemon.stats().to_dict())
        return data


@op("lazy_listen")
def op_lazy_listen(call: Call, image: str, address: str | None = None, port: int = 0,
                   wait: float = 600.0, parent: str | None = None) -> dict[str, Any]:
    """Open the page channel a lazy dump serves image ``image``'s memory on: its port and the
    nonce the source must prove itself with (as ``page_server``). ``parent``: the image the
    final dump is incremental to (a pre-copy's last round), whose pages the restore reads here."""
    if not 0 <= port < 65536:
        raise bad_request(f"{port} is not a TCP port")
    if not 0 < wait <= 24 * 3600:
        raise bad_request("wait must be more than 0 and at most a day")
    a = call.agent
    path = a.image_path(image, create=True)
    if parent is not None:
        link_parent(a, path, parent)
    with a.mutex:
        if image in a.lazy:
            raise BadImageError(f"a lazy migration of image {image!r} is under way here",
                                hint="lazy_stop it first")
        dst = a.lazy[image] = LazyDest(image)

    def on_channel(chan: pagechan.Channel) -> None:
        dst.chan = chan
        dst.arrived.set()

    addr = a.listen_host if address is None else address
    dst.listener = pagechan.Listener(a.key, image, addr, port, on_channel, wait=wait)
    dst.listener.start()
    return {"image": image, "address": addr, "port": dst.listener.port,
            "nonce": dst.listener.nonce.hex()}


@op("restore_lazy")
def op_restore_lazy(call: Call, image: str, options: dict[str, Any] | None = None,
                    channel_wait: float = 30.0) -> dict[str, Any]:
    """Restore image ``image`` with lazy pages, its memory fetched from the source's lazy dump
    on the page channel ``lazy_listen`` opened: answers once the tree runs (its root's pid);
    the memory goes on arriving (``lazy_status``)."""
    opts = options_from_args(RestoreOptions, options or {}, where="restore_lazy",
                             exclude=RESTORE_EXCLUDED)
    if not 0 < channel_wait <= 600:
        raise bad_request("channel_wait must be more than 0 and at most 600 s")
    a = call.agent
    from orthros_py.agent import optpolicy

    optpolicy.vet_restore(a.option_policy, root=opts.root, cgroup_yard=opts.cgroup_yard,
                          cgroup_roots=opts.cgroup_roots, external=opts.external)
    dst = _side(a, image)
    if not isinstance(dst, LazyDest):
        raise bad_request(f"image {image!r} is the source of a lazy migration here")
    if dst.daemon is not None:
        raise BadImageError(f"image {image!r} is already being restored lazily")
    if not dst.arrived.wait(channel_wait) or dst.chan is None:
        raise pagechan.PageChannelError(
            f"the source's lazy dump did not connect to the page channel of image {image!r} "
            f"within {channel_wait:g} s", stage="restore")
    path = a.image_path(image, must_exist=True)
    conn, joint = pagechan.criu_end(dst.chan, f"lazy image {image}")
    daemon = LazyPagesDaemon(path, page_socket=conn, log_level=opts.log_level)
    try:
        daemon.start()
    except BaseException:
        conn.close()
        if joint is not None:
            joint.close()
        raise
    conn.close()  # the daemon holds its copy
    dst.daemon, dst.joint = daemon, joint
    if joint is not None:
        joint.start()

    def wait_daemon() -> None:
        try:
            dst.result = daemon.wait(timeout=LAZY_TIMEOUT)
        except BaseException as err:
            dst.error = err
            dst.kill_tree()
            log.warning("lazy pages of image %s: %s; its restored tree was killed", image, err)
        finally:
            if dst.joint is not None:
                dst.joint.close()
            dst.ended.set()

    threading.Thread(target=wait_daemon, name=f"lazy-pages-{image}", daemon=True).start()
    try:
        result = restore_image(a, image, dataclasses.replace(opts, lazy_pages=True))
    except BaseException:
        daemon.stop()
        raise
    dst.restored_pid = result.pid
    dst.restored_pids = list(result.pids)
    dst.restore_done_at = time.time()
    if dst.error is not None:
        dst.kill_tree()  # the daemon failed while the restore ran
    data = result.to_dict()
    data["image"] = image
    data["lazy"] = dst.to_dict()
    return data


@op("lazy_status")
def op_lazy_status(call: Call, image: str, wait: float = 0.0) -> dict[str, Any]:
    """How the lazy side of ``image`` stands (either side); waits up to ``wait`` s for it to
    end."""
    if not 0 <= wait <= LAZY_TIMEOUT:
        raise bad_request(f"wait must be 0-{LAZY_TIMEOUT:g} s")
    side = _side(call.agent, image)
    if isinstance(side, LazyDest) and side.daemon is None:
        return side.to_dict()
    side.ended.wait(wait)
    return side.to_dict()


@op("lazy_stop")
def op_lazy_stop(call: Call, image: str) -> dict[str, Any]:
    """End and forget the lazy side of ``image``: the listener, the daemon, the page channel
    (a source's dump then fails and ends). Nothing if there is none."""
    a = call.agent
    validate_name(image)
    with a.mutex:
        side = a.lazy.pop(image, None)
    if side is None:
        return {"image": image, "state": None}
    was = side.state
    side.stop()
    side.ended.wait(10)
    return {**side.to_dict(), "was": was}


@op("dirty_track_close")
def op_dirty_track_close(call: Call, name: str) -> dict[str, Any]:
    """Let the tracker ``name`` go (a pre-copy ended): its userfaultfds close and the tree's
    memory is no longer tracked."""
    return {"name": name, "closed": call.agent.close_tracker(validate_name(name, "tracker"))}
