"""UNIX socket pairs inside one tree survive a dump and a restore (real CRIU, root).

tests/workloads/unix_pairs.py is a parent and its child talking over 100 socket pairs, stream
and datagram mixed, each checking that every message is the next one on its pair. Messages sit
in the socket buffers when the tree is frozen; CRIU must carry them over, in order.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
from helpers import Spawner, dump_cli, read_lines, restore_cli, wait_for

PAIRS = 100


def rounds(path: Path) -> list[int]:
    lines = read_lines(path)
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    assert not errors, errors
    return [int(ln.split()[1]) for ln in lines if ln.startswith("round ")]


def queued_messages(images: Path) -> int:
    """How many messages CRIU found waiting in the tree's socket buffers (sk-queues.img)."""
    from pycriu import images as pimages

    path = images / "sk-queues.img"
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return len(pimages.load(f).get("entries", []))


def test_socket_pairs_keep_talking_after_restore(
    spawner: Spawner, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pairs.out"
    proc = spawner.workload("unix_pairs", str(PAIRS), stdout=out)
    wait_for(lambda: len(rounds(out)) >= 20, what="the pairs to talk")
    child = psutil.Process(proc.pid).children()[0].pid

    dumped = dump_cli(proc.pid, images)
    assert proc.wait(timeout=10) < 0
    assert sorted(p["pid"] for p in dumped["processes"]) == sorted([proc.pid, child])
    # Each process holds one end of every pair.
    assert len(dumped["unix"]) == 2 * PAIRS
    before = rounds(out)
    print(f"\nmessages queued in socket buffers at the dump: {queued_messages(images)}")

    restored = restore_cli(spawner, images)
    print("unix pairs dump:", json.dumps(dumped["stats"]))
    print("unix pairs restore:", json.dumps(restored["stats"]))
    assert sorted(restored["pids"]) == sorted([proc.pid, child])
    assert psutil.Process(proc.pid).children()[0].pid == child
    wait_for(lambda: len(rounds(out)) >= len(before) + 50, what="the restored pairs to talk")
    seen = rounds(out)
    # One run of rounds from 0 on: none repeated, none skipped across the restore.
    assert seen == list(range(len(seen))), seen
