"""The lazy benchmark's paging-standby part on the lab (three hosts: alpha the active, beta the
standby, gamma the witness), through the pair policy (``orthros_py.policies.pair``):

1. memory against the hot fraction: for each size and hot fraction, a fresh memory workload
   (``orthros_py.workloads.memhog``, hot set spread, rewritten fast enough that the window
   sees it) paired with ``--paging --failover``; once generations have aged out of the hot
   window, ``pair status``'s paging figures sampled a few times; then the pair stopped;
2. failover, paging against eager: the same workload paired with and without ``--paging``,
   interleaved; the active dies (its link down, its agent and the workload SIGKILLed at one
   instant, as the e2e tests do it) while a client PINGs on one connection all along and a
   prober opens fresh connections every few ms; the standby's ``promoted`` event and its lazy
   record give the restore's start and end and when the last page was in; VERIFY must then
   find every page right. After each, alpha comes back, the pair is stopped, the workload
   killed everywhere and the service address put back on alpha.

Interfaces: the lab (namespaces, its hosts' init to spawn the workload, the bridge's fence
port), rtnetlink for links (pyroute2), the agents through the pair policy, TCP to the workload
from the client's namespace. Needs root. Nothing here prints: progress goes to the bench's
callback, records into its results.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from orthros_py.bench import labkit
from orthros_py.bench.labkit import reason as _reason
from orthros_py.bench.lazy.paging import (
    PAGING,
    FailoverRun,
    PagingMemoryRun,
    PlannedFailover,
    failover_plan,
    judge_failover,
    read_promotion,
    sample_of,
)
from orthros_py.errors import OrthrosError
from orthros_py.workloads.memhog import MemClient, MemConn

if TYPE_CHECKING:
    from orthros_py.bench.lazy.runner import LazyBench, Workload
    from orthros_py.lab import Lab
    from orthros_py.policies.hosts import Host
    from orthros_py.policies.pair import PairView

ACTIVE, STANDBY, WITNESS = "alpha", "beta", "gamma"
LAB_HOSTS = 3
FIRST_GENERATION_S = 300.0  # a full first checkpoint of 2 GiB, on a busy machine
LAZY_DONE_S = 600.0
# After a failed checkpoint the next is full: it is committed within this long, then ages out.
FULL_AGAIN_S = 15.0


def wait_until(cond: Callable[[], object], timeout: float, what: str,
               every: float = 0.05) -> None:
    labkit.wait_until(cond, timeout, what, every=every, stage="bench lazy")


class Prober:
    """From the client host, two threads a few ms apart: a fresh connection to the service
    address, one PING; a connect given up after 20 ms (the address still leads to the dead
    host), a refused one retried after 5 ms (the standby holds the address, the tree is not
    restored yet), a PONG waited for as long as it takes (the restored tree may fault its
    pages in first). Remembers every PONG: (probe begun, PONG received), wall clock."""

    CONNECT_TIMEOUT = 0.02
    REPLY_TIMEOUT = 30.0
    REFUSED_WAIT = 0.005

    def __init__(self, lab: Lab, address: str, port: int, armed_at: float) -> None:
        self.lab, self.addr, self.armed_at = lab, (address, port), armed_at
        self.pongs: list[tuple[float, float]] = []
        self.probes = 0
        self.log: list[tuple[float, float, str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i * self.CONNECT_TIMEOUT / 2,),
                                         daemon=True, name=f"lazy-prober-{i}") for i in range(2)]
        for t in self.threads:
            t.start()

    def _run(self, delay: float) -> None:
        if self.stop.wait(delay):
            return
        with self.lab.in_netns(self.lab.client):
            while not self.stop.is_set() and not self.pongs:
                self._probe()

    def _probe(self) -> None:
        t0 = time.time()
        with self.lock:
            self.probes += 1
        stage = "connect"
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Closed with a reset: hundreds of probes leave no TIME_WAIT behind.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            s.settimeout(self.CONNECT_TIMEOUT)
            s.connect(self.addr)
            stage = "reply"
            s.settimeout(self.REPLY_TIMEOUT)
            s.sendall(b"PING\n")
            with s.makefile("rb") as f:
                line = f.readline()
            if not line.startswith(b"PONG "):
                raise ValueError(f"not a PONG: {line[:40]!r}")
            got = time.time()
            with self.lock:
                self.pongs.append((t0, got))
            self._log(t0, "pong")
        except (OSError, ValueError) as err:
            self._log(t0, f"{stage}: {type(err).__name__}")
            if stage == "connect" and not isinstance(err, TimeoutError):
                self.stop.wait(self.REFUSED_WAIT)
        finally:
            s.close()

    def _log(self, t0: float, outcome: str) -> None:
        with self.lock:
            if len(self.log) < 2000:
                self.log.append((t0, time.time(), outcome))

    def first(self) -> float | None:
        with self.lock:
            return min((got for sent, got in self.pongs if sent >= self.armed_at), default=None)

    def log_after(self) -> list[str]:
        """The probes, compressed: runs of one outcome as one line, ms after the death."""
        t = self.armed_at
        with self.lock:
            entries = sorted(self.log)
        out: list[str] = []
        head: tuple[float, float, str] | None = None
        count = 0
        for entry in [*entries, (0.0, 0.0, "")]:
            if head is not None and entry[2] == head[2]:
                count += 1
                continue
            if head is not None:
                out.append(f"{(head[0] - t) * 1000:,.0f} ms: {head[2]}"
                           + (f" x{count}" if count > 1 else ""))
            head, count = entry, 1
        return out[:60]

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.REPLY_TIMEOUT + 5)


class PagingPart:
    """The paging standby's runs on ``bench``'s lab (already up, three hosts), recorded into
    ``bench.results``."""

    def __init__(self, bench: LazyBench,
                 on_record: Callable[[Any, int, int], None] | None = None) -> None:
        self.bench = bench
        self.config = bench.config
        self.progress = bench.progress
        self.on_record = on_record or (lambda _r, _i, _n: None)
        self.address, self.cidr = bench.address, bench.cidr

    @property
    def lab(self) -> Lab:
        assert self.bench.lab is not None, "the lab is not up"
        return self.bench.lab

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> tuple[list[PagingMemoryRun], list[FailoverRun]]:
        cfg, res = self.config, self.bench.results
        memory = [(size, frac) for size in cfg.paging_sizes for frac in cfg.hot_fractions]
        fos = failover_plan(cfg.failover_sizes, cfg.paging_reps, self.bench.seed,
                            read_only_check=cfg.read_only_check)
        total = len(memory) + len(fos)
        self.progress(f"paging standby (seed {self.bench.seed}): {len(memory)} memory runs, "
                      f"{len(fos)} failovers in this order: "
                      + ", ".join(f"{p.size_mib} {p.mode}" + (" read-only" if p.read_only_hot
                                                              else "") for p in fos))
        mems: list[PagingMemoryRun] = []
        done: list[FailoverRun] = []
        i = 0
        for size, frac in memory:
            i += 1
            rec = self.memory_run(size, frac)
            res.paging_memory.append(rec)
            mems.append(rec)
            self.on_record(rec, i, total)
            self.bench._save()
        for item in fos:
            i += 1
            fo = self.failover(item)
            res.failovers.append(fo)
            done.append(fo)
            self.on_record(fo, i, total)
            self.bench._save()
        return mems, done

    # -- the workload and the pair -------------------------------------------------------------

    def _argv(self, size: int, frac: float, read_only: bool) -> list[str]:
        cfg = self.config
        return [sys.executable, "-m", "orthros_py.workloads.memhog", "--mib", str(size),
                "--host", self.address, "--port", str(cfg.port), "--hot-fraction", str(frac),
                "--hot-layout", "spread", "--rate", str(cfg.paging_rate),
                "--seed", str(self.bench.seed % 2**31),
                *(["--read-only-hot"] if read_only else [])]

    def _workload(self, tag: str, size: int, frac: float, read_only: bool) -> Workload:
        from orthros_py.bench.lazy.runner import Workload

        self._heal()
        work = (self.config.out / "work").resolve()
        work.mkdir(parents=True, exist_ok=True)
        wl = Workload(self.lab, ACTIVE, self._argv(size, frac, read_only),
                      work / f"memhog-{tag}.out")
        try:
            wl.wait_ready(timeout=60 + size / 20)
        except BaseException:
            wl.kill()
            raise
        return wl

    def _hosts(self) -> dict[str, Host]:
        return self.bench._hosts()

    def _pair_start(self, name: str, pid: int, *, paging: bool) -> dict[str, Any]:
        from orthros_py.policies.pair import PairOptions, start

        cfg, lab = self.config, self.lab
        fence = None
        if lab.bridge_netns:
            # The lab's own fence (what ``orthros pair start`` gives a lab host).
            fence = {"agent": "lab", "netns": lab.bridge_netns, "ifname": f"b-{ACTIVE}"}
        opts = PairOptions(name=name, interval=cfg.paging_interval_s, service_ip=self.address,
                           failover=True, witness=WITNESS, fence=fence, paging=paging,
                           hot_window=cfg.hot_window_s)
        hosts = self._hosts()
        return start(hosts[ACTIVE], hosts[STANDBY], pid, opts, others=[hosts[WITNESS]],
                     wait_s=FIRST_GENERATION_S)

    def _view(self, name: str, *, alive: tuple[str, ...] = (ACTIVE, STANDBY, WITNESS)
              ) -> PairView:
        from orthros_py.policies.pair import status

        hosts = self._hosts()
        return status([hosts[h] for h in alive], name)[0]

    def _wait_aged(self, name: str) -> PairView:
        """Until at least two generations have aged out of the hot window (into the disk base,
        in place or by a merge), and no checkpoint failed within the window and a margin: a
        failed one makes the next one full, and its pages count as written within the window
        until it ages out. Then the standby holds what it holds in the steady state."""
        window = self.config.hot_window_s
        timeout = 4 * window + 240
        got: list[PairView] = []

        def aged() -> bool:
            v = self._view(name)
            got[:] = [v]
            p = v.paging or {}
            if int(p.get("aged_in_place") or 0) + int(p.get("aged_by_merge") or 0) < 2:
                return False
            failed = [float(e.get("at") or 0) for e in v.events
                      if e.get("what") == "checkpoint failed"]
            return v.state == "replicating" and (
                not failed or time.time() - max(failed) >= window + FULL_AGAIN_S)

        try:
            wait_until(aged, timeout, f"pair {name}'s generations to age out of the hot "
                                      "window", every=0.5)
        except OrthrosError as err:
            v = got[0] if got else None
            if v is not None:
                err.msg += f" (state {v.state}: {v.reason}; paging {v.paging})"
            raise
        return got[0]

    def _sample(self, name: str, n: int) -> list[dict[str, Any]]:
        every = max(1.0, self.config.paging_interval_s)
        out = []
        for k in range(n):
            if k:
                time.sleep(every)
            v = self._view(name)
            if v.paging:
                out.append({**sample_of(v.paging), "at": time.time(),
                            "generation": v.generation, "state": v.state})
        return out

    def _stop_pair(self, name: str) -> list[str]:
        from orthros_py.policies.pair import stop

        return [str(p) for p in stop(list(self._hosts().values()), name)["problems"]]

    def _stop_healthy_pair(self, name: str) -> list[str]:
        """``pair stop`` of a pair that has not failed over, the standby's part closed first.
        ``pair stop`` closes the active first: while its close waits for a checkpoint in
        flight (seconds, here) it renews no lease, the witness grants, and the standby
        promotes and fences the active. Closed first, the standby watches no more."""
        try:
            self._hosts()[STANDBY].agent.request("pair_close", {"name": name}, timeout=120.0)
        except OrthrosError as err:
            return [f"closing the standby's part first: {_reason(err)}"]
        return [p for p in self._stop_pair(name) if f"{STANDBY} (standby)" not in p]

    # -- 1. memory against the hot fraction ----------------------------------------------------

    def memory_run(self, size: int, frac: float, *, read_only: bool = False
                   ) -> PagingMemoryRun:
        cfg = self.config
        rec = PagingMemoryRun(size, frac, read_only, part="memory",
                              hot_window_s=cfg.hot_window_s, interval_s=cfg.paging_interval_s,
                              rate=cfg.paging_rate)
        name = f"lazy-mem-{size}-{round(frac * 100)}" + ("-ro" if read_only else "")
        self.progress(f"memory: {size:,} MiB, {frac:.0%} hot"
                      + (" (read only)" if read_only else "") + ": paging pair, waiting for "
                      f"the {cfg.hot_window_s:g} s window to fill and age")
        wl: Workload | None = None
        paired = False
        try:
            wl = self._workload(name, size, frac, read_only)
            t0 = time.monotonic()
            self._pair_start(name, wl.host_pid, paging=True)
            paired = True
            v = self._wait_aged(name)
            rec.settle_s = round(time.monotonic() - t0, 1)
            rec.samples = self._sample(name, cfg.paging_samples)
            rec.generation = v.generation
            rec.checkpoint_failures = sum(1 for e in self._view(name).events
                                          if e.get("what") == "checkpoint failed")
            if not rec.samples:
                raise OrthrosError(f"pair {name}'s status had no paging figures")
            rec.ok = True
        except (OrthrosError, OSError, TimeoutError, ValueError, KeyError) as err:
            rec.error = _reason(err)
        finally:
            if paired:
                try:
                    problems = self._stop_healthy_pair(name)
                    if problems:
                        rec.error = rec.error or f"pair stop: {problems[0]}"
                except OrthrosError as err:
                    rec.error = rec.error or f"pair stop: {_reason(err)}"
            if wl is not None:
                wl.kill()
            hurt = self._heal()
            if hurt:
                rec.error = rec.error or ("the pair failed over without a death: "
                                          + "; ".join(hurt))
        if rec.error:
            rec.ok = False
        return rec

    # -- 2. failover, paging against eager -----------------------------------------------------

    def failover(self, item: PlannedFailover) -> FailoverRun:
        cfg = self.config
        frac = cfg.failover_hot
        rec = FailoverRun(item.size_mib, frac, item.rep, item.mode, item.read_only_hot)
        name = (f"lazy-fo-{item.size_mib}-{item.mode}-{item.rep}"
                + ("-ro" if item.read_only_hot else ""))
        self.progress(f"failover: {item.size_mib:,} MiB, {frac:.0%} hot, rep {item.rep + 1}, "
                      f"{item.mode} standby" + (", read-only hot set" if item.read_only_hot
                                                else ""))
        paging = item.mode == PAGING
        wl: Workload | None = None
        client: MemClient | None = None
        prober: Prober | None = None
        paired = killed = False
        lab = self.lab
        port = cfg.port

        def connect() -> socket.socket:
            return lab.connect((self.address, port), timeout=2.0)

        try:
            wl = self._workload(name, item.size_mib, frac, item.read_only_hot)
            t0 = time.monotonic()
            first = self._pair_start(name, wl.host_pid, paging=paging)
            paired = True
            if paging:
                self._wait_aged(name)
                self._memory_before_death(name, item, t0)
            else:
                # As long as a paging pair runs before its death: the window, and a few
                # generations merged.
                g0 = int(first.get("generation") or 1)
                wait_until(lambda: self._view(name).generation >= g0 + 3
                           and time.monotonic() - t0 >= cfg.hot_window_s,
                           3 * cfg.hot_window_s + 180, f"pair {name} to run a window's time",
                           every=0.5)
            v = self._view(name)
            if v.state != "replicating" or v.serving != ACTIVE:
                raise OrthrosError(f"pair {name} is {v.state} (serving: {v.serving}: "
                                   f"{v.reason}) before the death")
            client = pinger = MemClient(connect, rate=cfg.ping_rate, timeout=2.0,
                                        clock=time.time).start()
            wait_until(lambda: len(pinger.snapshot().replies) >= 20, 30,
                       "the client's first PONGs")
            with MemConn(connect, timeout=30) as c:
                before = c.stat()
            if int(before.get("mismatches") or 0):
                raise OrthrosError(f"the worker found {before['mismatches']} wrong pages "
                                   "before the death")
            # The death: the link down (its instant: from then on no packet reaches alpha),
            # then the agent and the workload SIGKILLed.
            killed = True
            self._set_link(ACTIVE, False)
            rec.died_at = died = time.time()
            prober = probe = Prober(lab, self.address, port, armed_at=died)
            lab.stop_agent(ACTIVE)
            self._kill_on(wl.host_pid, ACTIVE)
            wait_until(lambda: probe.first() is not None, 180,
                       "the first PONG from the standby", every=0.01)
            got = probe.first()
            assert got is not None
            rec.first_reply_ms = (got - died) * 1000
            probe.close()
            rec.probes, rec.probe_log = probe.probes, probe.log_after()
            prober = None
            view = self._promoted(name, paging)
            ev = [e for e in view.events if e.get("what") == "promoted"][-1]
            read_promotion(rec, ev, view.lazy)
            wait_until(lambda: pinger.snapshot().first_reply_after(died) is not None, 30,
                       "the long-lived client to be answered at the standby", every=0.05)
            log = pinger.stop()
            client = None
            c_first = log.first_reply_after(died)
            rec.client_first_reply_ms = None if c_first is None else (c_first - died) * 1000
            after = log.window(died, None)
            rec.client_replies, rec.client_errors = len(after.replies), len(after.errors)
            with MemConn(connect, timeout=600) as c:
                t = time.monotonic()
                rec.verify = c.verify(timeout=600).line()
                rec.verify_ms = (time.monotonic() - t) * 1000
                rec.mismatches = int(c.stat().get("mismatches") or 0)
        except (OrthrosError, OSError, EOFError, TimeoutError, ValueError, KeyError,
                IndexError) as err:
            rec.error = _reason(err)
        finally:
            if prober is not None:
                prober.close()
                rec.probes, rec.probe_log = prober.probes, prober.log_after()
            if client is not None:
                client.stop()
            try:
                rec.leftovers += self._after_failover(name, wl, killed, paired)
            except (OrthrosError, OSError, ValueError) as err:
                rec.leftovers.append(f"cleanup failed: {_reason(err)}; the lab rebuilt")
                self._rebuild()
        judge_failover(rec)
        return rec

    def _memory_before_death(self, name: str, item: PlannedFailover, t0: float) -> None:
        """A paging failover's standby, sampled before the death: the memory table's
        ``failover`` rows (the read-only run's shows what a written hot set misses)."""
        cfg = self.config
        mem = PagingMemoryRun(item.size_mib, cfg.failover_hot, item.read_only_hot, item.rep,
                              part="failover", hot_window_s=cfg.hot_window_s,
                              interval_s=cfg.paging_interval_s, rate=cfg.paging_rate,
                              settle_s=round(time.monotonic() - t0, 1))
        try:
            mem.samples = self._sample(name, min(3, cfg.paging_samples))
            mem.generation = int(mem.samples[-1]["generation"]) if mem.samples else None
            mem.ok = bool(mem.samples)
            mem.error = None if mem.ok else "no paging figures"
        except OrthrosError as err:
            mem.error = _reason(err)
        self.bench.results.paging_memory.append(mem)

    def _promoted(self, name: str, paging: bool) -> PairView:
        """The pair as the standby and the witness see it once promoted (and for a paging
        standby, once its lazy pages are all in, or failed)."""
        got: list[PairView] = []

        def promoted() -> bool:
            v = self._view(name, alive=(STANDBY, WITNESS))
            got[:] = [v]
            if not any(e.get("what") == "promoted" for e in v.events):
                return False
            return not paging or (v.lazy or {}).get("state") in ("complete", "failed")

        wait_until(promoted, LAZY_DONE_S, f"pair {name}'s promotion"
                   + (" and its last lazy page" if paging else ""), every=0.1)
        return got[0]

    # -- the lab --------------------------------------------------------------------------------

    def _set_link(self, host: str, up: bool) -> None:
        from orthros_py.net.addr import iproute

        with iproute(self.lab.host(host).netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0],
                     state="up" if up else "down")

    def _kill_on(self, host_pid: int, host: str) -> None:
        """SIGKILL the workload's copy on ``host`` only (the standby's must live)."""
        import psutil

        mp = self.lab.machine_pid(host, host_pid)
        if mp is None:
            return
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            os.kill(mp, signal.SIGKILL)

    def _heal(self) -> list[str]:
        """alpha as a run needs it: its link and its bridge port up, its agent running, the
        service address on it alone. What had to be repaired, as text (nothing: healthy)."""
        from orthros_py.net.fence import LabFence

        lab = self.lab
        fixed = []
        if not lab.host(ACTIVE).link.has(self.cidr):
            holder = lab.holder(self.cidr)
            fixed.append(f"the service address was on {holder.name if holder else 'no host'}")
        self._set_link(ACTIVE, True)
        if lab.bridge_netns:
            fence = LabFence(lab.bridge_netns, f"b-{ACTIVE}")
            if fence.status() != "on":
                fixed.append(f"{ACTIVE} was fenced")
            fence.on()
        if not lab.host(ACTIVE).agent_alive():
            fixed.append(f"{ACTIVE}'s agent was dead")
            lab.restart_agent(ACTIVE)
        self._address_home()
        return fixed

    def _address_home(self) -> None:
        """The service address on alpha alone, announced."""
        lab = self.lab
        for h in lab.hosts:
            if h.name != ACTIVE and h.link.has(self.cidr):
                h.link.remove(self.cidr)
        alpha = lab.host(ACTIVE).link
        if not alpha.has(self.cidr):
            alpha.add(self.cidr)
            alpha.gratuitous_arp(self.cidr, count=2)

    def _after_failover(self, name: str, wl: Workload | None, killed: bool,
                        paired: bool) -> list[str]:
        """alpha back (link, fence port, agent), the pair stopped everywhere, the workload
        gone from every host, the address on alpha; what could not be cleaned, as text."""
        left: list[str] = []
        if killed:
            self._heal()
            if paired:
                def settled() -> bool:
                    rec = self._hosts()[ACTIVE].agent.request("pair_status", {"name": name},
                                                              timeout=10.0)
                    return rec.get("state") not in ("starting", "replicating")

                with contextlib.suppress(OrthrosError):
                    wait_until(settled, 20, "alpha to stand down", every=0.1)
        if paired:
            left += [f"pair stop: {p}" for p in self._stop_pair(name)]
        if wl is not None:
            wl.kill()
        self._address_home()
        return left

    def _rebuild(self) -> None:
        """After a failover whose cleanup failed: a fresh lab, so the next run starts clean."""
        from orthros_py.lab import Lab, teardown

        self.progress("rebuilding the lab (the last cleanup failed)")
        self.bench._keep_logs()
        teardown()
        self.bench.lab = Lab.up(LAB_HOSTS, rebuild=True)
