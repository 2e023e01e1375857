#!/usr/bin/env python3
"""Benchmark of post-copy (lazy) and pre-copy migration against eager on the lab: a memory
workload (``orthros_py.workloads.memhog``) of 256 MiB, 1 GiB and 2 GiB migrated back and forth
with each method, interleaved; downtime, the client's time to first response, total time until
the source is free, bytes sent, pages faulted and pushed; every page checked after each
migration. Then the paging standby (``pair start --paging``): its memory against the hot
fraction (1 GiB at 10, 30 and 60 % hot), and failovers of a paging pair against an eager one at
2 GiB, interleaved: time to the first response from the start of the standby's restore, time
until every page is present, every page checked.

The same code as ``orthros bench lazy``: every option is that command's (``--help``). Needs
root. For example, the default run, the migrations alone, the paging standby alone and a short
one of it::

    .venv/bin/python scripts/bench_lazy.py
    .venv/bin/python scripts/bench_lazy.py --skip-paging --sizes 256 --reps 1
    .venv/bin/python scripts/bench_lazy.py --paging-only
    .venv/bin/python scripts/bench_lazy.py --paging-only --paging-sizes 256 \
        --hot-fractions 0.3 --failover-sizes 256 --paging-reps 1 --hot-window 8

Writes results.json, results.md and PNG plots into ``--out`` (default
results/lazy-<timestamp>); builds a lab of three hosts (two with ``--skip-paging``) and leaves
nothing of it behind.
"""

from __future__ import annotations

import sys

from orthros_py.cli import main

if __name__ == "__main__":
    main(["bench", "lazy", *sys.argv[1:]])
