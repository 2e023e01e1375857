"""The standby host's side of a pair: the generations, the watch on the active, the promotion
(see ``runtime`` for the whole picture).

A promotion, in order: the witness's grant (automatic failover only; a planned one is ordered by
the caller, who moved the tree), the fence of the old active where one is configured, the
restore of the newest committed generation (without output commit its connections are closed,
CRIU's ``tcp_close``: their clients have moved past that checkpoint, so they get a reset at once
and reconnect instead of a stream that went back in time), then the service address with
gratuitous ARP. The restore comes before the address: until the address is here no packet can
reach the restored sockets, so no lock is needed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from orthros_py.agent.pair.config import PairRecord, bad
from orthros_py.agent.pair.runtime import (
    PairsHost,
    Role,
    describe,
    generation_image,
    log,
    monotonic,
)
from orthros_py.errors import OrthrosError

MIN_FREE_BYTES = 4 << 20  # below this the images root counts as full
LAZY_WAIT_S = 3600.0  # a lazy restore's cold pages still crossing after this: it failed
LAZY_STOP_WAIT_S = 120.0  # ``pair stop`` waits this long for the last cold pages


class StandbySide(Role):
    def __init__(self, pairs: PairsHost, rec: PairRecord) -> None:
        super().__init__(pairs, rec)
        from orthros_py.agent.pair.store import GenerationStore

        self.store: GenerationStore
        if self.cfg.paging:
            from orthros_py.agent.pair.tiers import PagingStore

            self.store = PagingStore(self.agent.images_root, self.name,
                                     hot_window=self.cfg.hot_window)
        else:
            self.store = GenerationStore(self.agent.images_root, self.name, self.cfg.keep)
        self.lazy: Any = None  # the lazy-pages daemon of a paging promotion
        self.lazy_state: dict[str, Any] | None = None
        self.watch: Any = None
        self.promoting = False
        self.last_checkpoint: dict[str, Any] | None = None
        self.refusals: list[str] = []  # why the witness refused, newest last

    def start(self) -> None:
        with contextlib.suppress(Exception):
            self.store.recover()
        latest = self.store.latest()
        if latest is not None:
            self.rec.generation = latest.number
            self.rec.committed_at = latest.committed_at
        if self.rec.state in ("failed over", "stopped"):
            return
        if self.cfg.failover and self.cfg.output_commit:
            # Loaded now (a first build takes ~10 s), not in the middle of a failover.
            self.spawn(self._xdp, "lock preparation")
        if self.cfg.failover:
            from orthros_py.agent.pair.guard import GuardTimings, StandbyWatch

            self.watch = StandbyWatch(GuardTimings(self.cfg.heartbeat, self.cfg.misses),
                                      now=monotonic())
            self.spawn(self._watch_loop, "watch")
        with self.mutex:
            self.rec.state = "replicating"
            self.save()

    def stop(self, keep_images: bool) -> dict[str, Any]:
        out = super().stop(keep_images)
        self._stop_page_servers()
        if self.lazy is not None and self.lazy.running():
            # The restored tree still faults its cold pages in from these images: they stay
            # until the daemon has pushed the last one.
            with contextlib.suppress(Exception):
                self.lazy.proc.wait(timeout=LAZY_STOP_WAIT_S)
            if self.lazy.running():
                keep_images = True
                out["kept_because"] = "the lazy-pages daemon still feeds the restored tree"
        if not keep_images:
            self.store.destroy()
        with self.mutex:
            self.rec.state = "stopped"
        out["kept_images"] = [g.dir for g in self.store.generations()] if keep_images else []
        return out

    def _stop_page_servers(self, only: str | None = None) -> None:
        a = self.agent
        prefix = f"{self.name}.g"
        with a.mutex:
            servers = [s for img, s in a.page_servers.items()
                       if img.startswith(prefix) and (only is None or img == only)]
            for s in servers:
                a.page_servers.pop(s.image, None)
        for s in servers:
            with contextlib.suppress(Exception):
                s.stop()

    # -- generations ---------------------------------------------------------------------------

    def stale(self, epoch: int) -> bool:
        """Whether a sender at ``epoch`` lost the service (it must stand down)."""
        return epoch < self.rec.epoch or self.rec.state == "failed over"

    def _check_sender(self, epoch: int) -> None:
        if self.stale(epoch):
            raise bad(f"pair {self.name}: the sender's epoch {epoch} is stale (this standby "
                      f"is at {self.rec.epoch}, {self.rec.state}): stand down")

    def _out_of_space(self) -> str | None:
        """A sentence if the images root is (nearly) full: a page server that cannot write
        only breaks the channel, and its own log cannot be written either."""
        root = self.agent.images_root
        try:
            st = os.statvfs(root)
        except OSError:
            return None
        free = st.f_bavail * st.f_frsize
        if free >= MIN_FREE_BYTES:
            return None
        return (f"No space left on device: {free} bytes free in {root} (the pair needs at "
                "least a generation's worth)")

    def begin(self, epoch: int, parent: int | None) -> dict[str, Any]:
        """Open the next generation; incremental on ``parent`` only if that is the newest
        committed one here (the active's copy of it is what CRIU's dump builds on)."""
        from orthros_py.agent.ops.criu import op_page_server
        from orthros_py.agent.table import Call

        if self.stale(epoch):
            return {"stand_down": True, "epoch": max(self.rec.epoch, epoch + 1)}
        full = self._out_of_space()
        if full:
            # Refused before the active freezes anything.
            raise OrthrosError(f"the standby cannot take a generation: {full}",
                               host=self.agent.name, stage="pair begin")
        latest = self.store.latest()
        gen = (latest.number if latest is not None else 0) + 1
        incremental = parent is not None and latest is not None and parent == latest.number
        image = generation_image(self.name, gen)
        self._stop_page_servers(only=image)
        self.store.begin(gen, incremental=incremental)
        ps = op_page_server(Call(self.agent, "pair"), image=image, address=None,
                            log_level=2, wait=60.0)
        return {"generation": gen, "incremental": incremental, "address": ps.get("address"),
                "port": ps["port"], "nonce": ps["nonce"]}

    def commit(self, gen: int, epoch: int, stats: dict[str, Any]) -> dict[str, Any]:
        self._check_sender(epoch)
        self._stop_page_servers(only=generation_image(self.name, gen))
        # Pruned after the answer: merging old generations copies memory, and the active
        # waits for this answer before it releases the held output.
        g = self.store.commit(gen, {k: v for k, v in stats.items()
                                    if k not in ("generation", "dir", "committed_at")},
                              prune=False)
        threading.Thread(target=self._prune, name=f"pair-{self.name}-prune",
                         daemon=True).start()
        used = self.store.bytes_used()
        with self.mutex:
            self.rec.generation = g.number
            self.rec.committed_at = g.committed_at
            self.last_checkpoint = {**stats, "storage_bytes": used}
            if self.rec.state == "degraded" and self.watch is None:
                self.rec.state = "replicating"
            # The record is written at most once a second: the store's pointer is the truth
            # about generations; the record only has to survive a restart.
            if time.time() - self.rec.updated_at > 1.0:
                self.save()
        return {"generation": g.number, "storage_bytes": used}

    def _prune(self) -> None:
        try:
            self.store.prune()
        except Exception as err:  # the next commit's prune tries again
            log.warning("pair %s: pruning old generations failed: %s", self.name, describe(err))

    def abort(self, gen: int) -> dict[str, Any]:
        image = generation_image(self.name, gen)
        self._stop_page_servers(only=image)
        said = None
        with contextlib.suppress(Exception):
            from orthros_py.agent.ops.criu import PAGE_SERVER_LOG
            from orthros_py.criu.log import log_tail, main_reason

            said = main_reason(log_tail(self.agent.images_root / image / PAGE_SERVER_LOG))
        if not said:
            said = self._out_of_space()
        if said:
            log.warning("pair %s: generation %d failed here: %s", self.name, gen, said)
        with contextlib.suppress(Exception):
            self.store.abort(gen)
        return {"aborted": gen, "page_server_said": said}

    # -- the watch -----------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        assert self.watch is not None and self.cfg.witness is not None
        hb = self.cfg.heartbeat
        active = self.client(self.cfg.active, timeout=hb, connect_timeout=hb)
        witness = self.client(self.cfg.witness, timeout=hb, connect_timeout=hb)
        degraded_since: float | None = None
        while not self.stop_event.is_set() and self.rec.state != "failed over":
            t = monotonic()
            try:
                res = active.call("pair_heartbeat", {"name": self.name,
                                                     "epoch": self.rec.epoch}).result or {}
                ok = bool(res.get("serving", True))
            except OrthrosError:
                ok = False
            if ok:
                self.watch.heartbeat_ok(monotonic())
                degraded_since = None
            else:
                self.watch.heartbeat_missed(monotonic())
            if self.watch.suspects(monotonic()):
                if degraded_since is None:
                    degraded_since = time.time()
                grant = self._ask_witness(witness)
                if grant.get("granted"):
                    try:
                        self.promote(f"the active missed {self.cfg.misses} heartbeats",
                                     epoch=int(grant["epoch"]), detected_at=time.time())
                    except Exception as err:
                        log.error("pair %s: promotion failed: %s", self.name, describe(err))
                        with self.mutex:
                            self.rec.state, self.rec.reason = "degraded", (
                                f"promotion failed: {describe(err)}")
                            self.rec.event("promotion failed", reason=describe(err))
                            self.save()
                    return
                self.refusals.append(str(grant.get("reason")))
                del self.refusals[:-5]
            self.stop_event.wait(max(0.0, hb - (monotonic() - t)))

    def _ask_witness(self, witness: Any) -> dict[str, Any]:
        """The witness's answer; refused only because the active's lease still runs for less
        than a heartbeat, asked again right when it runs out (the witness alone decides, so
        nothing is lost by not asking the active meanwhile)."""
        for _ in range(3):
            try:
                grant: dict[str, Any] = witness.call("witness_promote", {
                    "name": self.name, "epoch": self.rec.epoch}).result or {}
            except OrthrosError as err:
                return {"granted": False, "reason": f"the witness did not answer: {err}"}
            retry = float(grant.get("retry_in") or 0.0)
            if grant.get("granted") or not 0.0 < retry < self.cfg.heartbeat:
                return grant
            if self.stop_event.wait(retry + 0.002):
                break
        return grant

    # -- promotion -----------------------------------------------------------------------------

    def promote(self, why: str, *, epoch: int | None = None, planned: bool = False,
                detected_at: float | None = None) -> dict[str, Any]:
        with self.mutex:
            if self.promoting or self.rec.state == "failed over":
                raise bad(f"pair {self.name} is already failing over or failed over")
            self.promoting = True
        try:
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            if epoch is not None:
                with self.mutex:
                    self.rec.epoch = max(self.rec.epoch, epoch)
                    self.save()
            fenced = "no fence configured"
            if self.cfg.fence and not planned:
                from orthros_py.net.fence import fence_from_config

                fence = fence_from_config(dict(self.cfg.fence), host=self.cfg.active.name)
                try:
                    fence.off()
                    fenced = f"fenced: {fence.describe()}"
                except Exception as err:
                    # The witness's lease already made the old active fence itself: a fence
                    # device that fails is reported, and the promotion goes on.
                    fenced = f"fence failed: {describe(err)}"
                    log.warning("pair %s: %s", self.name, fenced)
                timings["fence_ms"] = (time.perf_counter() - t0) * 1000
            with self.store.reading() as latest:
                result, timings_rest = self._promote_from(latest)
            timings.update(timings_rest)
            timings["total_ms"] = (time.perf_counter() - t0) * 1000
            assert latest is not None
            age = time.time() - latest.committed_at
            with self.mutex:
                self.rec.state, self.rec.reason = "failed over", why
                self.rec.serving_pid = result.pid
                ev = self.rec.event("promoted", planned=planned, generation=latest.number,
                                    **({"lazy": self.lazy_state} if self.lazy_state else {}),
                                    generation_age_ms=round(age * 1000, 1),
                                    generation_frozen_at=(latest.stats or {}).get("frozen_at"),
                                    epoch=self.rec.epoch, pid=result.pid,
                                    detected_at=detected_at,
                                    tcp="kept" if self.cfg.output_commit else "closed",
                                    fence=fenced,
                                    **{k: round(v, 3) for k, v in timings.items()})
                self.save()
            self.stop_event.set()
            threading.Thread(target=self._announce_again, daemon=True).start()
            log.warning("pair %s: promoted: restored generation %d as pid %d (%s)", self.name,
                        latest.number, result.pid, why)
            return ev
        finally:
            with self.mutex:
                self.promoting = False

    def adopt(self, pid: int, why: str, *, epoch: int | None = None) -> dict[str, Any]:
        """A planned failover restored the tree here by a migration: this host serves it."""
        with self.mutex:
            if self.rec.state == "failed over":
                raise bad(f"pair {self.name} failed over already")
            if epoch is not None:
                self.rec.epoch = max(self.rec.epoch, epoch)
            self.rec.state, self.rec.reason = "failed over", why
            self.rec.serving_pid = pid
            ev = self.rec.event("promoted", planned=True, pid=pid, epoch=self.rec.epoch,
                                tcp="kept")
            self.save()
        self.stop_event.set()
        return ev

    def _promote_from(self, latest: Any) -> tuple[Any, dict[str, float]]:
        if latest is None:
            raise OrthrosError(f"pair {self.name} has no committed generation to restore",
                               host=self.agent.name, stage="promote")
        timings: dict[str, float] = {}
        # CRIU binds the restored sockets to the service address, so it must be here
        # first; with the connections kept, they stay locked until they are restored (a
        # client's packet meanwhile would meet no socket and reset the connection).
        t1 = time.perf_counter()
        locked = self._lock_conns(latest.dir) if self.cfg.output_commit else []
        self._take_address()
        timings["address_ms"] = (time.perf_counter() - t1) * 1000
        t2 = time.perf_counter()
        try:
            if self.cfg.paging:
                result = self._restore_lazily(latest.dir, timings)
            else:
                result = self._restore(latest.dir)
        finally:
            self._unlock_conns(locked)
        timings["restore_ms"] = (time.perf_counter() - t2) * 1000
        return result, timings

    def _restore_lazily(self, image: str, timings: dict[str, float]) -> Any:
        """The hot pages placed before the tree resumes, the cold ones left to CRIU's
        lazy-pages daemon, which serves a fault at once and pushes the rest from the disk base
        in the background (``_await_lazy`` records when the last one is in)."""
        from orthros_py.agent.pair.tiers import PagingStore
        from orthros_py.criu.lazy import LazyPagesDaemon

        assert isinstance(self.store, PagingStore)
        top = self.agent.images_root / image
        t = time.perf_counter()
        plan = self.store.prepare_lazy(top)
        timings["lazy_plan_ms"] = (time.perf_counter() - t) * 1000
        # Info level: the daemon's summary (pages in, on fault) is logged there.
        daemon = LazyPagesDaemon(Path(plan["view"]), log_level=3).start()
        try:
            result = self._restore(image, lazy=True)
        except BaseException:
            daemon.stop()
            raise
        self.lazy = daemon
        self.lazy_state = {**{k: v for k, v in plan.items() if k != "view"},
                           "state": "crossing", "started_at": time.time()}
        threading.Thread(target=self._await_lazy, args=(daemon, list(result.pids)), daemon=True,
                         name=f"pair-{self.name}-lazy").start()
        return result

    def _await_lazy(self, daemon: Any, pids: list[int]) -> None:
        try:
            res = daemon.wait(timeout=LAZY_WAIT_S)
        except OrthrosError as err:
            daemon.stop()
            # Its cold pages would now read as zeros (the daemon's userfaultfds closed with
            # it): the copy must not run one more instruction.
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with self.mutex:
                state = dict(self.lazy_state or {}, state="failed", reason=describe(err))
                self.lazy_state = state
                self.rec.event("lazy pages failed", reason=describe(err))
                self.save()
            log.error("pair %s: the lazy pages of the restored tree failed: %s", self.name,
                      describe(err))
            return
        with self.mutex:
            done = {**res.stats.to_dict(), "elapsed_ms": round(res.elapsed_ms, 3),
                    "finished_at": res.finished_at}
            self.lazy_state = dict(self.lazy_state or {}, state="complete", **done)
            self.rec.event("lazy pages in", **done)
            self.save()
        log.info("pair %s: every lazy page is in (%d of %d, %d on fault) after %.0f ms",
                 self.name, res.stats.copied, res.stats.total, res.stats.faulted,
                 res.elapsed_ms)

    def _restore(self, image: str, *, lazy: bool = False) -> Any:
        from orthros_py.agent.ops.criu import restore_image
        from orthros_py.criu.request import CriuNetworkLock, RestoreOptions

        cfg = self.cfg
        opts = RestoreOptions(tcp_established=cfg.tcp_established,
                              tcp_close=cfg.tcp_established and not cfg.output_commit,
                              shell_job=cfg.shell_job, file_locks=cfg.file_locks,
                              network_lock=CriuNetworkLock.SKIP, log_level=2, lazy_pages=lazy)
        return restore_image(self.agent, image, opts)

    def _xdp(self) -> Any:
        from orthros_py.agent.ops.net import _netlock

        with self.agent.netlock_mutex:
            lock = _netlock(self.agent, "xdp", None)
            lock.prepare()
        return lock

    def _lock_conns(self, image: str) -> list[Any]:
        from orthros_py.checkpoint import checkpoint_conns

        conns = checkpoint_conns(self.agent.images_root / image)
        if not conns or not self.cfg.service_ifname:
            return []
        lock = self._xdp()
        with self.agent.netlock_mutex:
            lock.attach([self.cfg.service_ifname], netns=None)
            return list(lock.lock(conns))

    def _unlock_conns(self, conns: list[Any]) -> None:
        if not conns:
            return
        lock = self._xdp()
        with self.agent.netlock_mutex:
            lock.unlock(conns)
            ip = str(self.cfg.service_ip).split("/")[0]
            mine = [lc for lc in lock.locked() if ip in (lc.conn.local_ip, lc.conn.remote_ip)]
            if not mine and self.cfg.service_ifname:
                with contextlib.suppress(Exception):
                    lock.detach([self.cfg.service_ifname], netns=None)

    def _take_address(self) -> None:
        if not self.cfg.service_ip or not self.cfg.service_ifname:
            return
        from orthros_py.net import addr

        addr.add_address(None, self.cfg.service_ifname, self.cfg.service_ip)
        with contextlib.suppress(Exception):
            addr.Link(None, self.cfg.service_ifname).gratuitous_arp(
                self.cfg.service_ip.split("/")[0], count=1)

    def _announce_again(self) -> None:
        """One more gratuitous ARP once the service runs (a switch that missed the first
        learns it now), off the promotion's critical path."""
        if not self.cfg.service_ip or not self.cfg.service_ifname:
            return
        from orthros_py.net import addr

        with contextlib.suppress(Exception):
            addr.Link(None, self.cfg.service_ifname).gratuitous_arp(
                self.cfg.service_ip.split("/")[0], count=1)

    def status(self) -> dict[str, Any]:
        d = super().status()
        with self.mutex:
            d["last_checkpoint"] = self.last_checkpoint
            d["witness_refusals"] = list(self.refusals)
        d["storage_bytes"] = self.store.bytes_used()
        d["generations"] = [g.to_dict() for g in self.store.generations()]
        if self.watch is not None:
            d["heartbeats"] = self.watch.to_dict(monotonic())
        latest = self.store.latest()
        d["newest"] = latest.to_dict() if latest is not None else None
        if self.cfg.paging:
            from orthros_py.agent.pair.tiers import PagingStore

            if isinstance(self.store, PagingStore):
                d["paging"] = self.store.tier_stats().to_dict()
            with self.mutex:
                d["lazy"] = dict(self.lazy_state) if self.lazy_state else None
        return d
