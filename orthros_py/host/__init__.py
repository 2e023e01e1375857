"""What this host offers orthros: privileges, CRIU, kernel features, BPF, namespaces, cgroups and
firewall tools, each probed once and reported with the reason and the fix when it is missing.
"""

from __future__ import annotations

from orthros_py.host.probe import (
    REQUIRED,
    ProbeResult,
    Report,
    Status,
    missing_error,
    run_probes,
)

__all__ = ["REQUIRED", "ProbeResult", "Report", "Status", "missing_error", "run_probes"]
