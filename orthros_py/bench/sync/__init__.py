"""Synchronized save and restore (``orthros sync``) of a 3-member etcd cluster, measured on the
lab: per raft heartbeat interval, whether a save left running and a restore of it go without
an election, how far apart the members froze and resumed, how long each took, what a snapshot
holds; the shortest heartbeat that survived every round; and the control, restores whose
members resume a stagger apart, with the elections that follow.

The package: ``model`` (pure: plan, the record of a round, elections, the writer's gaps, etcd's
log lines, medians, spreads, the targets; no privileges, unit-tested), ``report``
(results.json, results.md, PNG plots), ``volume`` (the btrfs volume on a loop device; root) and
``runner`` (``SyncBench``: the volume, the lab, etcd, the rounds; root). This module only
re-exports what the command and the tests use.
"""

from orthros_py.bench.sync.model import (
    DEFAULT_HEARTBEATS_MS,
    DEFAULT_STAGGERS_MS,
    HEARTBEAT,
    STAGGER,
    TARGET_HEARTBEAT_MS,
    TARGET_RESUME_SKEW_US,
    BenchConfig,
    BenchResults,
    GroupSummary,
    PlannedRound,
    SyncRound,
    config_for,
    headline,
    longest_gap,
    parse_heartbeats,
    parse_staggers,
    plan,
    round_line,
    shortest_surviving,
    summarize_heartbeats,
    summarize_staggers,
    targets,
)
from orthros_py.bench.sync.report import (
    fmt_us,
    load_results,
    markdown,
    notes_for,
    write_outputs,
)
from orthros_py.bench.sync.runner import SyncBench, default_out

__all__ = [
    "DEFAULT_HEARTBEATS_MS",
    "DEFAULT_STAGGERS_MS",
    "HEARTBEAT",
    "STAGGER",
    "TARGET_HEARTBEAT_MS",
    "TARGET_RESUME_SKEW_US",
    "BenchConfig",
    "BenchResults",
    "GroupSummary",
    "PlannedRound",
    "SyncBench",
    "SyncRound",
    "config_for",
    "default_out",
    "fmt_us",
    "headline",
    "load_results",
    "longest_gap",
    "markdown",
    "notes_for",
    "parse_heartbeats",
    "parse_staggers",
    "plan",
    "round_line",
    "shortest_surviving",
    "summarize_heartbeats",
    "summarize_staggers",
    "targets",
    "write_outputs",
]
