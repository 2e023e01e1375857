"""`orthros check` inside a guest: Debian's own 6.1 kernel, pure cgroup v2 with the cpu and memory
controllers, BCC compiling against the guest kernel's own headers, and the XDP lock's program in
native mode on the virtio NIC of the cluster network (what the network-namespace lab cannot show:
its hosts share this machine's kernel, hybrid cgroups and veths in generic mode)."""

from __future__ import annotations

import json

from vmkit import Cluster


def test_check_in_a_guest_reports_its_kernel_cgroup_v2_bcc_headers_and_native_xdp(
        cluster: Cluster) -> None:
    # Compiling the probe program with clang under emulation takes minutes, not seconds.
    r = cluster.ssh("alpha", "orthros check --json", timeout=900)
    report = json.loads(r.stdout)
    probes = report["probes"]
    assert report["ok"], report["missing_required"]

    release = probes["kernel"]["data"]["release"]
    assert release.startswith("6.1."), release
    assert release == cluster.ssh("alpha", "uname -r").stdout.strip()

    cg = probes["cgroups"]["data"]
    assert cg["mode"] == "v2" and cg["v1"] == {} and cg["v2"] == "/sys/fs/cgroup", cg
    controllers = cluster.ssh("alpha", "cat /sys/fs/cgroup/cgroup.controllers").stdout.split()
    assert {"cpu", "memory"} <= set(controllers), controllers

    headers = probes["kernel_headers"]
    assert headers["status"] == "ok", headers["detail"]
    assert release in headers["data"]["target"], headers["data"]

    xdp = probes["bpf_xdp"]
    assert xdp["ok"] and xdp["data"]["compiled"], xdp["detail"]
    nics = xdp["data"]["nics"]
    assert nics.get("eth1", {}).get("mode") == "native", (nics, xdp["detail"])
    assert nics["eth1"]["driver"] == "virtio_net", nics
