#!/usr/bin/env python3
"""Benchmark of network lock methods (seed 003's Table 2) on this machine.

The same code as ``orthros bench netlock``: every option is that command's (``--help``). Needs
root. For example, the full comparison, in the background::

    nohup .venv/bin/python scripts/bench_netlock.py --concurrency 0,500,1000,1500 \\
        --reps 3 --reps-slow 1 > bench.log 2>&1 &

Writes results.json, results.md and PNG plots (dump, restore, both, the lock window, the longest
client wait) into ``--out`` (default results/netlock-<timestamp>); leaves no namespace, XDP
program, rule or process behind.
"""

from __future__ import annotations

import sys

from orthros_py.cli import main

if __name__ == "__main__":
    main(["bench", "netlock", *sys.argv[1:]])
