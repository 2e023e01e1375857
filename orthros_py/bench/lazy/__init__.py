"""Post-copy (lazy) and pre-copy migration against eager, measured on the lab: downtime, the
client's time to first response, total time until the source is free, bytes sent, pages
faulted and pushed, for workloads of several sizes; the memory checked page by page after every
migration. And (to come) the paging standby: its memory against the hot fraction and its
failover against an eager restore.

The package: ``model`` (pure: methods, plan, records read from migrate's result and the
client's log, medians, spreads, ratios to eager, targets, results.md/json, plots; unit-tested)
and ``runner`` (``LazyBench``: the lab, the workload, the migrations; root). This module only
re-exports what the command and the tests use.
"""

from orthros_py.bench.lazy.model import (
    DEFAULT_SIZES,
    METHODS,
    TARGET_LAZY_RATIO,
    TARGET_SIZE_MIB,
    BenchConfig,
    BenchResults,
    CellSummary,
    MigrationRun,
    PagingRun,
    config_for,
    load_results,
    markdown,
    parse_methods,
    parse_sizes,
    plan,
    run_line,
    summarize,
    summarize_paging,
    targets,
    write_outputs,
)
from orthros_py.bench.lazy.runner import LazyBench, default_out

__all__ = [
    "DEFAULT_SIZES",
    "METHODS",
    "TARGET_LAZY_RATIO",
    "TARGET_SIZE_MIB",
    "BenchConfig",
    "BenchResults",
    "CellSummary",
    "LazyBench",
    "MigrationRun",
    "PagingRun",
    "config_for",
    "default_out",
    "load_results",
    "markdown",
    "parse_methods",
    "parse_sizes",
    "plan",
    "run_line",
    "summarize",
    "summarize_paging",
    "targets",
    "write_outputs",
]
