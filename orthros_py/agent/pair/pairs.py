"""The registry of the pairs one agent takes part in: it makes each role, opens and closes
pairs, and takes them up again from their records when the agent starts (see ``runtime``)."""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any

from orthros_py.agent.pair.active import ActiveSide
from orthros_py.agent.pair.config import PairConfig, PairRecord, RecordStore, bad
from orthros_py.agent.pair.runtime import Role, describe, log
from orthros_py.agent.pair.standby import StandbySide
from orthros_py.agent.pair.witness import WitnessSide

if TYPE_CHECKING:
    from orthros_py.agent.state import Agent

WITNESS_BOOK = "witness.json"
ROLE_CLASSES: dict[str, type[Role]] = {"active": ActiveSide, "standby": StandbySide,
                                       "witness": WitnessSide}


class Pairs:
    """Every pair of one agent, by name."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.store = RecordStore(agent.images_root)
        self.roles: dict[str, Role] = {}
        self.mutex = threading.Lock()
        self._book: Any = None

    @property
    def book(self) -> Any:
        """The witness's votes (one book for every pair this agent witnesses)."""
        from orthros_py.agent.pair.guard import WitnessBook

        with self.mutex:
            if self._book is None:
                self.store.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._book = WitnessBook(self.store.dir / WITNESS_BOOK)
            return self._book

    def make(self, rec: PairRecord) -> Role:
        return ROLE_CLASSES[rec.role](self, rec)

    def open(self, cfg: PairConfig, role: str, epoch: int = 1) -> Role:
        if cfg.role_of(self.agent.name) not in (role, None):
            raise bad(f"this agent is {self.agent.name}, the pair's "
                      f"{cfg.role_of(self.agent.name)}, not its {role}")
        with self.mutex:
            if cfg.name in self.roles:
                raise bad(f"this agent already takes part in a pair named {cfg.name!r} "
                          f"(as its {self.roles[cfg.name].rec.role})")
            rec = PairRecord(cfg, role, epoch=epoch)
            role_obj = self.make(rec)
            self.roles[cfg.name] = role_obj
        try:
            role_obj.save()
            role_obj.start()
        except BaseException:
            with self.mutex:
                self.roles.pop(cfg.name, None)
            with contextlib.suppress(Exception):
                role_obj.stop(keep_images=False)
            self.store.delete(cfg.name)
            raise
        return role_obj

    def get(self, name: str) -> Role:
        with self.mutex:
            role = self.roles.get(name)
        if role is None:
            raise bad(f"this agent ({self.agent.name}) takes part in no pair named {name!r}")
        return role

    def close(self, name: str, *, keep_images: bool = False) -> dict[str, Any]:
        role = self.get(name)
        out = role.stop(keep_images)
        with self.mutex:
            self.roles.pop(name, None)
            book = self._book
            if book is not None and not book.status():
                # The witness's book held only this pair: nothing of it stays on this host.
                self._book = None
                (self.store.dir / WITNESS_BOOK).unlink(missing_ok=True)
        self.store.delete(name)
        return out

    def statuses(self) -> list[dict[str, Any]]:
        with self.mutex:
            roles = list(self.roles.values())
        return [r.status() for r in roles]

    def resume_all(self) -> list[str]:
        """At the agent's start: take up every pair role kept on disk."""
        recs, broken = self.store.load_all()
        for line in broken:
            log.warning("pair record not readable, left alone: %s", line)
        names = []
        for rec in recs:
            if rec.state == "stopped":
                self.store.delete(rec.config.name)
                continue
            role = self.make(rec)
            with self.mutex:
                self.roles[rec.config.name] = role
            rec.event("agent restarted")
            # Each role starts in a thread of its own: the agent serves meanwhile (a role may
            # first ask its peers about the epoch, and they may be slow or gone).
            threading.Thread(target=self._take_up, args=(role,), daemon=True,
                             name=f"pair-{rec.config.name}-resume").start()
            names.append(rec.config.name)
        return names

    def _take_up(self, role: Role) -> None:
        try:
            role.start()
        except Exception as err:
            log.warning("pair %s: could not take up the %s role again: %s", role.name,
                        role.rec.role, describe(err))
            with role.mutex:
                role.rec.state, role.rec.reason = "degraded", f"could not resume: {describe(err)}"
                role.save()

    def shutdown(self) -> None:
        with self.mutex:
            roles = list(self.roles.values())
        for r in roles:
            r.shutdown()
