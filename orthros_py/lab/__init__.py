"""The lab: the inventory's hosts as network namespaces on this machine, joined by a bridge,
each running an agent. Needs root."""

from __future__ import annotations

from orthros_py.lab.lab import (
    DownReport,
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
