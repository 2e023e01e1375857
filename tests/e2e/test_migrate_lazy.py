"""Post-copy (``--lazy``) and pre-copy (``--precopy``) migration of a process holding 1 GiB.

The workload (``orthros_py.workloads.memhog``) fills 1 GiB of anonymous memory with a pattern
every page of which can be checked against a version the process keeps, while a thread of its
own keeps reading, checking and rewriting its hot pages, and a client on the client host PINGs
it over TCP through the service address. After the migration: every page of the 1 GiB holds
what it must (``VERIFY``), the worker never read a wrong page, the client's one connection saw
no error, the source runs nothing of it, and nothing of the migration is left on either host.
A source killed while the memory is still crossing loses the service: said in one sentence,
both hosts cleaned, and ``orthros recover`` finds nothing left to do.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import orthros_json
from migrate_kit import SERVICE_IP, Service, assert_nothing_left, host, migrate_cli

from orthros_py.lab import Lab
from orthros_py.policies.journal import Journal
from orthros_py.policies.migrate import Event, MigrateConfig, Migration, MigrationError, Stage
from orthros_py.workloads.memhog import ClientLog, MemClient, MemConn, wait_ready

PORT = 7600
MIB = 1024
PAGES = MIB * 256


def memhog(lab: Lab, tmp: Path, mib: int = MIB) -> Service:
    log = tmp / "memhog.out"
    svc = Service(lab, "alpha", [sys.executable, "-m", "orthros_py.workloads.memhog",
                                 "--mib", str(mib), "--host", SERVICE_IP, "--port", str(PORT),
                                 "--hot-fraction", "0.3", "--rate", "2000"], log=log)
    wait_ready(log, timeout=120)
    return svc


@contextlib.contextmanager
def pinging(lab: Lab) -> Iterator[MemClient]:
    client = MemClient(lambda: lab.connect((SERVICE_IP, PORT), timeout=10.0), rate=50,
                       timeout=60.0, reconnect=False).start()
    try:
        yield client
    finally:
        client.stop()


def check_memory(lab: Lab) -> dict[str, Any]:
    """Every page right, and the worker never read a wrong one."""
    with MemConn(lambda: lab.connect((SERVICE_IP, PORT), timeout=10.0), timeout=120) as c:
        verdict = c.verify(timeout=300)
        stat = c.stat()
    assert verdict.ok and verdict.pages == PAGES, verdict.line()
    assert stat["mismatches"] == 0, stat
    assert stat["writes"] > 0  # the worker went on writing through the migration
    return stat


def check_client(log: ClientLog) -> None:
    # Per connection: the one connection it opened saw no error at all.
    assert log.connections == 1 and log.errors_per_connection() == {}, log.errors[:3]
    assert log.replies


def runs_on(lab: Lab, svc: Service) -> list[str]:
    return [h.name for h in lab.hosts if lab.machine_pid(h, svc.pid) is not None]


@pytest.mark.lab(hosts=2)
def test_lazy_migration_of_1_gib_keeps_every_page_and_the_client(lab: Lab,
                                                                 tmp_path: Path) -> None:
    svc = memhog(lab, tmp_path)
    with pinging(lab) as client:
        out = migrate_cli(svc.pid, "alpha", "beta", "--lazy", "--no-precopy")
        log = client.stop()
    lazy = out["lazy"]
    # The memory crossed after the restore, not in the freeze: all of it, faulted or pushed.
    assert lazy["pages_copied"] >= PAGES * 0.99, lazy
    assert lazy["pages_faulted"] + lazy["pages_pushed"] == lazy["pages_copied"], lazy
    assert out["counts"]["pages"] < PAGES // 100, out["counts"]  # not in the frozen dump
    assert out["precopy"] is None
    assert "memory" in out["timings_ms"] and out["timings_ms"]["downtime"] > 0
    # The client was waiting: beta's agent saw its first reply acknowledged.
    assert out["timings_ms"].get("first response", 0) > 0, out["timings_ms"]
    check_client(log)
    check_memory(lab)
    assert runs_on(lab, svc) == ["beta"]
    assert_nothing_left(lab, holder="beta", service=svc)


@pytest.mark.lab(hosts=2)
def test_precopy_migration_of_1_gib_keeps_every_page_and_the_client(lab: Lab,
                                                                    tmp_path: Path) -> None:
    svc = memhog(lab, tmp_path)
    with pinging(lab) as client:
        out = migrate_cli(svc.pid, "alpha", "beta", "--precopy")
        log = client.stop()
    rounds = out["precopy"]["rounds"]
    # The first round copied (about) everything while the tree ran; the final freeze only
    # what the worker wrote since the last round.
    assert rounds and rounds[0]["pages"] >= PAGES * 0.99, rounds
    assert out["counts"]["pages"] < PAGES // 10, out["counts"]
    assert out["lazy"] is None
    check_client(log)
    check_memory(lab)
    assert runs_on(lab, svc) == ["beta"]
    assert_nothing_left(lab, holder="beta", service=svc)


@pytest.mark.lab(hosts=2)
def test_precopy_then_lazy_keeps_every_page(lab: Lab, tmp_path: Path) -> None:
    svc = memhog(lab, tmp_path, mib=256)
    with pinging(lab) as client:
        out = migrate_cli(svc.pid, "alpha", "beta", "--precopy", "--lazy")
        log = client.stop()
    assert out["precopy"]["rounds"] and out["lazy"] is not None
    check_client(log)
    with MemConn(lambda: lab.connect((SERVICE_IP, PORT), timeout=10.0), timeout=120) as c:
        verdict = c.verify(timeout=300)
        assert verdict.ok and verdict.pages == 256 * 256, verdict.line()
        assert c.stat()["mismatches"] == 0
    assert_nothing_left(lab, holder="beta", service=svc)


def _kill_lazy_dump(lab: Lab) -> list[int]:
    """SIGKILL the CRIU that serves the lazy pages on alpha (its agent's `criu swrk` child)."""
    agent = psutil.Process(lab.host("alpha").agent_pid)
    victims = [p for p in agent.children(recursive=True) if p.name() == "criu"]
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return [p.pid for p in victims]


@pytest.mark.lab(hosts=2)
def test_a_source_killed_mid_transfer_loses_the_service_and_leaves_nothing(
        lab: Lab, tmp_path: Path) -> None:
    svc = memhog(lab, tmp_path)
    journal = tmp_path / "journal"
    killed: list[int] = []

    def observe(ev: Event) -> None:
        # The tree runs on beta, most of its 1 GiB still on alpha.
        if ev.stage == Stage.UNLOCK and ev.kind == "start" and not killed:
            killed.extend(_kill_lazy_dump(lab))

    job = Migration(svc.pid, host(lab, "alpha"), host(lab, "beta"),
                    MigrateConfig(lazy=True, precopy=False, service_ip=SERVICE_IP),
                    observer=observe, journal=Journal(journal))
    with pinging(lab) as client, pytest.raises(MigrationError) as exc:
        job.run()
    log = client.stop()
    # The client's connection ends with the service (or hangs up on a dead peer): never a
    # wrong answer.
    assert all("wrong" not in e.what.lower() for e in log.errors), log.errors[:3]
    assert killed, f"no lazy dump was found to kill: {exc.value}"
    err = exc.value
    text = str(err)
    assert "lost the service" in text and "both hosts were cleaned" in text, text
    assert err.service_down and not err.rolled_back and not err.problems, text
    assert "\n" not in text
    # Neither copy runs: the source was released before the restore, the destination's
    # half-restored copy (its missing pages would read as zeros) was killed.
    assert runs_on(lab, svc) == []
    assert_nothing_left(lab, holder="beta", service=svc)
    # orthros recover agrees: nothing was left half done.
    assert orthros_json("recover", "--journal", str(journal)) == []


@pytest.mark.lab(hosts=2)
def test_recover_finishes_a_lazy_migration_whose_coordinator_died_mid_transfer(
        lab: Lab, tmp_path: Path) -> None:
    """The coordinator dies (os._exit, as SIGKILL would stop it) when the memory stage starts:
    the tree serves from beta, its pages still crossing between the agents (which go on without
    it), the images and both lazy sides still there. `orthros recover` waits for the last page,
    finishes, and leaves the service on beta with every page right and nothing else."""
    import os

    svc = memhog(lab, tmp_path, mib=256)
    journal = tmp_path / "journal"
    with pinging(lab) as client:
        child = os.fork()
        if child == 0:  # the coordinator: never returns into pytest
            try:
                def die(ev: Event) -> None:
                    if ev.stage == Stage.MEMORY and ev.kind == "start":
                        os._exit(137)

                Migration(svc.pid, host(lab, "alpha"), host(lab, "beta"),
                          MigrateConfig(lazy=True, precopy=False, service_ip=SERVICE_IP),
                          observer=die, journal=Journal(journal)).run()
            finally:
                os._exit(1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 137, "the coordinator did not die there"
        out = orthros_json("recover", "--journal", str(journal), timeout=300)
        log = client.stop()
    assert [r["outcome"] for r in out] == ["completed"], out
    assert out[0]["runs_on"] == "beta"
    check_client(log)
    with MemConn(lambda: lab.connect((SERVICE_IP, PORT), timeout=10.0), timeout=120) as c:
        verdict = c.verify(timeout=300)
        assert verdict.ok and verdict.pages == 256 * 256, verdict.line()
        assert c.stat()["mismatches"] == 0
    assert runs_on(lab, svc) == ["beta"]
    assert_nothing_left(lab, holder="beta", service=svc)
