"""Map key packing for bpf/netlock.c, and the rule texts of the iptables/nftables backends."""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from orthros_py.netlock import Conn
from orthros_py.netlock.iptables import parse_rule, rule_specs
from orthros_py.netlock.nftables import parse_ruleset, rules
from orthros_py.netlock.xdp import (
    COUNTER_NAMES,
    F_LOCAL_FIRST,
    KEY,
    SOURCE,
    VAL,
    conn_entries,
    pack_key,
    unpack_key,
)


def test_key_layout_ipv4() -> None:
    key = pack_key(("10.0.0.1", 80), ("10.0.0.2", 51234), socket.AF_INET)
    assert len(key) == KEY.size == 40
    assert key[0:16] == bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])  # IPv4-mapped
    assert key[16:32] == bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 2])
    assert key[32:34] == b"\x00\x50"  # port 80, network byte order
    assert key[34:36] == struct.pack(">H", 51234)
    assert key[36] == socket.AF_INET
    assert key[37:40] == b"\0\0\0"  # padding is zero: the kernel compares keys bytewise


def test_key_layout_ipv6() -> None:
    key = pack_key(("fd00::1", 443), ("fd00::2", 5000), socket.AF_INET6)
    assert key[0:16] == socket.inet_pton(socket.AF_INET6, "fd00::1")
    assert key[36] == socket.AF_INET6
    assert unpack_key(key) == (socket.AF_INET6, ("fd00::1", 443), ("fd00::2", 5000))


def test_entries_cover_both_directions() -> None:
    c = Conn.parse("10.0.0.1:80,10.0.0.2:51234")
    (out_key, out_val), (in_key, in_val) = conn_entries(c)
    # tc egress sees local->remote, XDP sees remote->local.
    assert out_key == pack_key(c.local, c.remote, c.family)
    assert in_key == pack_key(c.remote, c.local, c.family)
    assert VAL.unpack(out_val) == (0, F_LOCAL_FIRST, 0)
    assert VAL.unpack(in_val) == (0, 0, 0)
    assert unpack_key(out_key) == (socket.AF_INET, c.local, c.remote)
    # The same connection seen from the peer is the same pair of keys.
    assert {k for k, _ in conn_entries(c.reversed())} == {out_key, in_key}


def test_python_layout_matches_the_c_source() -> None:
    src = SOURCE.read_text()
    key = re.search(r"struct netlock_key \{(.*?)\};", src, re.S)
    val = re.search(r"struct netlock_val \{(.*?)\};", src, re.S)
    assert key and val
    fields = re.findall(r"(__u8|__be16|__u32|__u64)\s+(\w+)(\[\d+\])?;", key.group(1))
    assert fields == [("__u8", "saddr", "[16]"), ("__u8", "daddr", "[16]"),
                      ("__be16", "sport", ""), ("__be16", "dport", ""),
                      ("__u8", "family", ""), ("__u8", "pad", "[3]")]
    assert re.findall(r"(__u\d+)\s+(\w+);", val.group(1)) == [
        ("__u64", "packets"), ("__u32", "flags"), ("__u32", "pad")]
    assert f"#define NETLOCK_AF_INET {int(socket.AF_INET)}\n" in src
    assert f"#define NETLOCK_AF_INET6 {int(socket.AF_INET6)}\n" in src
    assert f"#define NETLOCK_F_LOCAL_FIRST {F_LOCAL_FIRST}\n" in src
    for i, name in enumerate(COUNTER_NAMES):
        assert f"#define CNT_{name.upper()} {i}\n" in src


def test_iptables_rules_roundtrip() -> None:
    c = Conn.parse("10.0.0.1:80,10.0.0.2:51234")
    inp, out = rule_specs(c)
    assert inp.startswith("INPUT -s 10.0.0.2 -d 10.0.0.1 ") and "--sport 51234 --dport 80" in inp
    assert out.startswith("OUTPUT -s 10.0.0.1 -d 10.0.0.2 ") and "--sport 80 --dport 51234" in out
    # As iptables-save prints them back.
    saved_in = ("-A INPUT -s 10.0.0.2/32 -d 10.0.0.1/32 -p tcp -m tcp --sport 51234 --dport 80 "
                "-m comment --comment orthros-netlock -j DROP")
    assert parse_rule(saved_in) == ("INPUT", c)
    assert parse_rule("-A OUTPUT " + out.split(" ", 1)[1]) == ("OUTPUT", c)
    assert parse_rule("-A INPUT -s 1.2.3.4/32 -j DROP") is None  # not ours


def test_nft_rules_and_json() -> None:
    c = Conn.parse("[fd00::1]:443,[fd00::2]:5000")
    (ch_in, r_in), (ch_out, r_out) = rules(c)
    assert ch_in == "input" and r_in.startswith("ip6 saddr fd00::2 ip6 daddr fd00::1 ")
    assert ch_out == "output" and "tcp sport 443 tcp dport 5000" in r_out
    assert f'comment "orthros:{c}"' in r_in
    data = {"nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"table": {"family": "inet", "name": "orthros_netlock", "handle": 1}},
        {"rule": {"family": "inet", "table": "orthros_netlock", "chain": "input", "handle": 4,
                  "comment": f"orthros:{c}",
                  "expr": [{"counter": {"packets": 3, "bytes": 180}}, {"drop": None}]}},
        {"rule": {"family": "inet", "table": "other", "chain": "input", "handle": 5,
                  "comment": f"orthros:{c}", "expr": []}},
    ]}
    assert parse_ruleset(data) == [("input", 4, c, 3)]


def test_state_file_roundtrip_and_empty_state_leaves_no_file(tmp_path: Path) -> None:
    from orthros_py.netlock import Attachment
    from orthros_py.netlock.xdp import XdpNetLock

    lock = XdpNetLock(pin_dir=tmp_path / "pins", state_dir=tmp_path / "run")
    atts = [Attachment("veth0", "/run/netns/x", (4, 1), 3, True, True, True),
            Attachment("lo", None, (4, 2), 1, True, False, False)]
    lock._write_state(atts)
    assert lock._read_state() == atts
    assert json.loads(lock.state_file.read_text())["version"] == 1
    lock._write_state([])
    assert not lock.state_file.exists()
    assert lock._read_state() == []


def test_missing_bcc_is_a_missing_feature(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from orthros_py.errors import MissingFeatureError
    from orthros_py.netlock.xdp import XdpNetLock

    monkeypatch.setitem(sys.modules, "bcc", None)  # import bcc -> ImportError
    with pytest.raises(MissingFeatureError, match="BCC's Python module cannot be imported"):
        XdpNetLock(pin_dir=tmp_path, state_dir=tmp_path)._compile()


def test_imports_stay_light() -> None:
    # `orthros --help` must work without BCC; the netlock package must not pull in pyroute2.
    code = ("import sys, orthros_py.cli; m = sys.modules; "
            "print('bcc' in m, 'orthros_py.netlock.xdp' in m)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"]
    code = "import sys, orthros_py.netlock; print('pyroute2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
