"""Network lock methods compared around a real CRIU dump and restore (seed 003's Table 2).

Workload: Debian's nginx (master and one worker, as root) in this network namespace on one end
of a veth pair; ApacheBench inside a private client namespace at the other end, keeping C
keep-alive connections busy. One run: a fresh nginx, C established connections, a dump with
``tcp_established`` (the tree is killed), a restore (the root becomes our child), about a second
more of traffic, then ab is stopped with SIGINT and its report read. Methods: CRIU's
``iptables`` and ``nftables``, orthros's ``xdp`` (BPF map writes), and ``none`` (nobody locks:
the floor). Each phase is split into CRIU's own part and the lock: for iptables/nftables the
time CRIU spent in its lock calls, read from its own log at level 4 (``criu.log``); for xdp the
map writes orthros timed itself. Per run also the lock window (from the lock's engaging to the
connections' flowing again: what clients wait through) and ab's longest request; a run whose
clients saw any failure counts as failed.

The package: ``model`` (pure: methods, the paper's figures, ab's report, run records, plan,
medians, ratios; no privileges, unit-tested), ``report`` (results.json, results.md, PNG plots),
``host`` (namespace, nginx, CRIU's leftovers, the XDP micro-benchmark; root) and ``runner``
(``NetlockBench`` and the command line's list parsers; root). This module only re-exports
what the command and the tests use; a test that patches a name patches it in the submodule
that looks it up.
"""

from orthros_py.bench.netlock.host import (
    IF_PREFIX,
    NS_PREFIX,
    criu_iptables_rules,
    pick_subnet,
    synthetic_conns,
)
from orthros_py.bench.netlock.model import (
    DEFAULT_CONCURRENCY,
    METHODS,
    PAPER,
    AbReport,
    BenchConfig,
    BenchResults,
    LockWindow,
    Method,
    MicroResult,
    Phase,
    RunRecord,
    client_failures,
    lock_window,
    parse_ab,
    plan,
    ratios,
    split_phase,
    summarize,
)
from orthros_py.bench.netlock.report import (
    fmt_range,
    fmt_ratio,
    load_results,
    markdown,
    notes_for,
    write_outputs,
)
from orthros_py.bench.netlock.runner import (
    NetlockBench,
    default_out,
    parse_concurrency,
    parse_methods,
)

__all__ = [
    "DEFAULT_CONCURRENCY",
    "IF_PREFIX",
    "METHODS",
    "NS_PREFIX",
    "PAPER",
    "AbReport",
    "BenchConfig",
    "BenchResults",
    "LockWindow",
    "Method",
    "MicroResult",
    "NetlockBench",
    "Phase",
    "RunRecord",
    "client_failures",
    "criu_iptables_rules",
    "default_out",
    "fmt_range",
    "fmt_ratio",
    "load_results",
    "lock_window",
    "markdown",
    "notes_for",
    "parse_ab",
    "parse_concurrency",
    "parse_methods",
    "pick_subnet",
    "plan",
    "ratios",
    "split_phase",
    "summarize",
    "synthetic_conns",
    "write_outputs",
]
