"""UNIX socket pairs inside one tree survive a dump and a restore (real CRIU, root).

tests/workloads/unix_pairs.py is a parent and its child talking over 100 socket pairs, stream
and datagram mixed, each checking that every message is the next one on its pair. Two more
pairs hold a backlog the child does not read until after the restore (64 KiB on a stream, 8
datagrams): data certainly queued at the dump, which CRIU must carry over, whole and in order.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
from helpers import Spawner, dump_cli, read_lines, restore_cli, wait_for

PAIRS = 100
HELD_BYTES, HELD_DGRAMS, DGRAM_SIZE = 64 << 10, 8, 1000  # as in tests/workloads/unix_pairs.py


def rounds(path: Path) -> list[int]:
    lines = read_lines(path)
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    assert not errors, errors
    return [int(ln.split()[1]) for ln in lines if ln.startswith("round ")]


def queued(images: Path) -> list[int]:
    """The lengths of the packets CRIU found waiting in the tree's socket buffers
    (sk-queues.img)."""
    from pycriu import images as pimages

    path = images / "sk-queues.img"
    if not path.exists():
        return []
    with path.open("rb") as f:
        return [int(e["length"]) for e in pimages.load(f).get("entries", [])]


def held(path: Path, what: str) -> list[int]:
    return [int(x) for ln in read_lines(path) if ln.startswith(f"held {what} ")
            for x in ln.split()[2:]]


def test_socket_pairs_keep_talking_after_restore(
    spawner: Spawner, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pairs.out"
    hold = tmp_path / "read-the-backlog"
    proc = spawner.workload("unix_pairs", str(PAIRS), str(hold), stdout=out)
    wait_for(lambda: len(rounds(out)) >= 20, what="the pairs to talk")
    # The child's own FIONREAD on the held stream: the backlog sits in its receive buffer.
    assert held(out, "queued") == [HELD_BYTES, HELD_DGRAMS]
    child = psutil.Process(proc.pid).children()[0].pid

    dumped = dump_cli(proc.pid, images)
    assert proc.wait(timeout=10) < 0
    assert sorted(p["pid"] for p in dumped["processes"]) == sorted([proc.pid, child])
    # Each process holds one end of every pair, the two held pairs included.
    assert len(dumped["unix"]) == 2 * (PAIRS + 2)
    before = rounds(out)
    # CRIU found the backlog in the buffers: the whole stream (in one or more packets) and
    # every datagram, besides whatever echo traffic was in flight.
    lengths = queued(images)
    print(f"\nqueued in socket buffers at the dump: {len(lengths)} packets, {sum(lengths)} bytes")
    assert sum(lengths) >= HELD_BYTES + HELD_DGRAMS * DGRAM_SIZE
    assert lengths.count(DGRAM_SIZE) >= HELD_DGRAMS

    restored = restore_cli(spawner, images)
    print("unix pairs dump:", json.dumps(dumped["stats"]))
    print("unix pairs restore:", json.dumps(restored["stats"]))
    assert sorted(restored["pids"]) == sorted([proc.pid, child])
    assert psutil.Process(proc.pid).children()[0].pid == child
    wait_for(lambda: len(rounds(out)) >= len(before) + 50, what="the restored pairs to talk")
    seen = rounds(out)
    # One run of rounds from 0 on: none repeated, none skipped across the restore.
    assert seen == list(range(len(seen))), seen
    # The backlog queued at the dump arrives after the restore, all of it, unchanged (the
    # child checks every byte and every datagram, and says ERROR otherwise).
    assert held(out, "received") == []
    hold.touch()
    wait_for(lambda: held(out, "received"), what="the child to read the held backlog")
    assert held(out, "received") == [HELD_BYTES, HELD_DGRAMS]
    rounds(out)  # no ERROR line
