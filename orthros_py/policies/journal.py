"""The policy journal: what a running policy may have done so far, on the coordinator's disk.

A policy writes its record before every call to an agent (the record says what that call may
do, before it does it) and removes it once the policy has finished or been rolled back whole.
A coordinator that dies half way (SIGKILL, a crash, a lost laptop session) leaves it behind,
and ``orthros recover`` reads it and hands it to the recover function of the policy that wrote
it (by ``Record.kind``), which finishes or rolls back. Without it, a killed coordinator would
leave a tree stopped and its connections locked, with nobody knowing which.

The record is generic (kind, id, the hosts by role, the stage, the coordinator); what the policy
needs to go on is its own ``state``, plain JSON that only the policy reads. Nothing here knows
any policy.

Plain JSON, one file per record, written to a temporary name and renamed: a reader sees either
the previous record or the new one. Writes survive the death of the writing process (the kernel
keeps them), not that of the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthros_py.errors import OrthrosError

JOURNAL_DIR = Path("/run/orthros/migrations")  # the name predates other policies; kept
VERSION = 2
# Version 1 was written by migrate alone: its fields are those of migrate's state today.
_V1_STATE = ("pid", "config", "plan", "done", "cgroup_roots")


class JournalError(OrthrosError):
    """A journal that cannot be read or written."""


@dataclass(frozen=True)
class HostRef:
    """Where to find a policy's host again."""

    name: str
    address: str
    agent_port: int


@dataclass
class Record:
    """One interrupted (or running) policy run, as its coordinator last recorded it."""

    kind: str  # the policy that wrote it: its recover function reads ``state``
    id: str  # unique among running policies (a migration's image name)
    hosts: dict[str, HostRef]  # role ("source", "dest", ...) -> host
    stage: str
    state: dict[str, Any]  # the policy's own, plain JSON
    coordinator: int  # the pid of the process that wrote it
    updated: float
    title: str = ""  # one line for people: "pid 4242 from alpha to beta"
    pid: int | None = field(default=None)  # the tree it is about, if one

    def coordinator_alive(self) -> bool:
        """Whether the writing process still runs (then the policy is not interrupted)."""
        if self.coordinator == os.getpid():
            return False
        try:
            os.kill(self.coordinator, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def to_dict(record: Record) -> dict[str, Any]:
    return {"version": VERSION, "kind": record.kind, "id": record.id,
            "hosts": {role: dataclasses.asdict(h) for role, h in record.hosts.items()},
            "stage": record.stage, "state": record.state, "coordinator": record.coordinator,
            "updated": record.updated, "title": record.title, "pid": record.pid}


def _upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    """A version 1 record (migrate's, before the journal was shared) as version 2."""
    src, dst = d["source"], d["dest"]
    return {"version": VERSION, "kind": "migrate", "id": d["image"],
            "hosts": {"source": src, "dest": dst}, "stage": d["stage"],
            "state": {k: d[k] for k in _V1_STATE if k in d}, "coordinator": d["coordinator"],
            "updated": d["updated"], "pid": d["pid"],
            "title": f"pid {d['pid']} from {src['name']} to {dst['name']}"}


def from_dict(d: dict[str, Any]) -> Record:
    """The record of ``to_dict`` (or of version 1); ValueError (or KeyError) on anything else."""
    if d.get("version") == 1:
        d = _upgrade_v1(d)
    if d.get("version") != VERSION:
        raise ValueError(f"journal version {d.get('version')!r}, expected {VERSION}")
    pid = d.get("pid")
    return Record(kind=str(d["kind"]), id=str(d["id"]),
                  hosts={str(role): HostRef(**h) for role, h in d["hosts"].items()},
                  stage=str(d["stage"]), state=dict(d["state"]),
                  coordinator=int(d["coordinator"]), updated=float(d["updated"]),
                  title=str(d.get("title", "")), pid=None if pid is None else int(pid))


class Journal:
    """The journal directory of this coordinator host."""

    def __init__(self, directory: Path = JOURNAL_DIR) -> None:
        self.directory = directory

    def path(self, id: str) -> Path:
        return self.directory / f"{id}.json"

    def write(self, record: Record) -> None:
        record.updated = time.time()
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path(record.id).with_suffix(".tmp")
            tmp.write_text(json.dumps(to_dict(record)))
            os.replace(tmp, self.path(record.id))
        except OSError as err:
            raise JournalError(f"cannot write the journal in {self.directory}: "
                               f"{err.strerror}", hint=f"orthros {record.kind} records its "
                               "progress there, so that orthros recover can finish or undo "
                               "it") from err

    def remove(self, id: str) -> None:
        for p in (self.path(id), self.path(id).with_suffix(".tmp")):
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # only once empty: nothing of orthros stays behind

    def exists(self, id: str) -> bool:
        return self.path(id).exists()

    def read(self, id: str) -> Record:
        path = self.path(id)
        try:
            return from_dict(json.loads(path.read_text()))
        except FileNotFoundError as err:
            raise JournalError(f"no journal record {id} in {self.directory}") from err
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise JournalError(f"the journal record {path} cannot be read: {err}") from err

    def entries(self) -> list[Record]:
        """Every readable record, oldest first (unreadable ones are skipped)."""
        out: list[Record] = []
        if not self.directory.is_dir():
            return out
        for path in sorted(self.directory.glob("*.json")):
            try:
                out.append(from_dict(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(out, key=lambda e: e.updated)


def drop_records_of(journal: Journal, hosts: Iterable[tuple[str, str]]) -> list[Record]:
    """Remove the records whose every host is one of ``hosts`` (name, address), and return them.

    For hosts that are gone for good (a lab taken down): ``orthros recover`` could only fail on
    their records. A host must match by name and address both, so that a real host that shares
    a lab host's name (the lab is built from the same inventory) keeps its records.
    """
    known = set(hosts)
    dropped = [r for r in journal.entries()
               if r.hosts and all((h.name, h.address) in known for h in r.hosts.values())]
    for record in dropped:
        journal.remove(record.id)
    return dropped
