"""What one agent holds between requests: its identity and key, the images root, the trees it
restored, the page channels it opened, the trees it holds stopped after a dump, the network locks
it keeps loaded, and the busy marks that keep two users off one image. Shared by all connections;
the operations (``orthros_py.agent.ops``) read and change it under its locks.

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
import logging
import os
import shutil
import signal as signals
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthros_py.agent import held as held_trees
from orthros_py.agent import optpolicy, pagechan
from orthros_py.agent.errors import ProtocolError
from orthros_py.agent.protocol import validate_name
from orthros_py.criu.request import TlsFiles
from orthros_py.errors import BadImageError, NoSuchProcessError, OrthrosError
from orthros_py.proc.tree import ProcessRef

log = logging.getLogger("orthros.agent")

TRASH = ".trash"  # below the images root: images being removed in the background
# Transient images in memory where /dev/shm is a tmpfs, one directory per agent.
SCRATCH_BASE = Path("/dev/shm/orthros-images")
TMPFS_MAGIC = 0x01021994
KEEP_EXITED = 256  # exited trees kept in the table (for ``status``) before the oldest go


def valid_name(name: str) -> bool:
    """Whether ``name`` may name an image or a file of one (temporaries and dot files may not)."""
    try:
        validate_name(name)
    except ProtocolError:
        return False
    return True


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


def default_scratch_root(name: str) -> Path | None:
    """The scratch root an agent called ``name`` uses unless told: on /dev/shm if that is a
    tmpfs (memory), else none."""
    try:
        import ctypes  # statfs(2): its f_type says tmpfs

        buf = ctypes.create_string_buffer(120)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.statfs(str(SCRATCH_BASE.parent).encode(), buf) != 0:
            return None
        if int.from_bytes(buf.raw[:8], "little") != TMPFS_MAGIC:
            return None
    except OSError:
        return None
    return SCRATCH_BASE / name


def _scratch_dir(root: Path | None) -> Path | None:
    """``root`` made ready (root's own, no access for others), emptied of removals an agent's
    death interrupted; None if it cannot be used (then images stay on disk)."""
    if root is None:
        return None
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = root.lstat()
        if not root.is_dir() or root.is_symlink() or st.st_uid != os.geteuid() \
                or st.st_mode & 0o077:
            log.warning("scratch root %s is not a private directory: images stay on disk", root)
            return None
    except OSError as err:
        log.warning("no scratch root at %s (%s): images stay on disk", root, err.strerror)
        return None
    shutil.rmtree(root / TRASH, ignore_errors=True)
    return root.resolve()


class Agent:
    """What one agent holds: its name, key, images root, the trees it restored, the page
    servers it started, and the network locks it keeps loaded. Shared by all connections."""

    def __init__(self, name: str, images_root: Path, key: bytes, *,
                 listen_host: str = "", cgroup_root: str = "/",
                 scratch_root: Path | None = None) -> None:
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
        # Images removed in the background wait here; a removal an agent's death interrupted
        # is finished at the next start.
        shutil.rmtree(self.images_root / TRASH, ignore_errors=True)
        # Where transient images (a migration's) live in memory (a tmpfs), reached through a
        # symlink in the images root: a dump and its transfer write hundreds of small files,
        # which a slow disk turned into the larger part of a migration's downtime. None: none.
        self.scratch_root = _scratch_dir(scratch_root)
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
        # Counts the netlock_lock calls: a detach deferred from before one of them is void
        # (the programs were attached again for a lock that is about to be written).
        self.netlock_epoch = 0
        self.mutex = threading.Lock()  # guards restored, page_servers and the busy marks
        self._busy: dict[str, str] = {}  # image -> what is using it
        self._criu: dict[str, Any] | None = None
        self._page_tls: TlsFiles | None = None
        # The pairs this agent takes part in (``orthros_py.agent.ops.pair.pairs_of``).
        self.pairs: Any = None
        # Members of synchronized saves and restores under way (``orthros_py.agent.sync``).
        self.syncs: Any = None
        # Lazy (post-copy) migrations under way: image -> its source or destination side
        # (``orthros_py.agent.ops.lazy``).
        self.lazy: dict[str, Any] = {}
        # Dirty trackers kept between the dumps of a pre-copy (name -> DirtyTracker).
        self.trackers: dict[str, Any] = {}
        # When each restored image's tree first answered (image -> FirstReply); the newest only.
        self.replies: dict[str, Any] = {}

    # -- images ---------------------------------------------------------------------------

    def image_path(self, image: str, *, create: bool = False, must_exist: bool = False,
                   scratch: bool = False) -> Path:
        """The directory of image ``image`` below the root; never a symlink out of it, but
        to the image's own directory in the scratch root. ``scratch`` with ``create``: a new
        image goes to the scratch root (in memory) where the agent has one."""
        path = self.images_root / validate_name(image)
        if path.is_symlink():
            if not self._scratch_link(path):
                raise BadImageError(f"{path} is not an image directory")
            return path
        if path.exists() and not path.is_dir():
            raise BadImageError(f"{path} is not an image directory")
        if create and scratch and self.scratch_root is not None and not path.exists():
            real = self.scratch_root / path.name
            try:
                real.mkdir(mode=0o700, exist_ok=True)
                path.symlink_to(real)
            except OSError as err:
                raise BadImageError(f"cannot create {real}: {err.strerror}") from err
            return path
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

    def busy_marks(self) -> dict[str, str]:
        """Image -> what is using it, at this moment."""
        with self.mutex:
            return dict(self._busy)

    def _scratch_link(self, path: Path) -> bool:
        """Whether ``path`` is an image's link to its own directory in the scratch root."""
        if self.scratch_root is None:
            return False
        try:
            return Path(os.readlink(path)) == self.scratch_root / path.name
        except OSError:
            return False

    def remove_image_dir(self, path: Path, *, later: bool = False) -> None:
        """Delete image directory ``path`` (and its scratch directory, if it has one);
        ``later``: out of the way at once, its files deleted on a thread of its own."""
        if path.is_symlink():
            root = self.scratch_root if self._scratch_link(path) else None
            path.unlink()
            if root is not None:
                if later:
                    self._remove_later(root / path.name, root / TRASH)
                else:
                    shutil.rmtree(root / path.name, ignore_errors=True)
            return
        if later:
            self._remove_later(path, self.images_root / TRASH)
        else:
            shutil.rmtree(path)

    def _remove_later(self, path: Path, trash: Path) -> None:
        """Take ``path`` out of the way at once (a rename) and delete it on a thread of its
        own: a caller need not wait for thousands of files to go."""
        trash.mkdir(mode=0o700, exist_ok=True)
        gone = trash / f"{path.name}.{uuid.uuid4().hex[:8]}"
        path.rename(gone)
        threading.Thread(target=shutil.rmtree, args=(gone,), kwargs={"ignore_errors": True},
                         name=f"remove {path.name}", daemon=True).start()

    def image_names(self) -> list[str]:
        """The image directories below the root (those in the scratch root too)."""
        try:
            entries = list(os.scandir(self.images_root))
        except OSError:
            return []
        return sorted(e.name for e in entries
                      if valid_name(e.name) and (e.is_dir(follow_symlinks=False)
                                                 or self._scratch_link(Path(e.path))))

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

    def tracker(self, name: str) -> Any:
        """The dirty tracker called ``name``, made on first use: it holds the userfaultfds
        that keep a tree's memory tracked from one dump to the next."""
        from orthros_py.criu.dirtytrack import DirtyTracker

        with self.mutex:
            tracker = self.trackers.get(name)
            if tracker is None:
                tracker = self.trackers[name] = DirtyTracker()
            return tracker

    def close_tracker(self, name: str) -> bool:
        with self.mutex:
            tracker = self.trackers.pop(name, None)
        if tracker is None:
            return False
        tracker.close()
        return True

    def close(self) -> None:
        """At the agent's exit: stop the page servers still waiting for a dump (nobody could
        stop them later). Restored trees are left running: init inherits them."""
        if self.pairs is not None:
            self.pairs.shutdown()  # threads stop; the records stay for the next start
        with self.mutex:
            servers = list(self.page_servers.values())
            self.page_servers.clear()
        for server in servers:
            if server.alive():
                log.info("stopping page server %d of image %s", server.pid, server.image)
            server.stop()
        with self.mutex:
            lazy, self.lazy = list(self.lazy.values()), {}
            trackers, self.trackers = list(self.trackers.values()), {}
        for side in lazy:
            side.stop()
        for tracker in trackers:
            tracker.close()

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
        """CRIU's path and version, and whether it tracks memory (incremental dumps, pre-copy)
        and restores lazily here, looked up once (each answer forks CRIU)."""
        if self._criu is None:
            from orthros_py.criu.binary import find_criu
            from orthros_py.criu.request import feature_request
            from orthros_py.criu.session import CriuSession

            try:
                binary = find_criu()
                info: dict[str, Any] = {"path": binary.path, "version": binary.version_str,
                                        "error": None, "mem_track": False, "lazy_pages": False}
                with contextlib.suppress(OrthrosError):
                    feats = CriuSession(binary, timeout=60).call(feature_request()).features
                    info.update(mem_track=bool(feats.mem_track),
                                lazy_pages=bool(feats.lazy_pages))
                self._criu = info
            except OrthrosError as err:
                self._criu = {"path": None, "version": None, "error": str(err),
                              "mem_track": False, "lazy_pages": False}
        return self._criu
