"""Test tiers: tests/unit runs anywhere; tests/linux and tests/e2e need root, real CRIU and BPF;
tests/vm boots the Vagrant cluster (scripts/vm.sh) and runs orthros across its VMs.

Fixtures here create real processes and always remove them, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from helpers import CriuNetfilter, Spawner, host_cgroups


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}linux{os.sep}" in path:
            item.add_marker(pytest.mark.linux)
        if f"{os.sep}e2e{os.sep}" in path:
            item.add_marker(pytest.mark.e2e)
        if f"{os.sep}vm{os.sep}" in path:
            item.add_marker(pytest.mark.vm)
        if any(item.get_closest_marker(m) for m in ("linux", "e2e", "vm")) and os.geteuid():
            item.add_marker(pytest.mark.skip(reason="needs root (real CRIU, BPF, namespaces)"))


@pytest.fixture
def spawner(tmp_path: Path) -> Iterator[Spawner]:
    s = Spawner(tmp_path)
    try:
        yield s
    finally:
        s.cleanup()


@pytest.fixture
def criu_netfilter(request: pytest.FixtureRequest) -> Iterator[CriuNetfilter]:
    """For tests that use CRIU's own network lock: add the test's server ports to ``.ports``.
    Whatever CRIU's lock left for them is removed at the end, pass or fail; a test that passed
    yet left some fails here (a restore should have lifted them)."""
    nf = CriuNetfilter()
    yield nf
    left = nf.cleanup()
    rep = getattr(request.node, "rep_call", None)
    if left and rep is not None and rep.passed:
        pytest.fail("CRIU's network lock left (now removed): " + "; ".join(left))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Let fixtures see how the test itself went (request.node.rep_call).
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    """Sockets a test opens (``socks.append(s)``); all closed at the end."""
    made: list[socket.socket] = []
    try:
        yield made
    finally:
        for s in made:
            s.close()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def orthros_bin() -> str:
    exe = shutil.which("orthros", path=str(Path(sys.executable).parent)) or shutil.which("orthros")
    if exe is None:
        pytest.fail("the orthros command is not installed: run 'make setup'")
    return exe


@pytest.fixture
def v2_hugetlb() -> Iterator[Path]:
    """cgroup v2 with hugetlb (on the hybrid development VM the one controller left to v2; on a
    pure v2 host one of many) enabled below the root; the root's subtree_control is put back as
    it was. Request it before the fixtures that make groups under it, so that it is torn down
    after they are gone."""
    unified = host_cgroups()[1]  # from /proc/self/mounts, not from orthros's own reading
    if unified is None or not (unified / "cgroup.procs").exists():
        pytest.skip("no cgroup2 hierarchy on this host")
    if "hugetlb" not in (unified / "cgroup.controllers").read_text().split():
        pytest.skip("this host's cgroup v2 has no hugetlb controller (bound to v1, or no "
                    "CONFIG_CGROUP_HUGETLB)")
    before = (unified / "cgroup.subtree_control").read_text().split()
    try:
        yield unified
    finally:
        if "hugetlb" not in before:
            with contextlib.suppress(OSError):
                (unified / "cgroup.subtree_control").write_text("-hugetlb")


@pytest.fixture(scope="module")
def xdp_pins_as_found() -> Iterator[None]:
    """A module whose dumps or restores use the xdp lock pins it (the lock must outlive orthros);
    if it was not pinned before the module, it goes again once nobody holds a lock or an
    attachment in it, so the machine is left as found."""
    from orthros_py.netlock.xdp import XdpNetLock

    lock = XdpNetLock()
    before = lock.pinned
    lock.close()
    yield
    if not before:
        lock = XdpNetLock()
        try:
            if lock.pinned:
                lock.flush_if_unused()
        finally:
            lock.close()
