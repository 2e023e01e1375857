"""Two processes of one tree talking over many UNIX socket pairs (stream and datagram mixed).

The parent makes PAIRS socket pairs (even ones SOCK_STREAM, odd ones SOCK_DGRAM) and forks. Each
round it sends two numbered messages on every pair; the child checks that every message is the
next one expected on its pair and echoes it; the parent checks every echo. With 2 x PAIRS
messages per round, some are always queued in socket buffers when a dump freezes the tree.
The parent prints "round N" after each complete round; on any loss, reordering or damage
either process prints "ERROR ..." and exits 1.

Usage: unix_pairs.py [PAIRS]
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def fail(msg: str) -> None:
    os.write(1, f"ERROR {msg}\n".encode())  # one write per line: two processes share stdout
    os._exit(1)


class Pair:
    """One end of a pair, with a reader that splits stream data back into messages."""

    def __init__(self, index: int, sk: socket.socket) -> None:
        self.index = index
        self.sk = sk
        self.stream = sk.type == socket.SOCK_STREAM
        self.buf = b""

    def send(self, msg: bytes) -> None:
        if self.stream:
            self.sk.sendall(msg + b"\n")
        else:
            self.sk.send(msg)

    def recv(self) -> list[bytes]:
        """The messages that one read brings (blocking until there is at least one)."""
        if not self.stream:
            return [self.sk.recv(4096)]
        while b"\n" not in self.buf:
            data = self.sk.recv(65536)
            if not data:
                fail(f"pair {self.index}: the peer closed its end")
            self.buf += data
        *msgs, self.buf = self.buf.split(b"\n")
        return msgs


def message(index: int, seq: int) -> bytes:
    return f"pair {index} seq {seq} ".encode() + bytes([65 + seq % 26]) * (index % 64)


def child(pairs: list[Pair]) -> None:
    sel = selectors.DefaultSelector()
    expected = dict.fromkeys(range(len(pairs)), 0)
    for p in pairs:
        sel.register(p.sk, selectors.EVENT_READ, p)
    while True:
        for key, _ in sel.select():
            p = key.data
            for msg in p.recv():
                if msg != message(p.index, expected[p.index]):
                    fail(f"child: pair {p.index} expected seq {expected[p.index]}, got {msg!r}")
                expected[p.index] += 1
                p.send(msg)


def parent(pairs: list[Pair]) -> None:
    seq = 0
    rnd = 0
    while True:
        for p in pairs:
            p.send(message(p.index, seq))
            p.send(message(p.index, seq + 1))
        for p in pairs:
            got: list[bytes] = []
            while len(got) < 2:
                got += p.recv()
            if got != [message(p.index, seq), message(p.index, seq + 1)]:
                fail(f"parent: pair {p.index} round {rnd} got {got!r}")
        seq += 2
        os.write(1, f"round {rnd}\n".encode())
        rnd += 1


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    ours: list[Pair] = []
    theirs: list[Pair] = []
    for i in range(n):
        kind = socket.SOCK_STREAM if i % 2 == 0 else socket.SOCK_DGRAM
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        ours.append(Pair(i, a))
        theirs.append(Pair(i, b))
    pid = os.fork()
    if pid == 0:
        for p in ours:
            p.sk.close()
        child(theirs)
    else:
        for p in theirs:
            p.sk.close()
        parent(ours)


if __name__ == "__main__":
    main()
