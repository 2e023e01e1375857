"""The migration journal, and recovery of a migration whose coordinator died.

The agents are the fakes of tests/unit/fakes.py (pure state machine logic); the coordinator's
death is a BaseException that skips the in-process rollback, as SIGKILL would. The e2e tier
kills a real coordinator process (tests/e2e/test_migrate_recover.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fakes import SVC, FakeAgent, World, pair

from orthros_py.errors import OrthrosError
from orthros_py.policies import migrate as mig
from orthros_py.policies.journal import Journal, from_dict, to_dict
from orthros_py.policies.migrate import (
    Event,
    Host,
    MigrateConfig,
    MigrateState,
    Migration,
    Stage,
)


class Died(BaseException):
    """The coordinator's death at a chosen point."""


@pytest.fixture
def world() -> World:
    return World()


def hosts(alpha: FakeAgent, beta: FakeAgent) -> tuple[Host, Host]:
    return Host("alpha", alpha, alpha.address, 7070), Host("beta", beta, beta.address, 7070)


def die_at(world: World, alpha: FakeAgent, beta: FakeAgent, journal: Journal, stage: Stage,
           monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a migration whose coordinator dies when ``stage`` starts (no rollback: it is dead)."""
    def observe(ev: Event) -> None:
        if ev.stage == stage and ev.kind == "start":
            raise Died(stage.value)

    def no_rollback(self: Migration, err: BaseException) -> BaseException:
        raise err

    monkeypatch.setattr(Migration, "rollback", no_rollback)
    src, dst = hosts(alpha, beta)
    m = Migration(4242, src, dst, MigrateConfig(dest_retry_s=3.0), image="img",
                  observer=observe, clock=world.clock, sleep=world.sleep, journal=journal)
    with pytest.raises(Died):
        m.run()
    monkeypatch.undo()


def recover(world: World, alpha: FakeAgent, beta: FakeAgent, journal: Journal) -> Any:
    (entry,) = journal.entries()
    assert entry.coordinator_alive() is False  # written by us: not a live coordinator
    src, dst = hosts(alpha, beta)
    return Migration.resume(entry, src, dst, journal=journal, clock=world.clock,
                            sleep=world.sleep).recover()


def test_a_finished_migration_leaves_no_journal(world: World, tmp_path: Path) -> None:
    alpha, beta = pair(world)
    journal = Journal(tmp_path)
    src, dst = hosts(alpha, beta)
    Migration(4242, src, dst, MigrateConfig(dest_retry_s=3.0), image="img", clock=world.clock,
              sleep=world.sleep, journal=journal).run()
    assert journal.entries() == [] and not tmp_path.exists()  # the emptied directory too


def test_a_rolled_back_migration_leaves_no_journal(world: World, tmp_path: Path) -> None:
    alpha, beta = pair(world)
    beta.fail["restore"] = OrthrosError("CRIU refused the restore")
    journal = Journal(tmp_path)
    src, dst = hosts(alpha, beta)
    with pytest.raises(mig.MigrationError):
        Migration(4242, src, dst, MigrateConfig(dest_retry_s=3.0), image="img",
                  clock=world.clock, sleep=world.sleep, journal=journal).run()
    assert journal.entries() == []


def test_the_journal_round_trips_plan_and_done(world: World, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    alpha, beta = pair(world)
    journal = Journal(tmp_path)
    die_at(world, alpha, beta, journal, Stage.RESTORE, monkeypatch)
    (entry,) = journal.entries()
    again = from_dict(json.loads(json.dumps(to_dict(entry))))
    assert again == entry
    assert (entry.kind, entry.id, entry.pid) == ("migrate", "img", 4242)
    assert {r: h.name for r, h in entry.hosts.items()} == {"source": "alpha", "dest": "beta"}
    state = MigrateState.from_dict(entry.state)
    assert entry.stage == "restore" and state.plan is not None
    assert str(state.plan.service) == f"{SVC}/32" and len(state.plan.conns) == 3
    assert state.done.held and state.done.address_on_dest and state.done.src_locked


def test_death_before_the_restore_is_rolled_back_by_recover(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alpha, beta = pair(world)
    journal = Journal(tmp_path)
    die_at(world, alpha, beta, journal, Stage.TRANSFER, monkeypatch)
    assert 4242 in alpha.held  # stopped and locked, as a killed coordinator leaves it
    assert alpha.locked

    result = recover(world, alpha, beta, journal)
    assert result.outcome == "rolled back" and result.runs_on == "alpha"
    assert result.died_in == "transfer"
    assert 4242 in alpha.running and f"{SVC}/32" in alpha.addrs
    assert alpha.clean() and beta.clean()
    assert journal.entries() == []


def test_death_after_the_restore_is_finished_by_recover(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alpha, beta = pair(world)
    journal = Journal(tmp_path)
    die_at(world, alpha, beta, journal, Stage.UNLOCK, monkeypatch)
    assert 4242 in beta.running and beta.locked  # running there, still locked

    result = recover(world, alpha, beta, journal)
    assert result.outcome == "completed" and result.runs_on == "beta"
    assert 4242 in beta.running and 4242 not in alpha.running
    assert f"{SVC}/32" in beta.addrs and f"{SVC}/32" not in alpha.addrs
    assert alpha.clean() and beta.clean()
    assert journal.entries() == []


def test_a_silent_destination_after_a_death_in_the_restore_is_left_alone(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alpha, beta = pair(world)
    journal = Journal(tmp_path)
    die_at(world, alpha, beta, journal, Stage.RESTORE, monkeypatch)
    beta.down = True
    world.log.clear()
    with pytest.raises(OrthrosError, match="cannot tell whether beta restored"):
        recover(world, alpha, beta, journal)
    assert not any(m.startswith("alpha.") and not m.endswith("status") for m in world.log)
    assert len(journal.entries()) == 1  # kept for the next try

    beta.down = False
    result = recover(world, alpha, beta, journal)
    assert result.outcome == "rolled back"
    assert 4242 in alpha.running and alpha.clean() and beta.clean()


def test_lab_down_drops_the_records_of_its_hosts_only(tmp_path: Path) -> None:
    from orthros_py.policies.journal import HostRef, Record, drop_records_of

    journal = Journal(tmp_path / "journal")

    def record(id: str, *hosts: HostRef) -> Record:
        return Record(kind="migrate", id=id, stage="dump", state={}, coordinator=1, updated=0.0,
                      hosts={f"role{i}": h for i, h in enumerate(hosts)}, title=f"run {id}")

    alpha, beta = HostRef("alpha", "10.77.0.11", 7070), HostRef("beta", "10.77.0.12", 7070)
    real_beta = HostRef("beta", "192.168.56.12", 7070)  # a real host of the same name
    journal.write(record("lab", alpha, beta))
    journal.write(record("mixed", alpha, real_beta))
    journal.write(record("none"))
    lab_hosts = [("alpha", "10.77.0.11"), ("beta", "10.77.0.12")]
    dropped = drop_records_of(journal, lab_hosts)
    assert [r.id for r in dropped] == ["lab"]
    assert sorted(r.id for r in journal.entries()) == ["mixed", "none"]
    assert drop_records_of(journal, lab_hosts) == []  # a second down finds nothing
