"""The lab fence on real namespaces (root): two hosts on a bridge that lives in a third
namespace, as ``orthros lab`` builds them; LabFence.off() sets a host's bridge port down and
cuts it off, on() lets it back. Everything made here is removed afterwards, pass or fail.

Run under the shared lock:
    flock /tmp/orthros-root-tests.lock .venv/bin/python -m pytest -q tests/linux/test_lab_fence.py
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from helpers import wait_for

from orthros_py.errors import OrthrosError
from orthros_py.net.addr import call_in_netns
from orthros_py.net.fence import FenceError, LabFence, PowerState, fence_from_config
from orthros_py.net.links import (
    add_bridge,
    add_veth,
    create_netns,
    link_up,
    loopback_up,
    remove_netns,
)

TAG = f"otf{os.getpid() % 100000}"
BRIDGE = "br0"
PORT = 7441
ADDRESSES = {"a": "10.231.0.1/24", "b": "10.231.0.2/24"}


@dataclass
class Net:
    bridge_netns: str
    hosts: dict[str, str]  # short name -> its namespace

    def port(self, host: str) -> str:
        return f"b-{TAG[-5:]}{host}"  # the lab's b-NAME, kept unique to this run


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net(f"{TAG}-br", {h: f"{TAG}-{h}" for h in ADDRESSES})
    made: list[str] = []
    try:
        for ns in (n.bridge_netns, *n.hosts.values()):
            create_netns(ns)
            made.append(ns)
            loopback_up(ns)
        add_bridge(n.bridge_netns, BRIDGE)
        link_up(n.bridge_netns, BRIDGE)
        for h, ns in n.hosts.items():
            add_veth(n.bridge_netns, n.port(h), peer="eth0", peer_netns=ns)
            link_up(n.bridge_netns, n.port(h), master=BRIDGE)
            link_up(ns, "eth0", address=ipaddress.IPv4Interface(ADDRESSES[h]))
        yield n
    finally:
        # The veths and the bridge go with their namespaces.
        for ns in reversed(made):
            remove_netns(ns)


def _listen(address: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, PORT))
    s.listen(16)
    return s


def _connects(address: str) -> bool:
    try:
        with socket.create_connection((address, PORT), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture
def server(net: Net) -> Iterator[str]:
    """A listening socket on host b (the kernel completes handshakes; nothing accepts)."""
    address = ADDRESSES["b"].split("/")[0]
    s = call_in_netns(net.hosts["b"], _listen, address)
    try:
        yield address
    finally:
        s.close()


def test_off_cuts_the_host_and_on_lets_it_back(net: Net, server: str) -> None:
    client = net.hosts["a"]
    wait_for(lambda: call_in_netns(client, _connects, server), what="a connection across")

    fence = LabFence(net.bridge_netns, net.port("b"))
    assert fence.status() == PowerState.ON
    fence.off()
    try:
        assert fence.status() == PowerState.OFF
        assert not call_in_netns(client, _connects, server)
        fence.off()  # fencing a fenced host is no error
        assert fence.status() == "off"
    finally:
        fence.on()
    assert fence.status() == "on"
    # The port forwards again once the kernel has seen the carrier back: wait for it.
    wait_for(lambda: call_in_netns(client, _connects, server), what="the connection back")


def test_the_inventory_settings_reach_the_same_port(net: Net, server: str) -> None:
    fence = fence_from_config({"agent": "lab", "ifname": net.port("a")}, host="a",
                              bridge_netns=net.bridge_netns)
    client = net.hosts["a"]
    wait_for(lambda: call_in_netns(client, _connects, server), what="a connection across")
    fence.off()
    try:
        assert not call_in_netns(client, _connects, server)  # the fenced host reaches no one
    finally:
        fence.on()
    wait_for(lambda: call_in_netns(client, _connects, server), what="the connection back")


def test_a_missing_port_or_namespace_is_an_error(net: Net) -> None:
    with pytest.raises(FenceError, match="no lab port b-nobody"):
        LabFence(net.bridge_netns, "b-nobody").off()
    with contextlib.suppress(FileNotFoundError):
        assert f"{TAG}-none" not in os.listdir("/run/netns")
    with pytest.raises(OrthrosError, match="no network namespace"):
        LabFence(f"{TAG}-none", "b-a").status()
