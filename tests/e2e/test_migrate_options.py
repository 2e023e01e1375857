"""CRIU's options for real services reach both agents of a migration: a tree holding a flock and
a POSIX lock (a pidfile, a database's lock file) migrates only with --file-locks, and holds both
locks again on the destination."""

from __future__ import annotations

import errno
import fcntl
import sys
from pathlib import Path

from helpers import read_lines, run_orthros, wait_for
from migrate_kit import Service, migrate_cli

from orthros_py.lab import Lab

HOLDER = Path(__file__).resolve().parents[1] / "workloads" / "holder.py"


def locks_free(d: Path) -> tuple[bool, bool]:
    """Whether this process could take (flock, POSIX) exclusive locks on the holder's files
    (as tests/linux/test_criu_options.py probes them)."""
    free = []
    for name, op in (("flock.lock", fcntl.flock), ("posix.lock", fcntl.lockf)):
        with (d / name).open("a") as f:
            try:
                op(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                assert err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES), err
                free.append(False)
            else:
                free.append(True)
    return free[0], free[1]


def test_file_locks_migrate_with_file_locks_only(lab: Lab, tmp_path: Path) -> None:
    d, out = tmp_path / "locks", tmp_path / "holder.out"
    d.mkdir()
    svc = Service(lab, "alpha", [sys.executable, str(HOLDER), "locks", str(d)], log=out)
    try:
        wait_for(lambda: len(read_lines(out)) >= 3, what="the holder to hold its locks")
        assert locks_free(d) == (False, False)

        r = run_orthros("migrate", str(svc.pid), "--from", "alpha", "--to", "beta",
                        timeout=180)
        assert r.returncode != 0
        assert "pass --file-locks" in r.stderr and "rolled back" in r.stderr, r.stderr
        assert svc.alive() and locks_free(d) == (False, False)  # still on alpha, still held

        result = migrate_cli(svc.pid, "alpha", "beta", "--file-locks")
        assert result["dest"] == "beta"
        n = len(read_lines(out))
        wait_for(lambda: len(read_lines(out)) >= n + 3, what="the holder to go on on beta")
        assert locks_free(d) == (False, False)  # the restored tree holds both again
    finally:
        svc.kill()
    wait_for(lambda: not svc.alive(), what="the holder to go")
    assert locks_free(d) == (True, True)
