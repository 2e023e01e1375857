"""The typed client of the agent RPC: one method per operation of ``orthros_py.agent.ops``,
answering with the results of ``orthros_py.agent.messages``.

Interface: a TCP connection per call to an agent (made by ``socket.create_connection``, or by a
``connector`` handed in, e.g. one that opens the socket inside a lab host's network namespace);
no privileges beyond reading the cluster key. Every response is verified (MAC, and that it
answers this very request) before it is believed.

Errors: an error raised by the operation on the agent comes back as the same OrthrosError
subclass with its context, ``host`` set to the agent's name. Failing to connect raises
AgentUnreachable; no answer in time raises OperationTimeout; a refusal (wrong key, replay,
version) raises AgentRefused, all with ``host`` set.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orthros_py.agent.auth import load_key
from orthros_py.agent.errors import AgentError, AgentUnreachable, ProtocolError
from orthros_py.agent.messages import (
    FileInfo,
    ImageInfo,
    KillResult,
    PageServerInfo,
    PingInfo,
    RemoteDump,
    RemoteRestore,
)
from orthros_py.agent.protocol import (
    DEFAULT_PORT,
    EMPTY_SHA256,
    PayloadReader,
    Response,
    SourceFile,
    build_request,
    decode_header,
    encode_request,
    file_digest,
    open_response,
    options_to_args,
    read_frame,
    send_payload,
    validate_name,
)
from orthros_py.criu.request import DumpOptions, RestoreOptions
from orthros_py.errors import OperationTimeout, OrthrosError
from orthros_py.net.conn import format_endpoint

if TYPE_CHECKING:
    from orthros_py.netlock.base import Conn

# (address, timeout) -> a connected stream socket.
Connector = Callable[[tuple[str, int], float], socket.socket]

CALL_TIMEOUT = 30.0
CRIU_TIMEOUT = 600.0  # dump and restore: as long as CriuSession waits for CRIU
TRANSFER_TIMEOUT = 600.0  # per file; a socket timeout, so it bounds stalls, not file size
CONNECT_TIMEOUT = 5.0
# Files sent in one request by upload_files, held in memory meanwhile: a checkpoint's small
# files (its memory goes through a page server, or in files of its own).
BUNDLE_LIMIT = 64 << 20
PIDS_PER_REQUEST = 65536  # what an agent's pids_in_use takes at most


def tcp_connect(address: tuple[str, int], timeout: float) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    # Requests and payloads are written whole: Nagle's wait for an acknowledgement only adds
    # the peer's delayed-ACK time to each (measured: 450 small image files took 400 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# --- the client --------------------------------------------------------------------------------


class AgentClient:
    """Calls one agent. Cheap to make; holds no connection between calls (each call opens
    its own), so one client may be used from several threads at once."""

    def __init__(self, host: str, port: int = DEFAULT_PORT, key: bytes | Path = b"", *,
                 name: str | None = None, timeout: float = CALL_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 connector: Connector | None = None) -> None:
        self.host = host
        self.port = port
        self.key = load_key(key) if isinstance(key, Path) else key
        if not self.key:
            raise ValueError("an agent client needs the cluster key")
        self.endpoint = format_endpoint(host, port)
        self.name = name or self.endpoint
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.connector = connector or tcp_connect

    def __repr__(self) -> str:
        return f"AgentClient({self.name} at {self.endpoint})"

    # -- transport ------------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        try:
            return self.connector((self.host, self.port), self.connect_timeout)
        except ConnectionRefusedError:
            reason = "connection refused"
        except TimeoutError:
            reason = f"no answer within {self.connect_timeout:g} s"
        except socket.gaierror as err:
            reason = f"cannot resolve {self.host}: {err.strerror}"
        except OSError as err:
            reason = (err.strerror or str(err)).lower()
        raise AgentUnreachable(
            f"agent on {self.name} at {self.endpoint} is not reachable: {reason}",
            host=self.name, hint="is 'orthros agent' running there, and the address right?")

    def call(self, op: str, args: Mapping[str, Any] | None = None, *,
             timeout: float | None = None, payload: SourceFile | None = None,
             sink: Callable[[PayloadReader], None] | None = None) -> Response:
        """Send one request (with a file as payload) and return its verified response; a
        response payload goes to ``sink`` (or is read and dropped). Raises the agent's error."""
        size, digest = file_digest(payload) if payload is not None else (0, EMPTY_SHA256)
        req = build_request(op, args, payload_len=size, payload_sha256=digest)
        frame = encode_request(self.key, req)
        limit = self.timeout if timeout is None else timeout
        sock = self._connect()
        try:
            with sock:
                sock.settimeout(limit)
                try:
                    sock.sendall(frame)
                    if payload is not None:
                        send_payload(sock, payload, size)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the agent gave up on us: its refusal may still be there to read
                raw = read_frame(sock)
                if raw is None:
                    raise AgentError(f"the agent on {self.name} at {self.endpoint} closed the "
                                     f"connection without answering the {op} request",
                                     host=self.name, stage=op)
                resp = open_response(self.key, decode_header(raw), req)
                if resp.ok and (resp.payload_len or sink is not None):
                    reader = PayloadReader(sock, resp.payload_len, resp.payload_sha256)
                    (sink or PayloadReader.discard)(reader)
        except TimeoutError as err:
            raise OperationTimeout(
                f"the agent on {self.name} at {self.endpoint} did not answer the {op} request "
                f"within {limit:g} s", host=self.name, stage=op) from err
        except OrthrosError as err:
            err.host = err.host or self.name
            raise
        except OSError as err:
            raise AgentError(f"lost the connection to the agent on {self.name} at "
                             f"{self.endpoint} during {op}: {err.strerror or err}",
                             host=self.name, stage=op) from err
        if not resp.ok:
            raise self._remote_error(resp.error or {})
        return resp

    def _remote_error(self, data: Mapping[str, Any]) -> OrthrosError:
        # Every error class registered itself in the tree: it comes back as itself, with the
        # extras it carries and its exit status.
        err = OrthrosError.from_dict(dict(data))
        err.host = err.host or self.name
        return err

    def _result(self, op: str, args: Mapping[str, Any] | None = None, *,
                timeout: float | None = None) -> dict[str, Any]:
        resp = self.call(op, args, timeout=timeout)
        return dict(resp.result or {})

    def request(self, op: str, args: Mapping[str, Any] | None = None, *,
                timeout: float | None = None) -> dict[str, Any]:
        """Any operation of the agent's table (see ``orthros_py.agent.ops``): its result."""
        return self._result(op, args, timeout=timeout)

    # -- host -----------------------------------------------------------------------------

    def ping(self) -> PingInfo:
        return PingInfo.from_dict(self._result("ping"))

    def status(self) -> dict[str, Any]:
        """Identity, versions (orthros, CRIU), images, restored trees and page servers."""
        return self._result("status")

    def check(self, *, quick: bool = True, timeout: float = 120.0) -> dict[str, Any]:
        """The host probes of ``orthros check``, run on the agent's host (Report.to_dict)."""
        return self._result("check", {"quick": quick}, timeout=timeout)

    # -- checkpoint and restore -----------------------------------------------------------

    def dump(self, pid: int, image: str, opts: DumpOptions | None = None, *,
             timeout: float = CRIU_TIMEOUT, page_nonce: str | None = None,
             dirty_track: str | None = None, scratch: bool = False) -> RemoteDump:
        """Checkpoint the tree of ``pid`` on the agent's host into its image ``image``.
        ``opts.pid`` is ignored; ``opts.notify`` cannot cross the RPC. With
        ``opts.page_server``, ``page_nonce`` is the destination's ``PageServerInfo.nonce``.
        ``scratch``: a transient image, kept in memory where the agent can."""
        opts = opts or DumpOptions()
        if opts.notify:
            raise ValueError("CRIU notifications cannot be answered over the agent RPC")
        args: dict[str, Any] = {"pid": pid, "image": validate_name(image),
                                "options": options_to_args(opts, exclude=("pid", "notify"))}
        if page_nonce is not None:
            args["page_nonce"] = page_nonce
        if dirty_track is not None:
            args["dirty_track"] = validate_name(dirty_track, "dirty_track")
        if scratch:
            args["scratch"] = True
        return RemoteDump.from_dict(self._result("dump", args, timeout=timeout))

    def restore(self, image: str, opts: RestoreOptions | None = None, *,
                timeout: float = CRIU_TIMEOUT) -> RemoteRestore:
        """Restore image ``image`` on the agent's host. The root becomes the agent's child
        (``opts.sibling`` is ignored), reaped by the agent when it exits."""
        opts = opts or RestoreOptions()
        if opts.notify:
            raise ValueError("CRIU notifications cannot be answered over the agent RPC")
        args = {"image": validate_name(image),
                "options": options_to_args(opts, exclude=("notify", "sibling"))}
        return RemoteRestore.from_dict(self._result("restore", args, timeout=timeout))

    def page_server(self, image: str, *, address: str | None = None,
                    port: int = 0, log_level: int = 2, wait: float = 600.0,
                    parent: str | None = None, scratch: bool = False) -> PageServerInfo:
        """Open the page channel receiving a dump's memory into image ``image``; pass its
        (address, port) as ``DumpOptions.page_server`` and its ``nonce`` as ``page_nonce`` to
        the dumping host's ``dump``. Port 0: any. It waits ``wait`` s for the sender."""
        args: dict[str, Any] = {"image": validate_name(image), "port": port,
                                "log_level": log_level, "wait": wait}
        if address is not None:
            args["address"] = address
        if parent is not None:
            args["parent"] = validate_name(parent, "parent image name")
        if scratch:
            args["scratch"] = True  # a transient image: in memory where the agent can
        return PageServerInfo.from_dict(self._result("page_server", args))

    def page_server_stop(self, image: str) -> dict[str, Any]:
        return self._result("page_server_stop", {"image": validate_name(image)})

    def kill(self, pid: int, *, signal: str = "KILL", wait: float = 5.0) -> KillResult:
        """Signal a tree the agent restored, or kill one it holds stopped after a dump (any
        other pid is refused)."""
        return KillResult.from_dict(self._result(
            "kill", {"pid": pid, "signal": signal, "wait": wait}, timeout=wait + CALL_TIMEOUT))

    def resume(self, pid: int) -> dict[str, Any]:
        """Resume a tree the agent left stopped after a ``leave_stopped`` dump: its TCP sockets
        out of repair mode, SIGCONT. Lifting its network lock is the caller's job."""
        return self._result("resume", {"pid": pid})

    def tree(self, pid: int) -> dict[str, Any]:
        """The tree of ``pid`` on the agent's host: processes, TCP connections (``conns``: all
        a lock must cover; ``established``), the interfaces they use."""
        return self._result("tree", {"pid": pid})

    def pids_in_use(self, pids: Iterable[int]) -> list[tuple[int, str]]:
        """(pid, name) of those of ``pids`` that a live process or thread holds in the agent's
        PID namespace (zombies do not count); asked in requests of at most PIDS_PER_REQUEST."""
        wanted = sorted({int(p) for p in pids})
        held: list[tuple[int, str]] = []
        for i in range(0, len(wanted), PIDS_PER_REQUEST):
            data = self._result("pids_in_use", {"pids": wanted[i:i + PIDS_PER_REQUEST]})
            held.extend((int(pid), str(name)) for pid, name in data.get("held", []))
        return held

    # -- cgroups --------------------------------------------------------------------------

    def cgroup_check(self, text: str, roots: Mapping[str, str] | None = None) -> list[str]:
        """Why the agent's host cannot honour a migration file moved to ``roots`` (none: it
        can)."""
        args: dict[str, Any] = {"text": text}
        if roots:
            args["roots"] = dict(roots)
        return [str(p) for p in self._result("cgroup_check", args).get("problems", [])]

    def cgroup_release(self, image: str) -> dict[str, Any]:
        """Remove the empty cgroups of a tree the agent dumped into ``image``."""
        return self._result("cgroup_release", {"image": validate_name(image)})

    # -- image files ----------------------------------------------------------------------

    def list_images(self, image: str | None = None, *, sha256: bool = False) -> list[ImageInfo]:
        args: dict[str, Any] = {"sha256": sha256}
        if image is not None:
            args["image"] = validate_name(image)
        data = self._result("list_images", args, timeout=TRANSFER_TIMEOUT if sha256 else None)
        return [ImageInfo.from_dict(i) for i in data["images"]]

    def remove_image(self, image: str, *, background: bool = False) -> bool:
        """Delete image ``image``; ``background``: the agent answers once it is out of the
        way and deletes its files afterwards (a migration's user need not wait for them)."""
        args: dict[str, Any] = {"image": validate_name(image)}
        if background:
            args["background"] = True
        return bool(self._result("remove_image", args)["removed"])

    def upload_file(self, image: str, local: Path, *, filename: str | None = None,
                    overwrite: bool = False, timeout: float = TRANSFER_TIMEOUT,
                    scratch: bool = False) -> FileInfo:
        """Copy a local file into image ``image`` on the agent (its ``recv_file``)."""
        name = validate_name(filename or local.name, "file name")
        args: dict[str, Any] = {"image": validate_name(image), "filename": name,
                                "overwrite": overwrite}
        if scratch:
            args["scratch"] = True
        with local.open("rb") as f:
            resp = self.call("recv_file", args, timeout=timeout, payload=f)
        return FileInfo.from_dict(resp.result or {})

    def upload_dir(self, image: str, local_dir: Path, *, overwrite: bool = False,
                   timeout: float = TRANSFER_TIMEOUT) -> list[FileInfo]:
        """Copy every regular file of ``local_dir`` (a CRIU image directory) into ``image``."""
        files = sorted(p for p in local_dir.iterdir()
                       if p.is_file() and not p.is_symlink() and not p.name.startswith("."))
        return [self.upload_file(image, p, overwrite=overwrite, timeout=timeout) for p in files]

    def upload_files(self, image: str, paths: Iterable[Path], *, overwrite: bool = False,
                     timeout: float = TRANSFER_TIMEOUT, scratch: bool = False) -> list[FileInfo]:
        """Copy local files into image ``image`` on the agent: the small ones (up to
        ``BUNDLE_LIMIT`` bytes in all) in one ``recv_files`` request, the rest one by one.
        An agent without ``recv_files`` gets them all one by one."""
        small: list[Path] = []
        large: list[Path] = []
        total = 0
        for p in paths:
            size = p.stat().st_size
            if total + size <= BUNDLE_LIMIT:
                small.append(p)
                total += size
            else:
                large.append(p)
        out: list[FileInfo] = []
        if len(small) > 1:
            try:
                out += self._upload_bundle(image, small, overwrite=overwrite, timeout=timeout,
                                           scratch=scratch)
                small = []
            except ProtocolError as err:
                if str(err.code) != "bad_request" or "unknown operation" not in err.msg:
                    raise  # an older agent lacks recv_files: anything else is a real refusal
        for p in [*small, *large]:
            out.append(self.upload_file(image, p, overwrite=overwrite, timeout=timeout,
                                        scratch=scratch))
        return out

    def _upload_bundle(self, image: str, paths: list[Path], *, overwrite: bool,
                       timeout: float, scratch: bool = False) -> list[FileInfo]:
        manifest: list[dict[str, Any]] = []
        bundle = io.BytesIO()
        for p in paths:
            data = p.read_bytes()
            manifest.append({"filename": validate_name(p.name, "file name"), "size": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()})
            bundle.write(data)
        bundle.seek(0)
        args: dict[str, Any] = {"image": validate_name(image), "files": manifest,
                                "overwrite": overwrite}
        if scratch:
            args["scratch"] = True
        resp = self.call("recv_files", args, timeout=timeout, payload=bundle)
        return [FileInfo.from_dict(f) for f in (resp.result or {}).get("files", [])]

    def download_file(self, image: str, filename: str, local: Path, *,
                      timeout: float = TRANSFER_TIMEOUT) -> FileInfo:
        """Copy file ``filename`` of image ``image`` on the agent to ``local`` (its
        ``send_file``); ``local`` appears only once the whole file arrived and verified."""
        tmp = local.with_name(f".{local.name}.part")

        def save(reader: PayloadReader) -> None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                reader.copy_to(f)

        try:
            resp = self.call("send_file", {"image": validate_name(image),
                                           "filename": validate_name(filename, "file name")},
                             timeout=timeout, sink=save)
            os.replace(tmp, local)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return FileInfo.from_dict(resp.result or {})

    def download_image(self, image: str, local_dir: Path, *,
                       timeout: float = TRANSFER_TIMEOUT) -> list[FileInfo]:
        """Copy every file of image ``image`` into ``local_dir`` (created if missing)."""
        local_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (info,) = self.list_images(image)
        return [self.download_file(image, f.filename, local_dir / f.filename, timeout=timeout)
                for f in info.files]

    def push_images(self, image: str, host: str, port: int, *, dest_image: str | None = None,
                    dest_name: str | None = None, overwrite: bool = False,
                    timeout: float = TRANSFER_TIMEOUT, files: Iterable[str] | None = None,
                    prefixes: Iterable[str] | None = None,
                    scratch: bool = False) -> list[FileInfo]:
        """Have the agent send image ``image`` (all of it, or the ``files`` named, or those
        whose names start with one of ``prefixes``) straight to the agent at ``host``:``port``
        (as that agent's host sees it), so the files never pass through this caller."""
        args: dict[str, Any] = {"image": validate_name(image), "host": host, "port": port,
                                "overwrite": overwrite, "timeout": timeout}
        if files is not None:
            args["files"] = [validate_name(f, "file name") for f in files]
        if prefixes is not None:
            args["prefixes"] = list(prefixes)
        if dest_image is not None:
            args["dest_image"] = validate_name(dest_image)
        if dest_name is not None:
            args["dest_name"] = dest_name
        if scratch:
            args["scratch"] = True  # the destination keeps them in memory where it can
        # The agent uploads file by file, each bounded by ``timeout``; allow for many files.
        data = self._result("push_images", args, timeout=timeout * 4)
        return [FileInfo.from_dict(f) for f in data["files"]]

    # -- network locks and service addresses ----------------------------------------------

    def netlock_prepare(self, backend: str = "xdp", *, timeout: float = 120.0) -> dict[str, Any]:
        """Load a lock backend on the agent ahead of time (XDP: compiling takes ~10 s)."""
        return self._result("netlock_prepare", {"backend": backend}, timeout=timeout)

    def netlock_lock(self, backend: str, *, conns: Iterable[str | Conn] = (),
                     pids: Iterable[int] = (), ifaces: Iterable[str] = (),
                     netns: str | None = None, timeout: float = 120.0,
                     inbound_only: bool = False) -> list[str]:
        """Lock connections on the agent's host (given, and/or those of ``pids``' tree, which
        the agent finds itself); returns the connections locked, as ``SRC:PORT,DST:PORT``.
        ``inbound_only``: only what arrives (XDP), for a tree not frozen yet."""
        data = self.netlock_engage(backend, conns=conns, pids=pids, ifaces=ifaces, netns=netns,
                                   timeout=timeout, inbound_only=inbound_only)
        return [str(c) for c in data["locked"]]

    def netlock_engage(self, backend: str, *, conns: Iterable[str | Conn] = (),
                       pids: Iterable[int] = (), ifaces: Iterable[str] = (),
                       netns: str | None = None, timeout: float = 120.0,
                       inbound_only: bool = False) -> dict[str, Any]:
        """``netlock_lock``'s whole answer: ``locked``, and ``engaged_after_ms``, how long
        after the request arrived the lock took hold (finding the connections comes first)."""
        args: dict[str, Any] = {
            "backend": backend, "conns": [str(c) for c in conns], "pids": list(pids),
            "ifaces": list(ifaces), "netns": netns}
        if inbound_only:
            args["inbound_only"] = True
        return self._result("netlock_lock", args, timeout=timeout)

    def netlock_unlock(self, backend: str, conns: Iterable[str | Conn], *,
                       netns: str | None = None, detach: Iterable[str] = (),
                       tidy: bool = False, detach_after: float = 0.0) -> list[str]:
        """Unlock ``conns``; then, if nothing is locked any more on the agent's host, XDP takes
        its programs off the interfaces in ``detach`` (``detach_after`` s later, in the
        background) and (``tidy``) nftables its table."""
        args: dict[str, Any] = {"backend": backend, "conns": [str(c) for c in conns],
                                "netns": netns, "detach": list(detach)}
        if tidy:
            args["tidy"] = True  # only then: an older agent refuses arguments it lacks
        if detach_after:
            args["detach_after"] = detach_after
        data = self._result("netlock_unlock", args)
        return [str(c) for c in data["unlocked"]]

    def netlock_unlock_giving_back(self, backend: str, conns: Iterable[str | Conn], pid: int,
                                   segments: Iterable[str] = ()) -> dict[str, Any]:
        """Unlock ``conns`` and give the tree of ``pid`` what their peers sent meanwhile:
        ``segments`` (caught elsewhere, base64) and what the lock caught here. The answer
        counts them: ``caught`` (here), ``given_back``, ``refused`` (reasons)."""
        return self._result("netlock_unlock", {
            "backend": backend, "conns": [str(c) for c in conns], "give_back_pid": pid,
            "segments": list(segments)})

    def netlock_caught(self, backend: str, conns: Iterable[str | Conn]) -> list[str]:
        """Take what the lock caught of ``conns`` on the agent's host (base64 IP packets)."""
        data = self._result("netlock_caught", {"backend": backend,
                                               "conns": [str(c) for c in conns]})
        return [str(s) for s in data["segments"]]

    def netlock_status(self, backend: str, *, netns: str | None = None) -> dict[str, Any]:
        return self._result("netlock_status", {"backend": backend, "netns": netns})

    def addr_list(self, *, netns: str | None = None) -> list[dict[str, Any]]:
        """The agent's interfaces: ``ifname``, ``state`` and IPv4 ``addresses`` (ip/prefix)."""
        return list(self._result("addr_list", {"netns": netns})["interfaces"])

    def addr_add(self, ifname: str, address: str, *, netns: str | None = None) -> bool:
        """Put ``address`` on ``ifname`` on the agent's host; False if it was there already."""
        return bool(self._result("addr_add", {"ifname": ifname, "address": address,
                                              "netns": netns})["added"])

    def addr_del(self, ifname: str, address: str, *, netns: str | None = None) -> bool:
        """Take ``address`` off ``ifname``; False if it was not there."""
        return bool(self._result("addr_del", {"ifname": ifname, "address": address,
                                              "netns": netns})["removed"])

    def garp(self, ifname: str, address: str, *, count: int = 1,
             netns: str | None = None) -> int:
        """Announce ``address`` from ``ifname`` with gratuitous ARP; frames sent."""
        return int(self._result("garp", {"ifname": ifname, "address": address, "count": count,
                                         "netns": netns})["sent"])
