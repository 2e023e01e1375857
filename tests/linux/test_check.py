"""``orthros check`` on this machine, run as a user would: the real CRIU, BCC and kernel."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import run_orthros
from pyroute2 import IPRoute, netns

from orthros_py.host.probe import parse_kernel_release

VENV_BIN = Path(sys.executable).parent
# CRIU 4.2.1 is built from source and installed here (PLATFORM.md); find_criu() looks in this
# directory even when PATH lacks it, so hiding CRIU takes more than a PATH without it.
CRIU_DIR = "/usr/local/sbin"

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


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

    # No CONFIG_MEM_SOFT_DIRTY on this kernel: reported, explained, but not required.
    mem = probes["mem_track"]
    assert mem["ok"] is False and mem["required"] is False and mem["status"] == "warn"
    assert "pre-dump" in mem["detail"]

    lazy = probes["lazy_pages"]
    assert lazy["ok"] and lazy["data"]["syscall"] is True and lazy["data"]["criu"] is True

    xdp = probes["bpf_xdp"]
    assert xdp["ok"] and xdp["data"]["compiled"] is True
    assert xdp["data"]["mode"] in ("xdp", "xdpgeneric")
    assert report["default_network_lock"] == "xdp"

    assert probes["netns"]["ok"]
    assert probes["cgroups"]["data"]["mode"] == "hybrid"
    assert probes["cgroups"]["data"]["v2"] == "/sys/fs/cgroup/unified"
    assert "memory" in probes["cgroups"]["data"]["v1"]
    assert probes["iptables"]["ok"] and probes["iptables"]["data"]["backend"] in (
        "nf_tables", "legacy")
    assert probes["nft"]["ok"]
    assert probes["kernel"]["data"]["release"] == os.uname().release
    assert probes["kernel_headers"]["ok"]
    # Root here lacks CAP_SYS_RESOURCE (PLATFORM.md).
    assert probes["cap_sys_resource"]["ok"] is False
    assert "RLIMIT_NOFILE" in probes["cap_sys_resource"]["detail"]

    # The human table goes to stderr, stdout carries only the JSON.
    assert "orthros check" in proc.stderr and "default network lock: xdp" in proc.stderr
    # Every scratch namespace and veth was removed (an XDP program dies with its veth).
    assert _leftovers() == before == ([], [])


def test_quick_skips_compiling() -> None:
    proc, report = _check_json("--quick")
    assert proc.returncode == 0, proc.stderr
    xdp = report["probes"]["bpf_xdp"]
    assert report["quick"] is True
    assert xdp["ok"] and xdp["status"] == "warn" and xdp["data"]["compiled"] is False
    assert report["default_network_lock"] == "xdp"


def _hide_criu_dir() -> None:
    """In the child, before exec: a private mount namespace where CRIU's directory is empty."""
    libc = ctypes.CDLL(None, use_errno=True)
    for rc in (libc.unshare(CLONE_NEWNS),
               # Private first, so that the tmpfs never propagates to the host's namespace.
               libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None),
               libc.mount(b"tmpfs", CRIU_DIR.encode(), b"tmpfs", 0, None)):
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def test_without_criu_exits_4_naming_it() -> None:
    assert shutil.which("criu") == f"{CRIU_DIR}/criu"
    path = f"{VENV_BIN}:/usr/bin:/bin"
    assert shutil.which("criu", path=path) is None
    # preexec_fn is unsafe only with threads, and this test process runs none.
    proc = subprocess.run(
        [str(VENV_BIN / "orthros"), "check", "--json", "--quick"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**os.environ, "PATH": path}, preexec_fn=_hide_criu_dir,
    )
    assert proc.returncode == 4, proc.stderr
    report = json.loads(proc.stdout)
    assert report["missing_required"] == ["criu", "criu_check"]
    message = " ".join(proc.stderr.split())
    assert "cannot dump or restore" in message
    assert "CRIU is not installed" in message and "make setup" in message
    assert Path(CRIU_DIR, "criu").exists()  # the host's namespace never saw the tmpfs


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
