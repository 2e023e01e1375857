#!/usr/bin/env python3
"""Benchmark of orthros's own overhead in a live migration: the 200-client echo service and
nginx under wrk, migrated between the lab's hosts by ``orthros migrate``, interleaved with a
baseline of CRIU alone (a dump and a restore of the same kind of tree through CRIU's RPC, no
lock, nothing of orthros around them): downtime, the clients' longest wait, CRIU's frozen time,
orthros's share, the ratio to CRIU's own dump and restore, and the issue's targets.

The same code as ``orthros bench migrate``: every option is that command's (``--help``). Needs
root. For example, the default run (7 repetitions, a few minutes on two cores) and a short one::

    .venv/bin/python scripts/bench_migrate.py
    .venv/bin/python scripts/bench_migrate.py --reps 2

Writes results.json, results.md and PNG plots into ``--out`` (default
results/migrate-<timestamp>); builds a lab of two hosts and leaves nothing of it behind.
"""

from __future__ import annotations

import sys

from orthros_py.cli import main

if __name__ == "__main__":
    main(["bench", "migrate", *sys.argv[1:]])
