"""e2e fixtures: a lab of network-namespace hosts (orthros_py.lab), built for one test and always
torn down after it, also when the test fails, and also what a crashed earlier run left.

    @pytest.mark.lab(hosts=3, agents=False)   # optional; defaults: 2 hosts, agents if available
    def test_something(lab: Lab) -> None: ...
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from orthros_py.lab import Lab, teardown


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lab(hosts=2, agents=True): the size of the lab the `lab` fixture builds")


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    marker = request.node.get_closest_marker("lab")
    opts = dict(marker.kwargs) if marker else {}
    teardown()  # whatever an earlier, killed run left behind
    try:
        yield Lab.up(int(opts.get("hosts", 2)), agents=bool(opts.get("agents", True)),
                     rebuild=True)
    finally:
        teardown()
