"""The migration policy without root or hosts: the plan it makes from what agents report, the
rollback it derives from what was done, and the whole state machine run against fake agents
that keep a little state (addresses, locks, a held tree, images), with a failure injected at
every stage. The real thing runs in tests/e2e/test_migrate.py and test_migrate_faults.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from fakes import SVC, FakeAgent, World, conns, pair

from orthros_py.agent.errors import AgentUnreachable, ProtocolError
from orthros_py.agent.ops.images import op_push_images, op_recv_files
from orthros_py.agent.protocol import PayloadReader
from orthros_py.agent.state import Agent
from orthros_py.agent.table import Call
from orthros_py.cgroup.fs import CgroupError
from orthros_py.criu.request import CriuNetworkLock, dump_request
from orthros_py.errors import BadImageError, CriuError, OrthrosError, PidsInUseError
from orthros_py.net.conn import Conn
from orthros_py.netlock.method import NetworkLock
from orthros_py.policies.migrate import (
    Done,
    Event,
    Facts,
    Host,
    HostFacts,
    MigrateConfig,
    Migration,
    MigrationError,
    PlanError,
    Stage,
    TreeFacts,
    Undo,
    plan,
    rollback_plan,
    shared_pid_space,
)


def host_facts(name: str, address: str, *extra: str, boot: str | None = "boot-1",
               pid_ns: int | None = 4026531836) -> HostFacts:
    return HostFacts(name, address,
                     {"lo": (ipaddress.IPv4Interface("127.0.0.1/8"),),
                      "eth0": tuple(ipaddress.IPv4Interface(a)
                                    for a in (f"{address}/24", *extra))},
                     boot, pid_ns)


def facts(tree_conns: tuple[Conn, ...] = conns(3), *, src_extra: tuple[str, ...] = (
        f"{SVC}/32",), dst_extra: tuple[str, ...] = (), candidates: tuple[str, ...] = (),
          dst_boot: str | None = "boot-1", in_netns: bool = True) -> Facts:
    return Facts(host_facts("alpha", "10.77.0.11", *src_extra),
                 host_facts("beta", "10.77.0.12", *dst_extra, boot=dst_boot),
                 TreeFacts(4242, (4242,), tree_conns, ("eth0",), in_netns), candidates)


# --- plan -----------------------------------------------------------------------------------------


def test_the_service_address_is_the_one_the_connections_use() -> None:
    p = plan(facts(), MigrateConfig(), "img")
    assert p.service == ipaddress.IPv4Interface(f"{SVC}/32")
    assert (p.src_ifname, p.dst_ifname, p.src_lock_ifaces) == ("eth0", "eth0", ("eth0",))
    assert p.lock is NetworkLock.XDP and len(p.conns) == 3
    assert p.release_first  # one boot, one PID namespace: the lab's hosts


def test_an_explicit_service_address_must_be_on_the_source() -> None:
    with pytest.raises(PlanError, match=r"alpha does not hold the service address 10\.77\.0\.101"):
        plan(facts(), MigrateConfig(service_ip="10.77.0.101"), "img")
    p = plan(facts(), MigrateConfig(service_ip=SVC), "img")
    assert p.service is not None and p.service.with_prefixlen == f"{SVC}/32"


def test_connections_on_the_hosts_own_address_cannot_move() -> None:
    mixed = conns(2) + conns(1, local="10.77.0.11")
    with pytest.raises(PlanError, match="several addresses"):
        plan(facts(mixed), MigrateConfig(), "img")
    with pytest.raises(PlanError, match=r"uses 10\.77\.0\.11, which stays on alpha"):
        plan(facts(mixed), MigrateConfig(service_ip=SVC), "img")
    with pytest.raises(PlanError, match="alpha's own address, which cannot move"):
        plan(facts(conns(2, local="10.77.0.11")), MigrateConfig(), "img")


def test_loopback_connections_stay_out_of_the_choice() -> None:
    p = plan(facts(conns(2) + conns(1, local="127.0.0.1")), MigrateConfig(), "img")
    assert p.service is not None and str(p.service.ip) == SVC


def test_without_connections_the_inventory_candidates_decide() -> None:
    p = plan(facts(()), MigrateConfig(), "img")
    assert p.service is None and any("no service address" in n for n in p.notes)
    p = plan(facts((), candidates=(f"{SVC}/32",)), MigrateConfig(), "img")
    assert p.service is not None and str(p.service.ip) == SVC
    both = facts((), src_extra=(f"{SVC}/32", "10.77.0.101/32"),
                 candidates=(f"{SVC}/32", "10.77.0.101/32"))
    with pytest.raises(PlanError, match="several service addresses"):
        plan(both, MigrateConfig(), "img")


def test_refusals_before_anything_is_touched() -> None:
    with pytest.raises(PlanError, match=r"beta already holds 10\.77\.0\.100"):
        plan(facts(dst_extra=(f"{SVC}/32",)), MigrateConfig(), "img")
    with pytest.raises(PlanError, match="another network namespace"):
        plan(facts(in_netns=False), MigrateConfig(), "img")
    f = facts()
    same = Facts(f.source, f.source, f.tree)
    with pytest.raises(PlanError, match="the same host"):
        plan(same, MigrateConfig(), "img")


def test_pid_space_decides_when_the_source_tree_goes() -> None:
    assert plan(facts(dst_boot="boot-2"), MigrateConfig(), "img").release_first is False
    unknown = plan(facts(dst_boot=None), MigrateConfig(), "img")
    assert unknown.release_first and any("PID space" in n for n in unknown.notes)
    forced = plan(facts(), MigrateConfig(release_source_first=False), "img")
    assert forced.release_first is False
    assert shared_pid_space(host_facts("a", "10.0.0.1"), host_facts("b", "10.0.0.2")) is True


def test_the_destination_interface_is_the_one_with_its_own_address() -> None:
    f = facts()
    dst = HostFacts("beta", "10.77.0.12", {"lo": (ipaddress.IPv4Interface("127.0.0.1/8"),),
                                           "ens3": (ipaddress.IPv4Interface("10.77.0.12/24"),),
                                           "ens4": (ipaddress.IPv4Interface("192.0.2.5/24"),)})
    assert plan(Facts(f.source, dst, f.tree), MigrateConfig(), "img").dst_ifname == "ens3"


def test_config_builds_criu_options_that_leave_the_tree_stopped() -> None:
    cfg = MigrateConfig()
    d = cfg.dump_options(("10.77.0.12", 1234))
    assert d.leave_stopped and not d.leave_running and d.tcp_established
    assert d.network_lock is CriuNetworkLock.SKIP and d.page_server == ("10.77.0.12", 1234)
    req = dump_request(dataclasses.replace(d, pid=4242), -1)
    assert req.opts.leave_stopped and req.opts.ps.port == 1234
    assert cfg.restore_options().network_lock is CriuNetworkLock.SKIP
    with pytest.raises(ValueError, match="negative"):
        MigrateConfig(dest_retry_s=-1)
    with pytest.raises(PlanError, match="not an IPv4"):
        MigrateConfig(service_ip="nope")


# --- rollback_plan ----------------------------------------------------------------------------


def test_rollback_undoes_exactly_what_was_done_in_order() -> None:
    assert rollback_plan(Done()) == []
    assert rollback_plan(Done(src_attached=("eth0",), page_server=True, dest_image=True)) == [
        Undo.STOP_PAGE_SERVER, Undo.UNLOCK_SOURCE, Undo.REMOVE_IMAGE_DEST]
    held = Done(src_attached=("eth0",), src_locked=("a",), held=True, src_image=True,
                dest_image=True)
    assert rollback_plan(held) == [Undo.RESUME_SOURCE, Undo.UNLOCK_SOURCE,
                                   Undo.REMOVE_IMAGE_DEST, Undo.REMOVE_IMAGE_SOURCE]
    moved = Done(src_attached=("eth0",), src_locked=("a",), dst_attached=("eth0",),
                 dst_locked=("a",), held=True, released=True, address_off_source=True,
                 address_on_dest=True, src_image=True, dest_image=True)
    assert rollback_plan(moved) == [
        Undo.ADDRESS_OFF_DEST, Undo.ADDRESS_ON_SOURCE, Undo.RESTORE_SOURCE, Undo.UNLOCK_SOURCE,
        Undo.UNLOCK_DEST, Undo.REMOVE_IMAGE_DEST, Undo.REMOVE_IMAGE_SOURCE]
    assert all(s.needs_tree for s in (Undo.UNLOCK_SOURCE, Undo.REMOVE_IMAGE_SOURCE))
    assert Stage.RESTORE.before_point_of_no_return
    assert not Stage.UNLOCK.before_point_of_no_return


# --- the state machine against fake agents ----------------------------------------------------


@pytest.fixture
def world() -> World:
    return World()


def run(world: World, alpha: FakeAgent, beta: FakeAgent, config: MigrateConfig | None = None,
        events: list[Event] | None = None) -> Any:
    m = Migration(4242, Host("alpha", alpha, alpha.address, 7070),
                  Host("beta", beta, beta.address, 7070),
                  config or MigrateConfig(dest_retry_s=3.0), image="img",
                  observer=events.append if events is not None else None,
                  clock=world.clock, sleep=world.sleep)
    return m.run()


def test_a_migration_moves_tree_address_and_leaves_nothing(world: World) -> None:
    alpha, beta = pair(world)
    events: list[Event] = []
    result = run(world, alpha, beta, events=events)
    assert result.new_pid == 4242 and result.connections == 3 and result.established == 3
    assert result.pages == 100 and result.bytes_transferred == 1024
    assert f"{SVC}/32" in beta.addrs and f"{SVC}/32" not in alpha.addrs
    assert 4242 in beta.running and 4242 not in alpha.running
    assert alpha.clean() and beta.clean()
    # Pre-copy is decided (and here declined: no memory tracking) before the page channel opens.
    assert [e.stage for e in events if e.kind == "start"] == [
        Stage.PREPARE, Stage.PRECOPY, Stage.LOCK, Stage.DUMP, Stage.TRANSFER, Stage.ADDRESS,
        Stage.RESTORE, Stage.UNLOCK, Stage.VERIFY, Stage.CLEANUP]
    # Shared PID space: the stopped source tree goes just before the restore, not after.
    log = world.log
    assert log.index("alpha.kill") < log.index("beta.restore")
    # Locked on the destination before the address arrives there.
    assert log.index("beta.netlock_lock") < log.index("beta.addr_add")
    assert log.index("alpha.addr_del") < log.index("beta.addr_add")
    for row in ("lock", "dump", "transfer", "address move", "restore", "unlock", "total"):
        assert row in result.timings_ms
    data = result.to_dict()
    assert data["new_pid"] == 4242 and data["counts"]["connections"] == 3


def test_separate_pid_spaces_keep_the_source_tree_until_the_restore_worked(
        world: World) -> None:
    alpha, beta = pair(world)
    run(world, alpha, beta, MigrateConfig(release_source_first=False))
    assert world.log.index("beta.restore") < world.log.index("alpha.kill")
    assert alpha.clean() and beta.clean()


def assert_rolled_back(alpha: FakeAgent, beta: FakeAgent) -> None:
    assert f"{SVC}/32" in alpha.addrs and f"{SVC}/32" not in beta.addrs
    assert 4242 in alpha.running and not alpha.held
    assert 4242 not in beta.running
    assert alpha.clean() and beta.clean()


# The agent call that fails, and the stage it belongs to.
FAULTS = [
    ("beta", "page_server", Stage.PREPARE),
    ("alpha", "netlock_lock", Stage.PREPARE),
    ("alpha", "dump", Stage.DUMP),
    ("alpha", "push_images", Stage.TRANSFER),
    ("beta", "netlock_lock", Stage.ADDRESS),
    ("beta", "addr_add", Stage.ADDRESS),
    ("beta", "restore", Stage.RESTORE),
]


@pytest.mark.parametrize(("who", "method", "stage"), FAULTS,
                         ids=[f"{w}.{m}" for w, m, _ in FAULTS])
def test_every_failure_before_the_point_of_no_return_rolls_back(
        world: World, who: str, method: str, stage: Stage) -> None:
    alpha, beta = pair(world)
    agent = alpha if who == "alpha" else beta
    agent.fail[method] = CriuError("CRIU said no") if method in ("dump", "restore") else \
        OrthrosError(f"{method} went wrong")
    with pytest.raises(MigrationError) as exc:
        run(world, alpha, beta)
    err = exc.value
    assert err.rolled_back and not err.problems and not err.service_down, str(err)
    assert err.stage == stage.value and err.host == who
    text = str(err)
    assert text.startswith(f"migration of pid 4242 from alpha to beta failed during "
                           f"{stage.value} on {who}: ")
    assert "rolled back: pid 4242 runs on alpha again" in text
    assert "nothing of the migration is left" in text
    assert_rolled_back(alpha, beta)


def test_a_failed_restore_after_the_source_tree_went_restores_it_on_the_source(
        world: World) -> None:
    alpha, beta = pair(world)
    beta.fail["restore"] = CriuError("Unexpected EOF")
    with pytest.raises(MigrationError) as exc:
        run(world, alpha, beta)
    assert exc.value.rolled_back
    # The pages came back from beta, then alpha restored its own tree.
    log = world.log
    assert log.index("alpha.kill") < log.index("beta.restore") < log.index("beta.push_images")
    assert log.index("beta.push_images") < log.index("alpha.restore")
    assert_rolled_back(alpha, beta)


def test_a_plan_error_touches_nothing(world: World) -> None:
    alpha, beta = pair(world)
    beta.addrs.add(f"{SVC}/32")
    with pytest.raises(PlanError, match="beta already holds"):
        run(world, alpha, beta)
    assert not any(m.endswith(("netlock_lock", "page_server", "dump")) for m in world.log)


def test_an_unreachable_destination_is_retried_after_the_service_is_back(
        world: World) -> None:
    alpha, beta = pair(world)
    real_push = alpha.push_images

    def push_then_lose_beta(*args: Any, **kw: Any) -> list[Any]:
        beta.down = True  # the link to beta goes down during the transfer
        return real_push(*args, **kw)

    alpha.push_images = push_then_lose_beta  # type: ignore[method-assign]
    resumed_at: list[float] = []
    real_resume = alpha.resume

    def resume(pid: int) -> dict[str, Any]:
        resumed_at.append(world.now)
        return real_resume(pid)

    alpha.resume = resume  # type: ignore[method-assign]
    real_sleep = world.sleep

    def sleep(s: float) -> None:
        real_sleep(s)
        if world.now >= 2.0:
            beta.down = False  # back after two seconds

    world.sleep = sleep  # type: ignore[method-assign]
    with pytest.raises(MigrationError) as exc:
        run(world, alpha, beta, MigrateConfig(dest_retry_s=10.0))
    assert exc.value.rolled_back and "nothing of the migration is left" in str(exc.value)
    assert resumed_at == [0.0]  # the service came back before any waiting
    assert_rolled_back(alpha, beta)


def test_a_destination_that_never_answers_leaves_only_its_images(world: World) -> None:
    alpha, beta = pair(world)
    alpha.fail["push_images"] = AgentUnreachable("agent on beta is not reachable", host="beta")
    alpha.fail_times["push_images"] = 1
    real_push = alpha.push_images

    def push(*args: Any, **kw: Any) -> list[Any]:
        beta.down = True
        return real_push(*args, **kw)

    alpha.push_images = push  # type: ignore[method-assign]
    with pytest.raises(MigrationError) as exc:
        run(world, alpha, beta, MigrateConfig(dest_retry_s=3.0))
    err = exc.value
    assert err.rolled_back and not err.problems
    assert err.leftovers and "remove the images on the destination" in err.leftovers[0]
    assert "left behind: could not remove the images on the destination" in str(err)
    assert world.now >= 3.0  # it did wait for beta
    assert 4242 in alpha.running and not alpha.held and alpha.clean()


def test_a_restore_whose_answer_was_lost_is_found_and_kept(world: World) -> None:
    alpha, beta = pair(world)
    real_restore = beta.restore

    def restore_then_drop(*args: Any, **kw: Any) -> Any:
        real_restore(*args, **kw)
        raise AgentUnreachable("lost the connection", host="beta")

    beta.restore = restore_then_drop  # type: ignore[method-assign]
    result = run(world, alpha, beta)
    assert result.new_pid == 4242 and 4242 in beta.running
    assert alpha.clean() and beta.clean()


def test_a_tree_that_cannot_come_back_keeps_its_checkpoint_and_locks(world: World) -> None:
    alpha, beta = pair(world)
    beta.fail["restore"] = CriuError("restore failed")
    alpha.fail["restore"] = CriuError("and here too")
    with pytest.raises(MigrationError) as exc:
        run(world, alpha, beta)
    err = exc.value
    assert err.service_down and not err.rolled_back
    assert "the service is DOWN" in str(err) and "kept as image img" in str(err)
    assert "img" in alpha.images and "img" in beta.images  # kept
    assert alpha.locked  # so that a manual restore can still take the connections over


def test_a_dump_that_failed_leaves_a_running_tree_to_just_unlock(world: World) -> None:
    alpha, beta = pair(world)
    alpha.fail["dump"] = CriuError("Dumping FAILED")
    with pytest.raises(MigrationError):
        run(world, alpha, beta)
    assert "alpha.resume" not in world.log
    assert_rolled_back(alpha, beta)


def test_skip_locks_nothing(world: World) -> None:
    alpha, beta = pair(world)
    result = run(world, alpha, beta, MigrateConfig(network_lock=NetworkLock.SKIP))
    assert not any("netlock" in m for m in world.log)
    assert result.plan.lock is NetworkLock.SKIP and any("no network lock" in n
                                                       for n in result.plan.notes)
    assert result.established == 3  # checked against what the plan found


def test_a_restored_tree_that_died_is_an_error_past_the_point_of_no_return(
        world: World) -> None:
    alpha, beta = pair(world)
    real_restore = beta.restore

    def restore_and_die(*args: Any, **kw: Any) -> Any:
        out = real_restore(*args, **kw)
        beta.running.discard(4242)
        return out

    beta.restore = restore_and_die  # type: ignore[method-assign]
    with pytest.raises(MigrationError, match="not running there any more") as exc:
        run(world, alpha, beta)
    assert exc.value.stage == "verify" and not exc.value.rolled_back
    assert "alpha.resume" not in world.log  # past the point of no return: nothing undone


# --- agent operations the migration relies on -------------------------------------------------


def _payload(data: bytes) -> PayloadReader:
    return PayloadReader(_Sock(data), len(data), hashlib.sha256(data).hexdigest())


class _Sock:
    def __init__(self, data: bytes) -> None:
        self.buf = io.BytesIO(data)

    def recv_into(self, view: bytearray | memoryview, n: int = 0, /) -> int:
        chunk = self.buf.read(n)
        view[:len(chunk)] = chunk
        return len(chunk)

    def sendall(self, data: bytes, /) -> None:
        raise AssertionError("nothing is sent")


def _manifest(files: dict[str, bytes]) -> list[dict[str, Any]]:
    return [{"filename": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for n, d in files.items()]


def test_recv_files_stores_a_bundle_whole(tmp_path: Path) -> None:
    agent = Agent("beta", tmp_path / "images", b"k" * 32)
    files = {"core-1.img": b"core" * 1000, "inventory.img": b"inv", "empty.img": b""}
    data = b"".join(files.values())
    out = op_recv_files(Call(agent, "peer", _payload(data)), "img", _manifest(files))
    assert [f["filename"] for f in out["files"]] == list(files)
    for name, content in files.items():
        assert (tmp_path / "images" / "img" / name).read_bytes() == content
    assert not [p for p in (tmp_path / "images" / "img").iterdir() if p.name.startswith(".")]
    with pytest.raises(BadImageError, match="already has a file"):
        op_recv_files(Call(agent, "peer", _payload(data)), "img", _manifest(files))


def test_recv_files_refuses_damage_and_bad_manifests(tmp_path: Path) -> None:
    agent = Agent("beta", tmp_path / "images", b"k" * 32)
    files = {"a.img": b"aaaa", "b.img": b"bbbb"}
    bad = _manifest(files)
    bad[1]["sha256"] = "0" * 64
    with pytest.raises(BadImageError, match=r"b\.img arrived damaged"):
        op_recv_files(Call(agent, "peer", _payload(b"aaaabbbb")), "img", bad)
    assert not list((tmp_path / "images" / "img").iterdir())  # nothing appeared
    short = _manifest(files)
    short[0]["size"] = 3
    with pytest.raises(ProtocolError, match="do not add up"):
        op_recv_files(Call(agent, "peer", _payload(b"aaaabbbb")), "img", short)
    with pytest.raises(ProtocolError, match="not allowed"):
        op_recv_files(Call(agent, "peer", _payload(b"x")), "img",
                      [{"filename": "../x", "size": 1, "sha256": "0"}])


def test_push_images_names_missing_files(tmp_path: Path) -> None:
    agent = Agent("alpha", tmp_path / "images", b"k" * 32)
    (tmp_path / "images" / "img").mkdir()
    (tmp_path / "images" / "img" / "core-1.img").write_bytes(b"x")
    with pytest.raises(BadImageError, match="has no file"):
        op_push_images(Call(agent, "peer"), "img", "127.0.0.1", 9, files=("pages-1.img",))


def test_keep_images_keeps_them_after_a_rollback_too(world: World) -> None:
    alpha, beta = pair(world)
    alpha.fail["dump"] = CriuError("CRIU refused the dump", log_path="/x/dump.log")
    with pytest.raises(MigrationError) as exc:
        run(world, alpha, beta)
    assert "CRIU's log went with the images: --keep-images keeps them" in str(exc.value)
    alpha, beta = pair(world)
    alpha.fail["dump"] = CriuError("CRIU refused the dump", log_path="/x/dump.log")
    with pytest.raises(MigrationError) as exc:
        run(world, alpha, beta, MigrateConfig(keep_images=True))
    assert exc.value.rolled_back and "img" in alpha.images and "img" in beta.images
    assert "--keep-images" not in str(exc.value) and "images img are kept" in str(exc.value)


def test_the_commands_are_registered() -> None:
    from click.testing import CliRunner

    from orthros_py.cli import cli

    runner = CliRunner()
    out = runner.invoke(cli, ["migrate", "--help"])
    assert out.exit_code == 0 and "--network-lock [xdp|nftables|iptables|skip]" in out.output
    out = runner.invoke(cli, ["hosts", "--help"])
    assert out.exit_code == 0 and "reachable" in out.output


def test_a_lost_restore_answer_with_nothing_restored_rolls_back(world: World) -> None:
    alpha, beta = pair(world)
    beta.fail["restore"] = AgentUnreachable("lost the connection", host="beta")
    with pytest.raises(MigrationError) as exc:
        run(world, alpha, beta)
    assert exc.value.rolled_back and "beta.status" in world.log[world.log.index("beta.restore"):]
    assert "may hold a restored copy" not in str(exc.value)  # beta answered: it holds none
    assert_rolled_back(alpha, beta)


def test_a_destination_that_cannot_honour_the_cgroups_is_refused_before_the_freeze(
        world: World) -> None:
    alpha, beta = pair(world)
    beta.cgroup_problems = ["/lab/alpha/ctr is limited to CPUs 0-1, but cpuset offers only 1"]
    with pytest.raises(CgroupError, match="beta cannot honour the cgroup limits of pid 4242: "
                                          "/lab/alpha/ctr is limited to CPUs 0-1") as info:
        run(world, alpha, beta)
    assert info.value.exit_status == 10
    assert not any(m.endswith(("netlock_lock", "page_server", "dump")) for m in world.log)
    assert 4242 in alpha.running and alpha.clean() and beta.clean()


def own_pid_spaces(alpha: FakeAgent, beta: FakeAgent) -> None:
    """Each host a PID namespace of its own, as machines (and the lab's hosts) have."""
    alpha.pid_ns, beta.pid_ns = 11, 12


def test_a_destination_holding_the_trees_pids_is_refused_before_the_freeze(
        world: World) -> None:
    alpha, beta = pair(world)
    own_pid_spaces(alpha, beta)
    alpha.tree_threads = 3  # 4242, and threads 4243 and 4244
    beta.pids_held = {4243: "kworker/u2:0-flush-254:0", 4244: "sleep"}
    with pytest.raises(PidsInUseError) as info:
        run(world, alpha, beta)
    err = info.value
    assert err.msg == ("beta cannot give pid 4242's tree its PIDs: pid 4243 is held there by "
                       "kworker/u2:0-flush-254:0 (and 1 more); nothing was frozen")
    assert err.exit_status == 10 and err.host == "beta" and err.stage == "prepare"
    assert err.hint is not None and "PID namespace of its own" in err.hint
    assert "beta.pids_asked=[4242, 4243, 4244]" in world.log  # every process and thread id
    # Asked before any lock was loaded or taken, any page server started, anything dumped.
    assert not any(m.endswith(("netlock_prepare", "netlock_lock", "page_server", "dump"))
                   for m in world.log), world.log
    assert 4242 in alpha.running and not alpha.held and alpha.clean() and beta.clean()
    assert f"{SVC}/32" in alpha.addrs and f"{SVC}/32" not in beta.addrs


def test_a_destination_where_the_trees_pids_are_free_takes_it(world: World) -> None:
    alpha, beta = pair(world)
    own_pid_spaces(alpha, beta)
    alpha.tree_threads = 2
    beta.pids_held = {4300: "unrelated"}
    result = run(world, alpha, beta)
    assert result.new_pid == 4242 and 4242 in beta.running
    log = world.log
    assert "beta.pids_asked=[4242, 4243]" in log
    assert log.index("beta.pids_in_use") < log.index("alpha.netlock_lock")
    assert "pid check" in result.timings_ms


@pytest.mark.parametrize("case", ["own pid namespace", "shared pid space", "not said"])
def test_the_pids_are_not_asked_for_where_the_restore_needs_them_not(
        world: World, case: str) -> None:
    """A container (the init of a PID namespace of its own) is restored into a new one; hosts
    of one PID space see the tree itself hold its PIDs (it is killed before the restore); an
    older source agent does not say which PID namespace the tree is in."""
    alpha, beta = pair(world)
    if case != "shared pid space":
        own_pid_spaces(alpha, beta)
    if case == "own pid namespace":
        alpha.tree_pidns = False
    elif case == "not said":
        alpha.tree_pidns = None
    beta.pids_held = {4242: "sleep"}
    result = run(world, alpha, beta)
    assert result.new_pid == 4242
    assert "beta.pids_in_use" not in world.log


def test_an_older_destination_agent_is_not_asked_for_the_pids(world: World) -> None:
    alpha, beta = pair(world)
    own_pid_spaces(alpha, beta)
    status = beta.status

    def old_status() -> dict[str, Any]:
        return {**status(), "ops": ["status", "tree", "dump", "restore"]}

    beta.status = old_status  # type: ignore[method-assign]
    events: list[Event] = []
    result = run(world, alpha, beta, events=events)
    assert result.new_pid == 4242 and "beta.pids_in_use" not in world.log
    assert any("cannot say whether the tree's PIDs are free" in e.message for e in events)


def test_cgroups_go_below_the_destinations_own_root_and_leave_the_source(
        world: World) -> None:
    alpha, beta = pair(world)
    alpha.cgroup_root, beta.cgroup_root = "/lab/alpha", "/lab/beta"
    result = run(world, alpha, beta)
    assert "beta.cgroup_roots={'cpu': '/lab/beta/ctr'}" in world.log
    assert result.to_dict()["cgroups"]["roots"] == {"cpu": "/lab/beta/ctr"}
    log = world.log
    assert log.index("beta.cgroup_check") < log.index("alpha.netlock_lock")
    assert log.index("beta.restore") < log.index("alpha.cgroup_release") \
        < log.index("alpha.remove_image")
    assert "cgroup check" in result.timings_ms


def test_tree_facts_from_an_older_agent_have_the_processes_pids_and_no_pid_namespace() -> None:
    old = {"pid": 7, "processes": [{"pid": 7, "threads": 2}, {"pid": 9}], "conns": []}
    facts = TreeFacts.from_agent(old)
    assert facts.tids == (7, 9) and facts.in_agent_pidns is None
    new = {**old, "processes": [{"pid": 7, "tids": [7, 8]}, {"pid": 9, "tids": [9]}],
           "agent_pidns": False}
    facts = TreeFacts.from_agent(new)
    assert facts.tids == (7, 8, 9) and facts.in_agent_pidns is False
