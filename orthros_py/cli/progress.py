"""The progress view of any policy (``orthros migrate``, ``orthros recover``, ...): a spinner
on the running stage, a line per finished one, notes dimmed, all on stderr (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape

from orthros_py.cli.context import Env

if TYPE_CHECKING:
    from orthros_py.policies.engine import Event

# The engine's own stage names (orthros_py.policies.engine), kept here as plain strings so
# that the view loads no policy.
_ROLLBACK, _DONE, _UNHAPPY = "rollback", "done", ("rolled back", "failed")


class ProgressView:
    """Renders a policy's events: whatever its stages, they arrive as names."""

    def __init__(self, env: Env, quiet: bool) -> None:
        self.env = env
        self.quiet = quiet
        self.status = env.console.status("starting")

    def __enter__(self) -> ProgressView:
        if not self.quiet:
            self.status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.status.stop()

    def __call__(self, ev: Event) -> None:
        if self.quiet:
            return
        con = self.env.console
        name = str(ev.stage)
        if ev.kind == "start":
            if name == _ROLLBACK:
                con.print(f"[bold red]rolling back[/]: {escape(ev.message)}")
            self.status.update(f"{name} ...")
        elif ev.kind == "done" and name != _DONE:
            ms = f"{ev.elapsed_ms:9.1f} ms" if ev.elapsed_ms is not None else ""
            colour = "yellow" if name in _UNHAPPY else "green"
            con.print(f"[{colour}]\u2713[/] {name:<13} {ms}")
        elif ev.kind == "failed":
            con.print(f"[red]\u2717[/] {name:<13} {escape(ev.message)}")
        elif ev.kind == "note":
            where = f"{ev.host}: " if ev.host else ""
            con.print(f"  [dim]{escape(where + ev.message)}[/]")
