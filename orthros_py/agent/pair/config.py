"""A pair's configuration as every agent of it holds it, and the record each keeps on disk.

The configuration travels from ``orthros pair start`` to the active, the standby and the witness
in one request each, and is checked again by every agent (it arrives over the network). The
record (``<images root>/.pairs/NAME.json``, written by rename) is what lets the protection
survive the command, the controller and an agent's restart: an agent that starts again reads
its records and takes up its role where it left it.

No privileges: pure data and a small file.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from orthros_py.agent.errors import ProtocolError, Refusal

PAIRS_DIR = ".pairs"  # below the images root; a dotted name no image can have
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
ROLES = ("active", "standby", "witness")
# What a pair is doing, as ``pair status`` shows it.
STATES = ("starting", "replicating", "degraded", "failed over", "fenced", "stopped")
MAX_EVENTS = 64


def bad(msg: str) -> ProtocolError:
    return ProtocolError(msg, code=Refusal.BAD_REQUEST)


def validate_pair_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad(f"pair name {name!r} is not allowed: use 1-40 lower-case letters, digits "
                  "or '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class PeerAddr:
    """Where one agent of the pair listens."""

    name: str
    address: str
    port: int

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.address)
        except ValueError as err:
            raise bad(f"{self.address!r} is not an IP address") from err
        if not 0 < self.port < 65536:
            raise bad(f"{self.port} is not a TCP port")

    @classmethod
    def from_dict(cls, d: Any) -> PeerAddr:
        if not isinstance(d, dict):
            raise bad("a pair host must be an object with name, address and port")
        try:
            name, address, port = d["name"], d["address"], d["port"]
            if not isinstance(name, str) or not isinstance(address, str):
                raise bad("a pair host's name and address must be strings")
            if isinstance(port, bool) or not isinstance(port, int):
                raise bad(f"a pair host's port must be a number, not {port!r}")
            return cls(name, address, port)
        except (KeyError, TypeError, ValueError) as err:
            raise bad(f"a pair host needs name, address and port: {err}") from err


@dataclass(frozen=True)
class PairConfig:
    """One protected service: the tree, its hosts, and the thresholds of its protection."""

    name: str
    pid: int  # the tree's root on the active host (in that host's PID namespace)
    active: PeerAddr
    standby: PeerAddr
    witness: PeerAddr | None = None
    interval: float = 0.2  # seconds between the starts of two checkpoints
    keep: int = 3  # committed generations the standby keeps
    service_ip: str | None = None  # "10.77.0.100/32": taken by the standby at a failover
    service_ifname: str | None = None  # where the standby puts it
    output_commit: bool = False
    failover: bool = False  # the standby promotes itself when the active dies
    heartbeat: float = 0.1
    misses: int = 3
    tcp_established: bool = True
    shell_job: bool = False
    file_locks: bool = False
    fence: dict[str, str] | None = None  # how the standby fences the active (inventory)
    # The standby keeps the pages written within ``hot_window`` in memory, the rest on disk,
    # and a promotion restores with lazy pages (``tiers``).
    paging: bool = False
    hot_window: float = 30.0
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        validate_pair_name(self.name)
        if self.pid <= 1:
            raise bad(f"{self.pid} is not a tree the pair can protect")
        if not 0.01 <= self.interval <= 3600:
            raise bad("interval must be between 10 ms and an hour")
        if not 1 <= self.keep <= 100:
            raise bad("keep must be 1-100 generations")
        if not 0.1 <= self.hot_window <= 86400:
            raise bad("the hot window must be between 100 ms and a day")
        if self.paging and self.hot_window < self.interval:
            raise bad("the hot window must be at least one interval: the pages of the newest "
                      "generation are hot by definition")
        if not 0.005 <= self.heartbeat <= 60 or not 1 <= self.misses <= 100:
            raise bad("heartbeat must be 5 ms - 60 s and misses 1-100")
        if self.active.name == self.standby.name:
            raise bad("the active and the standby must be two hosts")
        if self.witness is not None and self.witness.name in (self.active.name,
                                                               self.standby.name):
            raise bad("the witness must be a third host, neither the active nor the standby")
        if self.failover and self.witness is None:
            raise bad("automatic failover needs a witness: without a third vote a standby "
                      "cannot tell a dead active from a cut link")
        for k in ("service_ip", "service_ifname"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, str):
                raise bad(f"{k} must be a string, not {v!r}")
        if self.service_ip is not None:
            try:
                ipaddress.IPv4Interface(self.service_ip)
            except ValueError as err:
                raise bad(f"{self.service_ip!r} is not an IPv4 address") from err
            if self.service_ifname is None or not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}",
                                                               self.service_ifname):
                raise bad("a service address needs the standby's interface name")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> PairConfig:
        if not isinstance(d, dict):
            raise bad("a pair configuration must be an object")
        known = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(d) - known)
        if extra:
            raise bad(f"unknown pair settings: {', '.join(extra)}")
        try:
            args = dict(d)
            for k in ("active", "standby"):
                args[k] = PeerAddr.from_dict(d[k])
            args["witness"] = PeerAddr.from_dict(d["witness"]) if d.get("witness") else None
            fence = d.get("fence")
            if fence is not None and not (isinstance(fence, dict) and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in fence.items())):
                raise bad("fence must map option names to strings")
            for k in ("pid", "keep", "misses"):
                if k in args and (not isinstance(args[k], int) or isinstance(args[k], bool)):
                    raise bad(f"{k} must be an integer")
            for k in ("interval", "heartbeat", "hot_window", "created_at"):
                if k in args:
                    v = args[k]
                    if isinstance(v, bool) or not isinstance(v, (int, float)):
                        raise bad(f"{k} must be a number of seconds, not {v!r}")
                    args[k] = float(v)
            for k in ("output_commit", "failover", "tcp_established", "shell_job", "file_locks",
                      "paging"):
                if k in args and not isinstance(args[k], bool):
                    raise bad(f"{k} must be true or false")
            return cls(**args)
        except KeyError as err:
            raise bad(f"a pair configuration needs {err.args[0]}") from err
        except (TypeError, ValueError) as err:
            raise bad(f"bad pair configuration: {err}") from err

    def peer(self, role: str) -> PeerAddr | None:
        return {"active": self.active, "standby": self.standby, "witness": self.witness}[role]

    def role_of(self, host: str) -> str | None:
        for role in ROLES:
            p = self.peer(role)
            if p is not None and p.name == host:
                return role
        return None


@dataclass
class PairRecord:
    """What one agent keeps of one pair: its role, the configuration, where things stand."""

    config: PairConfig
    role: str
    epoch: int = 1
    state: str = "starting"
    reason: str | None = None  # why degraded, fenced or stopped
    reason_error: dict[str, Any] | None = None  # the error behind ``reason`` (errors.to_dict)
    generation: int = 0  # newest committed (the standby's, as the active last heard it)
    committed_at: float | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    serving_pid: int | None = None  # the standby's restored tree after a failover
    tree_started: float | None = None  # the active's root's start time: a reused pid is not it
    updated_at: float = field(default_factory=time.time)

    def event(self, what: str, **data: Any) -> dict[str, Any]:
        e = {"at": time.time(), "what": what, **data}
        self.events.append(e)
        del self.events[:-MAX_EVENTS]
        return e

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairRecord:
        cfg = PairConfig.from_dict(d["config"])
        role = d.get("role")
        if role not in ROLES:
            raise bad(f"unknown pair role {role!r}")
        rec = cls(cfg, role)
        for k in ("epoch", "generation"):
            setattr(rec, k, int(d.get(k) or 0) or getattr(rec, k))
        rec.state = str(d.get("state") or "starting")
        rec.reason = d.get("reason")
        rec.reason_error = d.get("reason_error")
        rec.committed_at = d.get("committed_at")
        rec.events = list(d.get("events") or [])
        rec.serving_pid = d.get("serving_pid")
        rec.tree_started = d.get("tree_started")
        return rec


class RecordStore:
    """The pair records of one agent, one JSON file each, replaced atomically."""

    def __init__(self, images_root: Path) -> None:
        self.dir = images_root / PAIRS_DIR

    def path(self, name: str) -> Path:
        return self.dir / f"{validate_pair_name(name)}.json"

    def save(self, rec: PairRecord) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        rec.updated_at = time.time()
        path = self.path(rec.config.name)
        tmp = path.with_suffix(".tmp")
        try:
            with tmp.open("w") as f:
                json.dump(rec.to_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not leave half a record behind
            raise

    def load_all(self) -> tuple[list[PairRecord], list[str]]:
        """Every readable record, and a sentence for each file that is not one."""
        recs, bad_files = [], []
        if not self.dir.is_dir():
            return [], []
        for p in sorted(self.dir.glob("*.json")):
            try:
                recs.append(PairRecord.from_dict(json.loads(p.read_text())))
            except (OSError, ValueError, KeyError, TypeError, ProtocolError) as err:
                bad_files.append(f"{p}: {err}")
        return recs, bad_files

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(name).unlink()
        self.path(name).with_suffix(".tmp").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # only when it is empty: nothing left behind


def with_epoch(rec: PairRecord, epoch: int) -> PairRecord:
    return replace(rec, epoch=epoch)
