"""Post-copy (lazy) and pre-copy migration against eager, measured on the lab: downtime, the
client's time to first response, total time until the source is free, bytes sent, pages
faulted and pushed, for workloads of several sizes; the memory checked page by page after every
migration. And the paging standby: its memory against the hot fraction, and its failover
against an eager standby's (time to first response and to all pages present).

The package: ``model`` (pure: methods, plan, records read from migrate's result and the
client's log, medians, spreads, ratios to eager, targets, results.md/json, plots; unit-tested),
``paging`` (pure: the paging standby's records, plan, summaries, targets, its sections and
plot), ``runner`` (``LazyBench``: the lab, the workload, the migrations; root) and ``standby``
(the paging pairs and their failovers on the lab; root). This module only re-exports what the
command and the tests use.
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
    config_for,
    load_results,
    markdown,
    parse_methods,
    parse_sizes,
    plan,
    run_line,
    summarize,
    targets,
    write_outputs,
)
from orthros_py.bench.lazy.paging import (
    FailoverRun,
    PagingMemoryRun,
    failover_line,
    failover_plan,
    memory_line,
    parse_fractions,
    summarize_failovers,
    summarize_memory,
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
    "FailoverRun",
    "LazyBench",
    "MigrationRun",
    "PagingMemoryRun",
    "config_for",
    "default_out",
    "failover_line",
    "failover_plan",
    "load_results",
    "markdown",
    "memory_line",
    "parse_fractions",
    "parse_methods",
    "parse_sizes",
    "plan",
    "run_line",
    "summarize",
    "summarize_failovers",
    "summarize_memory",
    "targets",
    "write_outputs",
]
