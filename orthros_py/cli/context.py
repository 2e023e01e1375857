"""The environment a command runs in (streams, consoles), injected so that tests can swap it."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape


@dataclass
class Env:
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    traceback: bool = False

    def __post_init__(self) -> None:
        # Tables and progress go to stderr; stdout carries only data.
        self.console = Console(file=self.stderr, highlight=False)

    def err(self, message: str) -> None:
        self.console.print(f"[bold red]orthros:[/] {escape(message)}", soft_wrap=True)

    def emit_json(self, data: Any) -> None:
        json.dump(data, self.stdout, indent=2, default=str)
        self.stdout.write("\n")
        self.stdout.flush()
