"""A closed connection's TIME_WAIT entry holds its 4-tuple; destroy_lingering frees exactly the
ones asked for (a restore needs the 4-tuples its checkpoint's connections had)."""

from __future__ import annotations

import socket
import time

from orthros_py.net.conn import Conn
from orthros_py.net.conns import TCP_TIME_WAIT, destroy_lingering, tcp_sockets


def _time_wait_pair() -> tuple[Conn, Conn]:
    """Two connections closed by the client first: each leaves a TIME_WAIT on its side."""
    lsk = socket.socket()
    lsk.bind(("127.0.0.1", 0))
    lsk.listen()
    made = []
    for _ in range(2):
        c = socket.create_connection(lsk.getsockname())
        s, _ = lsk.accept()
        made.append(Conn.of(c.getsockname(), c.getpeername()))
        c.close()
        time.sleep(0.05)
        s.close()
    lsk.close()
    time.sleep(0.05)
    return made[0], made[1]


def waiting() -> set[Conn]:
    return {c for c, _ in tcp_sockets(None, (TCP_TIME_WAIT,))}


def test_only_the_named_time_wait_entries_go() -> None:
    a, b = _time_wait_pair()
    assert {a, b} <= waiting()
    assert destroy_lingering([a]) == [a]
    left = waiting()
    assert a not in left and b in left
    assert destroy_lingering([a]) == []  # gone already
    destroy_lingering([b])
    assert b not in waiting()
