"""One CRIU RPC session: ``criu swrk`` on a SOCK_SEQPACKET socketpair, pycriu's protobuf messages.

Needs root (CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE and friends) for dump and restore. The session
answers CRIU's notifications (``notify_scripts``) through a callback, which is how orthros takes
and releases its own network lock at the moment CRIU would have taken its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pycriu import rpc_pb2 as rpc

from orthros_py.criu.binary import CriuBinary, find_criu
from orthros_py.criu.request import TlsFiles, apply_tls
from orthros_py.errors import CriuError, OperationTimeout, OrthrosError

# Called with (script name, pid) for each CRIU notification; raising refuses it, which aborts CRIU.
NotifyHook = Callable[[str, int], None]

_REQ_NAMES = {rpc.DUMP: "dump", rpc.RESTORE: "restore", rpc.CHECK: "check",
              rpc.FEATURE_CHECK: "feature check", rpc.PRE_DUMP: "pre-dump",
              rpc.PAGE_SERVER_CHLD: "page server start"}
_MAX_MSG = 1 << 20


# Error lines that say nothing about why a request failed.
_NOISE = (
    # CRIU tries to raise its own RLIMIT_NOFILE; without CAP_SYS_RESOURCE that fails harmlessly.
    "Can't setup RLIMIT_NOFILE for self",
    "Dumping FAILED",
    "Restoring FAILED",
    "Pre-dumping FAILED",
)
_PREFIX = re.compile(
    r"^\s*(?:\(?[\d.]+\)?\s*)?(?:\d+: )?(?:pie: \d+: )?(?:Error|Warn) \([^)]*\):\s*")


def log_tail(path: Path, lines: int = 8) -> list[str]:
    """The last lines of a CRIU log, errors first: what a user needs to see of a refusal."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    errors = [ln for ln in text if "Error (" in ln]
    tail = errors[-lines:] if errors else text[-lines:]
    return [ln.rstrip() for ln in tail]


def main_reason(tail: list[str]) -> str:
    """The first error line of a CRIU log (the cause; later ones are its echoes), unadorned."""
    for line in tail:
        if "Error (" in line and not any(n in line for n in _NOISE):
            return _PREFIX.sub("", line.strip()).rstrip(".")
    return ""


# CRIU reasons that have a plain cause and remedy on orthros's side.
_ADVICE = (
    (re.compile(r"Unix socket \S+ without peer"),
     "a UNIX socket of the tree is connected to a process outside it: allow such external "
     "sockets with --ext-unix-sk"),
    (re.compile(r"Some file locks are hold by dumping tasks"),
     "the tree holds file locks (flock, POSIX or OFD): pass --file-locks to dump and restore "
     "them"),
    (re.compile(r"Can't dump ghost file .* size, increase limit"),
     "the tree holds open a deleted file larger than CRIU's ghost limit (1 MiB unless "
     "raised): raise --ghost-limit above its size"),
    (re.compile(r"Can't create link remap for"),
     "the tree holds open, or watches with inotify, a file unlinked from the path it was "
     "opened by but linked elsewhere: pass --link-remap to let CRIU link it back"),
    (re.compile(r"The root process \d+ is not a session leader"),
     "the tree's root does not lead a session of its own: start it with setsid, or pass "
     "--shell-job"),
    (re.compile(r"A session leader of .* is outside of its pid namespace"),
     "the tree's session leader is outside the tree's PID namespace: start the namespace's "
     "init with setsid (unshare --pid --fork setsid CMD)"),
    (re.compile(r"In-flight connection \(l\)"),
     "a listening socket of the tree holds connections not yet accepted: pass "
     "--skip-in-flight to drop them (their clients connect again)"),
    (re.compile(r"Unaccessible path opened"),
     "a file the tree holds open is no longer what its path names (a device node hidden by a "
     "remount?): for the same device under that path, pass --evasive-devices"),
    (re.compile(r"Connected TCP socket, consider using"),
     "the tree has established TCP connections: pass --tcp-established to carry them"),
)


class CriuSession:
    """Runs one request through a fresh ``criu swrk`` and returns its final response."""

    def __init__(self, binary: CriuBinary | None = None, *, timeout: float = 600.0,
                 tls: TlsFiles | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        self.binary = binary or find_criu()
        self.timeout = timeout
        # The page channel: CRIU runs TLS on its page-server connection, which may be a
        # socket orthros connected and authenticated itself (``ps.fd``, inherited by swrk).
        self.tls = tls
        self.pass_fds = pass_fds

    def call(
        self,
        req: Any,
        *,
        images_dir: Path | None = None,
        on_notify: NotifyHook | None = None,
        pid: int | None = None,
    ) -> Any:
        what = _REQ_NAMES.get(req.type, "request")
        dir_fd = -1
        if images_dir is not None:
            dir_fd = os.open(images_dir, os.O_DIRECTORY | os.O_RDONLY)
            req.opts.images_dir_fd = dir_fd
        if self.tls is not None:
            apply_tls(req.opts, self.tls)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
        try:
            fds = [theirs.fileno()] + ([dir_fd] if dir_fd >= 0 else []) + list(self.pass_fds)
            proc = subprocess.Popen(
                [self.binary.path, "swrk", str(theirs.fileno())],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
            theirs.close()
            try:
                resp = self._converse(ours, req, on_notify, what, pid)
            except CriuError as err:
                # CRIU died without answering (an abort): what it said on stderr is the reason.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                stderr.seek(0)
                said = [ln.strip() for ln in stderr.read().decode(errors="replace").splitlines()
                        if ln.strip()]
                if said:
                    err.msg = f"{err.msg}: {said[-1].strip('* ')}"
                    err.log_tail = err.log_tail + said[-5:]
                raise
            finally:
                ours.close()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            ours.close()
            theirs.close()
            if dir_fd >= 0:
                os.close(dir_fd)
            stderr.close()
        if not resp.success:
            raise self._error(req, resp, what, images_dir, pid)
        return resp

    def _converse(
        self, sk: socket.socket, req: Any, on_notify: NotifyHook | None, what: str,
        pid: int | None,
    ) -> Any:
        sk.settimeout(self.timeout)
        sk.send(req.SerializeToString())
        hook_error: BaseException | None = None
        while True:
            try:
                buf = sk.recv(_MAX_MSG)
            except TimeoutError as err:
                raise OperationTimeout(
                    f"CRIU did not finish the {what} within {self.timeout:g} s", pid=pid,
                    stage=what) from err
            if not buf:
                raise CriuError(f"CRIU exited in the middle of the {what}", pid=pid, stage=what)
            resp = rpc.criu_resp()
            resp.ParseFromString(buf)
            if resp.type != rpc.NOTIFY:
                if hook_error is not None and not resp.success:
                    # CRIU failed because our hook refused: the hook's reason is the real one.
                    raise hook_error
                return resp
            ok = True
            if on_notify is not None and hook_error is None:
                try:
                    on_notify(resp.notify.script, resp.notify.pid)
                except Exception as err:  # refused notification: CRIU aborts and rolls back
                    hook_error, ok = err, False
            sk.send(rpc.criu_req(type=rpc.NOTIFY, notify_success=ok).SerializeToString())

    def _error(
        self, req: Any, resp: Any, what: str, images_dir: Path | None, pid: int | None
    ) -> OrthrosError:
        errno = resp.cr_errno if resp.HasField("cr_errno") else None
        log_path = images_dir / req.opts.log_file if images_dir and req.opts.log_file else None
        tail = log_tail(log_path) if log_path else []
        reason = main_reason(tail)
        if not reason and resp.HasField("cr_errmsg"):
            reason = main_reason([resp.cr_errmsg]) or resp.cr_errmsg.strip()
        if not reason and errno:
            with contextlib.suppress(ValueError):
                reason = os.strerror(errno)
        target = f" of pid {pid}" if pid else ""
        msg = f"CRIU refused the {what}{target}: {reason or 'no reason given'}"
        advice = next((a for pattern, a in _ADVICE if reason and pattern.search(reason)), None)
        if advice:
            msg = f"{msg} ({advice})"
        return CriuError(
            msg, errno=errno, log_tail=tail, log_path=str(log_path) if log_path else None,
            pid=pid, stage=what,
            hint=f"see {log_path}" if log_path else None,
        )
