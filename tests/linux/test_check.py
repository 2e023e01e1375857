"""``orthros check`` on this machine, run as a user would: the real CRIU, BCC and kernel.

What the report should say is worked out here from the host itself (/proc/mounts, CapEff, a
page's soft-dirty bit, where ``criu`` is), not from orthros's probe code, so that the same tests
hold on the hybrid-cgroup development VM and on a pure cgroup v2 host, and fail when orthros
misreports either.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import host_cgroups, run_orthros
from pyroute2 import IPRoute, netns

from orthros_py.host.probe import parse_kernel_release

VENV_BIN = Path(sys.executable).parent
# Where orthros looks for CRIU besides PATH (orthros_py.criu.binary); hiding CRIU means hiding
# every copy in these too.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_BIND = 0x1000
MS_PRIVATE = 1 << 18
CAP_SYS_RESOURCE = 24
PM_SOFT_DIRTY = 1 << 55  # /proc/PID/pagemap, Documentation/admin-guide/mm/pagemap.rst


# --- what the host offers, read without orthros -------------------------------------------------

def host_has_cap(cap: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    raise AssertionError("no CapEff line in /proc/self/status")


def host_has_soft_dirty() -> bool:
    """A page just written is soft-dirty exactly when the kernel tracks soft-dirty bits
    (CONFIG_MEM_SOFT_DIRTY); without it bit 55 of its pagemap entry stays clear."""
    with mmap.mmap(-1, mmap.PAGESIZE) as page:
        page[0:1] = b"x"
        cell = ctypes.c_char.from_buffer(page)
        addr = ctypes.addressof(cell)
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(addr // mmap.PAGESIZE * 8)
            entry = int.from_bytes(pagemap.read(8), "little")
        del cell  # the buffer export must end before the mapping can close
    assert entry >> 63 & 1, "the page just written is not present"
    return bool(entry & PM_SOFT_DIRTY)


def host_criu() -> list[str]:
    """Every CRIU orthros could find (PATH first, then the sbin directories), real paths.
    Set-up installs CRIU: a host without one fails here rather than skipping."""
    found = [shutil.which("criu")] + [shutil.which("criu", path=d) for d in SBIN_DIRS]
    paths = list(dict.fromkeys(os.path.realpath(p) for p in found if p))
    assert paths, "no criu on PATH or in " + ":".join(SBIN_DIRS) + ": run 'make setup-tests'"
    return paths


def _leftovers() -> tuple[list[str], list[str]]:
    """Namespaces and host interfaces a probe might have left behind."""
    spaces = [n for n in netns.listnetns() if n.startswith("orthros-")]
    with IPRoute() as ipr:
        links = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return spaces, [name for name in links if name.startswith("oprobe")]


def _check_json(*extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = run_orthros("check", "--json", *extra)
    return proc, json.loads(proc.stdout)


def test_check_reports_this_machine() -> None:
    before = _leftovers()
    proc, report = _check_json()
    assert proc.returncode == 0, proc.stderr
    probes = report["probes"]

    assert report["ok"] is True and report["missing_required"] == []
    assert probes["root"]["ok"] and probes["root"]["required"]
    criu = probes["criu"]
    assert criu["ok"] and criu["required"]
    assert parse_kernel_release(criu["data"]["version"]) >= (4, 2)
    assert probes["criu_check"]["ok"] and probes["criu_check"]["required"]

    # Dirty tracking: soft-dirty bits where the kernel keeps them; else userfaultfd write-protect
    # when CRIU itself (orthros's patched build) says it tracks memory; else none, which only
    # makes incremental checkpoints full ones, and is explained, not fatal.
    mem = probes["mem_track"]
    assert mem["required"] is False
    soft = host_has_soft_dirty()
    criu_tracks = subprocess.run([host_criu()[0], "check", "--feature", "mem_dirty_track"],
                                 capture_output=True, timeout=60).returncode == 0
    expected = ("soft-dirty" if soft else "uffd-wp") if criu_tracks else None
    assert mem["data"]["soft_dirty"] is soft
    assert mem["data"]["method"] == expected and report["dirty_tracking"] == expected
    assert mem["ok"] is (expected is not None)
    if expected == "uffd-wp":
        assert mem["data"]["uffd_wp"] is True and "userfaultfd write-protect" in mem["detail"]
    if expected is None:
        assert mem["status"] == "warn" and "fall back to full ones" in mem["detail"]
        assert "post-copy" not in mem["detail"]

    # userfaultfd: the sysctl exists exactly when the kernel has CONFIG_USERFAULTFD.
    lazy = probes["lazy_pages"]
    uffd = Path("/proc/sys/vm/unprivileged_userfaultfd").exists()
    assert lazy["data"]["syscall"] is uffd
    if uffd:
        criu_says = subprocess.run([host_criu()[0], "check", "--feature", "uffd-noncoop"],
                                   capture_output=True, timeout=60).returncode == 0
        assert lazy["ok"] is criu_says and lazy["data"]["criu"] is criu_says

    xdp = probes["bpf_xdp"]
    assert xdp["ok"] and xdp["data"]["compiled"] is True
    assert xdp["data"]["mode"] in ("xdp", "xdpgeneric")
    assert report["default_network_lock"] == "xdp"

    assert probes["netns"]["ok"]
    v1, v2 = host_cgroups()
    cg = probes["cgroups"]["data"]
    assert cg["mode"] == ("hybrid" if v1 and v2 else "v1" if v1 else "v2" if v2 else "none")
    assert cg["v2"] == (str(v2) if v2 else None)
    assert cg["v1"] == {k: str(p) for k, p in v1.items()}
    assert probes["iptables"]["ok"] and probes["iptables"]["data"]["backend"] in (
        "nf_tables", "legacy")
    assert probes["nft"]["ok"]
    assert probes["kernel"]["data"]["release"] == os.uname().release
    assert probes["kernel_headers"]["ok"]
    # The command runs with the capabilities of this test process.
    cap = probes["cap_sys_resource"]
    if host_has_cap(CAP_SYS_RESOURCE):
        assert cap["ok"] is True
    else:
        assert cap["ok"] is False and "RLIMIT_NOFILE" in cap["detail"]

    # The human table goes to stderr, stdout carries only the JSON.
    assert "orthros check" in proc.stderr and "default network lock: xdp" in proc.stderr
    assert f"dirty tracking: {expected or 'none'}" in proc.stderr
    # Every scratch namespace and veth was removed (an XDP program dies with its veth).
    assert _leftovers() == before == ([], [])


def test_quick_skips_compiling() -> None:
    proc, report = _check_json("--quick")
    assert proc.returncode == 0, proc.stderr
    xdp = report["probes"]["bpf_xdp"]
    assert report["quick"] is True
    assert xdp["ok"] and xdp["status"] == "warn" and xdp["data"]["compiled"] is False
    assert report["default_network_lock"] == "xdp"


def _hide(paths: list[str]) -> None:
    """In the child, before exec: a private mount namespace where each of ``paths`` is
    /dev/null, which no one can execute (so ``shutil.which`` passes it by)."""
    libc = ctypes.CDLL(None, use_errno=True)
    # Private first, so that the bind mounts never propagate to the host's namespace.
    rcs = [libc.unshare(CLONE_NEWNS), libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)]
    rcs += [libc.mount(b"/dev/null", p.encode(), None, MS_BIND, None) for p in paths]
    for rc in rcs:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def test_without_criu_exits_4_naming_it() -> None:
    criu = host_criu()
    # preexec_fn is unsafe only with threads, and this test process runs none.
    proc = subprocess.run(
        [str(VENV_BIN / "orthros"), "check", "--json", "--quick"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        preexec_fn=lambda: _hide(criu),
    )
    assert proc.returncode == 4, proc.stderr
    report = json.loads(proc.stdout)
    assert report["missing_required"] == ["criu", "criu_check"]
    message = " ".join(proc.stderr.split())
    assert "cannot dump or restore" in message
    assert "CRIU is not installed" in message and "make setup" in message
    # The host's namespace never saw the bind mounts.
    assert all(os.access(p, os.X_OK) for p in criu)


def test_old_criu_first_on_path_exits_4(tmp_path: Path) -> None:
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    fake.chmod(0o755)
    proc = subprocess.run(
        [str(VENV_BIN / "orthros"), "check", "--quick"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ.get('PATH', '/usr/bin:/bin')}"},
    )
    assert proc.returncode == 4, proc.stderr
    message = " ".join(proc.stderr.split())
    assert "CRIU 3.17.1" in message and "too old" in message


def test_sync_probe_finds_the_freezer_time_namespaces_and_udp_peek() -> None:
    from orthros_py.host.probe import probe_sync

    got = probe_sync()
    assert got.ok and not got.warning, got
    assert got.data["freezer"] == "cgroup v2 cgroup.freeze"
    assert got.data["time_namespaces"] and got.data["udp_peek_off"]
    # Without any freezer mounted, the probe says so with the fix.
    bare = probe_sync(mounts_text="proc /proc proc rw 0 0\n")
    assert not bare.ok and bare.fix is not None
