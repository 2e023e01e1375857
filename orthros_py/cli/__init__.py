"""The ``orthros`` command: click commands over the core, and the single error boundary.

Only this package imports click and rich. Human output goes to stderr through rich; data
(``--json``) goes to stdout, so that ``orthros dump ... --json | jq`` works.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

import click

from orthros_py import __version__
from orthros_py.cli.context import Env
from orthros_py.errors import ExitStatus, OrthrosError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="orthros")
@click.option("--traceback", "show_traceback", is_flag=True, help="Show the stack on errors.")
@click.pass_context
def cli(ctx: click.Context, show_traceback: bool) -> None:
    """Checkpoint, restore and live-migrate real Linux process trees with CRIU."""
    env = ctx.ensure_object(Env)
    env.traceback = show_traceback


# Command modules, each exporting COMMANDS. Imported here so that each stays import-light
# (bcc and pycriu are loaded lazily, so `orthros --help` works on a host without them).
_MODULES = ("check", "checkpoint", "inspect", "netlock", "bench", "agent", "lab", "hosts",
            "migrate", "recover", "pair", "sync")


def _register() -> None:
    import importlib

    for name in _MODULES:
        try:
            mod = importlib.import_module(f"orthros_py.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"orthros_py.cli.{name}":
                continue  # that command has not been built yet
            raise
        for command in mod.COMMANDS:
            cli.add_command(command)


_register()


def main(argv: Sequence[str] | None = None, env: Env | None = None) -> None:
    """Run the CLI; the one place where exceptions become a message and an exit status."""
    env = env or Env()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, prog_name="orthros", obj=env, standalone_mode=False)
    except click.exceptions.Abort:
        env.err("interrupted")
        sys.exit(ExitStatus.INTERRUPTED)
    except KeyboardInterrupt:
        env.err("interrupted")
        sys.exit(ExitStatus.INTERRUPTED)
    except click.ClickException as err:
        err.show(file=env.stderr)
        sys.exit(err.exit_code)
    except OrthrosError as err:
        if env.traceback or "--traceback" in args:
            traceback.print_exc(file=env.stderr)
        env.err(str(err))
        sys.exit(err.exit_status)
    except Exception as err:  # a bug: say so plainly, the stack only on request
        if env.traceback or "--traceback" in args:
            traceback.print_exc(file=env.stderr)
        env.err(f"internal error: {type(err).__name__}: {err} (run with --traceback for details)")
        sys.exit(ExitStatus.ERROR)
    sys.exit(ExitStatus.OK)
