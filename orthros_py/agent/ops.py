"""The agent's fixed table of operations: what a host does for its part of a migration.

Each operation is a function registered with ``@op``; its parameters, with their annotations and
defaults, are the operation's arguments, and every request's ``args`` are checked against them
before the function runs (``Op.bind``). Nothing else can be called: an op name that is not in
``OPS`` is refused. To add an operation, write a function ``(call: Call, ...) -> dict | Reply``
here and decorate it.

Interfaces and privileges, per operation:

- ``dump``, ``restore``, ``page_server``: CRIU through ``orthros_py.checkpoint`` and
  ``orthros_py.criu.session`` (``criu swrk``): root. Memory crosses hosts only on the page
  channel (``orthros_py.agent.pagechan``: a TCP port, the cluster key, then TLS inside CRIU
  or the agents' own AES-GCM records); paths
  and external resources in options are held to ``orthros_py.agent.optpolicy``.
- ``kill``, ``page_server_stop``: kill(2), only on processes this agent restored or started,
  or left stopped after a dump (checked by pid and start time): root, as the agent runs.
- ``resume``: ``orthros_py.agent.held`` (pidfd_getfd, TCP_REPAIR, SIGCONT) on a tree this agent
  left stopped after a dump (``leave_stopped``); ``tree``: /proc and sock_diag through
  ``orthros_py.net.conns``; ``addr_list``: rtnetlink through ``orthros_py.net.addr``.
- ``recv_file``, ``send_file``, ``list_images``, ``remove_image``, ``push_images``: files below
  the images root (created mode 0700), and a TCP connection to another agent for ``push_images``.
- ``check``: ``orthros_py.host.probe`` (see there); ``netlock_*``: ``orthros_py.netlock``;
  ``addr_*``, ``garp``: ``orthros_py.net.addr``. These are imported when first called, so that an
  agent whose orthros lacks one still serves everything else (MissingFeatureError says so).

Restored trees: a restore uses CRIU's ``rst_sibling``, so the restored root becomes the agent's
own child. The agent keeps it that way on purpose: a thread per restored tree waits for it
(``os.waitpid``), so it never lingers as a zombie, its exit status is known (``status``), and
``kill`` can tell that a pid is one the agent restored. It does not tie the tree's life to the
agent's: if the agent stops or crashes, the kernel reparents the tree to init (or the nearest
subreaper), which reaps it; the systemd unit uses ``KillMode=process`` so that stopping the
agent does not kill the workloads it restored. The alternative, CRIU restoring the root as its
own child and exiting, would leave it to init at once but lose the exit status and the proof
of ownership that ``kill`` relies on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import logging
import os
import platform
import re
import shutil
import signal as signals
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, get_type_hints

import psutil

from orthros_py import __version__
from orthros_py.agent import held as held_trees
from orthros_py.agent import optpolicy, pagechan
from orthros_py.agent.errors import ProtocolError, Refusal
from orthros_py.agent.protocol import (
    EMPTY_SHA256,
    PROTOCOL_VERSION,
    PayloadReader,
    Request,
    SourceFile,
    check_type,
    file_digest,
    options_from_args,
    validate_name,
)
from orthros_py.checkpoint import DumpResult, dump_tree, restore_tree
from orthros_py.criu.request import DumpOptions, RestoreOptions, TlsFiles
from orthros_py.criu.request import page_server_request as _ps_request
from orthros_py.criu.session import CriuSession
from orthros_py.errors import (
    BadImageError,
    MissingFeatureError,
    NoSuchProcessError,
    OrthrosError,
)
from orthros_py.proc.tree import ProcessRef

log = logging.getLogger("orthros.agent")

# Options a caller may not set remotely: the pid is an argument of its own; CRIU notifications
# need a hook on this side, which the RPC has no way to name; the agent always restores as
# CRIU's sibling (see the module docstring).
DUMP_EXCLUDED = ("pid", "notify")
RESTORE_EXCLUDED = ("notify", "sibling")
PAGE_SERVER_LOG = "page-server.log"
SIGNALS = {"TERM": signals.SIGTERM, "KILL": signals.SIGKILL, "INT": signals.SIGINT,
           "HUP": signals.SIGHUP, "QUIT": signals.SIGQUIT, "USR1": signals.SIGUSR1,
           "USR2": signals.SIGUSR2, "STOP": signals.SIGSTOP, "CONT": signals.SIGCONT}
KEEP_EXITED = 256  # exited trees kept in the table (for ``status``) before the oldest go
_PARENT_IMG = re.compile(r"\.\./(?P<name>[^/]+)")


# --- the agent's state -------------------------------------------------------------------------


@dataclass
class RestoredTree:
    """A tree this agent restored; its root is the agent's child until it exits."""

    ref: ProcessRef  # of the root; creation time 0.0 if it had exited before we looked
    image: str
    pids: list[int]
    restored_at: float
    exit_status: int | None = None  # as os.waitstatus_to_exitcode: negative for a signal
    exited: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int:
        return self.ref.pid

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "image": self.image, "pids": self.pids,
                "restored_at": self.restored_at, "running": not self.exited.is_set(),
                "exit_status": self.exit_status}


@dataclass
class PageServer:
    """A page channel this agent opened (``pagechan.Listener``) and the CRIU page server it
    starts on the connection that proves itself (forked by ``criu swrk``: not our child)."""

    image: str
    port: int
    address: str
    started_at: float
    ref: ProcessRef | None = None  # None until a connection has proved itself and CRIU runs on it
    listener: pagechan.Listener | None = None
    error: str | None = None  # why CRIU could not be started on the proven connection
    channel: str | None = None  # how the stream is protected: "tls" or "aes-gcm"
    joint: pagechan.Joint | None = None  # with "aes-gcm": between the channel and CRIU

    @property
    def pid(self) -> int:
        """CRIU's pid; 0 before it runs."""
        return self.ref.pid if self.ref is not None else 0

    def alive(self) -> bool:
        if self.ref is None:
            # Waiting for the sender, or starting CRIU for it: running, unless it gave up.
            state = self.listener.state if self.listener is not None else "stopped"
            return self.error is None and state in ("waiting", "connected")
        return self.ref.alive()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self.joint is not None:
            self.joint.close()
        if self.ref is not None and self.ref.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.ref.pid, signals.SIGKILL)

    def to_dict(self) -> dict[str, Any]:
        chan = self.listener.to_dict() if self.listener is not None else {}
        return {"image": self.image, "pid": self.pid, "port": self.port, "address": self.address,
                "started_at": self.started_at, "running": self.alive(),
                "state": chan.get("state", "stopped"), "refused": chan.get("refused", 0),
                "refusals": chan.get("refusals", []), "peer": chan.get("peer"),
                "error": self.error, "channel": self.channel,
                "channel_error": self.joint.error if self.joint is not None else None}


class Agent:
    """What one agent holds: its name, key, images root, the trees it restored, the page
    servers it started, and the network locks it keeps loaded. Shared by all connections."""

    def __init__(self, name: str, images_root: Path, key: bytes, *,
                 listen_host: str = "", cgroup_root: str = "/") -> None:
        validate_name(name, "agent name")
        self.name = name
        # Where this host keeps its containers' cgroups: a tree migrated here from a host with
        # another root is recreated below this one (lab hosts share one cgroup filesystem).
        self.cgroup_root = cgroup_root
        self.key = key
        try:
            images_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise BadImageError(f"cannot create the images root {images_root}: "
                                f"{err.strerror}") from err
        self.images_root = images_root.resolve()
        # What paths and external resources requests from the network may name here.
        self.option_policy = optpolicy.Policy(str(self.images_root))
        # Page channels listen where the agent listens unless told otherwise: no need to face
        # more networks than the agent does.
        self.listen_host = "" if listen_host in ("0.0.0.0", "::") else listen_host
        self.started = time.time()
        self.restored: dict[int, RestoredTree] = {}
        self.page_servers: dict[str, PageServer] = {}
        # Trees dumped with leave_stopped, by root pid: resumed or killed on request.
        self.held: dict[int, held_trees.HeldTree] = {}
        self.netlocks: dict[str, Any] = {}  # backend -> NetLock kept (XDP: the loaded program)
        self.netlock_mutex = threading.Lock()  # serializes the netlock_* operations
        self.mutex = threading.Lock()  # guards restored, page_servers and the busy marks
        self._busy: dict[str, str] = {}  # image -> what is using it
        self._criu: dict[str, Any] | None = None
        self._page_tls: TlsFiles | None = None

    # -- images ---------------------------------------------------------------------------

    def image_path(self, image: str, *, create: bool = False, must_exist: bool = False) -> Path:
        """The directory of image ``image`` below the root; never a symlink out of it."""
        path = self.images_root / validate_name(image)
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise BadImageError(f"{path} is not an image directory")
        if create:
            try:
                path.mkdir(mode=0o700, exist_ok=True)
            except OSError as err:
                raise BadImageError(f"cannot create {path}: {err.strerror}") from err
        elif must_exist and not path.is_dir():
            raise BadImageError(f"this agent holds no image {image!r}",
                                hint="see list_images for what it holds")
        return path

    @contextlib.contextmanager
    def busy(self, image: str, what: str) -> Iterator[None]:
        """Hold ``image`` for a dump, restore or removal; refuse a second such user at once."""
        with self.mutex:
            other = self._busy.get(image)
            if other is not None:
                raise BadImageError(f"image {image!r} is busy with a {other}",
                                    hint="wait for it to finish")
            self._busy[image] = what
        try:
            yield
        finally:
            with self.mutex:
                self._busy.pop(image, None)

    def busy_with(self, image: str) -> str | None:
        with self.mutex:
            return self._busy.get(image)

    # -- restored trees -------------------------------------------------------------------

    def adopt(self, pid: int, image: str, pids: list[int]) -> RestoredTree:
        """Record a tree just restored as our child, and start waiting for it."""
        # Gone already: the waiter collects its status at once.
        ref = ProcessRef.find(pid) or ProcessRef(pid, 0.0)
        tree = RestoredTree(ref, image, pids, time.time())
        with self.mutex:
            self.restored[pid] = tree
            exited = sorted((t for t in self.restored.values() if t.exited.is_set()),
                            key=lambda t: t.restored_at)
            for old in exited[:max(0, len(exited) - KEEP_EXITED)]:
                del self.restored[old.pid]
        threading.Thread(target=self._reap, args=(tree,), name=f"reap-{pid}",
                         daemon=True).start()
        return tree

    def _reap(self, tree: RestoredTree) -> None:
        try:
            _, status = os.waitpid(tree.pid, 0)
        except ChildProcessError:
            log.warning("restored tree %d (image %s) is not this agent's child; its exit "
                        "status is unknown", tree.pid, tree.image)
        else:
            tree.exit_status = os.waitstatus_to_exitcode(status)
            log.info("restored tree %d (image %s) exited with status %d", tree.pid, tree.image,
                     tree.exit_status)
        tree.exited.set()

    def restored_tree(self, pid: int) -> RestoredTree:
        with self.mutex:
            tree = self.restored.get(pid)
        if tree is None:
            raise NoSuchProcessError(
                f"pid {pid} was not restored by this agent: it signals only trees it restored",
                pid=pid)
        return tree

    def close(self) -> None:
        """At the agent's exit: stop the page servers still waiting for a dump (nobody could
        stop them later). Restored trees are left running: init inherits them."""
        with self.mutex:
            servers = list(self.page_servers.values())
            self.page_servers.clear()
        for server in servers:
            if server.alive():
                log.info("stopping page server %d of image %s", server.pid, server.image)
            server.stop()

    def page_tls(self) -> TlsFiles:
        """The page channel's certificate files, derived from the cluster key (written once,
        in a directory whose dotted name no image can have)."""
        with self.mutex:
            if self._page_tls is None:
                self._page_tls = pagechan.write_credentials(
                    self.key, self.images_root / ".page-channel")
            return self._page_tls

    # -- facts ----------------------------------------------------------------------------

    def criu_info(self) -> dict[str, Any]:
        """CRIU's path and version, looked up once (``criu --version`` forks)."""
        if self._criu is None:
            from orthros_py.criu.binary import find_criu

            try:
                binary = find_criu()
                self._criu = {"path": binary.path, "version": binary.version_str, "error": None}
            except OrthrosError as err:
                self._criu = {"path": None, "version": None, "error": str(err)}
        return self._criu


# --- the operation table -----------------------------------------------------------------------


@dataclass
class Call:
    """What a handler gets besides its arguments."""

    agent: Agent
    peer: str
    payload: PayloadReader | None = None


@dataclass
class Reply:
    """A result, optionally with a file streamed after it (``send_file``)."""

    result: dict[str, Any]
    payload: SourceFile | None = None
    payload_len: int = 0
    payload_sha256: str = EMPTY_SHA256


Handler = Callable[..., "dict[str, Any] | Reply"]
F = TypeVar("F", bound=Handler)
_REQUIRED: Any = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    name: str
    tp: Any
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True)
class Op:
    name: str
    handler: Handler
    params: tuple[Param, ...]
    payload: bool = False  # does a request carry a payload (a file) for this op?
    doc: str = ""

    def bind(self, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` checked against the handler's parameters, defaults filled in."""
        known = {p.name for p in self.params}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ProtocolError(
                f"{self.name} takes no argument(s) {', '.join(unknown)} "
                f"(it takes: {', '.join(sorted(known)) or 'none'})", code=Refusal.BAD_REQUEST)
        bound: dict[str, Any] = {}
        for p in self.params:
            if p.name in args:
                bound[p.name] = check_type(args[p.name], p.tp, f"argument {p.name} of {self.name}")
            elif p.required:
                raise ProtocolError(f"{self.name} needs the argument {p.name}",
                                    code=Refusal.BAD_REQUEST)
            else:
                bound[p.name] = p.default
        return bound

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "payload": self.payload, "doc": self.doc,
                "params": [{"name": p.name, "type": str(p.tp), "required": p.required}
                           for p in self.params]}


OPS: dict[str, Op] = {}


def op(name: str, *, payload: bool = False) -> Callable[[F], F]:
    """Register a handler as operation ``name``; its signature declares the arguments."""

    def register(fn: F) -> F:
        hints = get_type_hints(fn)
        params = tuple(Param(p.name, hints[p.name], p.default)
                       for p in list(inspect.signature(fn).parameters.values())[1:])
        if name in OPS:
            raise ValueError(f"operation {name} is registered twice")
        doc = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
        OPS[name] = Op(name, fn, params, payload, doc)
        return fn

    return register


def dispatch(agent: Agent, req: Request, payload: PayloadReader | None, peer: str) -> Reply:
    """Run an authenticated request through the table."""
    entry = OPS.get(req.op)
    if entry is None:
        raise ProtocolError(f"unknown operation {req.op!r}", code=Refusal.BAD_REQUEST,
                            hint="this agent knows: " + ", ".join(sorted(OPS)))
    if req.payload_len and not entry.payload:
        raise ProtocolError(f"{req.op} takes no payload", code=Refusal.BAD_REQUEST)
    kwargs = entry.bind(req.args)
    if kwargs.get("netns") is not None:
        # Every op that enters a namespace takes it as ``netns``: one check for all of them.
        kwargs["netns"] = agent.option_policy.netns(kwargs["netns"])
    out = entry.handler(Call(agent, peer, payload if entry.payload else None), **kwargs)
    return out if isinstance(out, Reply) else Reply(out)


def _feature(module: str, what: str) -> ModuleType:
    """Import ``module`` on first use; MissingFeatureError if this orthros lacks it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingFeatureError(
            f"this agent cannot {what}: {module} is not available here ({err})",
            hint="install the same orthros version, with its dependencies, on every host",
        ) from err


def _bad_request(msg: str) -> ProtocolError:
    return ProtocolError(msg, code=Refusal.BAD_REQUEST)


# --- host facts --------------------------------------------------------------------------------


@op("ping")
def op_ping(call: Call) -> dict[str, Any]:
    """Liveness, the agent's identity and clock (the caller can estimate clock skew)."""
    return {"name": call.agent.name, "version": __version__, "protocol": PROTOCOL_VERSION,
            "time": time.time(), "hostname": socket.gethostname()}


@op("status")
def op_status(call: Call) -> dict[str, Any]:
    """Who and what the agent is, and what it holds: images, restored trees, page servers."""
    a = call.agent
    with a.mutex:
        restored = [t.to_dict() for t in a.restored.values()]
        servers = list(a.page_servers.values())
        held = list(a.held.values())
        busy = dict(a._busy)
    with a.netlock_mutex:
        netlocks = sorted(a.netlocks)
    return {
        "name": a.name, "hostname": socket.gethostname(), "pid": os.getpid(),
        "uid": os.geteuid(), "orthros_version": __version__, "protocol": PROTOCOL_VERSION,
        "python": platform.python_version(), "kernel": platform.release(),
        "criu": a.criu_info(), "started": a.started, "uptime_s": round(time.time() - a.started, 3),
        "images_root": str(a.images_root), "images": _image_names(a),
        "restored": restored, "page_servers": [s.to_dict() for s in servers],
        "held": [t.to_dict() for t in held], "busy": busy,
        "netlocks_loaded": netlocks, "ops": sorted(OPS), "cgroup_root": a.cgroup_root,
        **_pid_space(),
    }


def _pid_space() -> dict[str, Any]:
    """Which PID space this agent's processes live in: the boot and the PID namespace. Two
    agents that report the same share one PID space (network-namespace hosts on one machine),
    so a tree dumped by one holds the PIDs that a restore by the other needs."""
    out: dict[str, Any] = {"boot_id": None, "pid_ns": None}
    with contextlib.suppress(OSError):
        out["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        out["pid_ns"] = os.stat("/proc/self/ns/pid").st_ino
    return out


@op("check")
def op_check(call: Call, quick: bool = True) -> dict[str, Any]:
    """Run the host probes of ``orthros check`` here (``quick`` skips compiling BPF)."""
    probe = _feature("orthros_py.host.probe", "probe the host")
    report = probe.run_probes(quick=quick)
    data: dict[str, Any] = report.to_dict()
    data["host"] = call.agent.name
    return data


# --- checkpoint and restore --------------------------------------------------------------------


@op("dump")
def op_dump(call: Call, pid: int, image: str,
            options: dict[str, Any] | None = None,
            page_nonce: str | None = None) -> dict[str, Any]:
    """Checkpoint the tree of ``pid`` into image ``image`` (DumpOptions fields in ``options``).
    With ``page_server``, memory goes over the page channel of the destination's image of the
    same name, opened with ``page_nonce`` (from its ``page_server``)."""
    opts = options_from_args(DumpOptions, options or {}, where="dump", exclude=DUMP_EXCLUDED)
    a = call.agent
    optpolicy.vet_dump(a.option_policy, opts.external)
    if opts.parent_img is not None:
        m = _PARENT_IMG.fullmatch(opts.parent_img)
        if m is None:
            raise _bad_request("parent_img must be ../NAME: another image of this agent")
        a.image_path(validate_name(m["name"], "parent image name"), must_exist=True)
    path = a.image_path(image)
    with a.busy(image, "dump"):
        result = _dump_tree(a, pid, image, path, opts, page_nonce)
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
    path = a.image_path(image, must_exist=True)
    with a.busy(image, "restore"):
        try:
            result = restore_tree(path, opts, host=a.name)
        except BaseException:
            _reap_failed_restore(a, path)
            raise
        # Adopted under the busy mark, before any other request can ask to kill it.
        a.adopt(result.pid, image, result.pids)
    data = result.to_dict()
    data["image"] = image
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


def _dump_tree(a: Agent, pid: int, image: str, path: Path, opts: DumpOptions,
               page_nonce: str | None) -> DumpResult:
    """``dump_tree``; with a page server, over the page channel: we connect and prove
    ourselves, and CRIU's dump reaches that connection through a loopback relay, with CRIU's
    TLS or, for a tree with its own IPC namespace, sealed by the relay (see ``pagechan`` for
    why a relay and not ``ps.fd``, and why not always TLS)."""
    if opts.page_server is None:
        return dump_tree(pid, path, opts)
    if page_nonce is None:
        raise _bad_request("a dump to a page server needs page_nonce, the nonce the "
                           "destination's page_server returned: memory crosses hosts only "
                           "on an authenticated channel")
    try:
        nonce = bytes.fromhex(page_nonce)
    except ValueError:
        nonce = b""
    if len(nonce) != pagechan.NONCE_BYTES:
        raise _bad_request(f"page_nonce must be {2 * pagechan.NONCE_BYTES} hex digits")
    host, port = opts.page_server
    use_tls = not _own_ipc_namespace(pid)
    if not use_tls:
        log.info("dump of pid %d: its tree has its own IPC namespace, which CRIU 4.2.1 cannot "
                 "dump over TLS: the agents encrypt the page channel (AES-256-GCM)", pid)
    tls = a.page_tls()
    start = time.perf_counter()
    try:
        chan = pagechan.connect(host, port, a.key, image, nonce, tls=use_tls)
    except pagechan.PageChannelError as err:
        err.stage, err.pid = "dump", pid
        raise
    handshake_ms = (time.perf_counter() - start) * 1000
    relay = pagechan.Relay(chan.sock, chan.records, label=f"image {image}")
    try:
        local = dataclasses.replace(opts, page_server=("127.0.0.1", relay.port))
        result = dump_tree(pid, path, local, session=CriuSession(tls=tls if use_tls else None))
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


@op("page_server")
def op_page_server(call: Call, image: str, address: str | None = None, port: int = 0,
                   log_level: int = 2, wait: float = 600.0) -> dict[str, Any]:
    """Open the page channel for a dump's memory into image ``image``: its port, and the
    ``nonce`` the sending agent must prove itself with.

    Connections to the port must prove within seconds that they hold the cluster key; others
    are refused, logged and counted (``refused`` in status) while it keeps waiting, up to
    ``wait`` s. On the first that proves itself, a CRIU page server receives one dump and
    exits: over TLS on that very connection, or, when the sender asks for the agents' records,
    through a socketpair joined to it by this agent. ``port`` 0 lets the kernel choose;
    ``address`` defaults to the agent's own listen address.
    """
    if not 0 <= port < 65536:
        raise _bad_request(f"{port} is not a TCP port")
    if not 0 <= log_level <= 4:
        raise _bad_request("log_level must be 0-4")
    if not 0 < wait <= 24 * 3600:
        raise _bad_request("wait must be more than 0 and at most a day")
    a = call.agent
    path = a.image_path(image, create=True)
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


@op("kill")
def op_kill(call: Call, pid: int, signal: str = "KILL", wait: float = 5.0) -> dict[str, Any]:
    """Signal a tree this agent restored (root and descendants); wait up to ``wait`` s for the
    root to exit. A tree this agent left stopped after a dump can only be killed (SIGKILL).
    Any other pid is refused."""
    sig = SIGNALS.get(signal.upper().removeprefix("SIG"))
    if sig is None:
        raise _bad_request(f"signal {signal!r} is not one of {', '.join(SIGNALS)}")
    with call.agent.mutex:
        stopped = call.agent.held.get(pid)
    if stopped is not None:
        if sig is not signals.SIGKILL:
            raise _bad_request(f"pid {pid} is held stopped after a dump: it can be resumed "
                               "(resume) or killed (signal KILL), nothing else")
        done = held_trees.kill(stopped, wait=min(wait, 60.0))
        if done["exited"]:
            with call.agent.mutex:
                call.agent.held.pop(pid, None)
        return {"pid": pid, "signal": sig.name, "signaled": done["signaled"],
                "exited": done["exited"], "exit_status": None, "held": True}
    tree = call.agent.restored_tree(pid)
    signaled: list[int] = []
    if not tree.exited.is_set():
        try:
            root = psutil.Process(pid)
            if not tree.ref.is_same(root):
                raise NoSuchProcessError(f"pid {pid} now belongs to another process", pid=pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
                signaled.append(proc.pid)
        if wait > 0 and sig in (signals.SIGKILL, signals.SIGTERM, signals.SIGINT):
            tree.exited.wait(min(wait, 60.0))
    return {"pid": pid, "signal": sig.name, "signaled": signaled,
            "exited": tree.exited.is_set(), "exit_status": tree.exit_status}


@op("resume")
def op_resume(call: Call, pid: int) -> dict[str, Any]:
    """Resume a tree this agent left stopped after a dump (``leave_stopped``): its TCP sockets
    out of repair mode, then SIGCONT. Its network lock is the caller's to lift."""
    a = call.agent
    with a.mutex:
        tree = a.held.get(pid)
    if tree is None:
        raise NoSuchProcessError(f"pid {pid} is not held stopped by this agent: it resumes "
                                 "only trees it dumped with leave_stopped", pid=pid)
    with a.busy(tree.image, "resume"):
        result = held_trees.resume(tree)
        with a.mutex:
            a.held.pop(pid, None)
    log.info("resumed the tree of pid %d (image %s): %d processes, %d sockets out of repair",
             pid, tree.image, len(result["resumed"]), result["sockets"])
    return result


@op("tree")
def op_tree(call: Call, pid: int) -> dict[str, Any]:
    """The processes of the tree of ``pid`` on this host and its TCP connections (all that a
    lock must cover, and those established), with the interfaces they leave by."""
    conns_mod = _feature("orthros_py.net.conns", "find a tree's connections")
    pids = conns_mod.tree_pids(pid)
    procs = []
    for p in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(p)
            procs.append({"pid": p, "name": proc.name(), "status": proc.status(),
                          "threads": proc.num_threads()})
    found = conns_mod.discover(pids)
    established = conns_mod.discover(pids, (conns_mod.TCP_ESTABLISHED,))
    from orthros_py.cgroup.fs import CgroupError, CgroupFs

    try:
        cgroups: str | None = CgroupFs.here().read_tree(pids).to_text()
    except CgroupError:
        cgroups = None  # the tree went meanwhile: the caller hears of it soon enough
    return {"pid": pid, "processes": procs, "conns": [str(c) for c in found.conns],
            "cgroups": cgroups,
            "established": [str(c) for c in established.conns],
            "interfaces": found.interfaces, "routes": {str(c): i for c, i in found.routes.items()},
            "netns_id": list(found.netns_id), "agent_netns": _own_netns_id() == found.netns_id}


# --- cgroups ------------------------------------------------------------------------------------


@op("cgroup_check")
def op_cgroup_check(call: Call, text: str, roots: dict[str, str] | None = None
                    ) -> dict[str, Any]:
    """Whether this host can honour a tree's cgroups (a migration file's ``text``) moved to
    ``roots`` ({hierarchy: top group}): the problems found, none if it can. Reads only."""
    from orthros_py.cgroup.fs import CgroupFs
    from orthros_py.cgroup.model import CgroupFile, check_path

    try:
        cgf = CgroupFile.from_text(text)
        for path in (roots or {}).values():
            check_path(path)
    except ValueError as err:
        raise _bad_request(f"bad cgroup migration file: {err}") from err
    if roots:
        cgf = cgf.rebased(cgf.new_roots(roots))
    start = time.perf_counter()
    problems = CgroupFs.here().check(cgf)
    return {"problems": problems, "groups": len(cgf.groups),
            "check_ms": round((time.perf_counter() - start) * 1000, 3)}


@op("cgroup_release")
def op_cgroup_release(call: Call, image: str) -> dict[str, Any]:
    """Remove the (now empty) cgroups of a tree this agent dumped into ``image``: its own
    record of them, never paths from the request."""
    from orthros_py.cgroup.fs import CgroupFs, wait_empty
    from orthros_py.checkpoint import load_cgroup_file

    cgf = load_cgroup_file(call.agent.image_path(image, must_exist=True))
    if cgf is None or cgf.empty:
        return {"removed": 0, "left": []}
    fs = CgroupFs.here()
    wait_empty([fs.dir(g.hierarchy, g.path) for g in cgf.groups])
    left = fs.remove(cgf)
    return {"removed": len(cgf.groups) - len(left), "left": left}


def _own_netns_id() -> tuple[int, int]:
    st = os.stat("/proc/self/ns/net")
    return (st.st_dev, st.st_ino)


# --- image files -------------------------------------------------------------------------------


def _is_name(name: str) -> bool:
    try:
        validate_name(name)
    except ProtocolError:
        return False
    return True


def _image_names(a: Agent) -> list[str]:
    try:
        entries = list(os.scandir(a.images_root))
    except OSError:
        return []
    return sorted(e.name for e in entries
                  if _is_name(e.name) and e.is_dir(follow_symlinks=False))


def _file_info(image: str, path: Path, sha256: bool) -> dict[str, Any]:
    st = path.stat(follow_symlinks=False)
    info: dict[str, Any] = {"image": image, "filename": path.name, "size": st.st_size}
    if sha256:
        with path.open("rb") as f:
            info["sha256"] = file_digest(f)[1]
    return info


def _image_files(path: Path) -> list[Path]:
    """The regular files of an image directory (no temporaries, no symlinks)."""
    return sorted(p for p in path.iterdir()
                  if _is_name(p.name) and not p.is_symlink() and p.is_file())


def _image_info(a: Agent, image: str, sha256: bool) -> dict[str, Any]:
    path = a.image_path(image, must_exist=True)
    files = [_file_info(image, p, sha256) for p in _image_files(path)]
    links = [{"name": p.name, "target": os.readlink(p)}
             for p in sorted(path.iterdir()) if _is_name(p.name) and p.is_symlink()]
    with a.mutex:
        server = a.page_servers.get(image)
    return {"name": image, "files": files, "links": links,
            "checkpoint": (path / "inventory.img").is_file(),
            "bytes": sum(f["size"] for f in files), "mtime": path.stat().st_mtime,
            "busy": a.busy_with(image),
            "page_server": server.to_dict() if server is not None else None}


@op("list_images")
def op_list_images(call: Call, image: str | None = None, sha256: bool = False) -> dict[str, Any]:
    """The image directories below the root (or just ``image``) and their files."""
    a = call.agent
    names = [validate_name(image)] if image is not None else _image_names(a)
    return {"images_root": str(a.images_root),
            "images": [_image_info(a, n, sha256) for n in names]}


@op("remove_image")
def op_remove_image(call: Call, image: str) -> dict[str, Any]:
    """Delete image ``image`` and its files (refused while it is in use)."""
    a = call.agent
    path = a.image_path(image)
    if not path.exists():
        return {"image": image, "removed": False}
    with a.mutex:
        server = a.page_servers.get(image)
    if server is not None and server.alive():
        raise BadImageError(f"a page server (pid {server.pid}) still writes into {image!r}",
                            hint="stop it with page_server_stop first")
    with a.busy(image, "removal"):
        shutil.rmtree(path)
    return {"image": image, "removed": True}


@op("recv_file", payload=True)
def op_recv_file(call: Call, image: str, filename: str,
                 overwrite: bool = False) -> dict[str, Any]:
    """Store the payload as file ``filename`` of image ``image`` (created if missing), after
    checking its SHA-256; it appears whole or not at all."""
    assert call.payload is not None
    a = call.agent
    validate_name(filename, "file name")
    other = a.busy_with(image)
    if other is not None:
        raise BadImageError(f"image {image!r} is busy with a {other}")
    path = a.image_path(image, create=True)
    target = path / filename
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise BadImageError(f"image {image!r} already has a file {filename}",
                            hint="pass overwrite to replace it")
    # A leading dot makes an invalid name: a partial file is never listed, sent or restored.
    tmp = path / f".{filename}.{os.getpid()}.{threading.get_ident()}.part"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as err:
        raise BadImageError(f"cannot write {filename} into image {image!r} at {path}: "
                            f"{err.strerror}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            size = call.payload.copy_to(f)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # no replacement of a file that appeared meanwhile
            except FileExistsError as err:
                raise BadImageError(f"image {image!r} already has a file {filename}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return {"image": image, "filename": filename, "size": size,
            "sha256": call.payload.sha256}


@op("recv_files", payload=True)
def op_recv_files(call: Call, image: str, files: list[dict[str, Any]],
                  overwrite: bool = False) -> dict[str, Any]:
    """Store the payload, the concatenation of several files, as the files ``files`` names
    (``filename``, ``size``, ``sha256`` each, in payload order) of image ``image``: one request
    for a whole checkpoint's small files. Every file and the whole payload are checked before
    any file appears; then they appear one by one, each whole."""
    assert call.payload is not None
    a = call.agent
    manifest: list[tuple[str, int, str]] = []
    for f in files:
        try:
            name = validate_name(f["filename"], "file name")
            size, digest = int(f["size"]), str(f["sha256"])
        except (KeyError, TypeError, ValueError) as err:
            raise _bad_request(f"bad entry in files: {f!r}") from err
        if size < 0:
            raise _bad_request(f"negative size for {name}")
        manifest.append((name, size, digest))
    if sum(m[1] for m in manifest) != call.payload.length:
        raise _bad_request("the sizes in files do not add up to the payload's length")
    if len({m[0] for m in manifest}) != len(manifest):
        raise _bad_request("a file is named twice in files")
    other = a.busy_with(image)
    if other is not None:
        raise BadImageError(f"image {image!r} is busy with a {other}")
    path = a.image_path(image, create=True)
    if not overwrite:
        present = [m[0] for m in manifest if (path / m[0]).exists() or (path / m[0]).is_symlink()]
        if present:
            raise BadImageError(f"image {image!r} already has a file {present[0]}",
                                hint="pass overwrite to replace it")
    tag = f"{os.getpid()}.{threading.get_ident()}"
    tmps = [path / f".{name}.{tag}.part" for name, _, _ in manifest]
    try:
        chunks = call.payload.chunks()
        chunk = memoryview(b"")
        at = 0  # how much of ``chunk`` is used (a view: slicing copies nothing)
        for (name, size, digest), tmp in zip(manifest, tmps, strict=True):
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
            except OSError as err:
                raise BadImageError(f"cannot write {name} into image {image!r} at {path}: "
                                    f"{err.strerror}") from err
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                left = size
                while left:
                    if at == len(chunk):
                        chunk, at = memoryview(next(chunks)), 0
                    piece = chunk[at:at + left]
                    out.write(piece)
                    h.update(piece)
                    at += len(piece)
                    left -= len(piece)
            if h.hexdigest() != digest:
                raise BadImageError(f"{name} arrived damaged (its SHA-256 does not match)")
        for _ in chunks:  # the end of the payload: checks its SHA-256 against the header
            pass
        for (name, _, _), tmp in zip(manifest, tmps, strict=True):
            if overwrite:
                os.replace(tmp, path / name)
            else:
                try:
                    os.link(tmp, path / name)
                except FileExistsError as err:
                    raise BadImageError(f"image {image!r} already has a file {name}") from err
    except OSError as err:
        raise BadImageError(f"cannot store files into image {image!r} at {path}: "
                            f"{err.strerror}") from err
    finally:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return {"image": image, "files": [{"image": image, "filename": n, "size": z, "sha256": d}
                                      for n, z, d in manifest]}


@op("send_file")
def op_send_file(call: Call, image: str, filename: str) -> Reply:
    """Stream file ``filename`` of image ``image`` back as the response's payload."""
    path = call.agent.image_path(image, must_exist=True) / validate_name(filename, "file name")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise BadImageError(f"image {image!r} has no file {filename}") from err
    except OSError as err:
        raise BadImageError(f"cannot read {filename} of image {image!r}: "
                            f"{err.strerror}") from err
    f = os.fdopen(fd, "rb")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadImageError(f"{filename} of image {image!r} is not a regular file")
        size, digest = file_digest(f)
    except BaseException:
        f.close()
        raise
    return Reply({"image": image, "filename": filename, "size": size, "sha256": digest},
                 payload=f, payload_len=size, payload_sha256=digest)


@op("push_images")
def op_push_images(call: Call, image: str, host: str, port: int, dest_image: str | None = None,
                   dest_name: str | None = None, overwrite: bool = False,
                   timeout: float = 600.0, files: tuple[str, ...] | None = None,
                   prefixes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Send every file of image ``image`` (or those named in ``files``, or whose names start
    with one of ``prefixes``) straight to the agent at ``host``:``port`` (into ``dest_image``,
    by default the same name), so images never detour through the caller."""
    from orthros_py.agent.client import AgentClient

    a = call.agent
    path = a.image_path(image, must_exist=True)
    dest = validate_name(dest_image or image)
    other = a.busy_with(image)
    if other is not None:
        raise BadImageError(f"image {image!r} is busy with a {other}")
    chosen = _image_files(path)
    if files is not None:
        wanted = {validate_name(f, "file name") for f in files}
        missing = sorted(wanted - {p.name for p in chosen})
        if missing:
            raise BadImageError(f"image {image!r} has no file(s) {', '.join(missing)}")
        chosen = [p for p in chosen if p.name in wanted]
    if prefixes is not None:
        chosen = [p for p in chosen if p.name.startswith(tuple(prefixes))]
    client = AgentClient(host, port, a.key, name=dest_name, timeout=timeout)
    start = time.perf_counter()
    sent = [f.to_dict() for f in client.upload_files(dest, chosen, overwrite=overwrite)]
    return {"image": image, "dest_image": dest, "dest": client.name, "files": sent,
            "bytes": sum(int(f["size"]) for f in sent),
            "elapsed_ms": round((time.perf_counter() - start) * 1000, 3)}


# --- network locks and service addresses (other modules, imported on first use) ----------------


def _netlock(a: Agent, backend: str, netns: str | None) -> Any:
    mod = _feature("orthros_py.netlock", "take network locks")
    if backend == "xdp":
        # Kept for the agent's life: the compiled program (~10 s to build) stays loaded.
        if "xdp" not in a.netlocks:
            a.netlocks["xdp"] = mod.backend("xdp")
        return a.netlocks["xdp"]
    try:
        return mod.backend(backend, netns=netns)
    except ValueError as err:
        raise _bad_request(str(err)) from err


def _conns(items: tuple[str, ...]) -> list[Any]:
    mod = _feature("orthros_py.netlock", "take network locks")
    try:
        return [mod.Conn.parse(c) for c in items]
    except ValueError as err:
        raise _bad_request(f"bad connection: {err}") from err


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
                    netns: str | None = None) -> dict[str, Any]:
    """Silence connections (``SRC:PORT,DST:PORT``, and those of ``pids``' tree, found here)."""
    wanted = _conns(conns)
    names = list(ifaces)
    if pids:
        found = _feature("orthros_py.net.conns", "find a tree's connections").discover(list(pids))
        wanted += list(found.conns)
        names += [i for i in found.interfaces if i not in names]
        netns = netns or found.netns
    with call.agent.netlock_mutex:
        lock = _netlock(call.agent, backend, netns)
        lock.prepare()
        if names and hasattr(lock, "attach"):
            lock.attach(names, netns=netns)
        locked = lock.lock(wanted)
    return {"backend": backend, "locked": [str(c) for c in locked], "ifaces": names,
            "netns": netns}


@op("netlock_unlock")
def op_netlock_unlock(call: Call, backend: str, conns: tuple[str, ...],
                      netns: str | None = None, detach: tuple[str, ...] = (),
                      tidy: bool = False) -> dict[str, Any]:
    """Let connections through again (locked here or by any earlier process). Then, unless a
    connection of this host is still locked: XDP takes its programs off the interfaces in
    ``detach`` (the map is shared by every namespace of the machine, so "of this host" means
    with an address of this namespace); with ``tidy``, nftables and iptables remove what holds
    their rules (nftables' table)."""
    wanted = _conns(conns)
    detached: list[str] = []
    tidied = False
    with call.agent.netlock_mutex:
        lock = _netlock(call.agent, backend, netns)
        unlocked = lock.unlock(wanted)
        if hasattr(lock, "detach"):
            if detach:
                here = _addresses(netns)
                busy = [lc for lc in lock.locked()
                        if lc.conn.local_ip in here or lc.conn.remote_ip in here]
                if not busy:
                    done = lock.detach(list(detach), netns=netns)
                    detached = [att.iface for att in done.detached]
        elif tidy and not lock.status().conns:
            lock.flush()
            tidied = True
    return {"backend": backend, "unlocked": [str(c) for c in unlocked], "detached": detached,
            "tidied": tidied}


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
    return _feature("orthros_py.net.addr", "manage service addresses")


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
        raise _bad_request(str(err)) from err
    return {"ifname": ifname, "address": address, "added": bool(added)}


@op("addr_del")
def op_addr_del(call: Call, ifname: str, address: str,
                netns: str | None = None) -> dict[str, Any]:
    """Take a service address off an interface of this host."""
    mod = _addr()
    try:
        removed = mod.remove_address(netns, ifname, address)
    except ValueError as err:
        raise _bad_request(str(err)) from err
    return {"ifname": ifname, "address": address, "removed": bool(removed)}


@op("garp")
def op_garp(call: Call, ifname: str, address: str, count: int = 1,
            netns: str | None = None) -> dict[str, Any]:
    """Announce a service address from this host with gratuitous ARP."""
    if not 1 <= count <= 100:
        raise _bad_request("count must be 1-100")
    mod = _addr()
    try:
        sent = mod.Link(netns, ifname).gratuitous_arp(address, count=count)
    except ValueError as err:
        raise _bad_request(str(err)) from err
    return {"ifname": ifname, "address": address, "sent": int(sent)}
