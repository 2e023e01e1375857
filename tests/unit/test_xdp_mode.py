"""XDP attach modes, the pure parts: IFLA_XDP as the kernel reports it, which interfaces try
native mode first, the fallback to generic mode, state files from before modes existed, and
which host interfaces the native-mode probe picks."""

from __future__ import annotations

import errno
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import NetlinkError

from orthros_py.host.probe import IFF_UP, Nic, cluster_nics, cluster_subnet, probe_native_xdp
from orthros_py.host.probe import xdp_attached_mode as probe_attached_mode
from orthros_py.netlock import Attachment
from orthros_py.netlock.xdp import (
    IFF_LOOPBACK,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    XdpNetLock,
    attach_xdp,
    link_native_first,
    native_first,
    xdp_attached_mode,
    xdp_programs,
)


class Nla:
    """Stands in for a pyroute2 message or nested attribute: ``get_attr`` and ``[field]``."""

    def __init__(self, fields: dict[str, Any] | None = None, **attrs: Any) -> None:
        self.fields = fields or {}
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


# --- IFLA_XDP -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "mode"), [
    (None, None), (0, None),
    (1, "native"), (2, "generic"), (3, "offload"), (4, "multi"),
    # pyroute2 decodes the attribute to names of its own.
    ("xdp", "native"), ("xdpgeneric", "generic"), ("xdpoffload", "offload"), ("xdpmulti", "multi"),
    (9, "unknown (9)"),
])
def test_attached_mode_names(value: object, mode: str | None) -> None:
    assert xdp_attached_mode(value) == mode
    # The probe keeps a copy (host may not import netlock): the two must agree.
    assert probe_attached_mode(value) == mode


def test_programs_of_one_mode_come_from_the_attached_mode() -> None:
    assert xdp_programs(None) == {}
    assert xdp_programs(Nla(IFLA_XDP_ATTACHED=0)) == {}
    assert xdp_programs(Nla(IFLA_XDP_ATTACHED="xdpgeneric", IFLA_XDP_PROG_ID=5,
                            IFLA_XDP_SKB_PROG_ID=5)) == {"generic": 5}
    assert xdp_programs(Nla(IFLA_XDP_ATTACHED="xdp", IFLA_XDP_PROG_ID=7,
                            IFLA_XDP_DRV_PROG_ID=7)) == {"native": 7}
    # Kernels before the per-mode ids (4.19) report the one id only.
    assert xdp_programs(Nla(IFLA_XDP_ATTACHED=1, IFLA_XDP_PROG_ID=8)) == {"native": 8}


def test_programs_in_several_modes_come_from_the_per_mode_ids() -> None:
    multi = Nla(IFLA_XDP_ATTACHED="xdpmulti", IFLA_XDP_DRV_PROG_ID=7, IFLA_XDP_HW_PROG_ID=9)
    assert xdp_programs(multi) == {"native": 7, "offload": 9}


# --- which interfaces try native mode -----------------------------------------------------------

@pytest.mark.parametrize(("ifname", "flags", "kind", "native"), [
    ("eth1", IFF_UP, None, True),  # a NIC: virtio_net, e1000e, ...
    ("br0", IFF_UP, "bridge", True),  # tried, and the kernel refuses: generic mode
    ("veth0", IFF_UP, "veth", False),
    ("lo", IFF_UP | IFF_LOOPBACK, None, False),
    ("lo", IFF_UP, None, False),
    ("lo2", IFF_LOOPBACK, None, False),
])
def test_native_first(ifname: str, flags: int, kind: str | None, native: bool) -> None:
    assert native_first(ifname, flags, kind) is native


def test_native_first_reads_a_link_message() -> None:
    veth = Nla({"flags": IFF_UP}, IFLA_IFNAME="b-alpha",
               IFLA_LINKINFO=Nla(IFLA_INFO_KIND="veth"))
    nic = Nla({"flags": IFF_UP}, IFLA_IFNAME="eth1")
    assert link_native_first(veth) is False
    assert link_native_first(nic) is True


class FakeIPRoute:
    """Records XDP attach requests; refuses native mode with ``refuse``."""

    def __init__(self, refuse: int | None = None) -> None:
        self.refuse = refuse
        self.flags: list[int] = []

    def link(self, cmd: str, *, index: int, xdp: dict[str, Any]) -> None:
        attrs = dict(xdp["attrs"])
        self.flags.append(attrs["IFLA_XDP_FLAGS"])
        if self.refuse and attrs["IFLA_XDP_FLAGS"] & XDP_FLAGS_DRV_MODE:
            raise NetlinkError(self.refuse)


NEW = XDP_FLAGS_UPDATE_IF_NOEXIST


def test_native_is_tried_first_and_kept() -> None:
    ipr = FakeIPRoute()
    attach_xdp(ipr, 3, 10, native=True)
    assert ipr.flags == [XDP_FLAGS_DRV_MODE | NEW]


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EINVAL, errno.ENOMEM])
def test_a_refused_native_mode_falls_back_to_generic(code: int) -> None:
    ipr = FakeIPRoute(refuse=code)
    attach_xdp(ipr, 3, 10, native=True)
    assert ipr.flags == [XDP_FLAGS_DRV_MODE | NEW, XDP_FLAGS_SKB_MODE | NEW]


@pytest.mark.parametrize("code", [errno.EPERM, errno.EACCES])
def test_no_permission_is_not_a_reason_to_fall_back(code: int) -> None:
    ipr = FakeIPRoute(refuse=code)
    with pytest.raises(NetlinkError):
        attach_xdp(ipr, 3, 10, native=True)
    assert ipr.flags == [XDP_FLAGS_DRV_MODE | NEW]


def test_generic_only_never_asks_for_native() -> None:
    ipr = FakeIPRoute()
    attach_xdp(ipr, 3, 10, native=False)
    assert ipr.flags == [XDP_FLAGS_SKB_MODE | NEW]


# --- the attachment's mode on record ------------------------------------------------------------

def test_attachment_mode_defaults_to_generic_and_round_trips() -> None:
    old = {"iface": "eth1", "netns": None, "netns_id": [4, 1], "ifindex": 3, "xdp": True,
           "tc": True, "clsact_created": True}  # written before modes existed
    assert Attachment.from_dict(old).mode == "generic"
    native = Attachment("eth1", None, (4, 1), 3, True, True, True, mode="native")
    assert native.to_dict()["mode"] == "native"
    assert Attachment.from_dict(native.to_dict()) == native


def test_a_state_file_without_modes_reads_as_generic(tmp_path: Path) -> None:
    lock = XdpNetLock(pin_dir=tmp_path / "pins", state_dir=tmp_path / "run")
    lock.state_dir.mkdir()
    lock.state_file.write_text(json.dumps({"version": 1, "attachments": [
        {"iface": "veth0", "netns": "/run/netns/x", "netns_id": [4, 1], "ifindex": 3,
         "xdp": True, "tc": True, "clsact_created": False}]}))
    (att,) = lock._read_state()
    assert att.mode == "generic"
    lock._write_state([Attachment("eth1", None, (4, 2), 2, True, True, False, mode="native")])
    assert [a.mode for a in lock._read_state()] == ["native"]


# --- the native-mode probe's choice of interfaces -------------------------------------------------

SUBNET = ipaddress.IPv4Network("10.77.0.0/24")


def test_cluster_nics_are_up_physical_and_in_the_subnet() -> None:
    nics = [
        Nic("lo", 1, IFF_UP | IFF_LOOPBACK, False, ("127.0.0.1",)),
        Nic("eth0", 2, IFF_UP, True, ("192.0.2.2",)),  # the management NIC
        Nic("eth1", 3, IFF_UP, True, ("10.77.0.11", "10.77.0.100")),  # the cluster NIC
        Nic("eth2", 4, 0, True, ("10.77.0.12",)),  # down
        Nic("orthros-lab0", 5, IFF_UP, False, ("10.77.0.1",)),  # the lab's veth
        Nic("eth3", 6, IFF_UP, True, ()),  # no address
        Nic("eth4", 7, IFF_UP, True, ("10.78.0.5", "10.77.0.13")),  # second address counts
    ]
    assert [n.name for n in cluster_nics(nics, SUBNET)] == ["eth1", "eth4"]
    assert cluster_nics(nics, ipaddress.IPv4Network("10.99.0.0/16")) == []


def inventory(subnet: str) -> str:
    """A minimal inventory with its hosts in ``subnet`` (a /24)."""
    net = subnet.rsplit(".", 1)[0]
    return (f'[cluster]\nsubnet = "{subnet}"\n\n[lab]\ncontroller = "{net}.1/24"\n\n'
            f'[[host]]\nname = "alpha"\naddress = "{net}.11/24"\n\n'
            f'[client]\nname = "client"\naddress = "{net}.50/24"\n')


def test_cluster_subnet_comes_from_the_inventory(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "inventory.toml"
    path.write_text(inventory("10.9.0.0/24"))
    assert cluster_subnet(path) == (ipaddress.IPv4Network("10.9.0.0/24"), "")
    # By default the one `orthros lab` and `orthros hosts` read: $ORTHROS_INVENTORY, else the
    # repository's.
    monkeypatch.setenv("ORTHROS_INVENTORY", str(path))
    assert cluster_subnet() == (ipaddress.IPv4Network("10.9.0.0/24"), "")
    monkeypatch.setenv("ORTHROS_INVENTORY", str(tmp_path / "none.toml"))
    subnet, why = cluster_subnet()
    assert subnet is None and "no inventory file" in why
    path.write_text("[cluster\n")
    subnet, why = cluster_subnet(path)
    assert subnet is None and "not valid TOML" in why


def test_without_an_inventory_no_interface_is_probed(tmp_path: Path) -> None:
    # Returns before opening any netlink socket: nothing on this machine is touched.
    summary, nics, refused = probe_native_xdp(-1, tmp_path / "none.toml")
    assert nics == {} and refused is False
    assert summary.startswith("no cluster subnet (no inventory file at ")
    assert summary.endswith("native mode not probed")
