"""A migration whose coordinator dies half way is finished or undone by `orthros recover`.

The coordinator is a real process that dies at a chosen point with no chance to clean up
(``os._exit`` from inside the policy, as SIGKILL would stop it there): before the point of no
return it leaves the service stopped on alpha with its connections locked; after it, running on
beta with its connections still locked and alpha's side not cleaned. `orthros recover`, run as
users run it, reads the journal the coordinator kept and rolls back or finishes. The clients
keep their connections and never see an error or a wrong answer.
"""

from __future__ import annotations

import os
from pathlib import Path

from helpers import orthros_json, wait_for
from migrate_kit import (
    SERVICE_IP,
    Service,
    answers,
    assert_nothing_left,
    client,
    established,
    host,
)
from test_migrate_faults import CLIENTS, PORT, echo_with_clients

from orthros_py.lab import Lab
from orthros_py.policies.journal import Journal
from orthros_py.policies.migrate import Event, MigrateConfig, Migration, Stage
from orthros_py.workloads.echo import ClientPool


def coordinator_dies_at(lab: Lab, pid: int, stage: Stage, journal: Path) -> None:
    """Run the migration in a child process that dies when ``stage`` starts."""
    child = os.fork()
    if child == 0:  # the coordinator: never returns into pytest
        try:
            def die(ev: Event) -> None:
                if ev.stage == stage and ev.kind == "start":
                    os._exit(137)

            Migration(pid, host(lab, "alpha"), host(lab, "beta"), MigrateConfig(),
                      observer=die, journal=Journal(journal)).run()
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 137, "the coordinator did not die where asked"


def assert_served_from(lab: Lab, name: str, svc: Service, pool: ClientPool) -> None:
    """The service answers from ``name`` with every client's connection, no client ever saw
    an error, and nothing of the migration is left anywhere."""
    assert lab.holder(SERVICE_IP) == lab.host(name) and answers(lab, PORT)
    before = pool.stats.requests
    wait_for(lambda: pool.stats.requests >= before + 3 * CLIENTS, timeout=30,
             what=f"the clients to get answers from {name}")
    assert established(lab, name, svc.pid) == CLIENTS
    assert pool.stats.errors == 0, pool.stats.error_samples
    assert_nothing_left(lab, holder=name, service=svc)


def recover(journal: Path) -> list[dict[str, object]]:
    out: list[dict[str, object]] = orthros_json("recover", "--journal", str(journal), "--json",
                                                timeout=120)
    return out


def test_a_coordinator_dead_before_the_restore_is_rolled_back(lab: Lab, tmp_path: Path) -> None:
    with echo_with_clients(lab) as (svc, pool):
        coordinator_dies_at(lab, svc.pid, Stage.ADDRESS, tmp_path)
        # What the dead coordinator left: the tree stopped on alpha, its connections locked.
        assert [t["pid"] for t in client(lab, "alpha").status()["held"]] == [svc.pid]
        (entry,) = Journal(tmp_path).entries()
        # `orthros hosts` points at it
        shown = orthros_json("hosts", "--no-check", "--journal", str(tmp_path), "--json")
        assert shown["interrupted_migrations"] == [
            {"image": entry.id, "pid": svc.pid, "source": "alpha", "dest": "beta",
             "stage": "address move"}]

        (done,) = recover(tmp_path)
        assert done["outcome"] == "rolled back" and done["runs_on"] == "alpha"
        assert done["died_in"] == "address move"
        assert Journal(tmp_path).entries() == []
        assert_served_from(lab, "alpha", svc, pool)


def test_a_coordinator_dead_after_the_restore_is_finished(lab: Lab, tmp_path: Path) -> None:
    with echo_with_clients(lab) as (svc, pool):
        coordinator_dies_at(lab, svc.pid, Stage.UNLOCK, tmp_path)
        # What the dead coordinator left: the tree restored on beta, its connections locked.
        assert [t["pid"] for t in client(lab, "beta").status()["restored"]] == [svc.pid]

        (done,) = recover(tmp_path)
        assert done["outcome"] == "completed" and done["runs_on"] == "beta"
        assert Journal(tmp_path).entries() == []
        assert_served_from(lab, "beta", svc, pool)

    assert orthros_json("recover", "--journal", str(tmp_path), "--json") == []
