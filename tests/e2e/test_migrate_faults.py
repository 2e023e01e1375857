"""Migrations that fail part way, on the lab, under clients that check every answer: the
destination's agent SIGKILLed, the link to the destination cut, the destination's image
directory unwritable, CRIU failing on restore. Each time the migration rolls back: the service
keeps running on the source with its clients connected and answered, and no lock, rule,
address or stray process is left anywhere. A destination where a live process holds one of
the tree's PIDs is refused before anything is frozen.

Faults are injected through the policy's observer when a stage starts (the policy is run
in-process for that; test_migrate.py runs the real command). Security of the agents (a wrong
key, a replayed request, a malformed message: refused, logged, the agent keeps serving) is
tested on real agents in tests/linux/test_agent.py; here, the same refusals by a lab agent in
the middle of the cluster, and that a migration with the wrong key touches nothing.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from helpers import run_orthros, wait_for
from migrate_kit import (
    SERVICE_IP,
    Service,
    answers,
    assert_nothing_left,
    at_stage,
    client,
    echo_server,
    established,
    host,
    set_link,
)

from orthros_py.agent.client import AgentClient
from orthros_py.agent.errors import AgentRefused
from orthros_py.agent.protocol import build_request, encode_request, read_frame
from orthros_py.lab import Lab
from orthros_py.policies.migrate import (
    Done,
    Event,
    Host,
    MigrateConfig,
    Migration,
    MigrationError,
    Stage,
)
from orthros_py.workloads.echo import ClientPool

PORT = 7100
CLIENTS = 50


@contextmanager
def echo_with_clients(lab: Lab, svc: Service | None = None
                      ) -> Iterator[tuple[Service, ClientPool]]:
    """The echo service on alpha (``svc`` if given, started already) under CLIENTS clients,
    traffic flowing on every connection."""
    svc = svc or echo_server(lab, "alpha", PORT)
    with lab.in_netns("client"):
        pool = ClientPool(SERVICE_IP, PORT, CLIENTS, timeout=60)
    try:
        pool.start(interval=0.005)
        wait_for(lambda: established(lab, "alpha", svc.pid) == CLIENTS, timeout=20,
                 what="the clients' connections on alpha")
        wait_for(lambda: pool.stats.requests >= 5 * CLIENTS, what="traffic on every connection")
        yield svc, pool
    finally:
        pool.close()


def fail_migration(lab: Lab, svc: Service, observer: Callable[[Event], None],
                   config: MigrateConfig | None = None) -> MigrationError:
    job = Migration(svc.pid, host(lab, "alpha"), host(lab, "beta"),
                    config or MigrateConfig(dest_retry_s=5.0), observer=observer)
    with pytest.raises(MigrationError) as exc:
        job.run()
    return exc.value


def assert_service_stayed(lab: Lab, svc: Service, pool: ClientPool, err: object) -> None:
    """The tree runs on alpha under its pid, holds every client's connection, and the clients
    get answers again, none of them ever wrong or reset."""
    print(f"\n{err}")
    assert svc.alive(), "the service's tree is gone"
    assert lab.holder(SERVICE_IP) == lab.host("alpha")
    assert answers(lab, PORT)
    before = pool.stats.requests
    wait_for(lambda: pool.stats.requests >= before + 3 * CLIENTS, timeout=30,
             what="the clients to get answers on alpha again")
    assert established(lab, "alpha", svc.pid) == CLIENTS
    assert pool.stats.errors == 0, pool.stats.error_samples


def test_destination_agent_killed_mid_migration(lab: Lab) -> None:
    beta_agent = lab.host("beta").agent_pid
    assert beta_agent is not None

    def kill_beta() -> None:  # the tree is dumped, stopped on alpha, its memory on beta
        os.kill(beta_agent, signal.SIGKILL)
        wait_for(lambda: not psutil.pid_exists(beta_agent)
                 or psutil.Process(beta_agent).status() == psutil.STATUS_ZOMBIE,
                 what="beta's agent to die")
        with contextlib.suppress(ChildProcessError):
            os.waitpid(beta_agent, 0)  # the lab started it: reap it here

    with echo_with_clients(lab) as (svc, pool):
        err = fail_migration(lab, svc, at_stage(Stage.TRANSFER, kill_beta),
                             MigrateConfig(dest_retry_s=2.0))
        assert err.stage == "transfer" and err.host == "beta"
        assert "rolled back: pid" in str(err) and "runs on alpha again" in str(err)
        # Nothing on beta can be cleaned without its agent: only its image files are left.
        assert err.rolled_back and not err.problems
        assert err.leftovers and "images on the destination" in err.leftovers[0]
        assert_service_stayed(lab, svc, pool, err)
        assert_nothing_left(lab, holder="alpha", service=svc, dead_agents=["beta"])


def test_link_to_destination_cut_during_transfer(lab: Lab) -> None:
    down_for = 7.0  # longer than an agent connection waits (5 s): the transfer fails

    def cut() -> None:
        set_link(lab, "beta", up=False)

        def heal() -> None:
            time.sleep(down_for)
            set_link(lab, "beta", up=True)

        threading.Thread(target=heal, daemon=True).start()

    with echo_with_clients(lab) as (svc, pool):
        err = fail_migration(lab, svc, at_stage(Stage.TRANSFER, cut),
                             MigrateConfig(dest_retry_s=20.0))
        assert err.stage == "transfer" and err.host == "beta" and "not reachable" in str(err)
        # The rollback waited for beta to come back and cleaned up there too.
        assert err.rolled_back and not err.problems and not err.leftovers, str(err)
        assert "nothing of the migration is left" in str(err)
        assert_service_stayed(lab, svc, pool, err)
        assert_nothing_left(lab, holder="alpha", service=svc)


def test_destination_image_directory_unwritable(lab: Lab) -> None:
    images = lab.host("beta").images_root
    assert images is not None
    # Root ignores file modes: a read-only bind mount is what stops it, made in beta's own
    # mount namespace (a mount made here would not reach it: this machine's are private).
    lab.run("beta", ["mount", "--bind", str(images), str(images)])
    try:
        lab.run("beta", ["mount", "-o", "remount,bind,ro", str(images)])
        with echo_with_clients(lab) as (svc, pool):
            err = fail_migration(lab, svc, lambda ev: None)
            assert err.stage == "prepare" and err.host == "beta"
            assert "Read-only file system" in str(err)
            assert err.rolled_back and not err.problems and not err.leftovers, str(err)
            assert_service_stayed(lab, svc, pool, err)
            assert_nothing_left(lab, holder="alpha", service=svc)
    finally:
        lab.run("beta", ["umount", str(images)], check=False)


def test_criu_failing_on_restore(lab: Lab) -> None:
    images = lab.host("beta").images_root
    assert images is not None

    def break_images() -> None:
        # A socket's image goes missing on beta: CRIU fails part way into the restore, after
        # it has forked the tree. alpha keeps its own copy of every file but the memory.
        (image,) = glob.glob(f"{images}/migrate-*")
        victims = glob.glob(f"{image}/tcp-stream-*.img")
        assert victims
        for path in victims[:1]:
            Path(path).unlink()

    with echo_with_clients(lab) as (svc, pool):
        err = fail_migration(lab, svc, at_stage(Stage.RESTORE, break_images))
        assert err.stage == "restore" and err.host == "beta"
        assert "CRIU" in str(err) and "restore.log" in str(err)  # CRIU's word, where its log is
        # Each lab host has a PID space of its own, as machines do: alpha's tree stayed
        # stopped through beta's restore, and the rollback resumed it (nothing restored).
        assert err.rolled_back and not err.problems and not err.leftovers, str(err)
        assert_service_stayed(lab, svc, pool, err)
        assert not [t for t in client(lab, "alpha").status()["restored"] if t["running"]]
        assert_nothing_left(lab, holder="alpha", service=svc)


def test_a_file_changed_between_dump_and_restore_leaves_the_service_on_the_source(
        lab: Lab, tmp_path: Path) -> None:
    """The service writes to a log file; the log is rotated (renamed) after the dump, so that
    CRIU on beta refuses the restore: the file the tree had open is not where it was. (A
    write-only O_APPEND file is exempt from CRIU's size check, so appending would not do.)
    The tree, held stopped on alpha meanwhile, is resumed: its clients never notice, and the
    error says why in its first sentence."""
    log = tmp_path / "echo.log"
    svc = Service(lab, "alpha", [sys.executable, "-m", "orthros_py.workloads.echo", "--host",
                                 SERVICE_IP, "--port", str(PORT)], log=log)
    wait_for(lambda: answers(lab, PORT), timeout=20, what="the echo server to answer")
    alpha_pid = svc.machine_pid()

    def rotate_the_log() -> None:  # dumped and moved; beta's restore comes next
        assert [t["pid"] for t in client(lab, "alpha").status()["held"]] == [svc.pid]
        log.rename(log.with_suffix(".log.1"))

    with echo_with_clients(lab, svc) as (_, pool):
        err = fail_migration(lab, svc, at_stage(Stage.RESTORE, rotate_the_log))
        assert err.stage == "restore" and err.host == "beta"
        assert int(err.exit_status) != 0
        first = str(err).split("\n")[0]
        assert "CRIU" in first and "restore" in first, first
        assert "echo.log" in str(err), str(err)  # CRIU's reason, from its log
        assert err.rolled_back and not err.problems and not err.leftovers, str(err)
        # The very process that was dumped, resumed: no restore on alpha, no PID waited for.
        assert svc.machine_pid() == alpha_pid
        assert not [t for t in client(lab, "alpha").status()["restored"] if t["running"]]
        assert_service_stayed(lab, svc, pool, err)
    assert_nothing_left(lab, holder="alpha", service=svc)


# Run inside a lab host: take PID argv[1] in the host's PID namespace for a sleeper (the
# counter set just below it, then a fork), put the counter back, print the sleeper's PID.
HOLD_PID = r"""
import os, sys, time
want = int(sys.argv[1])
last = "/proc/sys/kernel/ns_last_pid"
with open(last) as f:
    before = f.read().strip()
for _ in range(100):
    with open(last, "w") as f:
        f.write(str(want - 1))
    child = os.fork()
    if child == 0:
        if os.getpid() == want:
            os.execvp("sleep", ["sleep", "600"])
        os._exit(0)
    if child == want:
        break
    os.waitpid(child, 0)  # another process forked in between: again
    time.sleep(0.01)
else:
    sys.exit(f"pid {want} did not come")
with open(last, "w") as f:
    f.write(before)  # the host's own range again (the kernel skips PIDs in use)
print(want, flush=True)
"""


def test_a_destination_where_a_live_process_holds_a_pid_of_the_tree_is_refused(
        lab: Lab, tmp_path: Path) -> None:
    """Each lab host has a PID namespace of its own, as machines do: the tree is restored
    with every process and thread id it has on alpha. A sleeper on beta takes one of them (a
    thread of the echo server's); ``orthros migrate`` refuses before freezing anything, with
    exit status 10, and the service goes on on alpha untouched."""
    with echo_with_clients(lab) as (svc, pool):
        (root,) = [p for p in client(lab, "alpha").tree(svc.pid)["processes"]
                   if p["pid"] == svc.pid]
        want = max(root["tids"])  # a thread serving a client
        assert want != svc.pid and lab.machine_pid("beta", want) is None
        log = tmp_path / "hold.log"
        lab.spawn("beta", [sys.executable, "-c", HOLD_PID, str(want)], log=log)
        sleeper: list[int] = []

        def holding() -> bool:
            pid = lab.machine_pid("beta", want)
            with contextlib.suppress(psutil.Error):
                if pid is not None and psutil.Process(pid).name() == "sleep":
                    sleeper[:] = [pid]
            return bool(sleeper)

        try:
            wait_for(holding, timeout=20,
                     what=f"a sleeper on beta to hold pid {want} ({log.read_text()!r})"
                     if log.exists() else f"a sleeper on beta to hold pid {want}")
            before = pool.stats.requests
            res = run_orthros("migrate", str(svc.pid), "--from", "alpha", "--to", "beta",
                              timeout=180)
            assert res.returncode == 10, (res.returncode, res.stdout, res.stderr)
            assert (f"beta cannot give pid {svc.pid}'s tree its PIDs: pid {want} is held "
                    "there by sleep") in res.stderr, res.stderr
            assert "nothing was frozen" in res.stderr and "PID namespace of its own" \
                in res.stderr, res.stderr
            # Never frozen, never locked: the clients were answered all along.
            st = client(lab, "alpha").status()
            assert not st["held"] and not st["images"]
            assert svc.alive()  # running, not stopped
            assert pool.stats.requests > before
            assert_service_stayed(lab, svc, pool, res.stderr.strip())
        finally:
            for pid in sleeper:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        wait_for(lambda: lab.machine_pid("beta", want) is None, what="the sleeper to go")
        assert_nothing_left(lab, holder="alpha", service=svc)


def test_agents_refuse_a_wrong_key_a_replay_and_garbage(lab: Lab) -> None:
    """The refusals of tests/linux/test_agent.py, by an agent of the lab; and a migration
    with the wrong key stops before it touches anything."""
    h = lab.host("beta")
    assert h.agent_port is not None
    key = lab.key_file.read_bytes()

    def raw(data: bytes) -> dict[str, object]:
        with socket.create_connection((h.address, h.agent_port), timeout=10) as s:
            s.sendall(data)
            frame = read_frame(s)
        assert frame is not None
        return dict(json.loads(frame))

    with pytest.raises(AgentRefused) as exc:
        AgentClient(h.address, h.agent_port, bytes(32), name="beta").ping()
    assert exc.value.code == "auth"
    captured = encode_request(key, build_request("status"))
    assert raw(captured)["kind"] == "resp"
    again = raw(captured)
    assert again["kind"] == "refusal" and again["code"] == "replay"
    assert raw(struct.pack("!I", 9) + b"not json!")["code"] == "malformed"
    assert client(lab, "beta").ping().name == "beta"  # still serving
    log = (h.agent_log or Path("/nonexistent")).read_text(errors="replace")
    assert "refused a frame (auth)" in log and "refused a frame (replay)" in log

    with echo_with_clients(lab) as (svc, pool):
        wrong = host(lab, "beta")
        wrong_key = AgentClient(wrong.address, wrong.agent_port, bytes(32), name="beta")
        job = Migration(svc.pid, host(lab, "alpha"),
                        Host("beta", wrong_key, wrong.address, wrong.agent_port))
        with pytest.raises(AgentRefused):
            job.run()
        assert job.done == Done()  # nothing was done, so nothing to undo
        assert pool.stats.errors == 0
        assert_nothing_left(lab, holder="alpha", service=svc)
