"""The typed answers of the agent's operations, shared by the client (which builds them from the
wire) and the policies (which read them): each converts from and to the dict an operation
returns. Pure values: no I/O, no privileges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PingInfo:
    name: str
    version: str
    protocol: int
    time: float  # the agent's clock when it answered
    hostname: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PingInfo:
        return cls(str(d["name"]), str(d["version"]), int(d["protocol"]), float(d["time"]),
                   str(d["hostname"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "protocol": self.protocol,
                "time": self.time, "hostname": self.hostname}


@dataclass(frozen=True)
class FileInfo:
    image: str
    filename: str
    size: int
    sha256: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FileInfo:
        return cls(str(d["image"]), str(d["filename"]), int(d["size"]),
                   str(d["sha256"]) if d.get("sha256") else None)

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "filename": self.filename, "size": self.size,
                "sha256": self.sha256}


@dataclass(frozen=True)
class ImageInfo:
    name: str
    files: tuple[FileInfo, ...]
    checkpoint: bool  # holds inventory.img: a complete checkpoint, unless a transfer is missing
    bytes: int
    busy: str | None
    links: tuple[tuple[str, str], ...] = ()  # symlinks (CRIU's "parent"), not transferred

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageInfo:
        return cls(str(d["name"]), tuple(FileInfo.from_dict(f) for f in d["files"]),
                   bool(d["checkpoint"]), int(d["bytes"]),
                   str(d["busy"]) if d.get("busy") else None,
                   tuple((str(x["name"]), str(x["target"])) for x in d.get("links", [])))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "files": [f.to_dict() for f in self.files],
                "checkpoint": self.checkpoint, "bytes": self.bytes, "busy": self.busy,
                "links": [{"name": n, "target": t} for n, t in self.links]}

    @property
    def filenames(self) -> list[str]:
        return [f.filename for f in self.files]


@dataclass(frozen=True)
class RemoteDump:
    image: str
    pid: int
    elapsed_ms: float
    leave_running: bool
    pids: tuple[int, ...]
    stats: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False)  # everything DumpResult.to_dict says

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RemoteDump:
        return cls(str(d["image"]), int(d["pid"]), float(d["elapsed_ms"]),
                   bool(d["leave_running"]), tuple(int(p["pid"]) for p in d["processes"]),
                   d.get("stats"), dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)


@dataclass(frozen=True)
class RemoteRestore:
    image: str
    pid: int  # the restored root, the agent's child
    pids: tuple[int, ...]
    elapsed_ms: float
    stats: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RemoteRestore:
        return cls(str(d["image"]), int(d["pid"]), tuple(int(p) for p in d["pids"]),
                   float(d["elapsed_ms"]), d.get("stats"), dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)


@dataclass(frozen=True)
class PageServerInfo:
    image: str
    pid: int  # CRIU's page server: 0 while the channel waits for the sender
    port: int
    address: str
    running: bool
    nonce: str = ""  # what the sender proves itself with (pass it to dump as page_nonce)
    state: str = ""  # of the channel: waiting, connected, expired, stopped
    refused: int = 0  # connections refused for failing to prove themselves

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PageServerInfo:
        return cls(str(d["image"]), int(d["pid"]), int(d["port"]), str(d["address"]),
                   bool(d["running"]), str(d.get("nonce", "")), str(d.get("state", "")),
                   int(d.get("refused", 0)))

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "pid": self.pid, "port": self.port,
                "address": self.address, "running": self.running, "nonce": self.nonce,
                "state": self.state, "refused": self.refused}


@dataclass(frozen=True)
class KillResult:
    pid: int
    signal: str
    signaled: tuple[int, ...]
    exited: bool
    exit_status: int | None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KillResult:
        return cls(int(d["pid"]), str(d["signal"]), tuple(int(p) for p in d["signaled"]),
                   bool(d["exited"]),
                   None if d.get("exit_status") is None else int(d["exit_status"]))

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "signal": self.signal, "signaled": list(self.signaled),
                "exited": self.exited, "exit_status": self.exit_status}
