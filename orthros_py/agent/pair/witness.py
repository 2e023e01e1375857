"""The witness's side of a pair: a third host's agent that only votes (as corosync's qdevice
arbiter does). It keeps the pair's epoch and the active's lease (``guard.WitnessBook``) and grants
a promotion only to the pair's standby, at the current epoch, once the active's lease has run
out; the grant bumps the epoch before it is answered."""

from __future__ import annotations

from typing import Any

from orthros_py.agent.pair.config import PairRecord
from orthros_py.agent.pair.runtime import PairsHost, Role, monotonic


class WitnessSide(Role):
    def __init__(self, pairs: PairsHost, rec: PairRecord) -> None:
        super().__init__(pairs, rec)
        from orthros_py.agent.pair.guard import GuardTimings

        self.timings = GuardTimings(self.cfg.heartbeat, self.cfg.misses)

    def start(self) -> None:
        book = self.pairs.book
        if book.epoch_of(self.name) is None:
            book.register(self.name, self.cfg.active.name, self.cfg.standby.name,
                          self.rec.epoch, now=monotonic())
        with self.mutex:
            self.rec.epoch = book.epoch_of(self.name) or self.rec.epoch
            self.rec.state = "replicating"
            self.save()

    def renew(self, host: str, epoch: int) -> dict[str, Any]:
        verdict = self.pairs.book.renew(self.name, host, epoch, monotonic())
        return {"verdict": verdict.value, "epoch": self.pairs.book.epoch_of(self.name)}

    def promote(self, candidate: str, epoch: int) -> dict[str, Any]:
        grant = self.pairs.book.promote(self.name, candidate, epoch, monotonic(),
                                        self.timings.lease)
        out = {"granted": grant.granted, "reason": grant.reason,
               "epoch": self.pairs.book.epoch_of(self.name), "retry_in": grant.retry_in}
        if grant.granted:
            with self.mutex:
                self.rec.epoch = int(out["epoch"] or self.rec.epoch)
                self.rec.state = "failed over"
                self.rec.event("granted a promotion", to=candidate, epoch=self.rec.epoch)
                self.save()
        return out

    def stop(self, keep_images: bool) -> dict[str, Any]:
        out = super().stop(keep_images)
        self.pairs.book.forget(self.name)
        return out

    def status(self) -> dict[str, Any]:
        d = super().status()
        d["book"] = self.pairs.book.status().get(self.name)
        return d
