"""The lazy benchmark's runner: ``LazyBench`` builds a lab of two hosts (alpha, beta; three with
gamma the witness when the paging standby's part runs too, ``standby``) and the client, and
for each size starts the memory workload (``orthros_py.workloads.memhog``) bound to
the service address on the host holding it, a PING client on the client host whose connection
migrates with it, and migrates it back and forth with the migrate policy
(``orthros_py.policies.migrate``): every method once per round, in a shuffled order. After each
migration the workload's VERIFY must find every page right.

Interfaces: the lab (namespaces, its hosts' init to spawn the workload), the agents through the
migrate policy, TCP to the workload from the client's namespace. Needs root. Nothing here
prints: progress goes to a callback, results to files in the output directory. The lab is torn
down at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orthros_py.bench.labkit import keep_agent_logs, recorded
from orthros_py.bench.labkit import reason as _reason
from orthros_py.bench.lazy.model import (
    EAGER,
    BenchConfig,
    BenchResults,
    MigrationRun,
    PlannedRun,
    config_for,
    judge,
    notes_for,
    plan,
    read_client,
    read_result,
    write_outputs,
)
from orthros_py.bench.lazy.paging import FailoverRun, PagingMemoryRun
from orthros_py.errors import NotRootError, OrthrosError
from orthros_py.workloads.memhog import MemClient, MemConn, wait_ready

if TYPE_CHECKING:
    from orthros_py.lab import Lab
    from orthros_py.policies.hosts import Host

HOSTS = ("alpha", "beta")
Progress = Callable[[str], None]


def default_out() -> Path:
    return Path("results") / f"lazy-{datetime.now():%Y%m%d-%H%M%S}"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def migrate_options(method: str) -> dict[str, Any]:
    """``method``'s MigrateConfig fields. A field this orthros's MigrateConfig lacks is left
    out when it asks for the default (eager runs before the lazy fields exist), and refused
    when it does not."""
    import dataclasses

    from orthros_py.policies.migrate import MigrateConfig

    known = {f.name for f in dataclasses.fields(MigrateConfig)}
    missing = [k for k, v in config_for(method).items() if k not in known and v]
    if missing:
        raise OrthrosError(f"this orthros's MigrateConfig has no {', '.join(missing)}: "
                           f"{method} cannot run", stage="bench lazy")
    return {k: v for k, v in config_for(method).items() if k in known}


class Workload:
    """One memhog on the lab, known by the pid the hosts see (a restore keeps it)."""

    def __init__(self, lab: Lab, on: str, argv: list[str], log: Path) -> None:
        self.lab = lab
        self.host_pid = lab.spawn(on, argv, log=log, cwd="/").host_pid
        self.log = log

    def where(self) -> str | None:
        """The host it runs on (not a stopped copy), or None."""
        import psutil

        for h in self.lab.hosts:
            mp = self.lab.machine_pid(h, self.host_pid)
            if mp is None:
                continue
            with contextlib.suppress(psutil.Error):
                if psutil.Process(mp).status() not in (psutil.STATUS_ZOMBIE,
                                                       psutil.STATUS_STOPPED):
                    return h.name
        return None

    def wait_ready(self, timeout: float) -> None:
        pid, _ = wait_ready(self.log, timeout, alive=lambda: self.where() is not None)
        if pid != self.host_pid:
            raise OrthrosError(f"the workload says it is pid {pid}, the host knows it as "
                               f"{self.host_pid}")

    def kill(self) -> None:
        """SIGKILL every copy of it on any host."""
        import psutil

        for h in self.lab.hosts:
            mp = self.lab.machine_pid(h, self.host_pid)
            if mp is None:
                continue
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if "python" in psutil.Process(mp).name():
                    os.kill(mp, signal.SIGKILL)
                    psutil.Process(mp).wait(timeout=10)


class LazyBench:
    """Runs the migrations; ``run()`` returns the results and has written them to
    ``config.out`` (also when it is interrupted: then partial, and marked so)."""

    def __init__(self, config: BenchConfig, *, progress: Progress | None = None,
                 on_run: Callable[[MigrationRun, int, int], None] | None = None,
                 on_paging: Callable[[PagingMemoryRun | FailoverRun, int, int], None]
                 | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda _m: None)
        self.on_run = on_run or (lambda _r, _i, _n: None)
        self.on_paging = on_paging or (lambda _r, _i, _n: None)
        self.seed = config.seed if config.seed is not None else random.randrange(2**31)
        self.results = BenchResults(config, seed=self.seed)
        self.lab: Lab | None = None
        self.address = ""
        self.cidr = ""

    # -- setup ------------------------------------------------------------------------------

    def preflight(self) -> None:
        if os.geteuid() != 0:
            raise NotRootError("the benchmark needs root (the lab, CRIU)",
                               hint="run it with sudo")
        for m in self.config.methods:
            config_for(m)
        if not (self.config.migrations or self.config.paging):
            raise OrthrosError("nothing to run: both the migrations and the paging standby's "
                               "part are skipped", stage="bench lazy")

    @property
    def n_hosts(self) -> int:
        """Two hosts for migrations; a third, the witness, for the paging pairs."""
        return 3 if self.config.paging else len(HOSTS)

    @contextlib.contextmanager
    def _lab(self) -> Iterator[Lab]:
        from orthros_py.lab import Lab, teardown

        teardown()  # whatever an earlier, killed run left
        try:
            self.progress(f"building the lab ({self.n_hosts} hosts and the client)")
            self.lab = Lab.up(self.n_hosts, rebuild=True)
            svc = next((s for s in self.lab.services
                        if all(h in s.hosts for h in HOSTS)), None)
            if svc is None:
                raise OrthrosError("the lab has no service address that alpha and beta may "
                                   "hold", hint="the inventory needs a [[service]] for both")
            self.address, self.cidr = svc.address, svc.interface.with_prefixlen
            yield self.lab
        finally:
            self._keep_logs()
            self.lab = None
            self.progress("tearing the lab down")
            teardown()

    def _keep_logs(self) -> None:
        keep_agent_logs(self.lab, self.config.out / "logs")

    def _hosts(self) -> dict[str, Host]:
        from orthros_py.cluster import Cluster
        from orthros_py.policies.hosts import Host

        assert self.lab is not None
        cluster = Cluster.of_lab(self.lab)
        return {h.name: Host.of(cluster, h.name) for h in self.lab.hosts}

    def _environment(self) -> dict[str, Any]:
        env: dict[str, Any] = {
            "kernel": platform.release(), "cpus": len(os.sched_getaffinity(0)),
            "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
            "unprivileged_userfaultfd": _read("/proc/sys/vm/unprivileged_userfaultfd"),
            "address": self.address}
        with contextlib.suppress(OrthrosError, OSError):
            env["criu"] = self._hosts()[HOSTS[0]].agent.status().get("criu")
        return env

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> BenchResults:
        self.preflight()
        cfg, res = self.config, self.results
        with recorded(res, cfg.out, notes_for, write_outputs), self._lab():
            res.env = self._environment()
            if cfg.migrations:
                items = plan(cfg, self.seed)
                self.progress(f"seed {self.seed}: {len(items)} migrations")
                done = 0
                for size in cfg.sizes:
                    mine = [p for p in items if p.size_mib == size]
                    done = self._size(size, mine, done, len(items))
            if cfg.paging:
                self.paging_pair()
        return res

    def _save(self) -> None:
        with contextlib.suppress(Exception):
            write_outputs(self.results, self.config.out, plots=False)  # a long run keeps it

    def _argv(self, size: int) -> list[str]:
        cfg = self.config
        return [sys.executable, "-m", "orthros_py.workloads.memhog", "--mib", str(size),
                "--host", self.address, "--port", str(cfg.port),
                "--hot-fraction", str(cfg.hot_fraction), "--hot-layout", cfg.hot_layout,
                "--rate", str(cfg.rate), "--seed", str(self.seed % 2**31),
                *(["--read-only-hot"] if cfg.read_only_hot else [])]

    def _connect(self) -> Any:
        assert self.lab is not None
        lab, addr = self.lab, (self.address, self.config.port)
        return lambda: lab.connect(addr, timeout=10.0)

    def _size(self, size: int, items: list[PlannedRun], done: int, total: int) -> int:
        """The migrations of one size on one workload; returns how many ran so far."""
        assert self.lab is not None
        holder = self.lab.holder(self.cidr)
        where = holder.name if holder is not None else HOSTS[0]
        work = (self.config.out / "work").resolve()
        work.mkdir(parents=True, exist_ok=True)
        self.progress(f"{size:,} MiB: starting the workload on {where}")
        wl = Workload(self.lab, where, self._argv(size), work / f"memhog-{size}.out")
        client: MemClient | None = None
        try:
            wl.wait_ready(timeout=60 + size / 50)
            client = MemClient(self._connect(), rate=self.config.ping_rate,
                               timeout=120.0).start()
            if self.config.warmup and done == 0:
                self.progress("warming up: one eager migration, not recorded (builds the "
                              "XDP lock once)")
                warm = self._migrate(PlannedRun(size, -1, EAGER), wl, client, where)
                if not warm.ok:
                    self.progress(f"warm-up failed: {warm.error}")
                where = wl.where() or where
            for item in items:
                done += 1
                rec = self._migrate(item, wl, client, where)
                self.results.runs.append(rec)
                self.on_run(rec, done, total)
                self._save()
                now = wl.where()
                if now is None:
                    self.progress(f"{size:,} MiB: the workload is gone; skipping the rest "
                                  "of this size")
                    return done + (len(items) - items.index(item) - 1)
                where = now
        finally:
            if client is not None:
                client.stop()
            wl.kill()
        return done

    def _migrate(self, item: PlannedRun, wl: Workload, client: MemClient,
                 src: str) -> MigrationRun:
        from orthros_py.policies.engine import Event
        from orthros_py.policies.migrate import MigrateConfig, Migration

        dst = next(h for h in HOSTS if h != src)
        run = MigrationRun(item.size_mib, item.round, item.method, src, dst)
        marks: dict[str, float] = {}

        def observe(ev: Event) -> None:
            marks.setdefault(f"{ev.stage} {ev.kind}", time.monotonic())

        before: dict[str, Any] = {}
        with contextlib.suppress(OSError, EOFError, ValueError), \
                MemConn(self._connect(), timeout=30) as c:
            before = c.stat()
        hosts = self._hosts()
        image = f"lazy-{item.size_mib}-{item.method.replace('+', '-')}-{uuid.uuid4().hex[:6]}"
        client.clear()
        start = time.monotonic()
        end = start
        try:
            cfg = MigrateConfig(service_ip=self.address, **migrate_options(item.method))
            result = Migration(wl.host_pid, hosts[src], hosts[dst], cfg, observer=observe,
                               image=image).run()
            end = time.monotonic()
            read_result(run, result.to_dict())
        except Exception as err:  # recorded: the table names what failed
            end = time.monotonic()
            run.error = _reason(err)
        time.sleep(self.config.settle_s)
        read_client(run, client.snapshot(), start=start, end=end + self.config.settle_s,
                    locked_at=marks.get("lock done", marks.get("dump start")))
        try:
            with MemConn(self._connect(), timeout=30) as c:
                t = time.monotonic()
                run.verify = c.verify(timeout=300).line()
                run.verify_ms = (time.monotonic() - t) * 1000
                after = c.stat()
            if before:
                run.mismatches = int(after["mismatches"]) - int(before["mismatches"])
        except (OSError, EOFError, ValueError) as err:
            run.error = run.error or f"the workload did not answer VERIFY: {_reason(err)}"
        judge(run)
        return run

    # -- the paging standby ----------------------------------------------------------------------

    def paging_pair(self) -> tuple[list[PagingMemoryRun], list[FailoverRun]]:
        """The paging standby's part (``standby.PagingPart``) on the lab that is up (three
        hosts): memory against the hot fraction at each of ``paging_sizes`` and
        ``hot_fractions``; then failovers at each of ``failover_sizes``, a paging pair and an
        eager one per rep, interleaved, and one paging failover whose worker only reads.
        Recorded into ``self.results`` (``paging_memory``, ``failovers``) as they come; also
        returned."""
        from orthros_py.bench.lazy.standby import LAB_HOSTS, PagingPart

        if self.lab is None or len(self.lab.hosts) < LAB_HOSTS:
            raise OrthrosError("the paging standby's part needs the lab up with three hosts "
                               "(alpha, beta, gamma the witness)", stage="bench lazy")
        return PagingPart(self, on_record=self.on_paging).run()
