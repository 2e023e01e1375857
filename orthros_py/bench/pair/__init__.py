"""Protecting redis with a standby host (``orthros pair``), measured on the lab: throughput
and latency under redis-benchmark at each checkpoint interval with and without output commit,
what each checkpoint costs (frozen time, bytes; full against incremental; bytes against memory
written), and the time from the active's death to the first correct reply from the standby.

The package: ``model`` (pure: arms, plan, redis-benchmark's report, run records, medians,
spreads, ratios, targets, RESP; no privileges, unit-tested), ``report`` (results.json,
results.md, PNG plots) and ``runner`` (``PairBench``: the lab, redis, the pairs, the deaths;
root). This module only re-exports what the command and the tests use.
"""

from orthros_py.bench.pair.model import (
    DEFAULT_INTERVALS_MS,
    TARGET_DEATH_MS,
    TARGET_INTERVAL_MS,
    TARGET_THROUGHPUT_RATIO,
    TESTS,
    Arm,
    BenchConfig,
    BenchResults,
    DeathRun,
    MemoryRun,
    RedisTest,
    ThroughputRun,
    arms,
    parse_intervals,
    parse_redis_benchmark,
    plan,
    requests_for,
    summarize,
    summarize_deaths,
)
from orthros_py.bench.pair.report import fmt_bytes, fmt_fig, load_results, markdown, write_outputs
from orthros_py.bench.pair.runner import PairBench, default_out

__all__ = [
    "DEFAULT_INTERVALS_MS",
    "TARGET_DEATH_MS",
    "TARGET_INTERVAL_MS",
    "TARGET_THROUGHPUT_RATIO",
    "TESTS",
    "Arm",
    "BenchConfig",
    "BenchResults",
    "DeathRun",
    "MemoryRun",
    "PairBench",
    "RedisTest",
    "ThroughputRun",
    "arms",
    "default_out",
    "fmt_bytes",
    "fmt_fig",
    "load_results",
    "markdown",
    "parse_intervals",
    "parse_redis_benchmark",
    "plan",
    "requests_for",
    "summarize",
    "summarize_deaths",
    "write_outputs",
]
