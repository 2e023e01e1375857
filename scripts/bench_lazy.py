#!/usr/bin/env python3
"""Benchmark of post-copy (lazy) and pre-copy migration against eager on the lab: a memory
workload (``orthros_py.workloads.memhog``) of 256 MiB, 1 GiB and 2 GiB migrated back and forth
with each method, interleaved; downtime, the client's time to first response, total time until
the source is free, bytes sent, pages faulted and pushed; every page checked after each
migration.

The same code as ``orthros bench lazy``: every option is that command's (``--help``). Needs
root. For example, the default run and a short one::

    .venv/bin/python scripts/bench_lazy.py
    .venv/bin/python scripts/bench_lazy.py --sizes 256 --reps 1

Writes results.json, results.md and PNG plots into ``--out`` (default
results/lazy-<timestamp>); builds a lab of two hosts and leaves nothing of it behind.
"""

from __future__ import annotations

import sys

from orthros_py.cli import main

if __name__ == "__main__":
    main(["bench", "lazy", *sys.argv[1:]])
