"""The one way orthros runs an external program: an argument list, a timeout, and an error that
names argv, exit code and stderr. Never a shell string."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from orthros_py.errors import CommandError


def run(
    argv: Sequence[str],
    *,
    timeout: float = 60.0,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion and return it; raise CommandError on failure when ``check``."""
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            args, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as err:
        raise CommandError(f"{args[0]} is not installed", argv=args, returncode=None) from err
    except subprocess.TimeoutExpired as err:
        raise CommandError(
            f"{args[0]} did not finish within {timeout:g} s", argv=args, returncode=None
        ) from err
    if check and proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CommandError(
            f"{args[0]} failed with exit code {proc.returncode}: {last}",
            argv=args,
            returncode=proc.returncode,
            stderr=proc.stderr,
        )
    return proc
