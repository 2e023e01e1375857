"""``orthros pair`` when a checkpoint cannot be taken, on the lab: the standby's images directory
full, CRIU refusing the tree, the standby cut off, the active's agent restarted; and the trees
and configurations ``pair start`` must refuse (a tree holding a userfaultfd, ``--failover``
without a witness).

For a fault during checkpoints what must hold is always the same: the newest committed
generation stays, the service never notices (every client connection carries on, no error),
``orthros pair status NAME --json`` says ``degraded`` and why, and replication resumes once
the fault ends. A refused start leaves nothing on any host.

Each test prints the tail of every agent's log when it fails (pytest shows a failed test's
teardown output) and copies the whole logs to /tmp/orthros-test-logs/test_pair_faults/TEST/.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import WORKLOADS, run_orthros, wait_for
from migrate_kit import (
    SERVICE_IP,
    Service,
    StreamClients,
    answers,
    assert_nothing_left,
    client,
    echo_server,
    set_link,
)
from test_pair import (
    Writer,
    pair_start,
    pair_status,
    pair_stop,
    read_keys,
    start_redis,
    wait_generations,
)

from orthros_py.lab import Lab

pytestmark = pytest.mark.lab(hosts=3)

LOCK_PORT = 7400


# --- what every test shares ---------------------------------------------------------------------

LOGS = Path("/tmp/orthros-test-logs/test_pair_faults")


@pytest.fixture(autouse=True)
def agent_logs(lab: Lab, request: pytest.FixtureRequest) -> Iterator[None]:
    """After the test (before the lab goes): the agents' logs copied to LOGS/TEST (replaced
    at each run of the test), and their tails printed (shown only when the test failed)."""
    yield
    keep = LOGS / request.node.name
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True)
    for h in lab.hosts:
        log = h.agent_log
        if log is None or not log.exists():
            continue
        shutil.copy(log, keep / f"{h.name}.log")
        lines = log.read_text(errors="replace").splitlines()
        print(f"--- {h.name} agent log, last {min(len(lines), 60)} of {len(lines)} lines "
              f"(all of it in {keep / (h.name + '.log')}) ---")
        print("\n".join(lines[-60:]))


def agent_record(lab: Lab, on: str, name: str) -> dict[str, Any]:
    """What ``on``'s agent itself says of pair ``name`` (its role's record)."""
    rec: dict[str, Any] = client(lab, on).request("pair_status", {"name": name})
    return rec


def wait_state(name: str, state: str, timeout: float = 60.0) -> dict[str, Any]:
    """``orthros pair status NAME --json`` once it says ``state``."""
    seen: list[dict[str, Any]] = []

    def there() -> bool:
        seen[:] = [pair_status(name)]
        return bool(seen[0]["state"] == state)

    try:
        wait_for(there, timeout=timeout, what=f"pair {name} to be {state}")
    except AssertionError as err:
        raise AssertionError(f"{err}; last status: {seen[-1] if seen else None}") from err
    return seen[0]


def wait_resumed(name: str, past: int, timeout: float = 60.0) -> dict[str, Any]:
    """Replication resumed: the pair replicates again and commits generations beyond
    ``past`` (two, so that one is surely taken after the fault)."""
    seen: list[dict[str, Any]] = []

    def resumed() -> bool:
        seen[:] = [pair_status(name)]
        return bool(seen[0]["state"] == "replicating" and seen[0]["generation"] >= past + 2)

    try:
        wait_for(resumed, timeout=timeout, what=f"pair {name} to replicate past {past}")
    except AssertionError as err:
        raise AssertionError(f"{err}; last status: {seen[-1] if seen else None}") from err
    return seen[0]


def hold_still(name: str, generation_then: int, seconds: float) -> None:
    """While the fault lasts (``seconds``, many checkpoint intervals: every one of them tries
    and fails), the pair stays degraded and its newest committed generation stays."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        view = pair_status(name)
        assert view["state"] == "degraded", view
        assert view["generation"] == generation_then, (
            f"generation {view['generation']} was committed during the fault "
            f"(it stood at {generation_then})")
        time.sleep(0.2)


def acked_per_conn(writer: Writer, since: float, until: float | None = None) -> dict[int, int]:
    """Keys acknowledged on each of the writer's connections between ``since`` and ``until``."""
    out = {i: 0 for i in writer.resets}
    with writer.lock:
        for key, (_, at) in writer.acked.items():
            if at >= since and (until is None or at <= until):
                out[int(key.split(":")[1])] += 1
    return out


def wait_every_conn_writes(writer: Writer, since: float, n: int = 20,
                           timeout: float = 30.0) -> None:
    """Every connection of the writer got ``n`` more keys acknowledged since ``since``."""
    wait_for(lambda: all(c >= n for c in acked_per_conn(writer, since).values())
             or bool(writer.errors), timeout=timeout,
             what=f"every writer connection to get {n} keys acknowledged")
    if writer.errors:
        raise AssertionError(f"the writer's connections failed: {writer.errors}")


def assert_every_key_kept(lab: Lab, writer: Writer) -> None:
    """Each acknowledged key holds its value: the service never went back or restarted."""
    keys = sorted(writer.acked)
    stored = read_keys(lab, keys)
    wrong = [k for k in keys if stored[k] != writer.acked[k][0]]
    assert keys and not wrong, f"{len(wrong)} of {len(keys)} keys lost, e.g. {wrong[:3]}"


def stop_quietly(name: str | None) -> None:
    """``pair stop`` in a finally: whatever the test left (it may have stopped it already)."""
    if name is not None:
        run_orthros("pair", "stop", name)


def in_host(lab: Lab, on: str, *argv: str, check: bool = True, timeout: float = 60.0) -> str:
    return lab.run(on, list(argv), check=check, timeout=timeout).stdout


# --- the standby's images directory full -------------------------------------------------------

@contextlib.contextmanager
def small_images_fs(lab: Lab, on: str, size: str) -> Iterator[Path]:
    """``on``'s images root on a tmpfs of ``size`` of its own, mounted inside the host (its
    mount namespace is private: nothing else on the machine sees it). The agent is started
    again on it, so that it keeps all it writes there; unmounted at the end."""
    root = lab.host(on).images_root
    assert root is not None
    lab.stop_agent(on)
    in_host(lab, on, "mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
            "orthros-test-full", str(root))
    try:
        lab.restart_agent(on)
        yield root
    finally:
        # The agent first: nothing of it may keep the filesystem busy.
        lab.stop_agent(on)
        in_host(lab, on, "umount", str(root), check=False)
        if mounted_tmpfs(lab, on, root):
            in_host(lab, on, "umount", "-l", str(root), check=False)
        lab.restart_agent(on)


def mounted_tmpfs(lab: Lab, on: str, root: Path) -> bool:
    out = in_host(lab, on, "findmnt", "-n", "-o", "FSTYPE", str(root), check=False)
    return out.strip() == "tmpfs"


def fill(lab: Lab, on: str, path: Path) -> None:
    """Zeros into ``path`` until its filesystem is full (dd ends with ENOSPC)."""
    res = lab.run(on, ["dd", "if=/dev/zero", f"of={path}", "bs=1M"], check=False,
                  timeout=120)
    assert "No space left" in res.stderr, res.stderr
    avail = in_host(lab, on, "df", "--output=avail", "-B1", str(path.parent)).split()[-1]
    assert int(avail) < 64 * 1024, f"{avail} bytes still free after the fill"


def test_the_standbys_images_directory_full(lab: Lab, tmp_path: Path) -> None:
    name = None
    with small_images_fs(lab, "beta", "256m") as root:
        assert mounted_tmpfs(lab, "beta", root)
        svc = start_redis(lab, tmp_path)
        writer = Writer(lab, 2)
        try:
            wait_every_conn_writes(writer, 0.0, n=100)
            rec = pair_start(svc.pid, "--interval", "100ms")
            name = rec["config"]["name"]
            wait_generations(name, 3)
            standby_files = in_host(lab, "beta", "find", str(root), "-maxdepth", "1")
            assert f"{name}.committed" in standby_files  # the generations are on the tmpfs

            fault = time.time()
            fill(lab, "beta", root / "filler")
            degraded = wait_state(name, "degraded")
            stuck = int(degraded["generation"])
            # Space a failed checkpoint freed (its begun generation is removed at the next
            # one) is taken too, so that the fault is real for as long as it lasts.
            fill(lab, "beta", root / "filler2")
            wait_every_conn_writes(writer, fault)
            hold_still(name, stuck, 2.0)
            during = pair_status(name)
            # Where the cause shows on the standby, if anywhere: the failed generation's page
            # server log (removed with it at the next attempt; best effort, for the report).
            evidence = in_host(lab, "beta", "grep", "-rhs", "-m", "2", "No space left", str(root),
                               "--include=*.log", check=False).strip()
            standby = agent_record(lab, "beta", name)
            assert standby["newest"]["generation"] == stuck, standby["newest"]
            assert [g["generation"] for g in standby["generations"]][-1] == stuck

            ended = time.time()
            in_host(lab, "beta", "rm", "-f", str(root / "filler"), str(root / "filler2"))
            resumed = wait_resumed(name, stuck)
            wait_every_conn_writes(writer, ended)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                if name is not None:
                    pair_stop(name)
                    name = None
        assert writer.errors == [], writer.errors
        assert all(n == 0 for n in writer.resets.values()), writer.resets
        assert_every_key_kept(lab, writer)
        assert resumed["reason"] is None, resumed
        left = in_host(lab, "beta", "find", str(root), "-mindepth", "1", "-not", "-path",
                       f"{root}/.page-channel*").split()
        assert left == [], f"left on beta's images directory after pair stop: {left}"
        assert_nothing_left(lab, holder="alpha", service=svc)
        # Last, so that a reason that fails to say why does not hide the rest.
        reason = str(during["reason"])
        print(f"disk full: generation {stuck} kept, replication resumed at "
              f"{resumed['generation']}; reason {reason!r}; the standby's page server said "
              f"{evidence or 'nothing we could find'!r}")
        assert "No space left" in reason or "ENOSPC" in reason, (
            f"the degraded pair's reason does not say the standby's disk is full: {reason!r}")


# --- CRIU refusing the tree -----------------------------------------------------------------------

def lock_server(lab: Lab, tmp_path: Path) -> tuple[Service, Path]:
    log = tmp_path / "lock_echo.out"
    svc = Service(lab, "alpha", [sys.executable, str(WORKLOADS / "lock_echo.py"), SERVICE_IP,
                                 str(LOCK_PORT), str(tmp_path / "service.lock")], log=log)
    wait_for(lambda: answers(lab, LOCK_PORT), timeout=20, what="the lock server to answer")
    return svc, log


def wait_clients_talk(lab: Lab, clients: StreamClients, since: list[int], what: str) -> None:
    """Every client connection got 100 more bytes echoed since ``since``; if not, which ones
    stalled and what the server's host says of them (locks, sockets)."""
    try:
        wait_for(lambda: not clients.stalled(since, min_bytes=100), timeout=30,
                 what=f"every client to talk {what}")
    except AssertionError as err:
        from orthros_py.netlock.xdp import XdpNetLock

        xdp = XdpNetLock()
        try:
            locked = [str(lc.conn) for lc in xdp.locked()]
        finally:
            xdp.close()
        sockets = in_host(lab, "alpha", "ss", "-tni", f"sport = :{LOCK_PORT}", check=False)
        raise AssertionError(
            f"{err}: stalled {clients.stalled(since, min_bytes=100)}, errors {clients.errors}, "
            f"unanswered {clients.unanswered()}; XDP-locked connections {locked}; the "
            f"server's sockets:\n{sockets}") from err


def locked_share(port: int, seconds: float) -> tuple[int, int]:
    """Sampled over ``seconds``: (samples in which a connection of the service on ``port`` was
    locked by the XDP lock, that is, its packets dropped; samples). For the record."""
    from orthros_py.netlock.xdp import XdpNetLock

    xdp = XdpNetLock()
    hits = n = 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            n += 1
            hits += any(lc.conn.local_port == port for lc in xdp.locked())
            time.sleep(0.005)
    finally:
        xdp.close()
    return hits, n


def said(log: Path, line: str) -> int:
    return log.read_text().splitlines().count(line) if log.exists() else 0


def test_criu_refusing_a_checkpoint(lab: Lab, tmp_path: Path) -> None:
    svc, out = lock_server(lab, tmp_path)
    clients = StreamClients(lab, LOCK_PORT, 8)
    name = None
    try:
        wait_for(lambda: not clients.stalled([0] * 8, min_bytes=200), what="the clients to talk")
        rec = pair_start(svc.pid, "--interval", "100ms")
        name = rec["config"]["name"]
        wait_generations(name, 3)

        pid = svc.machine_pid()
        assert pid is not None
        svc.kill(signal.SIGUSR1)
        wait_for(lambda: said(out, "locked") == 1, what="the server to take its lock")
        degraded = wait_state(name, "degraded")
        stuck = int(degraded["generation"])
        before = clients.snapshot()
        locked, samples = locked_share(LOCK_PORT, 2.0)
        print(f"file lock: while checkpoints fail, the service's connections were locked in "
              f"{locked} of {samples} samples")
        hold_still(name, stuck, 1.0)
        during = pair_status(name)
        wait_clients_talk(lab, clients, before, "while checkpoints fail")
        assert clients.broken(before) == [], clients.errors
        assert answers(lab, LOCK_PORT)  # a new connection too

        svc.kill(signal.SIGUSR2)
        wait_for(lambda: said(out, "unlocked") == 1, what="the server to let its lock go")
        resumed = wait_resumed(name, stuck)
        after = clients.snapshot()
        wait_clients_talk(lab, clients, after, "after the fault")
    finally:
        unanswered = clients.drain()
        clients.close()
        stop_quietly(name)
    assert clients.errors == [], clients.errors
    assert unanswered == {}, unanswered
    assert resumed["reason"] is None, resumed
    assert svc.machine_pid() == pid  # the same process served throughout
    assert_nothing_left(lab, holder="alpha", service=svc)
    reason = str(during["reason"])
    print(f"file lock: generation {stuck} kept, resumed at {resumed['generation']}; "
          f"reason {reason!r}")
    assert "--file-locks" in reason, f"the reason does not name CRIU's --file-locks: {reason!r}"
    assert "lock" in reason.lower()


# --- the standby cut off by its link -------------------------------------------------------------

def frozen(pid: int) -> bool:
    """Whether ``pid`` is held by a tracer: CRIU seized it for a checkpoint (its parasite runs
    in it meanwhile, so its state alone does not tell) and has not let it go yet."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1]) != 0
    except OSError:
        pass
    return False


def served_while_cut_off(lab: Lab, writer: Writer, fault: float, pid: int, name: str) -> None:
    """While the standby is still cut off: every writer connection is served, and the active
    says the pair is degraded (its own word: the controller cannot reach beta either)."""
    def where() -> str:
        return (f"{time.time() - fault:.0f} s after the cut the tree is "
                f"{'still held by a checkpoint' if frozen(pid) else 'free'} and the active "
                f"says {agent_record(lab, 'alpha', name)['state']!r}")

    try:
        wait_every_conn_writes(writer, fault, timeout=45)
    except AssertionError as err:
        raise AssertionError(f"the service stalled while the standby was cut off: {err}; "
                             f"{where()}") from err
    try:
        wait_for(lambda: agent_record(lab, "alpha", name)["state"] == "degraded",
                 timeout=60, what="the active to see the pair degraded while beta is away")
    except AssertionError as err:
        raise AssertionError(f"{err}: {where()}") from err


def test_the_standby_unreachable_by_its_link(lab: Lab, tmp_path: Path) -> None:
    svc = start_redis(lab, tmp_path)
    writer = Writer(lab, 2)
    name = None
    try:
        wait_every_conn_writes(writer, 0.0, n=100)
        rec = pair_start(svc.pid, "--interval", "100ms")
        name = rec["config"]["name"]
        wait_generations(name, 3)
        pid = svc.machine_pid()
        assert pid is not None

        fault = time.time()
        set_link(lab, "beta", False)
        try:
            served_while_cut_off(lab, writer, fault, pid, name)
            during = pair_status(name)
            stuck = int(agent_record(lab, "alpha", name)["generation"])
            time.sleep(2.0)  # the fault lasts a little longer (a scenario's timing, no check)
            alpha = agent_record(lab, "alpha", name)
            assert alpha["state"] == "degraded" and alpha["generation"] == stuck, alpha
        finally:
            set_link(lab, "beta", True)
        ended = time.time()
        resumed = wait_resumed(name, stuck)
        wait_every_conn_writes(writer, ended)
    finally:
        writer.close()
        stop_quietly(name)
    assert writer.errors == [], writer.errors
    assert all(n == 0 for n in writer.resets.values()), writer.resets
    assert_every_key_kept(lab, writer)
    print(f"link down: generation {stuck} kept, resumed at {resumed['generation']}; "
          f"reason {during['reason']!r}")
    assert during["state"] == "degraded" and during["reason"], during
    assert "beta" in str(during["reason"]) or "standby" in str(during["reason"]), during
    assert resumed["reason"] is None, resumed
    assert_nothing_left(lab, holder="alpha", service=svc)


def cut_at_a_freeze(lab: Lab, pid: int, on: str, timeout: float = 30.0) -> None:
    """Take ``on``'s link down the moment a checkpoint seizes the tree of ``pid``: its memory
    and CRIU's closing handshake with the page server are still to cross."""
    deadline = time.monotonic() + timeout
    while frozen(pid):  # the end of a freeze under way: the next one is cut at its start
        assert time.monotonic() < deadline, "the tree stays frozen"
    while not frozen(pid):
        assert time.monotonic() < deadline, "no checkpoint froze the tree"
    set_link(lab, on, False)


def test_the_standby_cut_off_in_the_middle_of_a_checkpoint(lab: Lab, tmp_path: Path) -> None:
    """The link fails just as a checkpoint seizes the tree (the worst moment): the checkpoint
    must fail and let the tree go, not hold the service for as long as the standby is away."""
    svc = start_redis(lab, tmp_path)
    writer = Writer(lab, 2)
    name = None
    try:
        wait_every_conn_writes(writer, 0.0, n=100)
        rec = pair_start(svc.pid, "--interval", "100ms")
        name = rec["config"]["name"]
        wait_generations(name, 3)
        pid = svc.machine_pid()
        assert pid is not None

        fault = time.time()
        cut_at_a_freeze(lab, pid, "beta")
        try:
            served_while_cut_off(lab, writer, fault, pid, name)
            alpha = agent_record(lab, "alpha", name)
            stuck = int(alpha["generation"])
            failed = [e for e in alpha["events"] if e["what"] == "checkpoint failed"]
        finally:
            set_link(lab, "beta", True)
        ended = time.time()
        resumed = wait_resumed(name, stuck)
        wait_every_conn_writes(writer, ended)
    finally:
        writer.close()
        stop_quietly(name)
    assert writer.errors == [], writer.errors
    assert all(n == 0 for n in writer.resets.values()), writer.resets
    assert_every_key_kept(lab, writer)
    assert resumed["reason"] is None, resumed
    print(f"cut at a freeze: the checkpoint failed with "
          f"{failed[0]['reason'] if failed else None!r}")
    assert_nothing_left(lab, holder="alpha", service=svc)


# --- the active's agent restarts ------------------------------------------------------------------

def hold_rules(lab: Lab) -> list[str]:
    return [ln for ln in in_host(lab, "alpha", "iptables-save").splitlines()
            if "orthros-hold" in ln and ln.startswith("-A")]


def collect_checkpoints(lab: Lab, name: str, seen: dict[int, dict[str, Any]]
                        ) -> Callable[[], bool]:
    """A condition for wait_for that gathers every checkpoint the active reports (it keeps the
    newest ten) into ``seen`` by generation."""
    def poll() -> bool:
        with contextlib.suppress(Exception):
            for c in agent_record(lab, "alpha", name).get("checkpoints") or []:
                seen.setdefault(int(c["generation"]), c)
        return False

    return poll


def test_the_actives_agent_restarts_while_healthy(lab: Lab, tmp_path: Path) -> None:
    svc = start_redis(lab, tmp_path)
    writer = Writer(lab, 2)
    name = None
    try:
        wait_every_conn_writes(writer, 0.0, n=100)
        # Detection (500 ms x 20 = 10 s) longer than the agent's restart: a restart is not
        # a death, and the standby must not take over meanwhile.
        rec = pair_start(svc.pid, "--failover", "--output-commit", "--interval", "100ms",
                         "--heartbeat", "500ms", "--misses", "20")
        name = rec["config"]["name"]
        wait_generations(name, 3)
        assert len(hold_rules(lab)) == 1, hold_rules(lab)
        before = agent_record(lab, "alpha", name)
        assert str(before["tracking"]).startswith("incremental"), before["tracking"]
        tree_pid = svc.machine_pid()

        lab.stop_agent("alpha")
        restart = time.time()
        last_before = int(before["generation"])
        lab.restart_agent("alpha")
        seen: dict[int, dict[str, Any]] = {}
        poll = collect_checkpoints(lab, name, seen)
        wait_for(lambda: (poll() or len(seen) >= 4), timeout=60,
                 what="four checkpoints after the agent's restart")
        resumed = wait_resumed(name, last_before)
        wait_every_conn_writes(writer, restart)
        rules = hold_rules(lab)
        after = agent_record(lab, "alpha", name)
        standby = agent_record(lab, "beta", name)
    finally:
        writer.close()
        stop_quietly(name)
    assert writer.errors == [], writer.errors
    assert all(n == 0 for n in writer.resets.values()), writer.resets
    assert_every_key_kept(lab, writer)
    assert svc.machine_pid() == tree_pid  # the service itself never stopped
    assert standby["state"] != "failed over" and standby["epoch"] == before["epoch"], standby
    assert resumed["serving"] == "alpha", resumed
    assert any(e["what"] == "agent restarted" for e in after["events"]), after["events"]
    assert after["output_hold"] is not None, after
    assert len(rules) == 1, f"output hold rules on alpha after the restart: {rules}"
    gens = sorted(seen)
    first = seen[gens[0]]
    print(f"agent restart: last generation before {last_before}; after: "
          + ", ".join(f"{g} {'full' if seen[g]['full'] else 'incremental'}" for g in gens)
          + f"; hold rules {rules}")
    assert first["full"] is True, f"the first checkpoint after the restart: {first}"
    later = [seen[g] for g in gens[1:]]
    assert later and all(c["full"] is False for c in later), later
    assert_nothing_left(lab, holder="alpha", service=svc)


# --- trees and configurations pair start refuses --------------------------------------------------

def nothing_of_the_pair(lab: Lab, name: str) -> None:
    """No host takes part in ``name``, keeps a record, a generation or a rule of it."""
    res = run_orthros("pair", "status", name, "--json")
    assert res.returncode != 0 and "no host" in res.stderr, (res.returncode, res.stderr)
    listed = run_orthros("pair", "status", "--json")
    assert listed.returncode == 0 and listed.stdout.strip() in ("[]", ""), listed.stdout
    for h in lab.hosts:
        assert client(lab, h.name).request("pair_list")["pairs"] == [], h.name
        assert h.images_root is not None
        named = in_host(lab, h.name, "find", str(h.images_root), "-name", f"{name}*").split()
        mention = in_host(lab, h.name, "grep", "-rlF", name, str(h.images_root),
                          check=False).split()
        assert named == [] and mention == [], f"{h.name} keeps {named + mention}"
        rules = in_host(lab, h.name, "iptables-save")
        assert "orthros" not in rules, f"{h.name} has orthros's rules: {rules}"


def test_a_tree_that_uses_userfaultfd_itself_is_refused(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "uffd.out"
    svc = Service(lab, "alpha", [sys.executable, str(WORKLOADS / "uffd_holder.py")], log=out)
    wait_for(lambda: out.exists() and out.read_text().startswith("ready"),
             what="the workload to hold its userfaultfd")
    res = run_orthros("pair", "start", str(svc.pid), "--from", "alpha", "--to", "beta",
                      "--witness", "gamma", "--name", "uffd-tree", "--interval", "100ms",
                      timeout=180)
    try:
        assert res.returncode != 0, res.stdout
        text = " ".join(res.stderr.split())
        assert "userfaultfd" in text, res.stderr
        print(f"refused (exit {res.returncode}): {text}")
        errors = [ln for ln in res.stderr.splitlines() if "userfaultfd" in ln]
        assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
        assert svc.alive()  # refused, not harmed
        nothing_of_the_pair(lab, "uffd-tree")
        assert_nothing_left(lab, holder="alpha", service=svc)
    finally:
        if res.returncode == 0:
            stop_quietly("uffd-tree")


@pytest.mark.lab(hosts=2)
def test_failover_without_a_witness_is_refused(lab: Lab) -> None:
    svc = echo_server(lab, "alpha", 7000)
    res = run_orthros("pair", "start", str(svc.pid), "--from", "alpha", "--to", "beta",
                      "--name", "no-witness", "--failover", timeout=180)
    try:
        assert res.returncode == 2, (res.returncode, res.stderr)
        text = " ".join(res.stderr.split())
        assert "--failover needs a witness" in text, res.stderr
        print(f"refused (exit {res.returncode}): {text}")
        assert "--witness" in text, res.stderr  # and how to name one
        assert "Traceback" not in res.stderr
        nothing_of_the_pair(lab, "no-witness")
        assert_nothing_left(lab, holder="alpha", service=svc)
    finally:
        if res.returncode == 0:
            stop_quietly("no-witness")
