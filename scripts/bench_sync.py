#!/usr/bin/env python3
"""Benchmark of synchronized save and restore (``orthros sync``) on a 3-member etcd cluster in
the lab: per raft heartbeat interval, rounds of a save left running and a restore, each checked
for an election; the freeze and resume skews, the times, the snapshot sizes; the shortest
heartbeat that survived every round; and the control, restores whose members resume a stagger
apart.

The same code as ``orthros bench sync``: every option is that command's (``--help``). Needs
root. For example, the default run (several minutes on two cores) and a short one::

    .venv/bin/python scripts/bench_sync.py
    .venv/bin/python scripts/bench_sync.py --heartbeats 100 --reps 1 --staggers 0 --stagger-reps 1

Writes results.json, results.md and PNG plots into ``--out`` (default results/sync-<timestamp>);
mounts a btrfs volume, builds a lab of three hosts, and leaves nothing of either behind.
"""

from __future__ import annotations

import sys

from orthros_py.cli import main

if __name__ == "__main__":
    main(["bench", "sync", *sys.argv[1:]])
