"""The XDP lock in native (driver) mode, on the real kernel (root, BCC, a kernel with XDP).

veth has a driver mode, so it stands in for a NIC such as virtio_net: the lock leaves veths in
generic mode unless told otherwise, and a test that asks for native mode gets it. Each test gets
two fresh network namespaces joined by a veth (10.214.N.0/24, only inside them); nothing is
attached to an interface of this machine's own namespace. Namespaces, attachments and the pins
a test made are removed in finalizers, also when a test fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import VethPair, run_orthros, veth_pair

from orthros_py.host.probe import IFF_UP, _host_nics, cluster_nics, probe_native_xdp
from orthros_py.net.addr import in_netns
from orthros_py.netlock import Conn
from orthros_py.netlock.bpf import BPFFS
from orthros_py.netlock.xdp import XdpNetLock

pytestmark = pytest.mark.usefixtures("xdp_pins_as_found")

QUIET = 0.6  # seconds a locked connection must stay silent
FLOW = 20.0  # seconds within which TCP's retransmission must deliver after unlocking


@pytest.fixture(scope="module")
def lock(xdp_pins_as_found: None) -> Iterator[XdpNetLock]:
    """The host's lock (its pins), compiled at most once for the module."""
    xdp = XdpNetLock()
    xdp.prepare()
    try:
        yield xdp
    finally:
        xdp.release()
        xdp.unload()


@pytest.fixture(scope="module")
def older(lock: XdpNetLock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[XdpNetLock]:
    """A second load of the same program with pins and state of its own: what the host's lock
    finds on an interface after a flush and a new load elsewhere."""
    xdp = XdpNetLock(pin_dir=BPFFS / f"orthros-test-{secrets.token_hex(3)}",
                     state_dir=tmp_path_factory.mktemp("older-state"))
    xdp.prepare()
    try:
        yield xdp
    finally:
        with contextlib.suppress(Exception):
            xdp.flush()
        xdp.unload()


Pair = VethPair


@pytest.fixture
def pair() -> Iterator[VethPair]:
    with veth_pair("otxn", ("xna", "xnb"), "10.214") as p:
        yield p


def kernel_xdp(pair: Pair, side: str, ifname: str) -> tuple[str | None, int, int]:
    """What the kernel says, read without orthros: (IFLA_XDP_ATTACHED as pyroute2 names it,
    driver-mode program id, generic-mode program id)."""
    from pyroute2 import IPRoute

    with in_netns(pair.path(side)), IPRoute() as ipr:
        link = ipr.link("get", index=ipr.link_lookup(ifname=ifname)[0])[0]
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return None, 0, 0
    return (xdp.get_attr("IFLA_XDP_ATTACHED"), xdp.get_attr("IFLA_XDP_DRV_PROG_ID") or 0,
            xdp.get_attr("IFLA_XDP_SKB_PROG_ID") or 0)


def mine(lock: XdpNetLock, pair: Pair) -> list[Any]:
    return [a for a in lock.status().attachments if a.netns == pair.path("b")]


def xdp_id(lock: XdpNetLock) -> int:
    return int(lock.prepare()["xdp_prog_id"])


# --- the lock -----------------------------------------------------------------------------------

def test_a_veth_stays_in_generic_mode(lock: XdpNetLock, pair: Pair) -> None:
    (att,) = lock.attach([pair.b_if], netns=pair.b)
    assert att.mode == "generic"
    assert kernel_xdp(pair, "b", pair.b_if) == ("xdpgeneric", 0, xdp_id(lock))
    assert [a.mode for a in mine(lock, pair)] == ["generic"]
    result = lock.detach(netns=pair.b)
    assert result.problems == []
    assert kernel_xdp(pair, "b", pair.b_if)[0] is None


def test_native_mode_when_asked_attaches_in_the_driver_and_detaches(
        lock: XdpNetLock, pair: Pair) -> None:
    (att,) = lock.attach([pair.b_if], netns=pair.b, native=True)
    assert att.mode == "native"
    assert kernel_xdp(pair, "b", pair.b_if) == ("xdp", xdp_id(lock), 0)
    # Attaching again keeps it where it is, and the CLI shows the mode.
    (again,) = lock.attach([pair.b_if], netns=pair.b)
    assert again.mode == "native"
    res = run_orthros("netlock", "status", "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert [a["mode"] for a in st["attachments"] if a["netns"] == pair.path("b")] == ["native"]
    table = run_orthros("netlock", "status")
    assert "xdp mode" in table.stdout + table.stderr and "native" in table.stdout + table.stderr
    # A detach in generic mode would leave it on without a word from the kernel.
    result = lock.detach(netns=pair.b)
    assert result.problems == []
    assert kernel_xdp(pair, "b", pair.b_if) == (None, 0, 0)
    assert mine(lock, pair) == []


def test_native_mode_locks_and_unlocks_a_connection(lock: XdpNetLock, pair: Pair,
                                                    socks: list[socket.socket]) -> None:
    with in_netns(pair.path("b")):
        srv = socket.socket()
    socks.append(srv)
    srv.bind((pair.ip("b"), 0))
    srv.listen(4)
    with in_netns(pair.path("a")):
        cli = socket.socket()
    socks.append(cli)
    cli.settimeout(10)
    cli.connect((pair.ip("b"), srv.getsockname()[1]))
    end, _ = srv.accept()
    socks.append(end)
    conn = Conn.of(end.getsockname()[:2], end.getpeername()[:2])

    (att,) = lock.attach([pair.b_if], netns=pair.b, native=True)
    assert att.mode == "native"
    before = lock.counters()
    lock.lock([conn])
    try:
        cli.sendall(b"request")  # arrives on B's veth: the driver-mode program drops it
        end.settimeout(QUIET)
        with pytest.raises(TimeoutError):
            end.recv(100)
        assert lock.counters()["xdp_dropped"] > before["xdp_dropped"]
    finally:
        lock.unlock([conn])
    end.settimeout(FLOW)
    got = b""
    while len(got) < len(b"request"):
        chunk = end.recv(100)
        assert chunk, "the connection was closed"
        got += chunk
    assert got == b"request"  # retransmitted once the lock was lifted


@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
def test_an_older_load_is_replaced_in_its_mode(lock: XdpNetLock, older: XdpNetLock,
                                               pair: Pair, native: bool) -> None:
    mode = "native" if native else "generic"
    (att,) = older.attach([pair.b_if], netns=pair.b, native=native)
    assert att.mode == mode
    # The host's lock asks for nothing in particular: the program there keeps its mode.
    (att,) = lock.attach([pair.b_if], netns=pair.b)
    assert att.mode == mode
    attached, drv, skb = kernel_xdp(pair, "b", pair.b_if)
    assert attached == ("xdp" if native else "xdpgeneric")
    assert (drv or skb) == xdp_id(lock) != xdp_id(older)
    assert lock.detach(netns=pair.b).problems == []
    assert kernel_xdp(pair, "b", pair.b_if) == (None, 0, 0)
    older.detach(netns=pair.b)


# --- the native-mode probe of `orthros check` -----------------------------------------------------

def _inventory(tmp_path: Path, pair: Pair) -> Path:
    net = f"10.214.{pair.sub}"
    path = tmp_path / "inventory.toml"
    path.write_text(f'[cluster]\nsubnet = "{net}.0/24"\n\n[lab]\ncontroller = "{net}.1/24"\n\n'
                    f'[[host]]\nname = "alpha"\naddress = "{net}.11/24"\n\n'
                    f'[client]\nname = "client"\naddress = "{net}.50/24"\n')
    return path


@pytest.fixture
def as_nic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make the probe see interfaces as NICs with a driver: a fake /sys/class/net (the real one
    shows this machine's own namespace, and a veth has no device link there anyway)."""
    sys_net = tmp_path / "sys-class-net"
    monkeypatch.setattr("orthros_py.host.probe.SYS_NET", sys_net)

    def make(ifname: str, driver: str) -> None:
        (sys_net / "drivers" / driver).mkdir(parents=True, exist_ok=True)
        (sys_net / ifname / "device").mkdir(parents=True)
        (sys_net / ifname / "device" / "driver").symlink_to(sys_net / "drivers" / driver)

    return make


def test_probe_reports_native_mode_and_leaves_nothing(lock: XdpNetLock, pair: Pair,
                                                      tmp_path: Path, as_nic: Any) -> None:
    as_nic(pair.b_if, "veth")
    objs = lock._objects(create=False)
    assert objs is not None
    with in_netns(pair.path("b")):
        summary, nics, refused = probe_native_xdp(objs.xdp_fd, _inventory(tmp_path, pair))
    assert nics == {pair.b_if: {"driver": "veth", "mode": "native"}}
    assert summary == f"native XDP on {pair.b_if} (veth)" and refused is False
    assert kernel_xdp(pair, "b", pair.b_if) == (None, 0, 0)


def test_probe_reports_the_kernels_reason_when_native_mode_is_refused(
        lock: XdpNetLock, pair: Pair, tmp_path: Path, as_nic: Any) -> None:
    from pyroute2 import IPRoute

    # A bridge has no driver mode; given a driver and an address here, the probe picks it.
    with in_netns(pair.path("b")), IPRoute() as ipr:
        ipr.link("add", ifname="xnbr", kind="bridge")
        idx = ipr.link_lookup(ifname="xnbr")[0]
        ipr.addr("add", index=idx, address=f"10.214.{pair.sub}.3", prefixlen=32)
        ipr.link("set", index=idx, state="up")
    as_nic("xnbr", "bridge")
    objs = lock._objects(create=False)
    assert objs is not None
    with in_netns(pair.path("b")):
        summary, nics, refused = probe_native_xdp(objs.xdp_fd, _inventory(tmp_path, pair))
    assert list(nics) == ["xnbr"] and refused is True
    assert nics["xnbr"]["mode"] == "generic only"
    assert "native mode" in nics["xnbr"]["reason"]  # the kernel's extack message
    assert summary.startswith("generic XDP only on xnbr (bridge): ")
    assert kernel_xdp(pair, "b", "xnbr") == (None, 0, 0)


def test_probe_leaves_a_program_already_there(lock: XdpNetLock, pair: Pair, tmp_path: Path,
                                              as_nic: Any) -> None:
    as_nic(pair.b_if, "veth")
    lock.attach([pair.b_if], netns=pair.b)  # generic, as on every veth
    objs = lock._objects(create=False)
    assert objs is not None
    with in_netns(pair.path("b")):
        _, nics, _ = probe_native_xdp(objs.xdp_fd, _inventory(tmp_path, pair))
    assert nics[pair.b_if]["mode"] == "not probed"
    assert "already attached (generic mode)" in nics[pair.b_if]["reason"]
    assert kernel_xdp(pair, "b", pair.b_if) == ("xdpgeneric", 0, xdp_id(lock))
    lock.detach(netns=pair.b)


def test_cluster_nics_of_a_namespace_are_read_from_netlink(pair: Pair, as_nic: Any) -> None:
    from pyroute2 import IPRoute

    as_nic(pair.b_if, "veth")
    with in_netns(pair.path("b")), IPRoute() as ipr:
        nics = {n.name: n for n in _host_nics(ipr)}
    b = nics[pair.b_if]
    assert b.device and b.flags & IFF_UP and b.addresses == (pair.ip("b"),)
    assert not nics["lo"].device  # not in the fake sysfs
    subnet = ipaddress.IPv4Network(f"10.214.{pair.sub}.0/24")
    assert [n.name for n in cluster_nics(nics.values(), subnet)] == [pair.b_if]
