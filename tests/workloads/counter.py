"""Counter workload: prints "TOKEN N" with N increasing, one line per tick, to stdout.

The count and the token (random, drawn at start) live only in memory: the process never reads
its output. A restored process that goes on with the same token and N+1 has its memory back; a
restart would draw a new token and begin at 0.

Usage: counter.py [INTERVAL_SECONDS]
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    interval = float(sys.argv[1]) if len(sys.argv) > 1 else 0.05
    token = os.urandom(8).hex()
    # Some memory worth restoring: a page pattern derived from the token, checked every tick.
    ballast = bytearray(token.encode() * 4096)
    n = 0
    while True:
        ok = ballast[: len(token)] == token.encode()
        sys.stdout.write(f"{token} {n} {'ok' if ok else 'BAD'}\n")
        sys.stdout.flush()
        n += 1
        time.sleep(interval)


if __name__ == "__main__":
    main()
