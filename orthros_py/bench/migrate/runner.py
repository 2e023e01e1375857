"""The migrate benchmark's runner: ``MigrateBench`` builds a lab of two hosts (alpha, beta) and
the client, and for each planned run starts a fresh tree on the host that holds the service
address, bound to it, with its clients on the client host:

- echo: the echo server (``orthros_py.workloads.echo``) and ClientPool's connections, a request
  on every one of them every few ms, every reply checked (``echo_clients``, a process of its
  own);
- nginx: nginx (master and one worker, as root) and wrk (keep-alive, ``--latency``).

Once the clients are warm, either orthros migrates the tree to the other host (the migrate
policy, ``orthros_py.policies.migrate``) or CRIU alone dumps and restores it on its host
(``criu_alone``, run inside the host's namespaces); the clients go on a little, then report.
The tree is killed wherever it is and the next run starts afresh.

Interfaces: the lab (namespaces, its hosts' init to spawn the trees, nsenter), the agents
through the migrate policy, CRIU's RPC inside a host (``criu_alone``), nginx, wrk and the echo
clients (in the client's network namespace), TCP from there, /proc. Needs root. Nothing here
prints: progress goes to a callback, results to files in the output directory. The lab is
torn down at the end, also on Ctrl-C or failure (its teardown kills whatever runs in it).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import psutil

from orthros_py.bench.labkit import keep_agent_logs, recorded, wait_until
from orthros_py.bench.labkit import reason as _reason
from orthros_py.bench.migrate.model import (
    ECHO,
    ORTHROS,
    BenchConfig,
    BenchResults,
    PlannedRun,
    RunRecord,
    WrkReport,
    accept_queue,
    count_established,
    judge,
    parse_wrk,
    plan,
    read_criu_alone,
    read_echo,
    read_migration,
    read_wrk,
)
from orthros_py.bench.migrate.report import notes_for, write_outputs
from orthros_py.errors import MissingFeatureError, NotRootError, OrthrosError

if TYPE_CHECKING:
    from orthros_py.lab import Lab
    from orthros_py.policies.hosts import Host

HOSTS = ("alpha", "beta")
# Where CRIU alone writes its images: a tmpfs, as the agents' scratch roots are.
CRIU_ALONE_ROOT = Path("/dev/shm/orthros-bench-criu-alone")
WARMUP_CLIENTS = 10
Progress = Callable[[str], None]
OnRun = Callable[[RunRecord, int, int], None]

NGINX_CONF = """\
user root;
daemon off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections {conns};
    # Every pending connection at each wake-up: one per loop under load left wrk's last
    # connections unaccepted for seconds (CRIU refuses to dump those).
    multi_accept on;
}}
http {{
    access_log off;
    keepalive_timeout 600s;
    keepalive_requests 1000000000;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen {ip}:{port} backlog=4096;
        location / {{
            root {dir}/www;
        }}
    }}
}}
"""


def default_out() -> Path:
    return Path("results") / f"migrate-{datetime.now():%Y%m%d-%H%M%S}"


def _tool(name: str) -> str:
    exe = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if exe is None:
        raise MissingFeatureError(f"{name} is not installed (the benchmark needs it)",
                                  hint="run scripts/setup.sh")
    return exe


# --- the trees -----------------------------------------------------------------------------------


class Tree:
    """One service tree on a lab host, known by the pid the hosts see (a restore keeps it)."""

    def __init__(self, lab: Lab, on: str, argv: list[str], log: Path, name: str) -> None:
        self.lab, self.name = lab, name
        self.host_pid = lab.spawn(on, argv, log=log, cwd="/").host_pid

    def kill(self) -> list[str]:
        """SIGKILL every copy of it on any host, root and descendants; what it could not."""
        problems = []
        for h in self.lab.hosts:
            mp = self.lab.machine_pid(h, self.host_pid)
            if mp is None:
                continue
            try:
                root = psutil.Process(mp)
                if self.name not in root.name():
                    continue
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            _, alive = psutil.wait_procs(procs, timeout=10)
            problems += [f"{self.name} pid {p.pid} on {h.name} survived SIGKILL" for p in alive]
        return problems


# --- the clients -------------------------------------------------------------------------------


class EchoClients:
    """The echo clients (``echo_clients``) in a process of their own in the client's network
    namespace, so that their Python work never holds the interpreter lock the migration policy
    needs; spoken to in JSON lines on its stdin and stdout."""

    def __init__(self, lab: Lab, address: str, port: int, n: int, *, interval: float,
                 timeout: float, rundir: Path) -> None:
        self.n = n
        argv = [_tool("nsenter"), f"--net={lab.client.netns_path}", "--", sys.executable,
                "-m", "orthros_py.bench.migrate.echo_clients", "--host", address, "--port",
                str(port), "--clients", str(n), "--interval", f"{interval:g}", "--timeout",
                f"{timeout:g}"]
        self.err = rundir / "clients.err"
        with self.err.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, start_new_session=True,
                                         close_fds=True)

    def _said(self, timeout: float) -> dict[str, Any]:
        """The clients' next line, within ``timeout`` s."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            tail = self.err.read_text(errors="replace").strip().splitlines()[-1:] \
                if self.err.exists() else []
            raise OrthrosError("the echo clients said nothing within "
                               f"{timeout:g} s{': ' + tail[0] if tail else ''}",
                               stage="clients")
        said: dict[str, Any] = json.loads(line)
        if said.get("error"):
            raise OrthrosError(f"echo clients: {said['error']}", stage="clients")
        return said

    def _tell(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def ready(self, warm_s: float, timeout: float) -> int:
        n = int(self._said(timeout)["ready"])
        time.sleep(warm_s)
        return n

    def mark(self) -> None:
        """From here on the longest wait counts (the rounds before were the warm-up)."""
        self._tell("mark")
        self._said(10.0)

    def finish(self, rec: RunRecord) -> None:
        self._tell("stop")
        s = self._said(30.0)
        read_echo(rec, requests=int(s["requests"]), errors=int(s["errors"]),
                  max_gap_s=float(s["max_gap_s"]), samples=list(s["samples"]))
        if s.get("slowest"):
            rec.slowest_client = dict(s["slowest"])
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the end of stdin: the clients stop
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Wrk:
    """wrk in the client's network namespace (nsenter --net: no fork, the pid is wrk's), in a
    session of its own so that only we signal it; its report goes to a file."""

    def __init__(self, lab: Lab, address: str, port: int, conns: int, *, threads: int,
                 timeout_s: float, rundir: Path) -> None:
        self.lab, self.address, self.port, self.conns = lab, address, port, conns
        self.out = rundir / "wrk.out"
        argv = [_tool("nsenter"), f"--net={lab.client.netns_path}", "--", _tool("wrk"),
                "-c", str(conns), "-t", str(threads), "-d", "3600s", "--timeout",
                f"{timeout_s:g}s", "--latency", f"http://{address}:{port}/"]
        with self.out.open("wb") as out, (rundir / "wrk.err").open("wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, start_new_session=True, close_fds=True)

    def established(self) -> int:
        def read() -> str:
            return Path("/proc/thread-self/net/tcp").read_text()  # this thread's netns

        return count_established(self.lab.call(self.lab.client, read), self.address,
                                 self.port)

    def ready(self, warm_s: float, timeout: float) -> int:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise OrthrosError(f"wrk exited with {self.proc.returncode}: "
                                   f"{self._err_tail()}", stage="clients")
            return self.established() >= self.conns

        wait_until(up, timeout, f"wrk's {self.conns} connections", every=0.1, stage="clients")
        time.sleep(warm_s)
        return self.established()

    def mark(self) -> None:
        """wrk keeps one Max latency for its whole run: nothing to reset."""

    def finish(self, rec: RunRecord) -> None:
        report = self._stop()
        read_wrk(rec, report)
        if not report.complete:
            rec.error = rec.error or f"wrk printed no report: {self._err_tail()}"

    def _stop(self) -> WrkReport:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)  # wrk prints its report on SIGINT
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return parse_wrk(self.out.read_text(errors="replace"))

    def _err_tail(self) -> str:
        try:
            text = (self.out.parent / "wrk.err").read_text(errors="replace").strip()
        except OSError:
            return ""
        return text.splitlines()[-1] if text else "no message"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


Clients: TypeAlias = EchoClients | Wrk


# --- the benchmark -------------------------------------------------------------------------------


class MigrateBench:
    """Runs the plan; ``run()`` returns the results and has written them to ``config.out``
    (also when it is interrupted: then partial, and marked so)."""

    def __init__(self, config: BenchConfig, *, progress: Progress | None = None,
                 on_run: OnRun | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda _m: None)
        self.on_run = on_run or (lambda _r, _i, _n: None)
        self.seed = config.seed if config.seed is not None else random.randrange(2**31)
        self.results = BenchResults(config, seed=self.seed)
        self.lab: Lab | None = None
        self.hosts: dict[str, Host] = {}
        self.address = ""
        self.cidr = ""

    # -- setup ------------------------------------------------------------------------------

    def preflight(self) -> None:
        if os.geteuid() != 0:
            raise NotRootError("the benchmark needs root (the lab, CRIU)",
                               hint="run it with sudo")
        _tool("nsenter")
        if "nginx" in self.config.workloads:
            _tool("nginx")
            _tool("wrk")

    @contextlib.contextmanager
    def _nofile(self) -> Iterator[None]:
        """Enough descriptors for wrk's connections and the echo clients' (they inherit ours
        through nsenter); the limit is put back afterwards."""
        cfg = self.config
        need = max(cfg.nginx_conns if "nginx" in cfg.workloads else 0, cfg.echo_clients) + 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft >= need:
            yield
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
        except (ValueError, OSError) as err:
            raise OrthrosError(f"cannot raise RLIMIT_NOFILE to {need} for {need - 1024} "
                               f"connections: {err}", stage="bench migrate") from err
        try:
            yield
        finally:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    @contextlib.contextmanager
    def _lab(self) -> Iterator[Lab]:
        from orthros_py.cluster import Cluster
        from orthros_py.lab import Lab, teardown
        from orthros_py.policies.hosts import Host

        teardown()  # whatever an earlier, killed run left
        try:
            self.progress("building the lab (2 hosts and the client)")
            self.lab = Lab.up(len(HOSTS), rebuild=True)
            svc = next((s for s in self.lab.services if all(h in s.hosts for h in HOSTS)),
                       None)
            if svc is None:
                raise OrthrosError("the lab has no service address that alpha and beta may "
                                   "hold", hint="the inventory needs a [[service]] for both")
            self.address, self.cidr = svc.address, svc.interface.with_prefixlen
            cluster = Cluster.of_lab(self.lab)
            self.hosts = {h.name: Host.of(cluster, h.name) for h in self.lab.hosts}
            # Thousands of client connections per run, closed by the client: a wide port
            # range, so that the TIME_WAITs of earlier runs never run it dry.
            self.lab.call(self.lab.client, _wide_ports)
            yield self.lab
        finally:
            keep_agent_logs(self.lab, self.config.out / "logs")
            if self.lab is not None:
                self._look_for_leftovers()
            self.lab = None
            self.progress("tearing the lab down")
            teardown()
            shutil.rmtree(CRIU_ALONE_ROOT, ignore_errors=True)  # each run's went already

    def _environment(self) -> dict[str, Any]:
        env: dict[str, Any] = {"kernel": platform.release(),
                               "cpus": len(os.sched_getaffinity(0)), "address": self.address}
        with contextlib.suppress(OrthrosError, OSError, KeyError):
            criu = self.hosts[HOSTS[0]].agent.status().get("criu")
            env["criu"] = criu.get("version") if isinstance(criu, dict) else criu
        with contextlib.suppress(OSError, subprocess.SubprocessError, MissingFeatureError):
            p = subprocess.run([_tool("nginx"), "-v"], capture_output=True, text=True,
                               timeout=20, check=False)
            env["nginx"] = (p.stderr or p.stdout).strip().replace("nginx version: ", "")
        return env

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> BenchResults:
        self.preflight()
        cfg, res = self.config, self.results
        with recorded(res, cfg.out, notes_for, write_outputs), self._nofile(), self._lab():
            res.env = self._environment()
            items = plan(cfg, self.seed)
            self.progress(f"seed {self.seed}: {len(items)} runs")
            if cfg.warmup:
                for arm in cfg.arms:
                    self.progress(f"warming up: {arm}, echo with {WARMUP_CLIENTS} clients, "
                                  "not recorded")
                    warm = self.run_one(PlannedRun(ECHO, -1, arm), 0, clients=WARMUP_CLIENTS)
                    res.warmup.append(warm)
                    if not warm.ok:
                        self.progress(f"warm-up failed: {warm.error}")
            for i, item in enumerate(items, 1):
                rec = self.run_one(item, i)
                res.runs.append(rec)
                self.on_run(rec, i, len(items))
                self._save()
        return res

    def _save(self) -> None:
        with contextlib.suppress(Exception):
            write_outputs(self.results, self.config.out, plots=False)  # a long run keeps it

    def _home(self) -> str:
        """The host that holds the service address now (a migration moved it)."""
        assert self.lab is not None
        holder = self.lab.holder(self.cidr)
        return holder.name if holder is not None else HOSTS[0]

    def run_one(self, item: PlannedRun, seq: int, *, clients: int | None = None) -> RunRecord:
        assert self.lab is not None
        cfg = self.config
        n = clients or cfg.clients_of(item.workload)
        home = self._home()
        dest = next(h for h in HOSTS if h != home) if item.arm == ORTHROS else home
        rec = RunRecord(item.workload, item.arm, item.rep, seq, home, dest, n)
        name = f"{seq:03d}-{item.workload}-{item.arm}" if seq else f"warmup-{item.arm}"
        rundir = (cfg.out / "runs" / name).resolve()
        rundir.mkdir(parents=True, exist_ok=True)
        # In memory, where orthros's agents keep a migration's images: the ratio then measures
        # orthros's own work, not a disk's (the lab's is slow with small files).
        images = CRIU_ALONE_ROOT / home / f"{name}-{uuid.uuid4().hex[:6]}"
        tree: Tree | None = None
        cl: Clients | None = None
        stage = "service"
        started = time.monotonic()
        try:
            tree = self._start_tree(item.workload, home, rundir)
            stage = "clients"
            cl = self._start_clients(item.workload, n, rundir)
            rec.connected = cl.ready(cfg.warm_s, timeout=60.0)
            self._accepted(home, item.workload)
            cl.mark()
            stage = "migrate" if item.arm == ORTHROS else "criu alone"
            if item.arm == ORTHROS:
                self._migrate(rec, tree, home, dest, name)
            else:
                self._criu_alone(rec, tree, home, images)
            time.sleep(cfg.settle_s)
            stage = "clients"
            cl.finish(rec)
            cl = None
            stage = "after"
            rec.answered_after = self._answers(item.workload)
        except (OrthrosError, OSError, ValueError, subprocess.SubprocessError) as err:
            rec.error = rec.error or _reason(err)
            rec.stage = stage
        finally:
            if cl is not None:
                with contextlib.suppress(Exception):
                    cl.close()
            if tree is not None:
                rec.leftovers += tree.kill()
            self._keep_criu_logs(images, rundir)
            shutil.rmtree(images, ignore_errors=True)
            rec.leftovers += self._address_back()
            rec.wall_s = round(time.monotonic() - started, 2)
        if rec.error is not None and rec.stage is None:
            rec.stage = stage
        judge(rec)
        return rec

    # -- pieces of a run --------------------------------------------------------------------

    def _start_tree(self, workload: str, on: str, rundir: Path) -> Tree:
        assert self.lab is not None
        cfg = self.config
        if workload == ECHO:
            argv = [sys.executable, "-m", "orthros_py.workloads.echo", "--host", self.address,
                    "--port", str(cfg.echo_port)]
            if cfg.echo_ballast_mb:
                argv += ["--ballast-mb", str(cfg.echo_ballast_mb)]
            tree = Tree(self.lab, on, argv, rundir / "echo.out", "python")
        else:
            d = rundir / "nginx"
            (d / "www").mkdir(parents=True, exist_ok=True)
            (d / "tmp").mkdir(exist_ok=True)
            (d / "www" / "index.html").write_text("orthros migrate benchmark\n")
            conns = max(8192, 2 * cfg.nginx_conns + 64)
            (d / "nginx.conf").write_text(NGINX_CONF.format(
                dir=d, ip=self.address, port=cfg.nginx_port, conns=conns, nofile=conns + 64))
            argv = [_tool("nginx"), "-p", f"{d}/", "-c", str(d / "nginx.conf"), "-e",
                    str(d / "error.log")]
            tree = Tree(self.lab, on, argv, d / "nginx.out", "nginx")
        try:
            wait_until(lambda: self._answers(workload), 30, f"{workload} to answer",
                       every=0.05, stage="service")
        except OrthrosError:
            tree.kill()
            raise
        return tree

    def _start_clients(self, workload: str, n: int, rundir: Path) -> Clients:
        assert self.lab is not None
        cfg = self.config
        if workload == ECHO:
            return EchoClients(self.lab, self.address, cfg.echo_port, n,
                               interval=cfg.echo_interval_s, timeout=cfg.client_timeout_s,
                               rundir=rundir)
        return Wrk(self.lab, self.address, cfg.nginx_port, n,
                   threads=min(cfg.wrk_threads, n), timeout_s=cfg.wrk_timeout_s,
                   rundir=rundir)

    def _accepted(self, on: str, workload: str) -> None:
        """Until the service has accepted every connection (CRIU refuses a listener with
        connections in flight)."""
        assert self.lab is not None
        lab, cfg = self.lab, self.config
        port = cfg.echo_port if workload == ECHO else cfg.nginx_port

        def empty() -> bool:
            text = lab.call(on, lambda: Path("/proc/thread-self/net/tcp").read_text())
            return accept_queue(text, self.address, port) == 0

        wait_until(empty, 30, f"{workload} to accept every connection", every=0.05,
                   stage="clients")

    def _answers(self, workload: str) -> bool:
        """A fresh connection from the client host is served (an echo, an HTTP 200)."""
        assert self.lab is not None
        cfg = self.config
        port = cfg.echo_port if workload == ECHO else cfg.nginx_port
        ask = b"ping?" if workload == ECHO else b"GET / HTTP/1.0\r\n\r\n"
        try:
            with self.lab.connect((self.address, port), timeout=2.0) as s:
                s.sendall(ask)
                got = b""
                while len(got) < (len(ask) if workload == ECHO else 12):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    got += chunk
        except OSError:
            return False
        return got.startswith(ask) if workload == ECHO else got.startswith(b"HTTP/1.1 200")

    def _migrate(self, rec: RunRecord, tree: Tree, src: str, dst: str, name: str) -> None:
        from orthros_py.policies.migrate import MigrateConfig, Migration

        cfg = MigrateConfig(service_ip=self.address,
                            criu_log_level=self.config.criu_log_level)
        try:
            result = Migration(tree.host_pid, self.hosts[src], self.hosts[dst], cfg,
                               image=f"bench-{name}-{uuid.uuid4().hex[:6]}").run()
        except Exception as err:  # recorded: the table names what failed
            rec.error, rec.stage = _reason(err), "migrate"
            return
        read_migration(rec, result.to_dict())

    def _criu_alone(self, rec: RunRecord, tree: Tree, on: str, images: Path) -> None:
        assert self.lab is not None
        argv = [sys.executable, "-m", "orthros_py.bench.migrate.criu_alone", "--pid",
                str(tree.host_pid), "--images", str(images), "--log-level",
                str(self.config.criu_log_level)]
        res = self.lab.run(on, argv, timeout=300.0, check=False)
        try:
            data = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            rec.error = (f"CRIU alone printed no result (exit {res.returncode}): "
                         f"{(res.stderr.strip().splitlines() or ['no message'])[-1]}")
            rec.stage = "criu alone"
            return
        read_criu_alone(rec, data)
        if rec.error is not None:
            rec.stage = "criu alone"

    def _keep_criu_logs(self, images: Path, rundir: Path) -> None:
        for log in ("dump.log", "restore.log"):
            with contextlib.suppress(OSError):
                shutil.copyfile(images / log, rundir / f"criu-{log}")

    def _address_back(self) -> list[str]:
        """The service address on exactly one host (a failed migration may have left it on
        none): put on alpha if nobody holds it."""
        assert self.lab is not None
        holders = [h for h in self.lab.hosts if h.link.has(self.cidr)]
        if len(holders) == 1:
            return []
        for h in holders[1:]:
            h.link.remove(self.cidr)
        if not holders:
            alpha = self.lab.host(HOSTS[0]).link
            alpha.add(self.cidr)
            alpha.gratuitous_arp(self.cidr, count=2)
            return [f"the service address was on no host after the run: put back on "
                    f"{HOSTS[0]}"]
        return [f"the service address was on {', '.join(h.name for h in holders)}: kept on "
                f"{holders[0].name}"]

    def _look_for_leftovers(self) -> None:
        """What the agents still hold at the end (stopped trees, images, page servers)."""
        for name, host in self.hosts.items():
            try:
                st = host.agent.status()
            except (OrthrosError, OSError) as err:
                self.results.leftovers.append(f"{name}: status failed: {_reason(err)}")
                continue
            if st.get("held"):
                self.results.leftovers.append(f"{name} holds stopped trees {st['held']}")
            if st.get("images"):
                self.results.leftovers.append(f"{name} keeps images {st['images']}")
            running = [s for s in st.get("page_servers") or [] if s.get("running")]
            if running:
                self.results.leftovers.append(f"{name} runs page servers {running}")


def _wide_ports() -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write("10000 65000\n")
