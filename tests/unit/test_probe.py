"""Host probes, the pure parts: report aggregation, CapEff, cgroup layouts, tool versions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orthros_py.errors import ExitStatus
from orthros_py.host.probe import (
    CriuFeatures,
    ProbeResult,
    Report,
    Status,
    cgroup_layout,
    has_cap,
    headers_version,
    missing_error,
    parse_cap_eff,
    parse_iptables_version,
    parse_kernel_release,
    parse_mounts,
    parse_nft_version,
    probe_bpffs,
    probe_cap_sys_resource,
    probe_cgroups,
    probe_mem_track,
)

# This machine's cgroup mounts (v1 hierarchies plus cgroup2 at /sys/fs/cgroup/unified).
HYBRID = """\
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/devices cgroup rw,relatime,devices 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0
cgroup /sys/fs/cgroup/blkio cgroup rw,relatime,blkio 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,xattr,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""

# A systemd host in the unified layout.
PURE_V2 = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0
bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0
"""

# An older distribution: co-mounted controllers, no cgroup2.
PURE_V1 = """\
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/net_cls,net_prio cgroup rw,relatime,net_cls,net_prio 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
"""

STATUS = """\
Name:\tcat
Uid:\t0\t0\t0\t0
CapInh:\t0000000000000000
CapPrm:\t000001fffeffffff
CapEff:\t000001fffeffffff
CapBnd:\t000001fffeffffff
"""


def result(name: str, ok: bool, required: bool = False, **kw: object) -> ProbeResult:
    return ProbeResult(name, name.upper(), ok, required, f"{name} detail", **kw)  # type: ignore[arg-type]


# --- report aggregation ---------------------------------------------------------------------


def test_status_of_each_kind_of_result() -> None:
    assert result("a", True).status is Status.OK
    assert result("a", True, warning=True).status is Status.WARN
    assert result("a", False).status is Status.WARN  # optional and absent: degraded, not blocked
    assert result("a", False, required=True).status is Status.MISSING


def test_missing_required_lists_only_required_absent_items() -> None:
    report = Report((result("root", True, True), result("criu", False, True, fix="build it"),
                     result("mem_track", False), result("criu_check", False, True)))
    assert [r.name for r in report.missing_required] == ["criu", "criu_check"]
    assert not report.ok


def test_all_required_present_is_ok_despite_optional_gaps() -> None:
    report = Report((result("root", True, True), result("mem_track", False)))
    assert report.ok
    assert missing_error(report) is None


def test_default_network_lock_follows_xdp() -> None:
    assert Report((result("bpf_xdp", True),)).default_network_lock == "xdp"
    assert Report((result("bpf_xdp", False),)).default_network_lock == "iptables"
    assert Report(()).default_network_lock == "iptables"


def test_to_dict_is_keyed_by_name_and_carries_verdicts() -> None:
    report = Report((result("criu", False, True, fix="build it", data={"path": None}),
                     result("bpf_xdp", True)), quick=True)
    d = report.to_dict()
    assert d["ok"] is False
    assert d["quick"] is True
    assert d["default_network_lock"] == "xdp"
    assert d["missing_required"] == ["criu"]
    assert list(d["probes"]) == ["criu", "bpf_xdp"]
    assert d["probes"]["criu"] == {
        "title": "CRIU", "status": "missing", "ok": False, "required": True,
        "detail": "criu detail", "fix": "build it", "data": {"path": None},
    }


def test_missing_error_names_each_item_and_its_fix() -> None:
    report = Report((result("criu", False, True, fix="run 'make setup'"),
                     result("criu_check", False, True), result("bpffs", False, fix="mount")))
    err = missing_error(report)
    assert err is not None
    assert err.exit_status == ExitStatus.MISSING_FEATURE
    text = str(err)
    assert "2 required items are missing" in text
    assert "CRIU: criu detail (fix: run 'make setup')" in text
    assert "CRIU_CHECK: criu_check detail" in text
    assert "bpffs" not in text  # optional items never fail the check


def test_report_lookup() -> None:
    report = Report((result("netns", True),))
    assert report["netns"].ok
    assert report.get("nope") is None
    with pytest.raises(KeyError):
        report["nope"]


# --- capabilities ---------------------------------------------------------------------------


def test_cap_eff_parsed_and_cap_sys_resource_absent_here() -> None:
    mask = parse_cap_eff(STATUS)
    assert mask == 0x1FFFEFFFFFF
    assert not has_cap(mask, 24)  # CAP_SYS_RESOURCE: the one bit this machine's root lacks
    assert has_cap(mask, 21)  # CAP_SYS_ADMIN
    assert has_cap(mask, 40)  # CAP_CHECKPOINT_RESTORE
    assert has_cap(0x1FFFFFFFFFF, 24)


def test_cap_eff_missing_line_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse_cap_eff("Name:\tcat\n")


def test_cap_probe_explains_what_is_lost() -> None:
    r = probe_cap_sys_resource(STATUS)
    assert not r.ok and not r.required
    assert "RLIMIT_NOFILE" in r.detail and "another uid" in r.detail
    assert r.data["cap_eff"] == "000001fffeffffff"
    full = STATUS.replace("CapEff:\t000001fffeffffff", "CapEff:\t000001ffffffffff")
    assert probe_cap_sys_resource(full).ok


# --- mounts and cgroups ---------------------------------------------------------------------


def test_cgroup_hybrid_layout() -> None:
    layout = cgroup_layout(HYBRID)
    assert layout.mode == "hybrid"
    assert layout.v2 == "/sys/fs/cgroup/unified"
    assert set(layout.v1) == {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer",
                              "blkio", "pids", "name=systemd"}
    assert layout.v1["memory"] == "/sys/fs/cgroup/memory"
    assert "xattr" not in layout.v1 and "relatime" not in layout.v1


def test_cgroup_pure_v2_layout() -> None:
    layout = cgroup_layout(PURE_V2)
    assert layout.mode == "v2"
    assert layout.v2 == "/sys/fs/cgroup"
    assert dict(layout.v1) == {}


def test_cgroup_pure_v1_layout_with_comounted_controllers() -> None:
    layout = cgroup_layout(PURE_V1)
    assert layout.mode == "v1"
    assert layout.v2 is None
    assert layout.v1["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"
    assert layout.v1["net_prio"] == "/sys/fs/cgroup/net_cls,net_prio"


def test_cgroup_none_and_its_probe() -> None:
    assert cgroup_layout("proc /proc proc rw 0 0\n").mode == "none"
    r = probe_cgroups("proc /proc proc rw 0 0\n")
    assert not r.ok and r.fix


def test_cgroup_probe_detail_names_mode() -> None:
    r = probe_cgroups(PURE_V1)
    assert r.ok
    assert r.detail.startswith("v1: v1 cpu, cpuacct")
    assert r.data["mode"] == "v1"


def test_prefers_canonical_cgroup2_mount() -> None:
    text = ("cgroup2 /run/other cgroup2 rw 0 0\n"
            "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")
    assert cgroup_layout(text).v2 == "/sys/fs/cgroup"


def test_mount_points_are_unescaped() -> None:
    (m,) = parse_mounts("tmpfs /mnt/with\\040space tmpfs rw,relatime 0 0\n")
    assert m.target == "/mnt/with space"
    assert m.options == ("rw", "relatime")


def test_bpffs_probe() -> None:
    assert probe_bpffs(PURE_V2).ok
    r = probe_bpffs(HYBRID)
    assert not r.ok and not r.required
    assert r.fix == "mount -t bpf bpf /sys/fs/bpf"


# --- tool and kernel versions ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "version", "backend"), [
    ("iptables v1.8.9 (nf_tables)\n", "1.8.9", "nf_tables"),
    ("iptables v1.8.9 (legacy)\n", "1.8.9", "legacy"),
    ("iptables v1.6.1\n", "1.6.1", "legacy"),  # before 1.8 only the legacy backend existed
    ("iptables-legacy v1.8.7 (legacy)\n", "1.8.7", "legacy"),
])
def test_iptables_version(text: str, version: str, backend: str) -> None:
    parsed = parse_iptables_version(text)
    assert parsed is not None
    assert (parsed.version, parsed.backend) == (version, backend)


def test_unreadable_versions() -> None:
    assert parse_iptables_version("iptables: command not found") is None
    assert parse_nft_version("") is None


def test_nft_version() -> None:
    parsed = parse_nft_version("nftables v1.0.6 (Lester Gooch #5)\n")
    assert parsed is not None and parsed.version == "1.0.6" and parsed.backend is None


def test_kernel_release_and_headers_version() -> None:
    assert parse_kernel_release("6.18.44-fc-v669") == (6, 18, 44)
    assert parse_kernel_release("6.1.0-56-amd64") == (6, 1, 0)
    assert headers_version("/usr/src/linux-headers-6.1.0-56-amd64") == "6.1.0-56-amd64"
    assert headers_version("/usr/src/linux") is None


# --- CRIU features --------------------------------------------------------------------------


def test_mem_track_missing_is_optional_and_explained() -> None:
    r = probe_mem_track(CriuFeatures(mem_track=False, lazy_pages=True, pidfd_store=True),
                        soft_dirty=False, uffd_wp=False)
    assert not r.ok and not r.required
    assert r.status is Status.WARN
    assert "neither soft-dirty" in r.detail and "fall back to full ones" in r.detail
    assert r.data["method"] is None
    # orthros has no post-copy migration: the probe must not promise one.
    assert "post-copy" not in r.detail and "lazy" not in r.detail
    assert r.fix and "CONFIG_MEM_SOFT_DIRTY" in r.fix
    r = probe_mem_track("no usable CRIU", soft_dirty=True, uffd_wp=True)
    assert not r.ok and "no usable CRIU" in r.detail


@pytest.mark.parametrize(("soft_dirty", "uffd_wp", "method", "words"), [
    (True, False, "soft-dirty", "soft-dirty bits"),
    (True, True, "soft-dirty", "soft-dirty bits"),  # CRIU prefers soft-dirty where it exists
    (False, True, "uffd-wp", "userfaultfd write-protect through orthros's patched CRIU"),
])
def test_mem_track_names_the_method(soft_dirty: bool, uffd_wp: bool, method: str,
                                    words: str) -> None:
    r = probe_mem_track(CriuFeatures(True, True, True), soft_dirty=soft_dirty, uffd_wp=uffd_wp)
    assert r.ok and r.status is Status.OK
    assert r.data["method"] == method and words in r.detail
    assert Report((r,)).dirty_tracking == method
    assert Report((r,)).to_dict()["dirty_tracking"] == method


def test_mem_track_kernel_can_but_criu_does_not() -> None:
    # The kernel offers write-protect tracking, but this CRIU is not orthros's patched build.
    r = probe_mem_track(CriuFeatures(False, True, True), soft_dirty=False, uffd_wp=True)
    assert not r.ok and r.data["uffd_wp"] is True and r.data["criu"] is False
    assert "userfaultfd write-protect" in r.detail and "fall back to full ones" in r.detail
    assert r.fix and "make setup" in r.fix
    assert Report((r,)).dirty_tracking is None


def test_heavy_modules_are_imported_lazily() -> None:
    # `orthros --help` and `orthros check` must work on a host without BCC.
    code = ("import sys, orthros_py.cli, orthros_py.host.probe; "
            "print(' '.join(m for m in ('bcc', 'pyroute2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == ""
