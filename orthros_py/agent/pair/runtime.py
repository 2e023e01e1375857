"""The pairs one agent takes part in, and the work of each role.

- The **active** checkpoints the tree every interval with the tree left running: only the pages
  written since the last generation cross (CRIU's parent images over the userfaultfd
  write-protect tracking, ``orthros_py.criu.dirtytrack``), on the authenticated page channel to
  the standby's page server, then the other image files; the standby commits the generation,
  and only then, with output commit, are the packets the tree sent before that checkpoint's
  freeze released (``orthros_py.net.nfqueue``). With automatic failover it renews its lease with
  the witness every heartbeat and fences itself when it has lost both the standby and the
  witness (``guard``).
- The **standby** keeps the generations (``store``), answers nothing to clients, and with
  automatic failover watches the active; after ``misses`` missed heartbeats it asks the witness,
  and only with its grant fences the active (where a fence is configured), restores the newest
  committed generation and takes the service address with gratuitous ARP.
- The **witness** only votes (``guard.WitnessBook``).

Every change of state is written to the pair's record first (``config.RecordStore``), so an
agent that restarts takes its role up again; an agent that finds a newer epoch anywhere stops
its copy and drops the address before anything else.

Privileges: root (CRIU, network namespaces, NFQUEUE, addresses).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from orthros_py.agent.pair.config import (
    PairConfig,
    PairRecord,
    PeerAddr,
    RecordStore,
)
from orthros_py.errors import OrthrosError

if TYPE_CHECKING:
    from orthros_py.agent.client import AgentClient
    from orthros_py.agent.state import Agent

log = logging.getLogger("orthros.agent.pair")

OUTPUT_QUEUE_BASE = 7100  # NFQUEUE numbers of output holds: one per pair on a host


def local_image(name: str, gen: int) -> str:
    """The active's own copy of generation ``gen`` (every image file but the memory, which
    went to the standby): the next dump's parent, which CRIU reads for its inventory."""
    return f"{name}.a{gen:06d}"


def generation_image(name: str, gen: int) -> str:
    return f"{name}.g{gen:06d}"


def describe(err: BaseException) -> str:
    return str(err) if isinstance(err, OrthrosError) else f"{type(err).__name__}: {err}"


class PairsHost(Protocol):
    """What a role needs of the registry that holds it (``pairs.Pairs``)."""

    agent: Agent
    store: RecordStore

    @property
    def book(self) -> Any: ...


class Role:
    """One agent's part in one pair."""

    def __init__(self, pairs: PairsHost, rec: PairRecord) -> None:
        self.pairs = pairs
        self.agent = pairs.agent
        self.rec = rec
        self.cfg = rec.config
        self.mutex = threading.RLock()
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    @property
    def name(self) -> str:
        return self.cfg.name

    def save(self) -> None:
        self.pairs.store.save(self.rec)

    def client(self, peer: PeerAddr, timeout: float, connect_timeout: float | None = None
               ) -> AgentClient:
        from orthros_py.agent.client import AgentClient

        return AgentClient(peer.address, peer.port, self.agent.key, name=peer.name,
                           timeout=timeout,
                           connect_timeout=connect_timeout if connect_timeout else timeout)

    def spawn(self, target: Any, what: str) -> None:
        t = threading.Thread(target=self._guarded, args=(target, what),
                             name=f"pair-{self.name}-{what}", daemon=True)
        self.threads.append(t)
        t.start()

    def _guarded(self, target: Any, what: str) -> None:
        try:
            target()
        except Exception:  # a thread that dies silently would leave the pair unwatched
            log.exception("pair %s: the %s thread failed", self.name, what)
            with self.mutex:
                if self.rec.state not in ("failed over", "fenced", "stopped"):
                    self.rec.state, self.rec.reason = "degraded", f"the {what} thread failed"
                    self.save()

    def start(self) -> None:
        """Start the role's threads (at pair start and when the agent starts again)."""

    def shutdown(self) -> None:
        """Stop the threads; the record stays (the agent is stopping, or the pair ends)."""
        self.stop_event.set()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=10)

    def stop(self, keep_images: bool) -> dict[str, Any]:
        """End this host's part: nothing of the pair left here but what ``keep_images`` keeps."""
        self.shutdown()
        return {"host": self.agent.name, "role": self.rec.role}

    def status(self) -> dict[str, Any]:
        with self.mutex:
            d = self.rec.to_dict()
        d["host"] = self.agent.name
        return d

    def note_epoch(self, epoch: int, source: str) -> bool:
        """A newer epoch seen from ``source``: this host lost the service; True if it was."""
        with self.mutex:
            if epoch <= self.rec.epoch:
                return False
            old = self.rec.epoch
            self.rec.epoch = epoch
            self.rec.event("newer epoch", epoch=epoch, was=old, source=source)
            self.save()
        self.on_newer_epoch(source)
        return True

    def on_newer_epoch(self, source: str) -> None:
        pass


def remove_tree(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)


def replace_cfg(cfg: PairConfig, **changes: Any) -> PairConfig:
    return dataclasses.replace(cfg, **changes)


def monotonic() -> float:
    return time.monotonic()
