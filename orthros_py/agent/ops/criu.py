"""Checkpoint and restore through CRIU: ``dump``, ``restore``, ``page_server``,
``page_server_stop``.

Interfaces and privileges: CRIU through ``orthros_py.checkpoint`` and ``orthros_py.criu.session``
(``criu swrk``): root. Memory crosses hosts only on the page channel (``orthros_py.agent.pagechan``:
a TCP port, the cluster key, then TLS inside CRIU or the agents' own AES-GCM records); paths and
external resources in options are held to ``orthros_py.agent.optpolicy``. ``page_server_stop``
kills (kill(2)) only the CRIU page server this agent started, checked by pid and start time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import psutil

from orthros_py.agent import held as held_trees
from orthros_py.agent import optpolicy, pagechan
from orthros_py.agent.firstreply import FirstReply
from orthros_py.agent.protocol import options_from_args, validate_name
from orthros_py.agent.state import Agent, PageServer, log
from orthros_py.agent.table import Call, bad_request, op
from orthros_py.checkpoint import DumpResult, RestoreResult, dump_tree, restore_tree
from orthros_py.criu.request import DumpOptions, RestoreOptions
from orthros_py.criu.request import page_server_request as _ps_request
from orthros_py.criu.session import CriuSession
from orthros_py.errors import (
    BadImageError,
    MissingFeatureError,
    NoSuchProcessError,
    OrthrosError,
)
from orthros_py.proc.tree import ProcessRef

# Options a caller may not set remotely: the pid is an argument of its own; CRIU notifications
# need a hook on this side, which the RPC has no way to name; the agent always restores as
# CRIU's sibling (see ``orthros_py.agent.state``).
DUMP_EXCLUDED = ("pid", "notify")
RESTORE_EXCLUDED = ("notify", "sibling")
PAGE_SERVER_LOG = "page-server.log"
REPLIES_KEPT = 16  # first-reply watches kept for their migration to ask
_PARENT_IMG = re.compile(r"\.\./(?P<name>[^/]+)")


def vet_dump(a: Agent, opts: DumpOptions) -> None:
    """Hold a dump's options from the network to this agent's policy: external resources,
    and a parent that must be another image of this agent."""
    optpolicy.vet_dump(a.option_policy, opts.external)
    if opts.parent_img is not None:
        m = _PARENT_IMG.fullmatch(opts.parent_img)
        if m is None:
            raise bad_request("parent_img must be ../NAME: another image of this agent")
        a.image_path(validate_name(m["name"], "parent image name"), must_exist=True)


def parse_nonce(page_nonce: str | None) -> bytes:
    """The destination's page-channel nonce, as the caller passed it on."""
    if page_nonce is None:
        raise bad_request("a dump to a page server needs page_nonce, the nonce the "
                           "destination's page_server returned: memory crosses hosts only "
                           "on an authenticated channel")
    try:
        nonce = bytes.fromhex(page_nonce)
    except ValueError:
        nonce = b""
    if len(nonce) != pagechan.NONCE_BYTES:
        raise bad_request(f"page_nonce must be {2 * pagechan.NONCE_BYTES} hex digits")
    return nonce


@op("dump")
def op_dump(call: Call, pid: int, image: str,
            options: dict[str, Any] | None = None,
            page_nonce: str | None = None, dirty_track: str | None = None,
            scratch: bool = False) -> dict[str, Any]:
    """Checkpoint the tree of ``pid`` into image ``image`` (DumpOptions fields in ``options``;
    ``scratch``: a transient image, kept in memory where the agent has a scratch root).
    With ``page_server``, memory goes over the page channel of the destination's image of the
    same name, opened with ``page_nonce`` (from its ``page_server``). ``dirty_track`` names a
    tracker this agent keeps between dumps (``track_mem`` rounds; ``dirty_track_close``)."""
    opts = options_from_args(DumpOptions, options or {}, where="dump", exclude=DUMP_EXCLUDED)
    a = call.agent
    if opts.lazy_pages:
        raise bad_request("a lazy dump is dump_lazy's")
    if (opts.pre_dump or opts.track_mem) and not a.criu_info().get("mem_track"):
        # Unpatched, CRIU's pre-dump aborts here (BUG_ON without soft-dirty bits).
        raise MissingFeatureError(
            "CRIU cannot track memory on this host, which a pre-dump or a tracked dump needs",
            hint="run 'make setup' (orthros's CRIU patch 0002 tracks memory with userfaultfd "
                 "where the kernel has no soft-dirty bits)")
    vet_dump(a, opts)
    path = a.image_path(image, create=scratch, scratch=scratch)
    dump_kw: dict[str, Any] = {}
    if dirty_track is not None:
        # Pre-copy rounds and the final dump after them: the tracker keeps the tree's memory
        # tracked from one to the next (see orthros_py.criu.dirtytrack).
        dump_kw["dirty_track"] = a.tracker(validate_name(dirty_track, "dirty_track"))
    with a.busy(image, "pre-dump" if opts.pre_dump else "dump"):
        result = _dump_tree(a, pid, image, path, opts, page_nonce, **dump_kw)
        if opts.leave_stopped:
            tree = held_trees.HeldTree.of(pid, image, result.live.pids)
            with a.mutex:
                a.held[pid] = tree
    data = result.to_dict()
    data["image"] = image
    data["held"] = opts.leave_stopped
    return data


@op("restore")
def op_restore(call: Call, image: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore image ``image`` (RestoreOptions fields in ``options``); the new root's pid."""
    opts = options_from_args(RestoreOptions, options or {}, where="restore",
                             exclude=RESTORE_EXCLUDED)
    opts = dataclasses.replace(opts, sibling=True)
    a = call.agent
    optpolicy.vet_restore(a.option_policy, root=opts.root, cgroup_yard=opts.cgroup_yard,
                          cgroup_roots=opts.cgroup_roots, external=opts.external)
    data = restore_image(a, image, opts).to_dict()
    data["image"] = image
    return data


def restore_image(a: Agent, image: str, opts: RestoreOptions, *,
                  watch_reply: bool = True) -> RestoreResult:
    """Restore image ``image`` of this agent as its own child (vetted options only); with
    ``watch_reply``, watch for its first acknowledged reply (``first_reply``)."""
    opts = dataclasses.replace(opts, sibling=True)
    path = a.image_path(image, must_exist=True)
    with a.busy(image, "restore"):
        try:
            result = restore_tree(path, opts, host=a.name)
        except BaseException:
            _reap_failed_restore(a, path)
            raise
        # Adopted under the busy mark, before any other request can ask to kill it.
        a.adopt(result.pid, image, result.pids)
    if not watch_reply:
        return result
    watch = FirstReply(result.pid, list(result.pids), time.time()).start()
    with a.mutex:
        a.replies[image] = watch
        for old in list(a.replies)[:-REPLIES_KEPT]:
            del a.replies[old]
    return result


@op("first_reply")
def op_first_reply(call: Call, image: str, wait: float = 0.0) -> dict[str, Any]:
    """When the tree restored from ``image`` first got a reply acknowledged by a peer (see
    ``orthros_py.agent.firstreply``); waits up to ``wait`` s for it."""
    if not 0 <= wait <= 60:
        raise bad_request("wait must be 0-60 s")
    a = call.agent
    validate_name(image)
    with a.mutex:
        watch = a.replies.get(image)
    if watch is None:
        raise NoSuchProcessError(f"this agent restored no tree from image {image!r} lately")
    watch.done.wait(wait)
    data: dict[str, Any] = watch.to_dict()
    return data


def _reap_failed_restore(a: Agent, path: Path, timeout: float = 2.0) -> None:
    """Collect what a failed restore left as our children: CRIU kills the tasks it forked,
    but the root, forked as our child (rst_sibling), stays a zombie holding its PID (which a
    restore of the same tree elsewhere on this PID space needs) until we wait for it. A pid
    that belongs to a tree this agent restored before is that tree's: its waiter reaps it."""
    from orthros_py.checkpoint import image_pids

    try:
        pids = image_pids(path)
    except OrthrosError:
        return
    with a.mutex:
        ours = {t.pid for t in a.restored.values() if not t.exited.is_set()}
    deadline = time.monotonic() + timeout
    for pid in (p for p in pids if p not in ours):
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break  # not our child (or reaped): nothing to collect
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.01)


def page_server_request(address: str, port: int, log_level: int,
                        fd: int | None = None) -> Any:
    """A CRIU page server request (see ``orthros_py.criu.request.page_server_request``)."""
    return _ps_request(address, port, log_level, fd=fd, log_file=PAGE_SERVER_LOG)


def dump_for_pair(a: Agent, pid: int, image: str, path: Path, opts: DumpOptions,
                  page_nonce: str, remote_image: str, *, page_timeout: float,
                  **dump_kw: Any) -> DumpResult:
    """A pair's checkpoint: ``_dump_tree`` into the standby's ``remote_image`` with what only
    this side can give it (a network lock, the notification hook that marks the output hold,
    the dirty tracker). A standby that stops answering for ``page_timeout`` s ends the dump
    (CRIU then resumes the tree) instead of leaving the tree frozen while it is away."""
    with a.busy(image, "dump"):
        return _dump_tree(a, pid, image, path, opts, page_nonce, remote_image=remote_image,
                          page_timeout=page_timeout, **dump_kw)


def _give_up_after(sock: socket.socket, seconds: float) -> None:
    """Abort the connection when the peer acknowledges nothing for ``seconds`` (data sent,
    or keepalive probes while we wait for its answer): the kernel then fails our reads and
    writes, the relay ends CRIU's side, and CRIU fails the dump and resumes the tree."""
    ms = max(int(seconds * 1000), 200)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, ms)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(seconds / 2))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)


def _dump_tree(a: Agent, pid: int, image: str, path: Path, opts: DumpOptions,
               page_nonce: str | None, remote_image: str | None = None,
               page_timeout: float | None = None, **dump_kw: Any) -> DumpResult:
    """``dump_tree``; with a page server, over the page channel: we connect and prove
    ourselves, and CRIU's dump reaches that connection through a loopback relay, with CRIU's
    TLS or, for a tree with its own IPC namespace, sealed by the relay (see ``pagechan`` for
    why a relay and not ``ps.fd``, and why not always TLS)."""
    if opts.page_server is None:
        return dump_tree(pid, path, opts, **dump_kw)
    nonce = parse_nonce(page_nonce)
    host, port = opts.page_server
    use_tls = not _own_ipc_namespace(pid)
    if not use_tls:
        log.info("dump of pid %d: its tree has its own IPC namespace, which CRIU 4.2.1 cannot "
                 "dump over TLS: the agents encrypt the page channel (AES-256-GCM)", pid)
    tls = a.page_tls()
    start = time.perf_counter()
    try:
        # The handshake is bound to the image the destination receives into.
        chan = pagechan.connect(host, port, a.key, remote_image or image, nonce, tls=use_tls)
    except pagechan.PageChannelError as err:
        err.stage, err.pid = "dump", pid
        raise
    handshake_ms = (time.perf_counter() - start) * 1000
    if page_timeout is not None:
        _give_up_after(chan.sock, page_timeout)
    relay = pagechan.Relay(chan.sock, chan.records, label=f"image {image}")
    try:
        local = dataclasses.replace(opts, page_server=("127.0.0.1", relay.port))
        result = dump_tree(pid, path, local, session=CriuSession(tls=tls if use_tls else None),
                           **dump_kw)
    except OrthrosError as err:
        if relay.error or relay.upstream_closed:
            # Mostly seen from here as a broken connection; the destination's log has the cause.
            err.msg = (f"{err.msg}: the page channel ({host}:{port}, {chan.protection}) broke "
                       f"during the transfer ({relay.error or 'closed by the destination'}): "
                       "data damaged or forged in transit ends it so, or the destination's "
                       f"page server refused what arrived; see {PAGE_SERVER_LOG} in its image "
                       "and its agent's log")
        raise
    finally:
        relay.close()
    result.extra["page_channel"] = {
        "peer": f"{host}:{port}", "channel": chan.protection,
        "handshake_ms": round(handshake_ms, 3),
        "bytes_sent": relay.bytes_up, "bytes_received": relay.bytes_down,
        "refused_local": relay.refused}
    return result


def _own_ipc_namespace(pid: int) -> bool:
    """Whether a process of the tree of ``pid`` is in another IPC namespace than the agent
    (CRIU then dumps that namespace in a forked child: see ``pagechan`` on ``aes-gcm``)."""
    try:
        mine = os.stat("/proc/self/ns/ipc").st_ino
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        return any(os.stat(f"/proc/{p.pid}/ns/ipc").st_ino != mine for p in procs)
    except (OSError, psutil.Error):
        return False  # the dump finds out what is wrong, and says so


def link_parent(a: Agent, path: Path, parent: str) -> None:
    """Make image ``path`` incremental to this agent's image ``parent`` (CRIU's relative
    ``parent`` link, as its own ``--prev-images-dir ../NAME`` writes it)."""
    a.image_path(validate_name(parent, "parent image name"), must_exist=True)
    link = path / "parent"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(f"../{parent}", link)


@op("page_server")
def op_page_server(call: Call, image: str, address: str | None = None, port: int = 0,
                   log_level: int = 2, wait: float = 600.0,
                   parent: str | None = None, scratch: bool = False) -> dict[str, Any]:
    """Open the page channel for a dump's memory into image ``image``: its port, and the
    ``nonce`` the sending agent must prove itself with.

    Connections to the port must prove within seconds that they hold the cluster key; others
    are refused, logged and counted (``refused`` in status) while it keeps waiting, up to
    ``wait`` s. On the first that proves itself, a CRIU page server receives one dump and
    exits: over TLS on that very connection, or, when the sender asks for the agents' records,
    through a socketpair joined to it by this agent. ``port`` 0 lets the kernel choose;
    ``address`` defaults to the agent's own listen address. ``parent`` names another image of
    this agent that the incoming dump is incremental to (a pre-copy's previous round).
    """
    if not 0 <= port < 65536:
        raise bad_request(f"{port} is not a TCP port")
    if not 0 <= log_level <= 4:
        raise bad_request("log_level must be 0-4")
    if not 0 < wait <= 24 * 3600:
        raise bad_request("wait must be more than 0 and at most a day")
    a = call.agent
    if scratch and parent is not None:
        raise bad_request("an incremental image (parent) is not kept in scratch")
    path = a.image_path(image, create=True, scratch=scratch)
    if parent is not None:
        link_parent(a, path, parent)
    with a.mutex:
        running = a.page_servers.get(image)
    if running is not None and running.alive():
        raise BadImageError(f"a page server (pid {running.pid}, port {running.port}) already "
                            f"receives into image {image!r}",
                            hint="stop it with page_server_stop first")
    addr = a.listen_host if address is None else address
    tls = a.page_tls()
    server = PageServer(image, 0, addr, time.time())

    def on_channel(chan: pagechan.Channel) -> None:
        conn, joint = pagechan.criu_end(chan, f"image {image}")
        server.channel, server.joint = chan.protection, joint
        try:
            with conn, a.busy(image, "page server start"):
                session = CriuSession(tls=tls if chan.tls else None, pass_fds=(conn.fileno(),))
                resp = session.call(page_server_request("", 0, log_level, fd=conn.fileno()),
                                    images_dir=path)
        except BaseException as err:
            if joint is not None:
                joint.close()
            else:
                chan.sock.close()
            if not isinstance(err, OrthrosError):
                raise
            server.error = str(err)
            log.warning("page server of image %s could not start for %s: %s", image,
                        chan.peer, err)
            return
        if joint is not None:
            joint.start()  # CRIU holds its end now, and we closed our copy of it
        pid = int(resp.ps.pid)
        # Gone already: creation time 0.0 matches no process, so it reads as not alive.
        server.ref = ProcessRef.find(pid) or ProcessRef(pid, 0.0)
        log.info("page server %d receives image %s from %s over %s", pid, image, chan.peer,
                 "CRIU's TLS" if chan.tls else "the agents' AES-256-GCM records (the sender's "
                 "tree has its own IPC namespace)")

    listener = pagechan.Listener(a.key, image, addr, port, on_channel, wait=wait)
    server.listener, server.port = listener, listener.port
    with a.mutex:
        a.page_servers[image] = server
    listener.start()
    log.info("page channel for image %s listens on port %d", image, listener.port)
    return {**server.to_dict(), "nonce": listener.nonce.hex()}


@op("page_server_stop")
def op_page_server_stop(call: Call, image: str) -> dict[str, Any]:
    """Stop the page server of image ``image`` if it still runs (it ends by itself after a
    dump)."""
    a = call.agent
    validate_name(image)
    with a.mutex:
        server = a.page_servers.pop(image, None)
    if server is None:
        raise NoSuchProcessError(f"this agent started no page server for image {image!r}")
    was_running = server.alive()
    server.stop()
    return {**server.to_dict(), "was_running": was_running, "running": False}
