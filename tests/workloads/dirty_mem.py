"""Dirty-memory workload: regions of random bytes that change only where the test says.

It maps SIZE MiB of anonymous memory, fills it with random bytes, then obeys commands read one
per line from the FIFO CMD (opened read-write, so that it never meets end-of-file):

  ID write OFFSET_MIB LEN_MIB   overwrite that stretch of the first region with random bytes
  ID map LEN_MIB                map one more region and fill it with random bytes
  ID uffd                       open a userfaultfd and keep it (a service that uses its own)
  ID sum                        change nothing

and answers each on stdout with one line, ``ID SHA256``: the checksum of every region, in
order. A restored process that answers ``sum`` with the checksum it gave just before its dump
has its memory back, byte for byte. It prints ``ready SHA256`` once filled.

Usage: dirty_mem.py CMD_FIFO [SIZE_MIB]
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import sys

MIB = 1 << 20
# Random bytes come in small pieces: a large temporary would itself dirty heap pages.
CHUNK = 64 << 10
_NR_USERFAULTFD = 323  # x86_64


def fill(region: mmap.mmap, start: int, length: int) -> None:
    for off in range(start, start + length, CHUNK):
        n = min(CHUNK, start + length - off)
        region[off:off + n] = os.urandom(n)


def checksum(regions: list[mmap.mmap]) -> str:
    h = hashlib.sha256()
    for region in regions:
        h.update(region)
    return h.hexdigest()


def main() -> None:
    fifo = sys.argv[1]
    size = int(sys.argv[2]) * MIB if len(sys.argv) > 2 else 64 * MIB
    regions = [mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)]
    fill(regions[0], 0, size)
    held: list[int] = []
    out = sys.stdout
    out.write(f"ready {checksum(regions)}\n")
    out.flush()
    with open(os.open(fifo, os.O_RDWR), encoding="ascii") as cmds:
        for line in cmds:
            ident, cmd, *args = line.split()
            if cmd == "write":
                fill(regions[0], int(args[0]) * MIB, int(args[1]) * MIB)
            elif cmd == "map":
                regions.append(mmap.mmap(-1, int(args[0]) * MIB, flags=mmap.MAP_PRIVATE))
                fill(regions[-1], 0, int(args[0]) * MIB)
            elif cmd == "uffd":
                libc = ctypes.CDLL(None, use_errno=True)
                fd = libc.syscall(_NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
                if fd < 0:
                    out.write(f"{ident} error {os.strerror(ctypes.get_errno())}\n")
                    out.flush()
                    continue
                held.append(fd)
            out.write(f"{ident} {checksum(regions)}\n")
            out.flush()


if __name__ == "__main__":
    main()
