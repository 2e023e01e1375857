"""A process whose memory changes only when told to, and which reports a checksum of it.

Holds MIB of private anonymous memory filled with random bytes and prints "ready 0 SHA256".
On SIGUSR1 it rewrites PAGES pages of it, chosen at random, with new random bytes and prints
"state SEQ SHA256"; on SIGUSR2 it prints "check SEQ SHA256" of its memory as it is now. Nothing
else writes the buffer, so a restored process whose "check" equals the "state" printed before a
dump has that dump's memory back, and a dump made after a "state" line has exactly PAGES pages
of the buffer dirty since the dump before it.

Usage: dirty_pages.py MIB [PAGES]
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import signal
import sys
import time
from types import FrameType

PAGE = mmap.PAGESIZE
asked: list[int] = []


def on_signal(signum: int, _frame: FrameType | None) -> None:
    asked.append(signum)  # handled in the main loop: a handler must not touch the buffer


def say(line: str) -> None:
    os.write(1, f"{line}\n".encode())  # whole lines only


def main() -> None:
    mib = int(sys.argv[1])
    npages = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    buf = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, len(buf), 1 << 20):
        buf[off:off + (1 << 20)] = os.urandom(1 << 20)
    total = len(buf) // PAGE
    seq = 0
    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGUSR2, on_signal)
    say(f"ready {seq} {hashlib.sha256(buf).hexdigest()}")
    while True:
        while asked:
            signum = asked.pop(0)
            if signum == signal.SIGUSR1:
                seq += 1
                for page in random.sample(range(total), npages):
                    buf[page * PAGE:(page + 1) * PAGE] = os.urandom(PAGE)
                say(f"state {seq} {hashlib.sha256(buf).hexdigest()}")
            else:
                say(f"check {seq} {hashlib.sha256(buf).hexdigest()}")
        time.sleep(0.02)


if __name__ == "__main__":
    main()
