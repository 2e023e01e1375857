"""TCP echo server that takes a file lock on demand: what CRIU refuses to checkpoint without
``--file-locks`` ("Some file locks are hold"), switched on and off while the server keeps
answering.

SIGUSR1 takes flock(LOCK_EX) on LOCKFILE (opened at start, so that only the lock changes) and
prints "locked"; SIGUSR2 releases it and prints "unlocked". Prints "listening PORT" once bound.
Usage: lock_echo.py HOST PORT LOCKFILE
"""

from __future__ import annotations

import fcntl
import os
import selectors
import signal
import socket
import sys
from typing import Any


def say(line: str) -> None:
    os.write(1, f"{line}\n".encode())  # whole lines only, whatever Python's buffering


def main() -> None:
    host, port, lock_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    lock_file = open(lock_path, "a+")  # noqa: SIM115 - held for the process's life

    def take(*_: Any) -> None:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        say("locked")

    def release(*_: Any) -> None:
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        say("unlocked")

    signal.signal(signal.SIGUSR1, take)
    signal.signal(signal.SIGUSR2, release)
    sel = selectors.DefaultSelector()
    lsk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsk.bind((host, port))
    lsk.listen(128)
    lsk.setblocking(False)
    sel.register(lsk, selectors.EVENT_READ)
    say(f"listening {lsk.getsockname()[1]}")
    while True:
        for key, _ in sel.select():
            sk = key.fileobj
            assert isinstance(sk, socket.socket)
            if sk is lsk:
                conn, _ = lsk.accept()
                conn.setblocking(True)
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sk.recv(65536)
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(sk)
                sk.close()
                continue
            sk.sendall(data)


if __name__ == "__main__":
    main()
