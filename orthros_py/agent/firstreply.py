"""When a restored tree first answered: the first reply its peers acknowledged after a restore.

A migration's downtime ends when the locks are lifted, but what a client waits through ends when
the service's first answer reaches it. orthros cannot speak every service's protocol; what every
TCP service does when it answers is send data that its peer acknowledges. So the agent that
restored a tree watches the tree's established connections from the restore on (the tree is
still locked then) and notes the first instant one of them has more bytes acknowledged than at
the restore: a reply has reached a client (data the tree had queued before the dump, resent,
counts too: the client was waiting for it).

Interfaces: NETLINK_SOCK_DIAG with tcp_info (``orthros_py.net.conns.bytes_acked``), /proc/PID/fd,
a thread that polls every ``POLL_S`` until the first reply or ``TIMEOUT_S``. Root (setns).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from orthros_py.net import conns as conns_mod

log = logging.getLogger("orthros.agent")

POLL_S = 0.005  # a reply is timed to within this (and the poll's own ~1 ms)
TIMEOUT_S = 30.0  # a service that answers nobody for this long has no figure


class FirstReply:
    """Watches the tree of ``pid`` (restored at ``restored_at``, time.time()) in a thread."""

    def __init__(self, pid: int, pids: list[int], restored_at: float) -> None:
        self.pid, self.pids, self.restored_at = pid, list(pids), restored_at
        self.at: float | None = None
        self.connections = 0
        self.state = "watching"
        self.done = threading.Event()

    def start(self) -> FirstReply:
        threading.Thread(target=self._run, name=f"first-reply-{self.pid}", daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            netns, _ = conns_mod.netns_of(self.pid)
            inodes = set(conns_mod.socket_inodes(self.pids))
            base = conns_mod.bytes_acked(netns, inodes)
            self.connections = len(base)
            if not base:
                self.state = "no connections"
                return
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline:
                now = conns_mod.bytes_acked(netns, set(base))
                if any(now.get(i, 0) > b for i, b in base.items()):
                    self.at = time.time()
                    self.state = "answered"
                    return
                time.sleep(POLL_S)
            self.state = "no reply"
        except Exception as err:  # the tree went, or its namespace: no figure
            self.state = f"not measured: {err}"
            log.info("first reply of pid %d: %s", self.pid, err)
        finally:
            self.done.set()

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "state": self.state, "connections": self.connections,
                "restored_at": self.restored_at, "at": self.at,
                "after_restore_ms": (None if self.at is None
                                     else round((self.at - self.restored_at) * 1000, 3))}
