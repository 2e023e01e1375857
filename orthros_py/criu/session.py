"""One CRIU RPC session: ``criu swrk`` on a SOCK_SEQPACKET socketpair, pycriu's protobuf messages.

Needs root (CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE and friends) for dump and restore. The session
answers CRIU's notifications (``notify_scripts``) through a callback, which is how orthros takes
and releases its own network lock at the moment CRIU would have taken its own.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orthros_py.criu.binary import CriuBinary, find_criu
from orthros_py.criu.log import advice, log_tail, main_reason
from orthros_py.criu.request import (
    TlsFiles,
    apply_tls,
    notify_ack,
    pycriu_rpc,
    set_dirty_track_sk,
)
from orthros_py.errors import CriuError, OperationTimeout, OrthrosError

# Called with (script name, pid) for each CRIU notification; raising refuses it, which aborts CRIU.
NotifyHook = Callable[[str, int], None]


def _req_name(req_type: int) -> str:
    rpc = pycriu_rpc()
    return {rpc.DUMP: "dump", rpc.RESTORE: "restore", rpc.CHECK: "check",
            rpc.FEATURE_CHECK: "feature check", rpc.PRE_DUMP: "pre-dump",
            rpc.PAGE_SERVER_CHLD: "page server start"}.get(req_type, "request")


_MAX_MSG = 1 << 20


class CriuSession:
    """Runs one request through a fresh ``criu swrk`` and returns its final response."""

    def __init__(self, binary: CriuBinary | None = None, *, timeout: float = 600.0,
                 tls: TlsFiles | None = None, pass_fds: tuple[int, ...] = (),
                 dirty_track: socket.socket | None = None,
                 ps_fd: int | None = None, tcp_ts_advance_ms: int | None = None) -> None:
        self.binary = binary or find_criu()
        self.timeout = timeout
        # The page channel: CRIU runs TLS on its page-server connection, which may be a
        # socket orthros connected and authenticated itself (``ps.fd``, inherited by swrk).
        self.tls = tls
        self.pass_fds = pass_fds
        # Where a dump sends the userfaultfds that track its memory on (orthros's CRIU patch
        # 0002; a DirtyTracker's socket_for_criu()), inherited by swrk.
        self.dirty_track = dirty_track
        # A lazy dump's page-server socket, connected and authenticated by orthros (``ps.fd``;
        # orthros's CRIU patch 0003 lets a lazy dump take it), inherited by swrk.
        self.ps_fd = ps_fd
        # A restore's TCP timestamp advance (orthros's CRIU patch 0009), in criu's environment.
        self.tcp_ts_advance_ms = tcp_ts_advance_ms

    def call(
        self,
        req: Any,
        *,
        images_dir: Path | None = None,
        on_notify: NotifyHook | None = None,
        pid: int | None = None,
    ) -> Any:
        what = _req_name(req.type)
        pass_fds = list(self.pass_fds)
        rpc = pycriu_rpc()
        if self.dirty_track is not None and req.type in (rpc.DUMP, rpc.PRE_DUMP):
            set_dirty_track_sk(req.opts, self.dirty_track.fileno())
            pass_fds.append(self.dirty_track.fileno())
        if self.ps_fd is not None and req.type == rpc.DUMP:
            req.opts.ps.SetInParent()
            req.opts.ps.port = 0
            req.opts.ps.fd = self.ps_fd
            pass_fds.append(self.ps_fd)
        dir_fd = -1
        if images_dir is not None:
            dir_fd = os.open(images_dir, os.O_DIRECTORY | os.O_RDONLY)
            req.opts.images_dir_fd = dir_fd
        if self.tls is not None:
            apply_tls(req.opts, self.tls)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
        try:
            fds = [theirs.fileno()] + ([dir_fd] if dir_fd >= 0 else []) + pass_fds
            env = None
            if self.tcp_ts_advance_ms is not None and req.type == rpc.RESTORE:
                env = {**os.environ, "CRIU_TCP_TS_ADVANCE_MS": str(self.tcp_ts_advance_ms)}
            proc = subprocess.Popen(
                [self.binary.path, "swrk", str(theirs.fileno())],
                pass_fds=fds, env=env,
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
            resp = pycriu_rpc().criu_resp()
            resp.ParseFromString(buf)
            if resp.type != pycriu_rpc().NOTIFY:
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
            sk.send(notify_ack(ok).SerializeToString())

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
        fix = advice(reason)
        if fix:
            msg = f"{msg} ({fix})"
        return CriuError(
            msg, errno=errno, log_tail=tail, log_path=str(log_path) if log_path else None,
            pid=pid, stage=what,
            hint=f"see {log_path}" if log_path else None,
        )
