"""The migration journal: what a migration may have done so far, on the coordinator's disk.

``orthros migrate`` writes it before every call to an agent (the record says what that call may
do, before it does it) and removes it once the migration has finished or been rolled back
whole. A coordinator that dies half way (SIGKILL, a crash, a lost laptop session) leaves it
behind, and ``orthros recover`` reads it to finish the migration, if the destination already
runs the tree, or to roll it back. Without it, a killed coordinator would leave the tree stopped
on the source and its connections locked, with nobody knowing which.

Plain JSON, one file per migration, written to a temporary name and renamed: a reader sees
either the previous record or the new one. Writes survive the death of the writing process
(the kernel keeps them), not that of the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import ipaddress
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orthros_py.errors import OrthrosError
from orthros_py.netlock.base import Conn

if TYPE_CHECKING:
    from orthros_py.policies.migrate import Done, MigrateConfig, Plan

JOURNAL_DIR = Path("/run/orthros/migrations")
VERSION = 1


class JournalError(OrthrosError):
    """A journal that cannot be read or written."""


@dataclass(frozen=True)
class HostRef:
    """Where to find a migration's host again."""

    name: str
    address: str
    agent_port: int


@dataclass
class Entry:
    """One interrupted (or running) migration, as its coordinator last recorded it."""

    pid: int
    image: str
    source: HostRef
    dest: HostRef
    stage: str
    config: MigrateConfig
    plan: Plan | None
    done: Done
    cgroup_roots: dict[str, str]
    coordinator: int  # the pid of the process that wrote it
    updated: float

    def coordinator_alive(self) -> bool:
        """Whether the writing process still runs (then the migration is not interrupted)."""
        if self.coordinator == os.getpid():
            return False
        try:
            os.kill(self.coordinator, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (ipaddress.IPv4Interface, Conn)):
        return str(value) if isinstance(value, Conn) else value.with_prefixlen
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(entry: Entry) -> dict[str, Any]:
    plan = None
    if entry.plan is not None:
        plan = {f.name: _plain(getattr(entry.plan, f.name))
                for f in dataclasses.fields(entry.plan)}
    return {"version": VERSION, "pid": entry.pid, "image": entry.image,
            "source": dataclasses.asdict(entry.source), "dest": dataclasses.asdict(entry.dest),
            "stage": entry.stage,
            "config": {f.name: _plain(getattr(entry.config, f.name))
                       for f in dataclasses.fields(entry.config)},
            "plan": plan, "done": _plain(dataclasses.asdict(entry.done)),
            "cgroup_roots": entry.cgroup_roots, "coordinator": entry.coordinator,
            "updated": entry.updated}


def from_dict(d: dict[str, Any]) -> Entry:
    """The entry of ``to_dict``; ValueError (or KeyError) on anything else."""
    from orthros_py.criu.request import CgroupMode
    from orthros_py.policies.migrate import Done, LockMethod, MigrateConfig, Plan

    if d.get("version") != VERSION:
        raise ValueError(f"journal version {d.get('version')!r}, expected {VERSION}")
    cfg = dict(d["config"])
    cfg["network_lock"] = LockMethod(cfg["network_lock"])
    cfg["manage_cgroups"] = CgroupMode(cfg["manage_cgroups"])
    for name in ("dump_external", "restore_external"):  # JSON has lists only
        if name in cfg:
            cfg[name] = tuple(cfg[name])
    config = MigrateConfig(**{k: v for k, v in cfg.items()
                              if k in {f.name for f in dataclasses.fields(MigrateConfig)}})
    plan = None
    if d.get("plan") is not None:
        p = d["plan"]
        plan = Plan(pid=int(p["pid"]), image=str(p["image"]), source=str(p["source"]),
                    dest=str(p["dest"]),
                    service=ipaddress.IPv4Interface(p["service"]) if p["service"] else None,
                    src_ifname=p["src_ifname"], dst_ifname=str(p["dst_ifname"]),
                    src_lock_ifaces=tuple(p["src_lock_ifaces"]), lock=LockMethod(p["lock"]),
                    release_first=bool(p["release_first"]),
                    conns=tuple(Conn.parse(c) for c in p["conns"]),
                    notes=tuple(p.get("notes", ())))
    raw = dict(d["done"])
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()
                              if k in {f.name for f in dataclasses.fields(Done)}}
    done = Done(**fields)
    return Entry(pid=int(d["pid"]), image=str(d["image"]), source=HostRef(**d["source"]),
                 dest=HostRef(**d["dest"]), stage=str(d["stage"]), config=config, plan=plan,
                 done=done, cgroup_roots=dict(d.get("cgroup_roots", {})),
                 coordinator=int(d["coordinator"]), updated=float(d["updated"]))


class Journal:
    """The journal directory of this coordinator host."""

    def __init__(self, directory: Path = JOURNAL_DIR) -> None:
        self.directory = directory

    def path(self, image: str) -> Path:
        return self.directory / f"{image}.json"

    def write(self, entry: Entry) -> None:
        entry.updated = time.time()
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path(entry.image).with_suffix(".tmp")
            tmp.write_text(json.dumps(to_dict(entry)))
            os.replace(tmp, self.path(entry.image))
        except OSError as err:
            raise JournalError(f"cannot write the migration journal in {self.directory}: "
                               f"{err.strerror}", hint="orthros migrate records its progress "
                               "there, so that orthros recover can finish or undo it") from err

    def remove(self, image: str) -> None:
        for p in (self.path(image), self.path(image).with_suffix(".tmp")):
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # only once empty: nothing of orthros stays behind

    def read(self, image: str) -> Entry:
        path = self.path(image)
        try:
            return from_dict(json.loads(path.read_text()))
        except FileNotFoundError as err:
            raise JournalError(f"no journal of a migration {image} in {self.directory}") from err
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise JournalError(f"the migration journal {path} cannot be read: {err}") from err

    def entries(self) -> list[Entry]:
        """Every readable entry, oldest first (unreadable ones are skipped)."""
        out: list[Entry] = []
        if not self.directory.is_dir():
            return out
        for path in sorted(self.directory.glob("*.json")):
            try:
                out.append(from_dict(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(out, key=lambda e: e.updated)
