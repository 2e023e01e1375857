"""The orthros exception tree.

Every error carries what is known of where it happened (host, pid, stage) and renders itself as
one plain sentence. ``ExitStatus`` is the single table of exit codes; the CLI is the only place
where an error becomes a message and a status. ``to_dict``/``from_dict`` let an error cross the
agent RPC with its type and context intact: every subclass, wherever it is defined, registers
itself by name when its class statement runs.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
from typing import Any, ClassVar


class ExitStatus(enum.IntEnum):
    """Exit codes of the ``orthros`` command (documented in README.md)."""

    OK = 0
    ERROR = 1  # an unexpected failure: a bug, reported with --traceback
    USAGE = 2  # bad command line (click's own code)
    NOT_ROOT = 3
    MISSING_FEATURE = 4  # CRIU/BPF/kernel feature missing or too old
    NO_SUCH_PROCESS = 5  # wrong PID, PID 1, kernel thread
    BAD_IMAGE = 6  # image directory missing, empty or corrupt
    CRIU_FAILED = 7  # CRIU refused a dump/restore
    NETLOCK_FAILED = 8
    TIMEOUT = 9
    CANNOT_HONOUR = 10  # the destination cannot give the tree its cgroup limits or its PIDs
    SERVICE_LOST = 11  # a post-copy migration failed with the memory split between two hosts
    INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


_REGISTRY: dict[str, type[OrthrosError]] = {}
_BASE_KEYS = frozenset({"type", "module", "msg", "host", "pid", "stage", "hint", "exit_status"})


class OrthrosError(Exception):
    """Base of all errors orthros raises on purpose."""

    exit_status: ClassVar[ExitStatus] = ExitStatus.ERROR

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The first class of a name keeps it: a later namesake (a test's local class) must not
        # change what an agent's error turns into.
        _REGISTRY.setdefault(cls.__name__, cls)

    def __init__(
        self,
        msg: str,
        *,
        host: str | None = None,
        pid: int | None = None,
        stage: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(msg)
        self.msg = msg
        self.host = host
        self.pid = pid
        self.stage = stage
        self.hint = hint

    def __str__(self) -> str:
        where = []
        if self.host:
            where.append(f"on {self.host}")
        if self.stage:
            where.append(f"during {self.stage}")
        prefix = f"[{' '.join(where)}] " if where else ""
        text = f"{prefix}{self.msg}"
        if self.hint:
            text += f" ({self.hint})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "module": type(self).__module__,
            "msg": self.msg,
            "host": self.host,
            "pid": self.pid,
            "stage": self.stage,
            "hint": self.hint,
            "exit_status": int(self.exit_status),
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> OrthrosError:
        """Rebuild an error sent over the agent RPC: its class (imported from the module named
        if this process has not loaded it yet), its context, the extra fields its class carries,
        and its exit status. A type unknown here becomes OrthrosError with the sender's exit
        status, so that the command still exits as the remote failure says."""
        name = str(data.get("type"))
        cls = _REGISTRY.get(name)
        module = data.get("module")
        if cls is None and isinstance(module, str) and module.startswith("orthros_py."):
            # Absent in another orthros version: the base class below will do.
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
            cls = _REGISTRY.get(name)
        cls = cls or OrthrosError
        err = cls.__new__(cls)
        OrthrosError.__init__(
            err,
            str(data.get("msg", "unknown error")),
            host=data.get("host"),
            pid=data.get("pid"),
            stage=data.get("stage"),
            hint=data.get("hint"),
        )
        for key, value in data.items():
            # The extras a class carries (errno, log_tail, code, argv, ...), as sent; never a
            # name of the class itself (a method, exit_status) nor a private one.
            if key in _BASE_KEYS or key.startswith("_") or hasattr(type(err), key):
                continue
            if key == "cause" and isinstance(value, dict) and "type" in value:
                value = OrthrosError.from_dict(value)
            setattr(err, key, value)
        try:
            status = ExitStatus(data.get("exit_status", err.exit_status))
        except ValueError:
            status = ExitStatus.ERROR
        if status != err.exit_status:
            # An instance attribute shadows the class's: the base class standing in for an
            # unknown type still exits with the remote error's status.
            vars(err)["exit_status"] = status
        return err


class NotRootError(OrthrosError):
    exit_status = ExitStatus.NOT_ROOT


class MissingFeatureError(OrthrosError):
    """A kernel feature, binary or library this operation needs is absent."""

    exit_status = ExitStatus.MISSING_FEATURE


class NoSuchProcessError(OrthrosError):
    exit_status = ExitStatus.NO_SUCH_PROCESS


class BadImageError(OrthrosError):
    exit_status = ExitStatus.BAD_IMAGE


class CriuError(OrthrosError):
    """CRIU refused a request: keeps CRIU's errno and the tail of its log."""

    exit_status = ExitStatus.CRIU_FAILED

    def __init__(
        self,
        msg: str,
        *,
        errno: int | None = None,
        log_tail: list[str] | None = None,
        log_path: str | None = None,
        **context: Any,
    ) -> None:
        super().__init__(msg, **context)
        self.errno = errno
        self.log_tail = log_tail or []
        self.log_path = log_path

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.update(errno=self.errno, log_tail=self.log_tail, log_path=self.log_path)
        return data


class NetlockError(OrthrosError):
    exit_status = ExitStatus.NETLOCK_FAILED


class OutputHoldError(OrthrosError):
    """Holding a protected tree's output in an NFQUEUE queue failed: the queue is bound by
    someone else, the kernel refused a verdict, or the rule that feeds the queue would not go
    in or out."""

    # The output hold is pair's lock on what a tree sends: it fails as a network lock does.
    exit_status = ExitStatus.NETLOCK_FAILED


class CommandError(OrthrosError):
    """An external program (run through ``orthros_py.run``) failed or timed out."""

    def __init__(
        self,
        msg: str,
        *,
        argv: list[str],
        returncode: int | None,
        stderr: str = "",
        **context: Any,
    ) -> None:
        super().__init__(msg, **context)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.update(argv=self.argv, returncode=self.returncode, stderr=self.stderr)
        return data


class OperationTimeout(OrthrosError):
    exit_status = ExitStatus.TIMEOUT


class PidsInUseError(OrthrosError):
    """The destination cannot give a tree its PIDs: live processes there hold some of those
    (process or thread ids) that a tree of the host's own PID namespace gets back on restore.
    Refused, as unhonourable cgroup limits are, before anything is frozen."""

    exit_status = ExitStatus.CANNOT_HONOUR


class UsageError(OrthrosError):
    """A setting orthros refuses as given (a duration it cannot read, timings that would let
    two hosts serve at once, a fence option it does not pass on): the user must change it."""

    exit_status = ExitStatus.USAGE


def registered() -> dict[str, type[OrthrosError]]:
    """Every error class known to this process by name (those of modules imported so far)."""
    return dict(_REGISTRY)


_REGISTRY[OrthrosError.__name__] = OrthrosError
