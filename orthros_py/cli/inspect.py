"""``orthros inspect`` (placeholder until the image reader land)."""

from __future__ import annotations

COMMANDS: list[object] = []
