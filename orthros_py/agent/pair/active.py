"""The active host's side of a pair: the checkpoint loop, the output hold, the lease and the
self-fence (see ``runtime`` for the whole picture).

One checkpoint, in order (the standby commits nothing it has not all of):
1. the standby opens generation k (parent: the newest committed one) and its page server;
2. the tree is dumped with the tree left running, memory to that page server; while it is
   frozen (CRIU's ``post-dump`` notification) the output hold marks what the tree has sent;
3. the other image files go to the standby; it verifies and commits k atomically;
4. the packets up to the mark are released.
A checkpoint that fails on the way aborts k on the standby (k-1 stays committed), releases what
the hold keeps (the standby cannot take those packets' state over any more: the service must
not stall on it), ends the dirty tracking (pages written before the failed dump may never have
reached the standby, so the next checkpoint must send everything again), and marks the pair
degraded with the reason; the next one tries again.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from orthros_py.agent.pair.config import PairRecord
from orthros_py.agent.pair.runtime import (
    OUTPUT_QUEUE_BASE,
    PairsHost,
    Role,
    describe,
    generation_image,
    local_image,
    log,
    monotonic,
    remove_tree,
)
from orthros_py.errors import NoSuchProcessError, OrthrosError

KEEP_DEGRADED_REASON = 1200  # characters of a failure kept in the record


class ActiveSide(Role):
    def __init__(self, pairs: PairsHost, rec: PairRecord) -> None:
        super().__init__(pairs, rec)
        self.tracker: Any = None
        self.hold: Any = None
        self.guard: Any = None
        self.paused = False
        self.busy = False  # a checkpoint is under way
        self.checkpoints: list[dict[str, Any]] = []  # the newest few, for status
        self.failures = 0
        self.full_reason: str | None = "first checkpoint"  # why the next one sends everything
        self.tracking_note: str | None = None
        self.standby_said: str | None = None  # the reason a failed generation had there
        self.first_failure: str | None = None  # of the failures since the last success

    # -- life -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.rec.state in ("failed over", "fenced", "stopped"):
            log.info("pair %s: this host stood down (%s): not serving it again", self.name,
                     self.rec.state)
            self._flush_hold_rule()  # one an agent killed before it could remove it
            return
        if self.cfg.failover:
            from orthros_py.agent.pair.guard import ActiveGuard, GuardTimings

            timings = GuardTimings(self.cfg.heartbeat, self.cfg.misses)
            self.guard = ActiveGuard(timings, now=monotonic())
            if self.rec.events and self.rec.events[-1].get("what") == "agent restarted":
                # Back after a restart: a newer epoch anywhere means the service moved on.
                self._check_epoch_after_restart()
                if self.rec.state in ("failed over", "fenced"):
                    self._flush_hold_rule()
                    return
        if self.rec.tree_started is None:
            from orthros_py.proc.tree import ProcessRef

            try:
                self.rec.tree_started = ProcessRef.of(self.cfg.pid).create_time
            except OrthrosError as err:
                raise OrthrosError(f"pid {self.cfg.pid} is not running on "
                                   f"{self.agent.name}: {err.msg}", pid=self.cfg.pid) from err
        # The lock's program built and pinned now, in the request that opens the pair (its
        # caller waits for it), not inside the first checkpoint: a first build takes ~10 s of
        # a busy CPU, during which this agent answers other requests slowly.
        from orthros_py.agent.ops.net import _netlock

        with self.agent.netlock_mutex:
            _netlock(self.agent, "xdp", None).prepare()
        # A pair closed while this ran (an agent taking its roles up again serves meanwhile)
        # must not get a hold, a tracker or threads after its close.
        with self.mutex:
            if self.stop_event.is_set():
                return
            self._open_tracking()
            if self.cfg.output_commit:
                self._open_hold()
            self.spawn(self._loop, "replicator")
            if self.guard is not None:
                self.spawn(self._renew_loop, "lease")
                self.spawn(self._guard_loop, "guard")
            self.rec.state = "replicating" if self.rec.generation else "starting"
            self.save()

    def _open_tracking(self) -> None:
        from orthros_py.criu import dirtytrack

        user = dirtytrack.tree_uses_userfaultfd(self._tree_pids())
        if user is not None:
            raise NoSuchProcessError(
                f"pid {user} of the tree uses userfaultfd itself, and orthros tracks the "
                "tree's memory with a userfaultfd of its own: one memory range can have only "
                "one, so this tree cannot be protected", pid=self.cfg.pid)
        if dirtytrack.tracking_available():
            self.tracker = dirtytrack.DirtyTracker()
            self.tracking_note = "incremental (userfaultfd write-protect)"
        else:
            self.tracker = None
            self.tracking_note = ("full checkpoints: this host has neither soft-dirty nor "
                                  "userfaultfd write-protect tracking with orthros's CRIU")

    def _open_hold(self) -> None:
        from orthros_py.net import nfqueue

        ip = str(self.cfg.service_ip).split("/")[0]
        queue = self._queue_number()
        # A rule left by this agent before it was killed sends the output to a queue nobody
        # reads (held for good: fail closed); ours replaces it.
        nfqueue.flush(None, queue=queue)
        self.hold = nfqueue.OutputHold(address=ip, queue=queue)
        self.hold.start()

    def _queue_number(self) -> int:
        # One queue per pair on this host: stable for a name, away from other users' numbers.
        return OUTPUT_QUEUE_BASE + (sum(self.name.encode()) * 31) % 800

    def _tree_pids(self) -> list[int]:
        import psutil

        try:
            root = psutil.Process(self.cfg.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            return []

    def _flush_hold_rule(self) -> None:
        if not self.cfg.output_commit:
            return
        from orthros_py.net import nfqueue

        with contextlib.suppress(Exception):
            nfqueue.flush(None, queue=self._queue_number())

    def shutdown(self) -> None:
        with self.mutex:  # after a start under way has finished, or before it begins
            self.stop_event.set()
        super().shutdown()
        if self.hold is not None:
            with contextlib.suppress(Exception):
                self.hold.close()
            self.hold = None
        if self.tracker is not None:
            with contextlib.suppress(Exception):
                self.tracker.close()
            self.tracker = None

    def stop(self, keep_images: bool) -> dict[str, Any]:
        out = super().stop(keep_images)
        self._flush_hold_rule()
        self._remove_local_images()
        with self.mutex:
            self.rec.state = "stopped"
        return out

    # -- the checkpoint loop ----------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            start = monotonic()
            if not self.paused and self.rec.state not in ("failed over", "fenced"):
                self.checkpoint()
            # After failures, back off (up to 5 s): every attempt freezes the tree and locks
            # its connections, and a refusal (CRIU's, a full standby) rarely ends by itself
            # within an interval.
            wait = self.cfg.interval * (2 ** min(self.failures, 6)) if self.failures else \
                self.cfg.interval
            left = min(max(wait, self.cfg.interval), max(5.0, self.cfg.interval)) - (
                monotonic() - start)
            self.stop_event.wait(max(left, 0.0))

    def checkpoint(self) -> dict[str, Any] | None:
        """One checkpoint; None when it failed (the pair is degraded then)."""
        with self.mutex:
            if self.busy:
                return None
            self.busy = True
        try:
            return self._checkpoint()
        except Exception as err:
            self._failed(err)
            return None
        finally:
            with self.mutex:
                self.busy = False

    def _checkpoint(self) -> dict[str, Any]:
        from orthros_py.agent.ops.criu import dump_for_pair
        from orthros_py.criu.request import CriuNetworkLock, DumpOptions
        from orthros_py.netlock.method import NetworkLock

        a, cfg = self.agent, self.cfg
        t0 = time.perf_counter()
        tracking = self.tracker is not None
        # Our copy of the newest committed generation, if we have it: CRIU reads its inventory.
        # Without tracking there is no parent (CRIU's pid-reuse check needs a tracked one).
        mine = self.rec.generation
        parent_ok = tracking and mine >= 1 and (a.images_root / local_image(self.name,
                                                                            mine)).is_dir()
        standby = self.client(cfg.standby, timeout=max(30.0, cfg.interval * 10),
                              connect_timeout=max(1.0, cfg.heartbeat * 5))
        # The standby numbers the generation and says whether our parent is its newest
        # committed one (an answer lost after a commit would otherwise split the chains).
        begun = standby.call("pair_begin", {
            "name": self.name, "epoch": self.rec.epoch,
            "parent": mine if parent_ok else None}).result or {}
        if begun.get("stand_down"):
            self.note_epoch(int(begun["epoch"]), "the standby")
            return {"stood_down": True}
        gen = int(begun["generation"])
        image = local_image(self.name, gen)
        path = a.image_path(image)
        remove_tree(path)  # a leftover of a checkpoint that failed half way
        parent = local_image(self.name, mine)
        has_parent = bool(begun.get("incremental"))
        if not has_parent and self.full_reason is None:
            self.full_reason = "the standby holds no generation this host can build on"
        opts = DumpOptions(
            leave_running=True, tcp_established=cfg.tcp_established, shell_job=cfg.shell_job,
            file_locks=cfg.file_locks, network_lock=CriuNetworkLock.SKIP, notify=True,
            track_mem=tracking, parent_img=f"../{parent}" if has_parent else None,
            page_server=(str(begun["address"] or cfg.standby.address), int(begun["port"])),
            log_level=2)
        mark: list[int] = []
        frozen_at: list[float] = []  # when the tree was frozen: what this generation holds

        def on_notify(script: str, _pid: int) -> None:
            # post-dump: the tree is still frozen, so everything it sent is in the queue.
            if script == "post-dump":
                frozen_at.append(time.time())
                if self.hold is not None:
                    mark.append(self.hold.mark())

        committed = False
        try:
            result = dump_for_pair(a, cfg.pid, image, path, opts, str(begun["nonce"]),
                                   generation_image(self.name, gen),
                                   page_timeout=self._page_timeout(),
                                   network_lock=NetworkLock.XDP, on_notify=on_notify,
                                   dirty_track=self.tracker)
            if self.tracker is not None:
                self.tracker.collect()
            dumped = time.perf_counter()
            files = [p for p in sorted(path.iterdir())
                     if p.is_file() and not p.is_symlink() and not p.name.endswith(".log")]
            # A stall is bounded as every other call to the standby is (not by the default
            # transfer timeout of 10 min): a standby cut off mid-upload must fail the
            # checkpoint, and the pair show degraded, within that.
            sent = standby.upload_files(generation_image(self.name, gen), files,
                                        timeout=standby.timeout)
            stats = result.stats.to_dict() if result.stats else {}
            chan = result.extra.get("page_channel") or {}
            info = {"generation": gen, "frozen_ms": stats.get("frozen_ms"),
                    "frozen_at": frozen_at[-1] if frozen_at else None,
                    "pages_written": stats.get("pages_written"),
                    "pages_skipped_parent": stats.get("pages_skipped_parent"),
                    "page_bytes": chan.get("bytes_sent"),
                    "file_bytes": sum(f.size for f in sent),
                    "dump_ms": round(result.elapsed_ms, 3),
                    "full": self.full_reason is not None or not tracking,
                    "full_reason": self.full_reason if tracking else self.tracking_note}
            done = standby.call("pair_commit", {"name": self.name, "generation": gen,
                                                "epoch": self.rec.epoch,
                                                "stats": info}).result or {}
            committed = True
        finally:
            if not committed:
                self.standby_said = None
                with contextlib.suppress(Exception):
                    ab = standby.call("pair_abort", {"name": self.name, "generation": gen},
                                      timeout=5.0).result or {}
                    self.standby_said = ab.get("page_server_said")
                remove_tree(path)
        released = 0
        if self.hold is not None and mark:
            released = self.hold.release(mark[-1])
        info["released_packets"] = released
        info["transfer_ms"] = round((time.perf_counter() - dumped) * 1000, 3)
        info["duration_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        info["storage_bytes"] = done.get("storage_bytes")
        info["at"] = time.time()
        self._remove_local_images(keep=image)
        with self.mutex:
            if self.stood_down():
                return info  # fenced or failed over meanwhile: that state stays
            self.full_reason = None
            self.failures = 0
            self.first_failure = None
            self.rec.generation = gen
            self.rec.committed_at = time.time()
            self.rec.state, self.rec.reason, self.rec.reason_error = "replicating", None, None
            self.checkpoints.append(info)
            del self.checkpoints[:-10]
            self.save()
        return info

    def _remove_local_images(self, keep: str | None = None) -> None:
        """Every copy of a generation this host keeps for the pair (an agent killed between
        the standby's commit and its own record may have left one the numbers do not name)."""
        prefix = f"{self.name}.a"
        for name in self.agent.image_names():
            if name.startswith(prefix) and name[len(prefix):].isdigit() and name != keep:
                remove_tree(self.agent.images_root / name)

    def _page_timeout(self) -> float:
        """How long a checkpoint waits for a silent standby, the tree frozen meanwhile: long
        enough for a busy standby, short against what clients tolerate."""
        return max(2.0, 10 * self.cfg.heartbeat)

    def _failed(self, err: BaseException) -> None:
        why = describe(err)
        said, self.standby_said = self.standby_said, None
        if said:
            # What the standby's page server logged before its generation was removed
            # (a full disk shows there, not in the broken channel seen from here).
            why = f"{why}; the standby's page server said: {said}"
        # Named with the standby: a broken channel reads as CRIU's own failure otherwise.
        why = f"the checkpoint to {self.cfg.standby.name} failed: {why}"
        if self.failures == 0:
            self.first_failure = why
        elif self.first_failure and self.first_failure != why:
            # Later attempts often fail only as a consequence (a full standby resets the
            # channel): the first cause stays in view until a checkpoint succeeds.
            why = f"{why} (failing since: {self.first_failure})"
        why = why[:KEEP_DEGRADED_REASON]
        log.warning("pair %s: checkpoint failed: %s", self.name, why)
        if self.hold is not None:
            with contextlib.suppress(Exception):
                self.hold.release_all()
        if self.tracker is not None:
            # Pages written before this dump may never have reached the standby.
            with contextlib.suppress(Exception):
                self.tracker.forget()
        gone = isinstance(err, NoSuchProcessError) or not self._tree_pids()
        with self.mutex:
            if self.stood_down():
                return  # a checkpoint under way when this host stood down: nothing to say
            self.failures += 1
            self.full_reason = "the checkpoint before failed"
            self.rec.state = "degraded"
            self.rec.reason = ("the protected tree is gone" if gone else why)
            # Kept whole, so that the caller who waits for the first generation fails as the
            # checkpoint did (a CRIU refusal exits as one).
            self.rec.reason_error = (err.to_dict() if isinstance(err, OrthrosError)
                                     else None)
            if self.failures == 1 or gone:
                self.rec.event("checkpoint failed", reason=self.rec.reason)
            self.save()

    # -- heartbeats, the lease, the self-fence ------------------------------------------------

    def stood_down(self) -> bool:
        return self.rec.state in ("failed over", "fenced", "stopped")

    def heartbeat(self, epoch: int) -> dict[str, Any]:
        """The standby's heartbeat: it is alive and sees us."""
        if self.note_epoch(epoch, "the standby"):
            return self.beat_answer()
        if self.guard is not None:
            # The time the request arrived: the standby records this heartbeat when the answer
            # reaches it, later still, so its suspicion cannot start earlier than our count.
            self.guard.heard_from_standby(monotonic())
        return self.beat_answer()

    def beat_answer(self) -> dict[str, Any]:
        with self.mutex:
            return {"epoch": self.rec.epoch, "state": self.rec.state,
                    "generation": self.rec.generation, "pid": self.cfg.pid,
                    "serving": self.rec.state not in ("failed over", "fenced", "stopped")}

    def _renew_loop(self) -> None:
        """Renew the lease with the witness every heartbeat."""
        from orthros_py.agent.pair.guard import Verdict

        assert self.guard is not None and self.cfg.witness is not None
        hb = self.cfg.heartbeat
        witness = self.client(self.cfg.witness, timeout=hb, connect_timeout=hb)
        while not self.stop_event.is_set() and self.rec.state not in ("failed over", "fenced"):
            sent = monotonic()
            try:
                res = witness.call("witness_renew", {"name": self.name, "epoch": self.rec.epoch,
                                                     "role": "active"}).result or {}
            except OrthrosError:
                res = {}
            verdict = str(res.get("verdict"))
            if verdict == Verdict.STAND_DOWN.value or int(res.get("epoch") or 0) > self.rec.epoch:
                self.note_epoch(max(int(res.get("epoch") or 0), self.rec.epoch + 1),
                                "the witness")
                return
            if verdict == Verdict.RENEWED.value:
                # The time the request left, not the answer's: the witness recorded the renewal
                # no earlier than that, and the guard's proof counts from there.
                self.guard.heard_from_witness(sent)
            self.stop_event.wait(max(0.0, hb - (monotonic() - sent)))

    def _guard_loop(self) -> None:
        """Fence this host once it has heard neither the standby nor the witness for the
        guard's self-fence time, looked at every ``check_every``."""
        assert self.guard is not None
        every = self.guard.timings.check_every
        while not self.stop_event.is_set() and self.rec.state not in ("failed over", "fenced"):
            if self.guard.must_fence(monotonic()):
                self.fence_self("heard neither the standby nor the witness for "
                                f"{self.guard.timings.self_fence_after * 1000:.0f} ms")
                return
            self.stop_event.wait(every)

    def on_newer_epoch(self, source: str) -> None:
        self.stand_down(f"{source} has a newer epoch: the service runs elsewhere now",
                        state="failed over")

    def fence_self(self, why: str) -> None:
        self.stand_down(why, state="fenced")

    def stand_down(self, why: str, *, state: str, kill: bool = True) -> None:
        """Stop serving here at once: the tree killed, the address dropped, held output dropped
        (the standby's copy never sent those packets: they must never leave)."""
        with self.mutex:
            if self.rec.state in ("failed over", "fenced"):
                return
            self.rec.state, self.rec.reason = state, why
            self.rec.event("stood down", reason=why)
            self.save()
        log.warning("pair %s: standing down: %s", self.name, why)
        self.stop_event.set()
        if self.hold is not None:
            with contextlib.suppress(Exception):
                self.hold.drop_all()
        if kill:
            from orthros_py.proc.tree import ProcessRef, kill_tree

            with contextlib.suppress(Exception):
                kill_tree(ProcessRef(self.cfg.pid, self.rec.tree_started or 0.0), timeout=2.0)
        self._drop_address()
        if self.hold is not None:
            with contextlib.suppress(Exception):
                self.hold.close(verdict="drop")
            self.hold = None
        self._flush_hold_rule()

    def _drop_address(self) -> None:
        if not self.cfg.service_ip:
            return
        from orthros_py.net import addr

        ip = self.cfg.service_ip
        with contextlib.suppress(Exception):
            with addr.iproute(None) as ipr:
                links = {int(link["index"]): str(link.get("IFLA_IFNAME"))
                         for link in ipr.get_links()}
            for ifname in links.values():
                with contextlib.suppress(Exception):
                    addr.remove_address(None, ifname, ip)

    def _check_epoch_after_restart(self) -> None:
        for peer, op in ((self.cfg.witness, "witness_epoch"), (self.cfg.standby, "pair_epoch")):
            if peer is None:
                continue
            try:
                res = self.client(peer, timeout=2.0).call(op, {"name": self.name}).result or {}
            except OrthrosError:
                continue
            if int(res.get("epoch", 0)) > self.rec.epoch or res.get("stand_down"):
                self.note_epoch(max(int(res.get("epoch", 0)), self.rec.epoch + 1), peer.name)
                return

    # -- control ------------------------------------------------------------------------------

    def pause(self) -> dict[str, Any]:
        """Stop checkpointing (a planned failover is about to move the tree)."""
        with self.mutex:
            self.paused = True
        deadline = time.monotonic() + 60
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.hold is not None:
            self.hold.release_all()
        return self.beat_answer()

    def resume(self) -> None:
        with self.mutex:
            self.paused = False

    def status(self) -> dict[str, Any]:
        d = super().status()
        with self.mutex:
            d["checkpoints"] = list(self.checkpoints)
            d["tracking"] = self.tracking_note
            d["tree_running"] = bool(self._tree_pids())
            d["output_hold"] = (self.hold.stats().to_dict() if self.hold is not None
                                else None)
            if self.guard is not None:
                d["lease"] = self.guard.to_dict(monotonic())
        d["pid_self"] = os.getpid()
        return d
