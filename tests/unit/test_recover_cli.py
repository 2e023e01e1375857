"""``orthros recover`` across policies: each journal record goes to the recover function of its
kind, records of the journal's first version (migrate's alone) are still read, and
``--forget`` drops a record without touching any host. The agents are the fakes of
tests/unit/fakes.py; the cluster is swapped for one that hands them out.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from fakes import FakeAgent, World, host, pair
from test_migrate_journal import die_at

from orthros_py.cli import cli
from orthros_py.policies.engine import Recovery, register_recover
from orthros_py.policies.journal import HostRef, Journal, Record
from orthros_py.policies.migrate import MigrateState, Stage


class FakeCluster:
    """What ``Host.of`` asks of a ``Cluster``, handing out fake agents."""

    def __init__(self, *agents: FakeAgent) -> None:
        self.agents = {a.name: a for a in agents}

    def client(self, name: str) -> FakeAgent:
        return self.agents[name]

    def reach(self, name: str) -> tuple[str, int]:
        h = host(self.agents[name])
        return h.address, h.agent_port


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def invoke(monkeypatch: pytest.MonkeyPatch, cluster: FakeCluster | None, *args: str) -> Result:
    from orthros_py.cluster import Cluster

    monkeypatch.setattr(Cluster, "load", staticmethod(lambda inventory, key: cluster))
    return CliRunner().invoke(cli, ["recover", *args])


def toy_record(journal: Journal, coordinator: int, id: str = "toy-1") -> Record:
    ref = HostRef("alpha", "10.77.0.11", 7070)
    rec = Record(kind="toy-recover", id=id, hosts={"only": ref}, stage="second",
                 state={"n": 3}, coordinator=coordinator, updated=0.0, title="three things",
                 pid=77)
    journal.write(rec)
    return rec


CALLS: list[tuple[Record, dict[str, str]]] = []


@register_recover("toy-recover")
def _toy_recover(record: Record, hosts: Any, *, journal: Journal,
                 observer: Any = None) -> Recovery:
    CALLS.append((record, {role: h.name for role, h in hosts.items()}))
    journal.remove(record.id)
    return Recovery(record.id, 77, record.stage, "completed", 78, "alpha")


def test_recover_dispatches_on_the_records_kind(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    world = World()
    alpha, beta = pair(world)
    journal = Journal(tmp_path)
    toy_record(journal, dead_pid())
    CALLS.clear()
    out = invoke(monkeypatch, FakeCluster(alpha, beta), "--journal", str(tmp_path), "--json")
    assert out.exit_code == 0, out.output
    (rec, hosts), = CALLS
    assert (rec.kind, rec.state, hosts) == ("toy-recover", {"n": 3}, {"only": "alpha"})
    assert json.loads(out.stdout)[0]["outcome"] == "completed"
    assert journal.entries() == []


def test_a_record_of_the_first_journal_version_is_recovered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = World()
    alpha, beta = pair(world)
    journal = Journal(tmp_path)
    die_at(world, alpha, beta, journal, Stage.TRANSFER, monkeypatch)
    (rec,) = journal.entries()
    # What the journal's first version wrote for it (migrate's fields at the top level).
    v1 = {"version": 1, "pid": rec.pid, "image": rec.id, "stage": rec.stage,
          "source": {"name": "alpha", "address": alpha.address, "agent_port": 7070},
          "dest": {"name": "beta", "address": beta.address, "agent_port": 7070},
          "coordinator": dead_pid(), "updated": 1.0,
          **{k: rec.state[k] for k in ("config", "plan", "done", "cgroup_roots")}}
    journal.path(rec.id).write_text(json.dumps(v1))
    (old,) = journal.entries()
    assert (old.kind, old.id, old.pid, old.title) == ("migrate", "img", 4242,
                                                      "pid 4242 from alpha to beta")
    assert MigrateState.from_dict(old.state).done.held
    out = invoke(monkeypatch, FakeCluster(alpha, beta), "--journal", str(tmp_path), "--json")
    assert out.exit_code == 0, out.output
    (done,) = json.loads(out.stdout)
    assert done["outcome"] == "rolled back" and done["runs_on"] == "alpha"
    assert 4242 in alpha.running and alpha.clean() and beta.clean()
    assert journal.entries() == []


def test_forget_drops_a_record_and_says_what_it_was(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(tmp_path)
    toy_record(journal, dead_pid())
    toy_record(journal, dead_pid(), id="toy-2")
    out = invoke(monkeypatch, None, "--forget", "toy-1", "--journal", str(tmp_path))
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "forgot toy-recover toy-1: three things, stopped during second" in text
    assert "nothing on those hosts was touched" in text and "only alpha" in text
    assert [r.id for r in journal.entries()] == ["toy-2"]  # the other one stays
    out = invoke(monkeypatch, None, "--forget", "toy-1", "--journal", str(tmp_path))
    assert out.exit_code != 0 and "no journal record toy-1" in str(out.exception)


def test_forget_refuses_a_running_coordinator_and_drops_an_unreadable_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(tmp_path)
    toy_record(journal, os.getppid())  # alive, and not us
    out = invoke(monkeypatch, None, "--forget", "toy-1", "--journal", str(tmp_path))
    assert out.exit_code == 2 and "still running" in out.output
    assert journal.exists("toy-1")
    journal.path("junk").write_text("{not json")
    out = invoke(monkeypatch, None, "--forget", "junk", "--journal", str(tmp_path), "--json")
    assert out.exit_code == 0 and json.loads(out.stdout)["readable"] is False
    assert not journal.path("junk").exists()
    out = invoke(monkeypatch, None, "--forget", "--journal", str(tmp_path))
    assert out.exit_code == 2 and "--forget needs the IMAGE" in out.output
