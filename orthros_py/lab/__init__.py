"""The lab: the inventory's hosts on this machine, each a network namespace joined to the others
by a bridge, with PID and mount namespaces of its own, running an agent. Needs root."""

from __future__ import annotations

from orthros_py.lab.lab import (
    DownReport,
    HostProcess,
    HostStatus,
    Lab,
    LabHost,
    LabService,
    LabStatus,
    Role,
    agent_unavailable,
    teardown,
)
from orthros_py.net.addr import call_in_netns, in_netns

__all__ = [
    "DownReport",
    "HostProcess",
    "HostStatus",
    "Lab",
    "LabHost",
    "LabService",
    "LabStatus",
    "Role",
    "agent_unavailable",
    "call_in_netns",
    "in_netns",
    "teardown",
]
