"""``orthros check`` (placeholder until the probes land)."""

from __future__ import annotations

COMMANDS: list[object] = []
