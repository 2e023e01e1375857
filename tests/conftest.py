"""Test tiers: tests/unit runs anywhere; tests/linux and tests/e2e need root, real CRIU and BPF.

Fixtures here create real processes and always remove them, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Spawner


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}linux{os.sep}" in path:
            item.add_marker(pytest.mark.linux)
        if f"{os.sep}e2e{os.sep}" in path:
            item.add_marker(pytest.mark.e2e)
        if (item.get_closest_marker("linux") or item.get_closest_marker("e2e")) and os.geteuid():
            item.add_marker(pytest.mark.skip(reason="needs root (real CRIU, BPF, namespaces)"))


@pytest.fixture
def spawner(tmp_path: Path) -> Iterator[Spawner]:
    s = Spawner(tmp_path)
    try:
        yield s
    finally:
        s.cleanup()


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
    """cgroup v2 with hugetlb, the one controller this hybrid host leaves to v2, enabled below
    the root; the root's subtree_control is put back as it was. Request it before the fixtures
    that make groups under it, so that it is torn down after they are gone."""
    from orthros_py.cgroup.fs import mounts
    from orthros_py.cgroup.model import V2

    unified = mounts().get(V2)
    if unified is None or not (unified / "cgroup.procs").exists():
        pytest.skip("no cgroup2 hierarchy on this host")
    if "hugetlb" not in (unified / "cgroup.controllers").read_text().split():
        pytest.skip("cgroup v2 here offers no controller to limit with (hugetlb is bound to v1)")
    before = (unified / "cgroup.subtree_control").read_text().split()
    try:
        yield unified
    finally:
        if "hugetlb" not in before:
            with contextlib.suppress(OSError):
                (unified / "cgroup.subtree_control").write_text("-hugetlb")
