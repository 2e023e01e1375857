"""A tree whose UNIX socket talks to a peer outside the tree (a log daemon's datagram socket)
migrates only when told --ext-unix-sk: without it CRIU refuses and the tree keeps running where
it was; with it the restored socket is connected to the same path on the destination and the
messages go on, numbered on from where they were."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_orthros, wait_for
from migrate_kit import Service, migrate_cli

from orthros_py.lab import Lab

WORKLOAD = Path(__file__).resolve().parents[1] / "workloads" / "ext_logger.py"


class Reader:
    """The log daemon: a datagram socket bound at a path, outside any migrated tree, in the
    network namespace of the host the tree starts on (CRIU finds a UNIX socket's peer through
    sock_diag, which sees one network namespace: a peer in another is no peer at all)."""

    def __init__(self, path: Path, lab: Lab, host: str) -> None:
        self.path = path
        with lab.in_netns(host):
            self.sk = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sk.bind(str(path))
        self.sk.setblocking(False)
        self.seen: list[int] = []

    def drain(self) -> list[int]:
        while True:
            try:
                msg = self.sk.recv(64).decode()
            except BlockingIOError:
                return self.seen
            self.seen.append(int(msg.split()[1]))

    def close(self) -> None:
        self.sk.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def reader(lab: Lab, tmp_path: Path) -> Iterator[Reader]:
    r = Reader(tmp_path / "log.sock", lab, "alpha")
    try:
        yield r
    finally:
        r.close()


def more(reader: Reader, n: int) -> None:
    start = len(reader.drain())
    wait_for(lambda: len(reader.drain()) >= start + n, timeout=20,
             what=f"{n} more messages from the logger")


def test_a_socket_with_an_outside_peer_migrates_only_with_ext_unix_sk(
        lab: Lab, reader: Reader) -> None:
    svc = Service(lab, "alpha", [sys.executable, str(WORKLOAD), str(reader.path), "0.02"])
    more(reader, 10)

    r = run_orthros("migrate", str(svc.pid), "--from", "alpha", "--to", "beta", timeout=120)
    assert r.returncode != 0
    assert "--ext-unix-sk" in r.stderr and "rolled back" in r.stderr, r.stderr
    more(reader, 10)  # still running on alpha
    assert svc.alive()

    result = migrate_cli(svc.pid, "alpha", "beta", "--ext-unix-sk")
    assert result["dest"] == "beta"
    more(reader, 20)
    seen = reader.drain()
    # One sender, one run of numbers: nothing restarted from 0, nothing repeated or reordered.
    assert seen == list(range(seen[0], seen[0] + len(seen))), seen
