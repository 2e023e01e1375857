"""Local dump and restore of a real process through the ``orthros`` command (real CRIU, root).

The workload is tests/workloads/counter.py: it prints "TOKEN N ok" with N increasing and a token
drawn at start, both held only in memory. A restore that goes on with the same token and the next
N has brought the process's memory back; a restart would print a new token and begin at 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import Spawner, dump_cli, read_lines, restore_cli, wait_for

TICK = "0.02"  # seconds between two lines of the counter


def counts(path: Path) -> list[tuple[str, int]]:
    """The counter's complete lines as (token, n); a line being written is left out."""
    out = []
    for line in read_lines(path):
        parts = line.split()
        if len(parts) == 3:
            assert parts[2] == "ok", f"the counter found its memory damaged: {line!r}"
            out.append((parts[0], int(parts[1])))
    return out


def assert_consecutive(seq: list[tuple[str, int]]) -> None:
    tokens = {t for t, _ in seq}
    assert len(tokens) == 1, f"the counter restarted: tokens {sorted(tokens)}"
    numbers = [n for _, n in seq]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers


def test_restored_counter_continues_from_its_saved_state(
    spawner: Spawner, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "counter.out"
    proc = spawner.workload("counter", TICK, stdout=out)
    wait_for(lambda: len(counts(out)) >= 10, what="the counter to count")

    dumped = dump_cli(proc.pid, images)
    print("\ncounter dump:", json.dumps(dumped["stats"]))
    # CRIU kills a dumped tree; it is our child, so reap it to free its PID for the restore.
    assert proc.wait(timeout=10) < 0
    assert dumped["pid"] == proc.pid
    assert [p["pid"] for p in dumped["processes"]] == [proc.pid]
    assert dumped["stats"]["pages_written"] > 0

    before = counts(out)
    assert_consecutive(before)
    token, last = before[-1]
    # Empty the output (the counter appends, so CRIU does not check its size): from here on
    # nothing on disk knows where the count stood; only the restored memory does.
    out.write_bytes(b"")

    restored = restore_cli(spawner, images)
    print("counter restore:", json.dumps(restored["stats"]))
    assert restored["pid"] == proc.pid
    assert restored["pids"] == [proc.pid]
    wait_for(lambda: len(counts(out)) >= 10, what="the restored counter to count")
    after = counts(out)
    assert after[0] == (token, last + 1), f"expected {token} {last + 1}, got {after[0]}"
    assert_consecutive(after)


def test_leave_running_keeps_the_original_and_its_image_restores(
    spawner: Spawner, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "counter.out"
    proc = spawner.workload("counter", TICK, stdout=out)
    wait_for(lambda: len(counts(out)) >= 5, what="the counter to count")

    first = len(counts(out))  # the next number the counter prints
    dumped = dump_cli(proc.pid, images, "--leave-running")
    last_at_dump = len(counts(out))
    assert dumped["leave_running"] is True
    # The original keeps running after the dump, and keeps counting.
    wait_for(lambda: len(counts(out)) >= last_at_dump + 10, what="the original to go on")
    assert proc.poll() is None

    proc.kill()
    proc.wait(timeout=10)
    token, killed_at = counts(out)[-1]

    restored = restore_cli(spawner, images)
    assert restored["pid"] == proc.pid
    wait_for(lambda: len(counts(out)) >= killed_at + 1 + 10, what="the restored counter")
    resumed = counts(out)[killed_at + 1:]
    # The restored counter goes on from the moment of the dump, not from the kill.
    assert resumed[0][0] == token
    assert first <= resumed[0][1] <= last_at_dump, (first, resumed[0], last_at_dump)
    assert_consecutive(resumed)


def test_restore_without_detach_waits_for_the_tree_and_passes_on_its_status(
    spawner: Spawner, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "counter.out"
    proc = spawner.workload("counter", TICK, stdout=out)
    wait_for(lambda: len(counts(out)) >= 5, what="the counter to count")
    dump_cli(proc.pid, images)
    proc.wait(timeout=10)

    n = len(counts(out))
    waiter = subprocess.Popen([str(Path(sys.executable).parent / "orthros"), "restore", "-D",
                               str(images)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    spawner.track(waiter.pid)  # killing orthros's tree kills the restored counter, its child
    wait_for(lambda: len(counts(out)) >= n + 5, what="the restored counter to count")
    assert waiter.poll() is None  # orthros waits for the tree it restored

    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = waiter.communicate(timeout=10)
    assert waiter.returncode == 128 + signal.SIGTERM, stderr
    assert f"root pid {proc.pid}" in stderr
    assert stdout == ""  # human output goes to stderr
