"""The network lock benchmark's runner: ``NetlockBench`` runs the plan (a fresh nginx, C
connections from ab, a dump and a restore timed per method, teardown on every path) and writes
the results as it goes; and the parsers for the command line's lists.

Interfaces: CRIU through ``orthros_py.checkpoint``, ab (in the client namespace), the host side
in ``host``. Needs root (checked first). Nothing here prints: progress goes to a callback,
results to files in the output directory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from orthros_py.bench.netlock.host import (
    ClientNet,
    Nginx,
    _tool,
    criu_iptables_rules,
    criu_nft_tables,
    environment,
    micro_xdp,
    remove_iptables_rules,
    remove_nft_tables,
    subreaper,
    wait_gone,
    xdp_release,
)
from orthros_py.bench.netlock.model import (
    METHODS,
    AbReport,
    BenchConfig,
    BenchResults,
    Method,
    PlannedRun,
    RunRecord,
    lock_window,
    parse_ab,
    plan,
    split_phase,
)
from orthros_py.bench.netlock.report import notes_for, write_outputs
from orthros_py.errors import (
    CommandError,
    CriuError,
    NotRootError,
    OrthrosError,
)
from orthros_py.proc.tree import kill_tree, reap

# --- the benchmark ------------------------------------------------------------------------------

Progress = Callable[[str], None]


def _reason(err: BaseException, log: Path | None = None) -> str:
    """One line for the table: the error, and for CRIU, when the error itself says little
    (a CRIU that aborts leaves only "exited in the middle"), where its log stops."""
    from orthros_py.criu.log import lock_spans, main_reason, read_lines

    if not isinstance(err, OrthrosError):
        return f"{type(err).__name__}: {err}"
    text = err.msg
    if not isinstance(err, CriuError) or main_reason(err.log_tail) or log is None:
        return text
    lines = read_lines(log)
    last = [ln.strip() for ln in lines if ln.startswith("(")][-1:]
    spans = lock_spans(lines)
    if spans.calls and last and "Running " in last[0]:
        return (f"{text}: CRIU died inside its {spans.calls}th {spans.tool} lock call "
                f"({last[0].split('[', 1)[-1].rstrip(']')[:100]})")
    return f"{text} (its log ends: {last[0][:160]})" if last else text


class NetlockBench:
    """Runs the plan; ``run()`` returns the results and has written them to ``config.out``."""

    def __init__(self, config: BenchConfig, *, progress: Progress | None = None,
                 on_run: Callable[[RunRecord, int, int], None] | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda _msg: None)
        self.on_run = on_run or (lambda _rec, _i, _n: None)
        self.net: ClientNet | None = None
        self.tmp: Path | None = None
        self.results = BenchResults(config)

    # -- checks and setup ---------------------------------------------------------------------

    def preflight(self) -> None:
        if os.geteuid() != 0:
            raise NotRootError("the benchmark needs root (CRIU, namespaces, BPF, iptables)",
                               hint="run it with sudo")
        for name in ("nginx", "ab", "nsenter"):
            _tool(name)
        if Method.IPTABLES in self.config.methods:
            _tool("iptables")
            _tool("iptables-save")
        if Method.NFTABLES in self.config.methods:
            _tool("nft")
        if any(c < 0 for c in self.config.concurrency):
            raise OrthrosError("concurrency cannot be negative")
        for c in self.config.concurrency:
            # The client holds C sockets, nginx C + its own: RLIMIT_NOFILE is fixed here.
            soft = _nofile()
            if c + 64 > soft:
                raise OrthrosError(f"{c} connections need more than RLIMIT_NOFILE={soft} "
                                   "descriptors", hint="lower --concurrency")

    def run(self) -> BenchResults:
        self.preflight()
        cfg = self.config
        res = self.results
        res.started = _now()
        res.env = environment()
        cfg.out.mkdir(parents=True, exist_ok=True)
        runs = plan(cfg)
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(subreaper())
                if Method.XDP in cfg.methods:
                    stack.enter_context(self._xdp_pins())
                self.tmp = Path(stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="orthros-bench-")))
                self.progress("creating the client namespace and veth pair")
                self.net = stack.enter_context(ClientNet(
                    ipaddress.IPv4Network(cfg.subnet) if cfg.subnet else None))
                res.env["subnet"] = str(self.net.subnet)
                if Method.XDP in cfg.methods and cfg.micro_conns > 0:
                    self.progress(f"XDP map microbenchmark: {cfg.micro_conns} connections")
                    res.micro = micro_xdp(cfg.micro_conns, cfg.micro_reps)
                for i, item in enumerate(runs, 1):
                    rec = self.run_one(item, i)
                    res.runs.append(rec)
                    self.on_run(rec, i, len(runs))
                    write_outputs(res, cfg.out, plots=False)  # a long run keeps what it has
        except BaseException:
            res.interrupted = True
            res.finished = _now()
            res.notes = notes_for(res.runs)
            with contextlib.suppress(Exception):
                write_outputs(res, cfg.out)
            raise
        res.finished = _now()
        res.notes = notes_for(res.runs)
        write_outputs(res, cfg.out)
        return res

    @contextlib.contextmanager
    def _xdp_pins(self) -> Iterator[None]:
        """Compile (or open) the XDP lock before any timing; take the pins away again at the
        end if this benchmark made them and nothing else uses them."""
        from orthros_py.netlock.xdp import PIN_DIR, PINS, XdpNetLock

        existed = (PIN_DIR / PINS["conns"]).exists()
        lock = XdpNetLock()
        try:
            self.progress("loading the XDP lock (compiles once, ~10 s, if not pinned)")
            info = lock.prepare()
            if info.get("compiled"):
                self.results.env["xdp_compile_s"] = info.get("compile_seconds")
        finally:
            lock.unload()
        try:
            yield
        finally:
            lock = XdpNetLock()
            try:
                if not existed:
                    lock.flush_if_unused()
            finally:
                lock.close()

    # -- one run ------------------------------------------------------------------------------

    def run_one(self, item: PlannedRun, seq: int) -> RunRecord:
        from orthros_py.checkpoint import dump_tree, restore_tree
        from orthros_py.criu.log import lock_spans_in
        from orthros_py.criu.request import DumpOptions, RestoreOptions

        assert self.net is not None and self.tmp is not None
        cfg, net, method, conc = self.config, self.net, item.method, item.concurrency
        rec = RunRecord(conc, method.value, item.rep, seq)
        name = f"{seq:03d}-c{conc}-{method.value}-r{item.rep}"
        rundir = cfg.out / "runs" / name
        rundir.mkdir(parents=True, exist_ok=True)
        images = rundir / "images"
        nginx = Nginx(self.tmp / name, net.server_ip, cfg.port)
        ab: subprocess.Popen[bytes] | None = None
        restored: int | None = None
        tables_before = criu_nft_tables() if method is Method.NFTABLES else set()
        started = time.monotonic()
        stage = "nginx"
        self.progress(f"[{seq}] {conc} connections, {method.value}, rep {item.rep + 1}")
        try:
            nginx.start()
            if conc > 0:
                stage = "clients"
                ab = self._start_ab(conc, rundir)
                self._wait_established(nginx, ab, conc)
            rec.conns = nginx.established()
            pids = nginx.pids()
            stage = "dump"
            dopts = DumpOptions(tcp_established=True, leave_running=False,
                                log_level=cfg.log_level, network_lock=method.lock.criu)
            t0 = time.perf_counter()
            d = dump_tree(nginx.master, images, dopts, network_lock=method.lock)
            t1 = time.perf_counter()
            spans = lock_spans_in(images / "dump.log")
            rec.dump = split_phase(method, "dump", (t1 - t0) * 1000, d.elapsed_ms,
                                   spans_ms=spans.total_ms, spans_calls=spans.calls,
                                   lock_report=d.extra.get("lock"),
                                   stats=d.stats.to_dict() if d.stats else None)
            stage = "restore"
            assert nginx.proc is not None
            nginx.proc.wait(timeout=30)  # CRIU killed it: collect it, and the orphaned worker
            wait_gone(pids)
            ropts = RestoreOptions(tcp_established=True, log_level=cfg.log_level,
                                   network_lock=method.lock.criu)
            t2 = time.perf_counter()
            r = restore_tree(images, ropts, network_lock=method.lock)
            t3 = time.perf_counter()
            restored = r.pid
            spans = lock_spans_in(images / "restore.log")
            rec.restore = split_phase(method, "restore", (t3 - t2) * 1000, r.elapsed_ms,
                                      spans_ms=spans.total_ms, spans_calls=spans.calls,
                                      lock_report=r.extra.get("lock"),
                                      stats=r.stats.to_dict() if r.stats else None)
            # Same process, same clock: when the lock engaged (CRIU's dump called) and when
            # the connections flowed again, between the calls' own starts and ends.
            rec.window = lock_window(t0, d.extra.get("engaged_at"), t1, t2,
                                     r.extra.get("unlocked_at"), t3)
            rec.ok = True
            if ab is not None:
                stage = "clients after restore"
                time.sleep(cfg.settle_s)  # traffic on the restored server, as the brief says
        except (OrthrosError, OSError, subprocess.SubprocessError) as err:
            log = images / ("dump.log" if stage == "dump" else "restore.log")
            rec.stage, rec.error = stage, _reason(err, log)
        finally:
            self._teardown(rec, nginx, ab, restored, rundir, method, tables_before)
            rec.judge_clients()  # ab's report is in only now that it is stopped
            rec.wall_s = time.monotonic() - started
        return rec

    def _start_ab(self, conc: int, rundir: Path) -> subprocess.Popen[bytes]:
        assert self.net is not None
        url = f"http://{self.net.server_ip}:{self.config.port}/"
        argv = self.net.argv([_tool("ab"), "-k", "-r", "-s", "600", "-c", str(conc), "-t", "900",
                              "-n", "100000000", url])
        with open(rundir / "ab.out", "wb") as out, open(rundir / "ab.err", "wb") as err:
            # Its own session: a Ctrl-C reaches only us, and we stop it in order.
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)

    def _wait_established(self, nginx: Nginx, ab: subprocess.Popen[bytes], conc: int) -> None:
        timeout = self.config.connect_timeout_s
        deadline = time.monotonic() + timeout
        have = 0
        while True:
            have = nginx.established()
            if have >= conc:
                return
            if ab.poll() is not None:
                raise OrthrosError(f"ab exited with {ab.returncode} before opening {conc} "
                                   f"connections ({have} established)", stage="clients")
            if time.monotonic() > deadline:
                raise OrthrosError(f"only {have} of {conc} connections established after "
                                   f"{timeout:g} s", stage="clients")
            time.sleep(0.05)

    def _stop_ab(self, ab: subprocess.Popen[bytes], rundir: Path) -> AbReport:
        stopped = ab.poll() is None  # else it ended by itself: its status then says why
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(ab.pid, signal.SIGINT)  # ab prints its report on SIGINT
            try:
                ab.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(ab.pid, signal.SIGKILL)
                ab.wait(timeout=10)
        out = (rundir / "ab.out").read_text(errors="replace")
        err = (rundir / "ab.err").read_text(errors="replace")
        return parse_ab(out, err, ab.returncode, stopped)

    def _teardown(self, rec: RunRecord, nginx: Nginx, ab: subprocess.Popen[bytes] | None,
                  restored: int | None, rundir: Path, method: Method,
                  tables_before: set[str]) -> None:
        """Everything of the run goes, on every path: ab, nginx (original or restored), the
        lock rules a failed CRIU may have left, the bulky images."""
        assert self.net is not None
        if ab is not None:
            try:
                rec.ab = self._stop_ab(ab, rundir)
            except (OSError, subprocess.SubprocessError) as err:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(ab.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.SubprocessError):
                    ab.wait(timeout=10)
                rec.error = rec.error or f"stopping ab: {err}"
        if restored is not None:
            kill_tree(restored)
        if nginx.proc is not None:
            pids = nginx.pids()
            if nginx.proc.poll() is None:
                kill_tree(nginx.master)
            with contextlib.suppress(subprocess.SubprocessError):
                nginx.proc.wait(timeout=10)
            reap(pids)
        # A restore interrupted on our side may still have been finished by CRIU: that tree
        # came back under the old PIDs without our knowing its root. Found by its files.
        for pid in nginx.masters():
            kill_tree(pid)
        if method is Method.XDP:
            rec.leftovers += xdp_release(self.net)
        try:
            if method is Method.IPTABLES:
                rules = criu_iptables_rules([self.net.server_ip, self.net.client_ip])
                rec.leftovers += remove_iptables_rules(rules)
            elif method is Method.NFTABLES:
                rec.leftovers += remove_nft_tables(sorted(criu_nft_tables() - tables_before))
        except CommandError as err:
            rec.leftovers.append(f"could not check for CRIU's rules: {err.msg}")
        if not self.config.keep_images and images_dir_of(rundir).is_dir():
            for p in images_dir_of(rundir).iterdir():
                if p.suffix == ".img" and not p.name.startswith("stats-"):
                    p.unlink()


def images_dir_of(rundir: Path) -> Path:
    return rundir / "images"


def _nofile() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _now() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


def default_out() -> Path:
    return Path("results") / f"netlock-{datetime.now():%Y%m%d-%H%M%S}"


def parse_concurrency(text: str) -> tuple[int, ...]:
    """``0,500,1000`` -> (0, 500, 1000); ValueError naming what is wrong."""
    out = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if not part:
            continue
        if not part.isdigit():
            raise ValueError(f"{part!r} is not a number of connections")
        out.append(int(part))
    if not out:
        raise ValueError("no concurrency given")
    return tuple(dict.fromkeys(out))


def parse_methods(text: str) -> tuple[Method, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(Method(part))
        except ValueError as err:
            raise ValueError(f"unknown method {part!r} (one of "
                             f"{', '.join(m.value for m in METHODS)})") from err
    if not out:
        raise ValueError("no method given")
    return tuple(dict.fromkeys(out))
