"""``orthros netlock``'s command line, without root: unlock undoes what lock did."""

from __future__ import annotations

import click

from orthros_py.cli.netlock import lock_cmd, unlock_cmd


def _options(cmd: click.Command) -> set[str]:
    return {opt for p in cmd.params for opt in p.opts}


def test_unlock_takes_every_argument_of_lock() -> None:
    # A script that ran `lock ARGS` can run `unlock ARGS` (--iface included) to undo it.
    assert _options(lock_cmd) <= _options(unlock_cmd)
    assert "--iface" in _options(unlock_cmd)
