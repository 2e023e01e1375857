"""This process's effective capabilities, from the CapEff line of /proc/PID/status.

No privileges. The one reader of CapEff: ``orthros check`` reports from it, and the XDP lock
fails early with it where libbcc would only print an error.
"""

from __future__ import annotations

import re
from pathlib import Path

# include/uapi/linux/capability.h
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_BPF = 39

_CAP_EFF = re.compile(r"^CapEff:\s*([0-9a-fA-F]+)\s*$", re.MULTILINE)


def parse_cap_eff(status_text: str) -> int:
    """The effective capability mask from the text of /proc/PID/status."""
    m = _CAP_EFF.search(status_text)
    if m is None:
        raise ValueError("no CapEff line in the process status")
    return int(m.group(1), 16)


def has_cap(mask: int, cap: int) -> bool:
    return bool(mask >> cap & 1)


def effective_caps(pid: int | str = "self") -> int:
    """The effective capability mask of ``pid`` (default: this process)."""
    return parse_cap_eff(Path(f"/proc/{pid}/status").read_text())
