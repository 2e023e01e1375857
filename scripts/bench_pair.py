#!/usr/bin/env python3
"""Benchmark of a protected service (``orthros pair``) on the lab: redis under redis-benchmark
unprotected and paired at each checkpoint interval, with and without output commit; what each
checkpoint costs; the time from the active's death to the first correct reply from the standby.

The same code as ``orthros bench pair``: every option is that command's (``--help``). Needs
root. For example, the default run (about ten minutes on two cores) and a short one::

    .venv/bin/python scripts/bench_pair.py
    .venv/bin/python scripts/bench_pair.py --intervals 200 --reps 1 --death-reps 1

Writes results.json, results.md and PNG plots into ``--out`` (default
results/pair-<timestamp>); builds a lab of three hosts and leaves nothing of it behind.
"""

from __future__ import annotations

import sys

from orthros_py.cli import main

if __name__ == "__main__":
    main(["bench", "pair", *sys.argv[1:]])
