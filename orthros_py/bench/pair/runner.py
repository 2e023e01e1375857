"""The pair benchmark's runner: ``PairBench`` builds a lab of three hosts (alpha the active,
beta the standby, gamma the witness, and the client), runs redis-server on alpha bound to the
service address and measures, through the pair policy (``orthros_py.policies.pair``):

1. throughput and latency under redis-benchmark (SET, GET, ``-P 1``) on the client host,
   unprotected and paired at each interval with and without output commit, interleaved in
   rounds (each arm once per round, the order shuffled by the seed); one redis serves them all,
   and each paired run starts a pair (its first checkpoint is full) and stops it after;
2. what each checkpoint cost (the active's records: frozen time, pages, bytes), and in a redis
   filled with ``memory_mib`` of values, bytes per checkpoint against memory written;
3. death to serving: the active's agent and redis SIGKILLed and its link taken down at one
   instant; a prober on the client host finds the first correct reply at the service address
   (a fresh redis and pair per death; alpha revived and the address put back after each).

Interfaces: the lab (namespaces, ``nsenter``), redis-server and redis-benchmark, the agents
through the pair policy, rtnetlink for links (pyroute2), the lab's fence, iptables (the output
hold's leftovers). Needs root. Nothing here prints: progress goes to a callback, results to
files in the output directory. The lab is torn down at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import shutil
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orthros_py.bench.labkit import keep_agent_logs, recorded, wait_until
from orthros_py.bench.labkit import reason as _reason
from orthros_py.bench.pair.model import (
    Arm,
    BenchConfig,
    BenchResults,
    DeathRun,
    MemoryRun,
    PlannedRun,
    ThroughputRun,
    death_plan,
    merge_checkpoints,
    parse_info,
    parse_redis_benchmark,
    parse_snmp,
    plan,
    read_reply,
    requests_for,
    resp_command,
)
from orthros_py.bench.pair.report import notes_for, write_outputs
from orthros_py.errors import MissingFeatureError, NotRootError, OrthrosError

if TYPE_CHECKING:
    from orthros_py.lab import Lab
    from orthros_py.policies.hosts import Host

ACTIVE, STANDBY, WITNESS = "alpha", "beta", "gamma"
LAB_HOSTS = 3
CANARY = ("bench:canary", "alive")
PAGE_CHUNK = 4096  # the memory experiment overwrites its region a page per SETRANGE
Progress = Callable[[str], None]


def _tool(name: str) -> str:
    exe = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if exe is None:
        raise MissingFeatureError(f"{name} is not installed (the benchmark needs it)",
                                  hint="run scripts/setup.sh")
    return exe


def default_out() -> Path:
    return Path("results") / f"pair-{datetime.now():%Y%m%d-%H%M%S}"


# --- redis on the lab ----------------------------------------------------------------------------


class RedisClient:
    """One connection to redis made from the lab's client host."""

    def __init__(self, lab: Lab, address: str, port: int, timeout: float = 10.0) -> None:
        self.sock = lab.connect((address, port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def call(self, *words: str | bytes) -> Any:
        self.sock.sendall(resp_command(*words))
        return read_reply(self.file)

    def pipeline(self, commands: list[tuple[str | bytes, ...]]) -> list[Any]:
        self.sock.sendall(b"".join(resp_command(*c) for c in commands))
        return [read_reply(self.file) for _ in commands]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RedisClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisServer:
    """redis-server as a daemon of a lab host, bound to the service address. ``host_pid`` is
    its pid as the hosts see it (a restore on another host keeps it)."""

    def __init__(self, lab: Lab, on: str, address: str, port: int, workdir: Path) -> None:
        self.lab, self.address, self.port = lab, address, port
        workdir = workdir.resolve()  # the host's daemon starts in its own root directory
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [_tool("redis-server"), "--bind", address, "--port", str(port), "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
                "--dir", str(workdir), "--enable-debug-command", "yes"]
        self.host_pid = lab.spawn(on, argv, log=workdir / "redis.log", cwd="/").host_pid

    def answers(self) -> bool:
        try:
            with RedisClient(self.lab, self.address, self.port, timeout=1.0) as c:
                return bool(c.call("PING") == "PONG")
        except (OSError, EOFError, ValueError):
            return False

    def wait_ready(self, timeout: float = 20.0) -> None:
        wait_until(self.answers, timeout, "redis to answer", every=0.05)

    def kill(self) -> list[int]:
        """SIGKILL every copy of it on any host (the original, a restored one); the machine
        pids killed."""
        import psutil

        killed = []
        for h in self.lab.hosts:
            mp = self.lab.machine_pid(h, self.host_pid)
            if mp is None:
                continue
            try:
                p = psutil.Process(mp)
                if "redis-server" not in p.name() or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                os.kill(mp, signal.SIGKILL)
                killed.append(mp)
            except (psutil.Error, ProcessLookupError):
                continue
        for mp in killed:
            with contextlib.suppress(psutil.Error):
                psutil.Process(mp).wait(timeout=5)
        return killed


# --- the client host's writer and prober ---------------------------------------------------------


class Writer:
    """SETs unique keys from the client host on ``n`` connections, remembering when redis
    acknowledged each; reconnects after a reset (and counts it)."""

    def __init__(self, lab: Lab, address: str, port: int, n: int = 2) -> None:
        self.lab, self.addr = lab, (address, port)
        self.acked: dict[str, float] = {}
        self.resets = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                         name=f"bench-writer-{i}") for i in range(n)]
        for t in self.threads:
            t.start()

    def _connect(self) -> tuple[socket.socket, Any]:
        while True:
            try:
                s = self.lab.connect(self.addr, timeout=2.0)
                return s, s.makefile("rb")
            except OSError:
                if self.stop.wait(0.02):
                    raise
                continue

    def _run(self, i: int) -> None:
        seq = 0
        try:
            s, f = self._connect()
        except OSError:
            return
        while not self.stop.is_set():
            seq += 1
            key = f"w:{i}:{seq}"
            try:
                s.sendall(resp_command("SET", key, f"v{seq}"))
                if read_reply(f) != "OK":
                    continue
            except (OSError, EOFError, ValueError):
                with self.lock:
                    self.resets += 1
                with contextlib.suppress(OSError):
                    s.close()
                try:
                    s, f = self._connect()
                except OSError:
                    return
                continue
            with self.lock:
                self.acked[key] = time.time()
        with contextlib.suppress(OSError):
            s.close()

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


class Prober:
    """From the client host, in a tight loop: a new connection to the service address, PING and
    GET of the canary key pipelined; with short timeouts when ``armed_at`` is given (the death),
    else patient ones (output commit holds every reply up to a checkpoint). Remembers every
    answer."""

    CONNECT_TIMEOUT = 0.02  # armed: a connect to a dead host is given up after this
    REPLY_TIMEOUT = 0.5
    PATIENT_TIMEOUT = 3.0

    def __init__(self, lab: Lab, address: str, port: int, *,
                 armed_at: float | None = None) -> None:
        self.lab, self.addr = lab, (address, port)
        self.armed_at = armed_at
        self.pongs: list[tuple[float, float]] = []  # (probe sent, PONG received)
        self.gets: list[float] = []  # canary read back right
        self.after = 0  # probes begun when armed
        self.lock = threading.Lock()
        self.log: list[tuple[float, float, str]] = []  # when armed: (begun, ended, outcome)
        self.stop = threading.Event()
        # Armed, two probers a few ms apart: a probe that waits out its connect timeout does
        # not leave the address unwatched meanwhile.
        self.threads = [threading.Thread(target=self._run, args=(i * self.CONNECT_TIMEOUT / 2,),
                                         daemon=True, name=f"bench-prober-{i}")
                        for i in range(2 if armed_at is not None else 1)]
        for t in self.threads:
            t.start()

    def _run(self, delay: float) -> None:
        if self.stop.wait(delay):
            return
        with self.lab.in_netns(self.lab.client):
            while not self.stop.is_set():
                self._probe()

    def _probe(self) -> None:
        armed = self.armed_at is not None
        t0 = time.time()
        if armed:
            with self.lock:
                self.after += 1
        stage = "connect"
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Closed with a reset: thousands of probes leave no TIME_WAIT behind.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            s.settimeout(self.CONNECT_TIMEOUT if armed else self.PATIENT_TIMEOUT)
            s.connect(self.addr)
            stage = "reply"
            s.settimeout(self.REPLY_TIMEOUT if armed else self.PATIENT_TIMEOUT)
            s.sendall(resp_command("PING") + resp_command("GET", CANARY[0]))
            f = s.makefile("rb")
            if read_reply(f) == "PONG":
                self.pongs.append((t0, time.time()))
                stage = "pong"
                if read_reply(f) == CANARY[1].encode():
                    self.gets.append(time.time())
            f.close()
            self._log(t0, stage)
        except (OSError, EOFError, ValueError) as err:
            self._log(t0, f"{stage}: {type(err).__name__}")
            self.stop.wait(0.002)  # refused at once (no listener yet): do not spin
        finally:
            s.close()

    def _log(self, t0: float, outcome: str) -> None:
        if self.armed_at is not None and len(self.log) < 400:
            self.log.append((t0, time.time(), outcome))
            self.log.sort()

    def log_after(self, t: float | None) -> list[str]:
        """The probes after the death, compressed: runs of one outcome as one line, times in
        ms after ``t``."""
        if t is None:
            return []
        out: list[str] = []
        run_start: tuple[float, float, str] | None = None
        count = 0
        for entry in [*self.log, (0.0, 0.0, "")]:
            if run_start is not None and entry[2] == run_start[2]:
                count += 1
                continue
            if run_start is not None:
                out.append(f"{(run_start[0] - t) * 1000:,.0f} ms: {run_start[2]}"
                           + (f" x{count}" if count > 1 else "")
                           + f" (first ended at {(run_start[1] - t) * 1000:,.0f} ms)")
            run_start, count = entry, 1
        return out

    def first_after(self, t: float) -> tuple[float | None, float | None]:
        """The first PONG and the first right canary of probes sent after ``t``."""
        pong = min((got for sent, got in list(self.pongs) if sent >= t), default=None)
        get = min((g for g in list(self.gets) if g >= (pong or t)), default=None)
        return pong, get

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


class _Poller:
    """Reads a record (the active's) every ``every`` seconds in a thread of its own."""

    def __init__(self, read: Callable[[], dict[str, Any]], every: float) -> None:
        self.read, self.every = read, every
        self.records: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="bench-poller")
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            with contextlib.suppress(OrthrosError, OSError):
                self.records.append(self.read())

    def close(self) -> list[dict[str, Any]]:
        self.stop.set()
        self.thread.join(30)
        return self.records


# --- the benchmark -------------------------------------------------------------------------------


class PairBench:
    """Runs the three parts; ``run()`` returns the results and has written them to
    ``config.out`` (also when it is interrupted: then partial, and marked so)."""

    def __init__(self, config: BenchConfig, *, progress: Progress | None = None,
                 on_run: Callable[[Any, int, int], None] | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda _m: None)
        self.on_run = on_run or (lambda _r, _i, _n: None)
        self.seed = config.seed if config.seed is not None else random.randrange(2**31)
        self.results = BenchResults(config, seed=self.seed)
        self.lab: Lab | None = None
        self.redis: RedisServer | None = None
        self.address = ""
        self.cidr = ""
        self._redis_n = 0

    # -- setup ------------------------------------------------------------------------------

    def preflight(self) -> None:
        if os.geteuid() != 0:
            raise NotRootError("the benchmark needs root (the lab, CRIU, NFQUEUE)",
                               hint="run it with sudo")
        for name in ("redis-server", "redis-benchmark", "nsenter", "iptables"):
            _tool(name)

    @contextlib.contextmanager
    def _lab(self) -> Iterator[Lab]:
        from orthros_py.lab import Lab, teardown

        teardown()  # whatever an earlier, killed run left
        try:
            self.progress(f"building the lab ({LAB_HOSTS} hosts and the client)")
            self.lab = Lab.up(LAB_HOSTS, rebuild=True)
            self._service_of(self.lab)
            yield self.lab
        finally:
            self._keep_logs()
            self.lab = None
            self.progress("tearing the lab down")
            teardown()

    def _keep_logs(self) -> None:
        keep_agent_logs(self.lab, self.config.out / "logs")

    def _diagnose(self, tag: str) -> None:
        """What the hosts look like now (addresses, iptables, the client's neighbours), into
        ``out/logs/diag-TAG.txt``: for a run that failed."""
        from orthros_py.run import run

        if self.lab is None:
            return
        parts = []
        for h in self.lab.all_hosts:
            for argv in (["ip", "-br", "addr"], ["ip", "neigh"], ["iptables-save"]):
                try:
                    out = run(["nsenter", f"--net={h.netns_path}", *argv], timeout=20,
                              check=False)
                    parts.append(f"### {h.name}: {' '.join(argv)}\n{out.stdout}{out.stderr}")
                except (OrthrosError, OSError) as err:
                    parts.append(f"### {h.name}: {' '.join(argv)}: {err}")
        parts.append("### processes in the lab's network namespaces\n" + self._lab_processes())
        with contextlib.suppress(OSError):
            dest = self.config.out / "logs"
            dest.mkdir(parents=True, exist_ok=True)
            (dest / f"diag-{tag}.txt").write_text("\n".join(parts))

    def _lab_processes(self) -> str:
        import psutil

        assert self.lab is not None
        ids = {}
        for h in self.lab.all_hosts:
            with contextlib.suppress(OSError):
                st = os.stat(h.netns_path)
                ids[(st.st_dev, st.st_ino)] = h.name
        lines = []
        for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
            with contextlib.suppress(OSError, psutil.Error):
                st = os.stat(f"/proc/{p.pid}/ns/net")
                host = ids.get((st.st_dev, st.st_ino))
                if host is not None:
                    lines.append(f"{host} {p.pid} {' '.join(p.info['cmdline'] or [])[:160]}")
        return "\n".join(sorted(lines))

    def _service_of(self, lab: Lab) -> None:
        svc = next((s for s in lab.services if ACTIVE in s.hosts and STANDBY in s.hosts), None)
        if svc is None:
            raise OrthrosError("the lab has no service address that alpha and beta may hold",
                               hint="the inventory needs a [[service]] for both")
        self.address, self.cidr = svc.address, svc.interface.with_prefixlen

    def _rebuild_lab(self) -> None:
        """After a death whose cleanup failed: a fresh lab, so the next one starts clean."""
        from orthros_py.lab import Lab, teardown

        self.progress("rebuilding the lab (the last cleanup failed)")
        self.redis = None
        self._keep_logs()
        teardown()
        self.lab = Lab.up(LAB_HOSTS, rebuild=True)

    def _environment(self) -> dict[str, Any]:
        from orthros_py.run import run

        env: dict[str, Any] = {"kernel": platform.release(),
                               "cpus": len(os.sched_getaffinity(0))}
        with contextlib.suppress(OrthrosError, OSError):
            env["redis"] = run([_tool("redis-server"), "--version"]).stdout.strip()
        with contextlib.suppress(OrthrosError, OSError):
            env["redis_benchmark"] = run([_tool("redis-benchmark"), "--version"]
                                         ).stdout.strip()
        with contextlib.suppress(OrthrosError, OSError):
            env["criu"] = self._host(ACTIVE).agent.status().get("criu")
        return env

    # -- the hosts and the pair ----------------------------------------------------------------

    def _hosts(self) -> dict[str, Host]:
        from orthros_py.cluster import Cluster
        from orthros_py.policies.hosts import Host

        assert self.lab is not None
        cluster = Cluster.of_lab(self.lab)
        return {h.name: Host.of(cluster, h.name) for h in self.lab.hosts}

    def _host(self, name: str) -> Host:
        return self._hosts()[name]

    def _pair_start(self, name: str, interval_ms: int, output_commit: bool, *,
                    failover: bool = False) -> dict[str, Any]:
        from orthros_py.policies.pair import PairOptions, start

        assert self.lab is not None and self.redis is not None
        cfg = self.config
        fence = None
        if failover and self.lab.bridge_netns:
            # The lab's own fence (what ``orthros pair start`` gives a lab host): alpha's port
            # on the bridge, set down from outside.
            fence = {"agent": "lab", "netns": self.lab.bridge_netns, "ifname": f"b-{ACTIVE}"}
        opts = PairOptions(name=name, interval=interval_ms / 1000, service_ip=self.address,
                           output_commit=output_commit, failover=failover,
                           heartbeat=cfg.heartbeat_ms / 1000, misses=cfg.misses,
                           witness=WITNESS, fence=fence)
        hosts = self._hosts()
        return start(hosts[ACTIVE], hosts[STANDBY], self.redis.host_pid, opts,
                     others=[hosts[WITNESS]])

    def _active_record(self, name: str) -> dict[str, Any]:
        return self._host(ACTIVE).agent.request("pair_status", {"name": name}, timeout=10.0)

    def _pair_stop(self, name: str) -> list[str]:
        from orthros_py.policies.pair import stop

        return list(stop(list(self._hosts().values()), name)["problems"])

    def _wait_generation(self, name: str, at_least: int, timeout: float = 60.0
                         ) -> dict[str, Any]:
        got: list[dict[str, Any]] = []

        def reached() -> bool:
            got[:] = [self._active_record(name)]
            if got[0].get("state") == "degraded":
                raise OrthrosError(f"pair {name} is degraded: {got[0].get('reason')}")
            return int(got[0].get("generation") or 0) >= at_least

        wait_until(reached, timeout, f"generation {at_least} of pair {name}")
        return got[0]

    def _start_redis(self) -> RedisServer:
        assert self.lab is not None
        if self.redis is not None:
            self.redis.kill()
        self._redis_n += 1
        self.redis = RedisServer(self.lab, ACTIVE, self.address, self.config.port,
                                 self.config.out / "work" / f"redis-{self._redis_n}")
        try:
            self.redis.wait_ready(timeout=10.0)
        except OrthrosError:
            # An output hold rule a pair left sends every reply to a queue nobody reads.
            if not self._leftover_holds("redis did not answer"):
                raise
            self.redis.wait_ready()
        with RedisClient(self.lab, self.address, self.config.port) as c:
            c.call("SET", *CANARY)
        return self.redis

    def _set_link(self, host: str, up: bool) -> None:
        from orthros_py.net.addr import iproute

        assert self.lab is not None
        with iproute(self.lab.host(host).netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0],
                     state="up" if up else "down")

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> BenchResults:
        self.preflight()
        cfg, res = self.config, self.results
        with recorded(res, cfg.out, notes_for, write_outputs), self._lab():
            res.env = self._environment()
            if not cfg.skip_throughput:
                self._throughput()
            if cfg.memory_mib > 0:
                self._memory()
            if not cfg.skip_death and cfg.death_reps > 0:
                self._deaths()
        return res

    def _save(self) -> None:
        with contextlib.suppress(Exception):
            write_outputs(self.results, self.config.out, plots=False)  # a long run keeps it

    # -- 1. throughput and latency -----------------------------------------------------------------

    def _throughput(self) -> None:
        cfg = self.config
        runs = plan(cfg, self.seed)
        self._start_redis()
        self.progress("warming up: one pair at 200 ms (builds the XDP lock once) and one "
                      "redis-benchmark run, neither recorded")
        warm = time.monotonic()
        rec = self._one_throughput(PlannedRun(-1, Arm(200, False)), 0)
        self.results.env["warmup_s"] = round(time.monotonic() - warm, 1)
        if not rec.ok:
            self.progress(f"warm-up failed: {rec.error}")
        for i, item in enumerate(runs, 1):
            rec = self._one_throughput(item, i)
            self.results.throughput.append(rec)
            self.on_run(rec, i, len(runs))
            self._save()

    def _bench_argv(self, requests: int) -> list[str]:
        cfg = self.config
        return ["redis-benchmark", "-h", self.address, "-p", str(cfg.port), "-t", "set,get",
                "-n", str(requests), "-c", str(cfg.clients), "-P", "1", "-r",
                str(cfg.keyspace), "--csv"]

    def _bench_timeout(self, item: PlannedRun, requests: int) -> float:
        iv = item.arm.interval_ms
        if item.arm.output_commit and iv:
            cycles = requests / self.config.clients
            return 120.0 + 2 * 4 * cycles * iv / 1000  # two tests, up to 4 intervals a cycle
        return 120.0 + 2 * requests / 1000  # 1,000 requests/s would be very slow here

    def _one_throughput(self, item: PlannedRun, seq: int) -> ThroughputRun:
        assert self.lab is not None
        arm = item.arm
        requests = requests_for(self.config, arm)
        rec = ThroughputRun(item.round, seq, arm, requests)
        name = f"bench-{seq:03d}-{arm.key.replace('+', '-')}" if arm.paired else None
        started = time.monotonic()
        self.progress(("warm-up" if item.round < 0 else f"[{seq}] round {item.round + 1}")
                      + f": {arm.label}, {requests:,} requests per test")
        poller: _Poller | None = None
        try:
            if self.redis is None or not self.redis.answers():
                self._start_redis()
            started_rec: dict[str, Any] = {}
            first: dict[str, Any] = {}
            if name is not None:
                assert arm.interval_ms is not None
                started_rec = self._pair_start(name, arm.interval_ms, arm.output_commit)
                rec.tracking = started_rec.get("tracking")
                first = self._active_record(name)
                poller = _Poller(lambda: self._active_record(name), 0.5)
            retrans = self._client_retrans()
            t_start = time.time()
            out = self.lab.run(self.lab.client, self._bench_argv(requests),
                               timeout=self._bench_timeout(item, requests))
            t_end = time.time()
            after = self._client_retrans()
            if retrans is not None and after is not None:
                rec.client_retrans = after - retrans
            rec.bench_s = t_end - t_start
            rec.tests = parse_redis_benchmark(out.stdout)
            missing = [t for t in ("SET", "GET") if t not in rec.tests]
            if missing:
                raise OrthrosError(f"redis-benchmark printed no {', '.join(missing)} result: "
                                   f"{out.stdout.strip()[-200:]!r}")
            if name is not None and poller is not None:
                seen = poller.close()
                last = self._active_record(name)
                rec.checkpoints = merge_checkpoints(
                    started_rec.get("checkpoints") or [], first.get("checkpoints") or [],
                    *(r.get("checkpoints") or [] for r in seen), last.get("checkpoints") or [])
                for c in rec.checkpoints:
                    at, dur = c.get("at"), c.get("duration_ms")
                    c["loaded"] = bool(at is not None and dur is not None
                                       and at - dur / 1000 >= t_start and at <= t_end)
                gen_at = [(r.get("generation") or 0) for r in (first, last)]
                rec.generations = max(0, int(gen_at[1]) - int(gen_at[0]))
                rec.output_hold = last.get("output_hold")
                rec.pair_state = last.get("state")
                if last.get("state") != "replicating":
                    raise OrthrosError(f"the pair was {last.get('state')} at the end: "
                                       f"{last.get('reason')}")
            rec.ok = True
        except (OrthrosError, OSError, EOFError, ValueError) as err:
            rec.error = _reason(err)
            self._diagnose(f"run-{seq:03d}")
        finally:
            if poller is not None:
                poller.close()
            if name is not None:
                self._stop_quietly(rec, name)
                if arm.output_commit:
                    self._leftover_holds(f"after pair stop ({arm.label})")
            rec.wall_s = time.monotonic() - started
        return rec

    def _leftover_holds(self, when: str) -> int:
        """Output hold rules (iptables NFQUEUE) left in any host: removed, and recorded."""
        from orthros_py.net import nfqueue

        assert self.lab is not None
        total = 0
        for h in self.lab.hosts:
            try:
                n = nfqueue.flush(h.netns)
            except OrthrosError as err:
                self.results.leftovers.append(f"{when}: cannot read {h.name}'s iptables: "
                                              f"{err.msg}")
                continue
            if n:
                total += n
                again = nfqueue.flush(h.netns)
                self.results.leftovers.append(
                    f"{when}: {n} output hold rule(s) left in {h.name}'s iptables "
                    + ("(removed)" if not again else f"(still {again} after removing them)"))
        return total

    def _client_retrans(self) -> int | None:
        """TCP segments the client host has sent again so far (its RetransSegs)."""
        def read() -> str:
            # thread-self: the namespace of this thread, which call() moved.
            return Path("/proc/thread-self/net/snmp").read_text()

        assert self.lab is not None
        try:
            return parse_snmp(self.lab.call(self.lab.client, read)).get("RetransSegs")
        except (OSError, OrthrosError):
            return None

    def _stop_quietly(self, rec: ThroughputRun, name: str) -> None:
        try:
            problems = self._pair_stop(name)
        except OrthrosError as err:
            problems = [err.msg]
        if problems:
            rec.error = rec.error or f"pair stop: {problems[0]}"
            rec.ok = False

    # -- 2. bytes per checkpoint against memory written -------------------------------------------

    def _memory(self) -> None:
        assert self.lab is not None
        cfg = self.config
        k = cfg.memory_checkpoints
        region_keys = cfg.write_mib  # 1 MiB each
        mem = MemoryRun(cfg.memory_mib, region_keys * 2**20, cfg.memory_interval_ms)
        self.results.memory = mem
        name = "bench-memory"
        paired = False
        self.progress(f"memory: redis filled with {cfg.memory_mib} MiB, paired at "
                      f"{cfg.memory_interval_ms} ms, {cfg.write_mib} MiB written between "
                      "checkpoints")
        try:
            self._start_redis()
            with RedisClient(self.lab, self.address, cfg.port, timeout=120.0) as c:
                value = 256
                c.call("DEBUG", "POPULATE", str(cfg.memory_mib * 2**20 // value), "fill",
                       str(value))
                for i in range(region_keys):
                    c.call("SET", f"region:{i}", bytes(2**20))
                # Filling grew the key table, and redis rehashes it a millisecond per tick
                # (hz 10) for seconds after: ticks 50 times as often for a while, so that this
                # background writing is done before the checkpoints are counted.
                c.call("CONFIG", "SET", "hz", "500")
                time.sleep(3.0)
                c.call("CONFIG", "SET", "hz", "10")
                info = parse_info(c.call("INFO", "memory").decode())
                mem.used_memory = int(info.get("used_memory", 0)) or None
                mem.rss_bytes = int(info.get("used_memory_rss", 0)) or None
                first = self._pair_start(name, cfg.memory_interval_ms, False)
                paired = True
                gen = int(first.get("generation") or 1)
                seen = [first.get("checkpoints") or []]
                # The floor: k checkpoints with nothing written (what redis touches itself).
                rec = self._wait_generation(name, gen + k, timeout=60 + 3 * k)
                seen.append(rec.get("checkpoints") or [])
                idle_gens = set(range(gen + 1, gen + k + 1))
                gen = int(rec["generation"])
                # Then k checkpoints, each after the region was overwritten once in place: the
                # write begins once generation g is committed and must end before g + 1's
                # freeze; one that a freeze cut in two is left out, and so is the generation
                # after it (which holds its tail).
                for n in range(k):
                    chunk = bytes([n % 250 + 1]) * PAGE_CHUNK
                    cmds: list[tuple[str | bytes, ...]] = [
                        ("SETRANGE", f"region:{i}", str(off), chunk)
                        for i in range(region_keys) for off in range(0, 2**20, PAGE_CHUNK)]
                    for at in range(0, len(cmds), 256):
                        c.pipeline(cmds[at:at + 256])
                    done = time.time()
                    rec = self._wait_generation(name, gen + 1, timeout=60)
                    seen.append(rec.get("checkpoints") or [])
                    held = next((x for x in rec.get("checkpoints") or []
                                 if x.get("generation") == gen + 1), None)
                    if held is not None and (held.get("frozen_at") or 0) > done:
                        mem.written.append(held)
                    else:
                        mem.straddled += 1
                        rec = self._wait_generation(name, gen + 2, timeout=60)
                    gen = int(rec["generation"])
            cps = {int(x["generation"]): x for x in merge_checkpoints(*seen)}
            mem.full = cps.get(1)
            mem.idle = [cps[g] for g in sorted(idle_gens) if g in cps]
            mem.ok = mem.full is not None and bool(mem.written)
            if not mem.ok:
                mem.error = "no checkpoint held a whole write"
        except (OrthrosError, OSError, EOFError, ValueError) as err:
            mem.error = _reason(err)
        finally:
            if paired:
                try:
                    problems = self._pair_stop(name)
                except OrthrosError as err:
                    problems = [err.msg]
                if problems:
                    mem.error = mem.error or f"pair stop: {problems[0]}"
            if self.redis is not None:
                self.redis.kill()
                self.redis = None
            self._save()

    # -- 3. death to serving ------------------------------------------------------------------

    def _deaths(self) -> None:
        deaths = death_plan(self.config, self.seed)
        for i, (rep, oc) in enumerate(deaths, 1):
            rec = self._one_death(rep, oc)
            self.results.deaths.append(rec)
            self.on_run(rec, i, len(deaths))
            self._save()

    def _one_death(self, rep: int, oc: bool) -> DeathRun:
        assert self.lab is not None
        cfg = self.config
        rec = DeathRun(rep, oc, cfg.death_interval_ms, cfg.heartbeat_ms, cfg.misses)
        name = f"bench-death-{rep}-{'oc' if oc else 'plain'}"
        self.progress(f"death {rep + 1}/{cfg.death_reps}"
                      + (" with output commit" if oc else " without output commit"))
        writer: Writer | None = None
        prober: Prober | None = None
        paired = killed = False
        try:
            self._start_redis()
            assert self.redis is not None
            self._pair_start(name, cfg.death_interval_ms, oc, failover=True)
            paired = True
            writer = Writer(self.lab, self.address, cfg.port)
            gen = int(self._active_record(name).get("generation") or 1)
            self._wait_generation(name, gen + 3)
            # The service answers a fresh connection and the writer writes (with output
            # commit each answer waits for a commit: patient probes); then that prober goes,
            # so that no probe of it is stuck on alpha when the death comes.
            check = Prober(self.lab, self.address, cfg.port)
            try:
                wait_until(lambda: len(check.pongs) >= 3 and writer.count() > 20, 30,
                           "the prober and the writer to get answers")
            finally:
                check.close()
            # The death (as the e2e tests do it): the link down, then the agent and redis
            # SIGKILLed. Its instant is the link's going down: from then on no packet reaches
            # alpha. The prober with short timeouts starts there, so that none of its probes
            # can have been answered by alpha.
            killed = True
            self._set_link(ACTIVE, False)
            rec.died_at = time.time()
            prober = Prober(self.lab, self.address, cfg.port, armed_at=rec.died_at)
            self.lab.stop_agent(ACTIVE)
            self.redis.kill()
            wait_until(lambda: prober.first_after(rec.died_at or 0)[1] is not None, 30,
                       "the first right answer from the standby")
            rec.first_pong_at, rec.first_get_at = prober.first_after(rec.died_at)
            rec.probes_after = prober.after
            prober.close()
            writer.close()
            self._death_facts(rec, name, writer)
            rec.ok = True
        except (OrthrosError, OSError, EOFError, ValueError) as err:
            rec.error = _reason(err)
            self._diagnose(f"death-{rep + 1}-{'oc' if oc else 'plain'}")
        finally:
            if prober is not None:
                rec.probe_log = prober.log_after(rec.died_at)
            for t in (prober, writer):
                if t is not None:
                    t.close()
            try:
                self._after_death(rec, name, killed, paired)
            except (OrthrosError, OSError, ValueError) as err:
                rec.leftovers.append(f"cleanup failed: {_reason(err)}")
                self._rebuild_lab()
        return rec

    def _death_facts(self, rec: DeathRun, name: str, writer: Writer) -> None:
        """The promotion's event, the witness's grant, and which acknowledged keys survived."""
        from orthros_py.policies.pair import status

        hosts = self._hosts()
        views = status([hosts[STANDBY], hosts[WITNESS]], name)
        ev = [e for e in views[0].events if e.get("what") == "promoted"]
        if not ev:
            raise OrthrosError(f"pair {name}: the standby recorded no promotion "
                               f"(state {views[0].state}: {views[0].reason})")
        rec.promoted = {k: v for k, v in ev[-1].items() if k != "host"}
        grants = [e for e in views[0].events if e.get("what") == "granted a promotion"]
        rec.granted_at = grants[-1].get("at") if grants else None
        died = rec.died_at or 0.0
        frozen = rec.promoted.get("generation_frozen_at")
        before = {k: t for k, t in writer.acked.items() if t < died}
        rec.keys_acked = len(before)
        rec.resets = writer.resets
        if frozen is not None:
            rec.acked_after_freeze = sum(1 for t in before.values() if t > frozen)
        keys = sorted(before)
        missing: set[str] = set()
        assert self.lab is not None
        with RedisClient(self.lab, self.address, self.config.port, timeout=30.0) as c:
            for at in range(0, len(keys), 1000):
                batch = keys[at:at + 1000]
                got = c.pipeline([("GET", k) for k in batch])
                missing |= {k for k, v in zip(batch, got, strict=True) if v is None}
        rec.lost = len(missing)
        if frozen is not None:
            rec.lost_before_freeze = sum(1 for k in missing if before[k] < frozen)

    def _after_death(self, rec: DeathRun, name: str, killed: bool, paired: bool) -> None:
        """alpha back (link, fence port, agent), the pair stopped everywhere, redis gone from
        every host, the service address on alpha alone; what the pair left is recorded."""
        from orthros_py.net.fence import LabFence

        assert self.lab is not None
        lab = self.lab
        if killed:
            self._set_link(ACTIVE, True)
            if lab.bridge_netns:
                LabFence(lab.bridge_netns, f"b-{ACTIVE}").on()
            lab.restart_agent(ACTIVE)
            if paired:
                def settled() -> bool:
                    state = self._active_record(name).get("state")
                    return state not in ("starting", "replicating")

                with contextlib.suppress(OrthrosError):
                    wait_until(settled, 20, "alpha to stand down", every=0.1)
        if paired:
            problems = self._pair_stop(name)
            if problems:
                raise OrthrosError(f"pair stop: {problems[0]}")
        if self.redis is not None:
            self.redis.kill()
            self.redis = None
        before = len(self.results.leftovers)
        when = (f"after pair stop (death {rec.rep + 1}"
                + (" with output commit)" if rec.output_commit else ")"))
        # A removed rule has been seen to come back within a second: look again, twice.
        for look in range(3):
            if look:
                time.sleep(1.0)
            if not self._leftover_holds(when if not look else f"{when}, {look} s later") \
                    and look:
                break
        rec.leftovers += self.results.leftovers[before:]
        for h in lab.hosts:
            if h.name != ACTIVE and h.link.has(self.cidr):
                h.link.remove(self.cidr)
        alpha = lab.host(ACTIVE).link
        if not alpha.has(self.cidr):
            alpha.add(self.cidr)
            alpha.gratuitous_arp(self.cidr, count=2)

