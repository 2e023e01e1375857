#!/usr/bin/env python3
"""Benchmark of container migration, part by part (seed 000's table) on the lab.

The same code as ``orthros bench container``: every option is that command's (``--help``).
Needs root. For example, the paper's size and ten times more::

    .venv/bin/python scripts/bench_container.py --sockets 500,4980 --reps 5

Writes results.json, results.md and parts.png into ``--out`` (default
results/container-<timestamp>); builds the lab and leaves nothing of it behind.
"""

from __future__ import annotations

import sys

from orthros_py.cli import main

if __name__ == "__main__":
    main(["bench", "container", *sys.argv[1:]])
