"""Two processes of one tree talking over many UNIX socket pairs (stream and datagram mixed).

The parent makes PAIRS socket pairs (even ones SOCK_STREAM, odd ones SOCK_DGRAM) and forks. Each
round it sends two numbered messages on every pair; the child checks that every message is the
next one expected on its pair and echoes it; the parent checks every echo. With 2 x PAIRS
messages per round, some are always queued in socket buffers when a dump freezes the tree.
The parent prints "round N" after each complete round; on any loss, reordering or damage
either process prints "ERROR ..." and exits 1.

With HOLD (a file name), two more pairs carry a backlog the child does not read until that file
exists: HELD_BYTES on a stream pair and HELD_DGRAMS datagrams on a datagram pair, all written
before the fork, so they are certainly queued in the child's receive buffers when a dump
freezes the tree. The child prints "held queued BYTES DGRAMS" (its own FIONREAD and count) at
start and "held received BYTES DGRAMS" once it has read and checked the whole backlog.

Usage: unix_pairs.py [PAIRS [HOLD]]
"""

from __future__ import annotations

import fcntl
import os
import selectors
import socket
import struct
import sys
import termios

HELD_BYTES = 64 << 10  # fits a UNIX stream socket's buffers: written without blocking
HELD_DGRAMS = 8  # below net.unix.max_dgram_qlen's default of 10
DGRAM_SIZE = 1000


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


def held_data(i: int, size: int) -> bytes:
    return bytes((i * 7 + k) % 251 for k in range(size))


def queued_bytes(sk: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sk.fileno(), termios.FIONREAD, b"\0" * 4))[0])


def drain_held(stream: socket.socket, dgram: socket.socket) -> None:
    got = b""
    while len(got) < HELD_BYTES:
        chunk = stream.recv(HELD_BYTES - len(got))
        if not chunk:
            fail("held stream: the peer closed its end")
        got += chunk
    if got != held_data(0, HELD_BYTES):
        fail("held stream: the backlog came back damaged")
    for i in range(HELD_DGRAMS):
        if dgram.recv(DGRAM_SIZE * 2) != held_data(i + 1, DGRAM_SIZE):
            fail(f"held datagram {i}: lost, reordered or damaged")
    os.write(1, f"held received {len(got)} {HELD_DGRAMS}\n".encode())


def child(pairs: list[Pair], held: tuple[socket.socket, socket.socket] | None = None,
          hold: str | None = None) -> None:
    sel = selectors.DefaultSelector()
    expected = dict.fromkeys(range(len(pairs)), 0)
    for p in pairs:
        sel.register(p.sk, selectors.EVENT_READ, p)
    if held is not None:
        os.write(1, f"held queued {queued_bytes(held[0])} {HELD_DGRAMS}\n".encode())
    while True:
        if held is not None and hold is not None and os.path.exists(hold):
            drain_held(*held)
            held = None
        # A timeout, so that the hold file is noticed while the pairs are quiet too.
        for key, _ in sel.select(timeout=0.05 if held is not None else None):
            p = key.data
            for msg in p.recv():
                if msg != message(p.index, expected[p.index]):
                    fail(f"child: pair {p.index} expected seq {expected[p.index]}, got {msg!r}")
                expected[p.index] += 1
                p.send(msg)


def parent(pairs: list[Pair], keep: list[socket.socket]) -> None:
    """``keep``: the parent's ends of the held pairs, open (a closed stream peer would be an
    end of file, not a backlog) and never touched again."""
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
    hold = sys.argv[2] if len(sys.argv) > 2 else None
    held: tuple[socket.socket, socket.socket] | None = None
    mine: list[socket.socket] = []
    if hold is not None:
        s_ours, s_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        d_ours, d_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        s_ours.sendall(held_data(0, HELD_BYTES))
        for i in range(HELD_DGRAMS):
            d_ours.send(held_data(i + 1, DGRAM_SIZE))
        held, mine = (s_theirs, d_theirs), [s_ours, d_ours]
    ours: list[Pair] = []
    theirs: list[Pair] = []
    for i in range(n):
        kind = socket.SOCK_STREAM if i % 2 == 0 else socket.SOCK_DGRAM
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        ours.append(Pair(i, a))
        theirs.append(Pair(i, b))
    pid = os.fork()
    if pid == 0:
        for sk in [*(p.sk for p in ours), *mine]:
            sk.close()
        child(theirs, held, hold)
    else:
        for p in theirs:
            p.sk.close()
        for sk in held or ():
            sk.close()
        parent(ours, mine)


if __name__ == "__main__":
    main()
