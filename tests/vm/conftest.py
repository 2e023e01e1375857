"""The VM tier's cluster fixture: vagrant/Vagrantfile booted for real by scripts/vm.sh (see
vmkit.py), once for the session (the box is built on first use, then cached), destroyed at the
end; ORTHROS_VM_KEEP=1 leaves it running for the next session."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from vmkit import UP_TIMEOUT_S, Cluster, vm_sh


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if f"{os.sep}vm{os.sep}" in str(item.fspath):
            # The first test waits for the box build and the boot under emulation.
            item.add_marker(pytest.mark.timeout(UP_TIMEOUT_S + 1800))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log = tmp_path_factory.mktemp("vm") / "vm.log"
    started = time.monotonic()
    try:
        vm_sh("up", log, UP_TIMEOUT_S)
        print(f"\nVM cluster up in {time.monotonic() - started:.0f} s (log {log})")
        yield Cluster(log)
    finally:
        if os.environ.get("ORTHROS_VM_KEEP") != "1":
            vm_sh("down", log, 600)
