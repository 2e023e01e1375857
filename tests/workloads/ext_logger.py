"""A process whose UNIX datagram socket is connected to a peer outside its tree (a log daemon).

It sends "seq N" to PATH every INTERVAL seconds, N counting in its memory; after a checkpoint
and restore with --ext-unix-sk, the numbers go on from where they were.

Usage: ext_logger.py PATH [INTERVAL_SECONDS]
"""

from __future__ import annotations

import socket
import sys
import time


def main() -> None:
    path = sys.argv[1]
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
    sk = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sk.connect(path)
    n = 0
    while True:
        try:
            sk.send(f"seq {n}".encode())
            n += 1
        except OSError:  # the reader's queue is full or the peer is away: try that one again
            pass
        time.sleep(interval)


if __name__ == "__main__":
    main()
