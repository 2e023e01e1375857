"""Host probes behind ``orthros check``: each asks one interface once and returns a ProbeResult.

Interfaces asked, and the privilege each needs to answer truthfully:

- ``geteuid`` and ``/proc/self/status`` (CapEff): none.
- CRIU: ``criu --version``, then ``criu swrk`` RPC requests CHECK and FEATURE_CHECK: root.
- userfaultfd: ``/proc/sys/vm/unprivileged_userfaultfd`` and the ``userfaultfd(2)`` syscall:
  root, or CAP_SYS_PTRACE, when that sysctl is 0.
- Memory dirty tracking: the soft-dirty bit of a page of our own in ``/proc/self/pagemap`` (none),
  and a write-protect userfaultfd on that page with ``PAGEMAP_SCAN`` (as for userfaultfd).
- BPF/XDP: BCC compiles a tiny XDP program, the kernel loads it (``bpf(2)``), and netlink attaches
  it to a veth inside a throwaway network namespace: root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).
  The same pass-through program then goes on each of the host's cluster interfaces (a NIC in the
  inventory's ``[cluster] subnet``) in native mode and comes off at once, to learn whether its
  driver runs XDP natively: root (CAP_NET_ADMIN).
- Network namespaces: pyroute2 creates and removes one under /run/netns: root.
- ``/proc/self/mounts`` (bpffs, cgroup v1 and v2), ``/lib/modules``, ``os.uname``: none.
- ``iptables --version`` and ``nft --version``: none.

Probes never change the host for good: every namespace, veth and BPF program they create is
removed before they return, also on failure. ``bcc`` and ``pyroute2`` are imported inside the probes
that use them, so that importing this module (and ``orthros --help``) stays fast and works on a
host without BCC.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import ipaddress
import os
import platform
import re
import resource
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthros_py.criu.binary import FIX as CRIU_FIX
from orthros_py.criu.binary import MIN_VERSION, CriuBinary, find_criu
from orthros_py.errors import MissingFeatureError, OrthrosError
from orthros_py.host.caps import CAP_SYS_RESOURCE, has_cap, parse_cap_eff
from orthros_py.run import run

# Items without which orthros cannot dump or restore anything: `orthros check` fails on them.
REQUIRED = ("root", "criu", "criu_check")

SETUP_FIX = "run 'make setup'"
# Where Debian keeps root's tools; a non-root PATH (or a service's) often lacks them.
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"

ProgressHook = Callable[[str], None]


class Status(enum.StrEnum):
    """How an item renders: present; present or optional but with a caveat; required and absent."""

    OK = "ok"
    WARN = "warn"
    MISSING = "missing"


@dataclass(frozen=True)
class ProbeResult:
    """One probed item. ``name`` is a stable key (for --json), ``title`` the label people read."""

    name: str
    title: str
    ok: bool
    required: bool
    detail: str
    fix: str | None = None
    # Present, but with a caveat worth reading (headers of another kernel, a check skipped).
    warning: bool = False
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> Status:
        if self.ok:
            return Status.WARN if self.warning else Status.OK
        # An optional item that is absent degrades a feature; only required ones block.
        return Status.MISSING if self.required else Status.WARN

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "status": self.status.value,
            "ok": self.ok,
            "required": self.required,
            "detail": self.detail,
            "fix": self.fix,
            "data": dict(self.data),
        }


@dataclass(frozen=True)
class Report:
    """Every probe's result, in the order they ran."""

    results: tuple[ProbeResult, ...]
    quick: bool = False

    def get(self, name: str) -> ProbeResult | None:
        return next((r for r in self.results if r.name == name), None)

    def __getitem__(self, name: str) -> ProbeResult:
        result = self.get(name)
        if result is None:
            raise KeyError(name)
        return result

    @property
    def missing_required(self) -> list[ProbeResult]:
        return [r for r in self.results if r.required and not r.ok]

    @property
    def ok(self) -> bool:
        return not self.missing_required

    @property
    def default_network_lock(self) -> str:
        """The lock orthros picks here: its own XDP lock when BPF/XDP works, else CRIU's iptables
        (the nftables method aborts above ~1,000 connections with bookworm's libnftables)."""
        xdp = self.get("bpf_xdp")
        return "xdp" if xdp is not None and xdp.ok else "iptables"

    @property
    def dirty_tracking(self) -> str | None:
        """How incremental checkpoints learn which pages changed (a TrackMethod value), None
        when they cannot and fall back to full ones."""
        mem = self.get("mem_track")
        method = mem.data.get("method") if mem is not None and mem.ok else None
        return str(method) if method else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "quick": self.quick,
            "default_network_lock": self.default_network_lock,
            "dirty_tracking": self.dirty_tracking,
            "missing_required": [r.name for r in self.missing_required],
            "probes": {r.name: r.to_dict() for r in self.results},
        }


def missing_error(report: Report) -> MissingFeatureError | None:
    """The error naming every missing required item and its fix, or None when all are present."""
    missing = report.missing_required
    if not missing:
        return None
    parts = []
    for r in missing:
        text = f"{r.title}: {r.detail}"
        if r.fix:
            text += f" (fix: {r.fix})"
        parts.append(text)
    noun = "item is" if len(missing) == 1 else "items are"
    return MissingFeatureError(
        f"this host cannot dump or restore: {len(missing)} required {noun} missing: "
        + "; ".join(parts)
    )


# --- pure parsers (unit-tested) -------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str
    options: tuple[str, ...]


def _unescape(field_text: str) -> str:
    # The kernel escapes space, tab, newline and backslash in mount fields as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def parse_mounts(text: str) -> list[Mount]:
    """Parse /proc/PID/mounts (fstab format)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mounts.append(Mount(_unescape(fields[0]), _unescape(fields[1]), fields[2],
                            tuple(fields[3].split(","))))
    return mounts


# Controllers a v1 hierarchy can carry (kernel/cgroup/*, include/linux/cgroup_subsys.h); mount
# options such as rw, relatime, xattr or clone_children are not controllers.
V1_CONTROLLERS = frozenset({
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "net_prio", "blkio",
    "perf_event", "hugetlb", "pids", "rdma", "misc", "debug",
})


class CgroupMode(enum.StrEnum):
    V1 = "v1"
    HYBRID = "hybrid"  # v1 controllers plus a cgroup2 hierarchy (usually without controllers)
    V2 = "v2"
    NONE = "none"


@dataclass(frozen=True)
class CgroupLayout:
    mode: CgroupMode
    v1: Mapping[str, str]  # controller (or "name=X" for a named hierarchy) -> mount point
    v2: str | None  # cgroup2 mount point

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "v1": dict(self.v1), "v2": self.v2}


def cgroup_layout(mounts_text: str) -> CgroupLayout:
    """Which cgroup hierarchies are mounted, from the text of /proc/PID/mounts."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for m in parse_mounts(mounts_text):
        if m.fstype == "cgroup":
            for opt in m.options:
                if opt in V1_CONTROLLERS or opt.startswith("name="):
                    v1.setdefault(opt, m.target)
        elif m.fstype == "cgroup2" and (v2 is None or m.target == "/sys/fs/cgroup"):
            # Prefer the canonical mount point when cgroup2 is mounted more than once.
            v2 = m.target
    if v1 and v2:
        mode = CgroupMode.HYBRID
    elif v1:
        mode = CgroupMode.V1
    elif v2:
        mode = CgroupMode.V2
    else:
        mode = CgroupMode.NONE
    return CgroupLayout(mode, v1, v2)


@dataclass(frozen=True)
class ToolVersion:
    version: str
    backend: str | None = None  # iptables only: "nf_tables" or "legacy"


def parse_iptables_version(text: str) -> ToolVersion | None:
    """``iptables v1.8.9 (nf_tables)``; before 1.8 there was no suffix and only the legacy
    backend."""
    m = re.search(r"\bv(\d+(?:\.\d+)+)(?:\s+\(([\w-]+)\))?", text)
    if m is None:
        return None
    return ToolVersion(m.group(1), m.group(2) or "legacy")


def parse_nft_version(text: str) -> ToolVersion | None:
    """``nftables v1.0.6 (Lester Gooch #5)``."""
    m = re.search(r"\bv(\d+(?:\.\d+)+)", text)
    return ToolVersion(m.group(1)) if m else None


def parse_kernel_release(release: str) -> tuple[int, ...]:
    """``6.18.44-fc-v669`` -> (6, 18, 44)."""
    m = re.match(r"(\d+(?:\.\d+)*)", release)
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def headers_version(target: str) -> str | None:
    """The kernel release a headers directory is for, from Debian's name for it
    (``/usr/src/linux-headers-6.1.0-56-amd64`` -> ``6.1.0-56-amd64``)."""
    m = re.match(r"linux-headers-(.+)$", Path(target).name)
    return m.group(1) if m else None


# --- probes ---------------------------------------------------------------------------------


def probe_root() -> ProbeResult:
    """CRIU needs root (CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE, ptrace of any process)."""
    euid = os.geteuid()
    if euid == 0:
        return ProbeResult("root", "root", True, True, "running as root", data={"euid": euid})
    return ProbeResult("root", "root", False, True, f"running as uid {euid}, not root",
                       fix="run orthros as root, e.g. through sudo", data={"euid": euid})


def probe_criu() -> tuple[ProbeResult, CriuBinary | None]:
    """Find CRIU (PATH, then the sbin directories) and read ``criu --version``."""
    need = ".".join(map(str, MIN_VERSION))
    try:
        binary = find_criu()
    except OrthrosError as err:
        return ProbeResult("criu", f"CRIU >= {need}", False, True, err.msg,
                           fix=err.hint or CRIU_FIX), None
    return ProbeResult(
        "criu", f"CRIU >= {need}", True, True, f"CRIU {binary.version_str} at {binary.path}",
        data={"path": binary.path, "version": binary.version_str},
    ), binary


def probe_criu_check(binary: CriuBinary | None) -> ProbeResult:
    """``criu check`` through the RPC (a CHECK request over ``criu swrk``)."""
    from orthros_py.criu.request import check_request
    from orthros_py.criu.session import CriuSession

    title = "criu check"
    if binary is None:
        return ProbeResult("criu_check", title, False, True, "not run: no usable CRIU")
    req = check_request()
    # A log in a scratch directory, so that a refusal comes back with CRIU's own reason.
    req.opts.log_file = "check.log"
    req.opts.log_level = 2
    try:
        with tempfile.TemporaryDirectory(prefix="orthros-check-") as tmp:
            CriuSession(binary, timeout=60).call(req, images_dir=Path(tmp))
    except OrthrosError as err:
        data = err.to_dict()
        return ProbeResult(
            "criu_check", title, False, True, err.msg,
            fix="run 'criu check --all' as root for every missing kernel feature; CRIU needs a "
                "kernel with CONFIG_CHECKPOINT_RESTORE",
            data={"errno": data.get("errno"), "log_tail": data.get("log_tail", [])},
        )
    return ProbeResult("criu_check", title, True, True, "CRIU says the kernel looks good")


@dataclass(frozen=True)
class CriuFeatures:
    mem_track: bool
    lazy_pages: bool
    pidfd_store: bool


def criu_features(binary: CriuBinary | None) -> CriuFeatures | str:
    """CRIU's FEATURE_CHECK answer, or the reason there is none."""
    from orthros_py.criu.request import feature_request
    from orthros_py.criu.session import CriuSession

    if binary is None:
        return "no usable CRIU"
    try:
        resp = CriuSession(binary, timeout=60).call(feature_request())
    except OrthrosError as err:
        return err.msg
    f = resp.features
    return CriuFeatures(bool(f.mem_track), bool(f.lazy_pages), bool(f.pidfd_store))


class TrackMethod(enum.StrEnum):
    """How CRIU learns which pages a tree wrote since its previous dump."""

    SOFT_DIRTY = "soft-dirty"
    UFFD_WP = "uffd-wp"  # a userfaultfd write-protecting the memory (orthros's CRIU patch 0002)


def probe_mem_track(features: CriuFeatures | str, *, soft_dirty: bool | None = None,
                    uffd_wp: bool | None = None) -> ProbeResult:
    """Memory dirty tracking, which incremental checkpoints rest on (a dump with a parent that
    writes only the pages written since): the kernel's soft-dirty bits, or a userfaultfd
    write-protecting the memory, which only orthros's patched CRIU uses. ``soft_dirty`` and
    ``uffd_wp`` say what the kernel offers (None: ask it)."""
    from orthros_py.criu.dirtytrack import soft_dirty_available, uffd_wp_async_available

    title = "memory dirty tracking"
    soft_dirty = soft_dirty_available() if soft_dirty is None else soft_dirty
    uffd_wp = uffd_wp_async_available() if uffd_wp is None else uffd_wp
    criu = features.mem_track if isinstance(features, CriuFeatures) else None
    method = None
    if criu:
        method = TrackMethod.SOFT_DIRTY if soft_dirty or not uffd_wp else TrackMethod.UFFD_WP
    data = {"method": method.value if method else None, "soft_dirty": soft_dirty,
            "uffd_wp": uffd_wp, "criu": criu}
    incremental = "incremental checkpoints write only the pages written since the last one"
    if method is TrackMethod.SOFT_DIRTY:
        return ProbeResult("mem_track", title, True, False,
                           f"soft-dirty bits: {incremental}, and CRIU can pre-dump iteratively",
                           data=data)
    if method is TrackMethod.UFFD_WP:
        return ProbeResult(
            "mem_track", title, True, False,
            f"userfaultfd write-protect through orthros's patched CRIU (no soft-dirty bits "
            f"here): {incremental}; memory it cannot track counts as dirty", data=data)
    full = "incremental checkpoints fall back to full ones (each dump writes all memory)"
    if isinstance(features, str):
        return ProbeResult("mem_track", title, False, False,
                           f"CRIU not asked ({features}): {full}", data=data)
    if soft_dirty or uffd_wp:
        what = "soft-dirty bits" if soft_dirty else "userfaultfd write-protect tracking"
        return ProbeResult(
            "mem_track", title, False, False,
            f"the kernel offers {what}, but this CRIU does not track memory with it (not "
            f"orthros's patched build?): {full}", fix=f"{SETUP_FIX} (builds CRIU with orthros's "
            "patches)", data=data)
    return ProbeResult(
        "mem_track", title, False, False,
        "the kernel has no memory dirty tracking (neither soft-dirty bits nor userfaultfd "
        f"write-protect): {full}",
        fix="a kernel with CONFIG_MEM_SOFT_DIRTY=y, or Linux 6.7+ with CONFIG_USERFAULTFD and "
            "CONFIG_PTE_MARKER_UFFD_WP",
        data=data,
    )


# userfaultfd(2) by machine; it has no libc wrapper in bookworm's glibc.
_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "riscv64": 282, "s390x": 355, "ppc64le": 364}


def _userfaultfd_syscall() -> tuple[bool, str]:
    """Open and close a userfaultfd; (works, why not)."""
    nr = _NR_USERFAULTFD.get(platform.machine())
    if nr is None:
        return False, f"userfaultfd syscall number unknown on {platform.machine()}"
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        return False, f"userfaultfd(2) failed: {errno.errorcode.get(err, err)} {os.strerror(err)}"
    os.close(fd)
    return True, ""


def probe_lazy_pages(features: CriuFeatures | str) -> ProbeResult:
    """Post-copy restore: userfaultfd in the kernel, and CRIU's own lazy-pages verdict."""
    title = "lazy pages (userfaultfd)"
    sysctl = Path("/proc/sys/vm/unprivileged_userfaultfd")
    try:
        unprivileged: str | None = sysctl.read_text().strip()
    except OSError:
        unprivileged = None  # the sysctl exists only with CONFIG_USERFAULTFD
    works, why = _userfaultfd_syscall()
    criu_says = features.lazy_pages if isinstance(features, CriuFeatures) else None
    data = {"syscall": works, "unprivileged_userfaultfd": unprivileged, "criu": criu_says}
    if not works:
        detail = why if unprivileged is not None else f"no CONFIG_USERFAULTFD ({why})"
        return ProbeResult("lazy_pages", title, False, False,
                           f"{detail}: no post-copy restore", fix="a kernel with "
                           "CONFIG_USERFAULTFD=y (and run as root)", data=data)
    if criu_says is False:
        return ProbeResult("lazy_pages", title, False, False,
                           "userfaultfd works but CRIU reports lazy pages unsupported",
                           fix="run 'criu check --feature uffd-noncoop' for CRIU's reason",
                           data=data)
    who = "root only" if unprivileged == "0" else "any user"
    detail = f"userfaultfd works (vm.unprivileged_userfaultfd={unprivileged}: {who})"
    if criu_says:
        detail += "; CRIU supports lazy pages"
    else:
        detail += f"; CRIU not asked ({features})"
    return ProbeResult("lazy_pages", title, True, False, detail, data=data)


def probe_kernel() -> ProbeResult:
    u = os.uname()
    version = parse_kernel_release(u.release)
    return ProbeResult("kernel", "kernel", True, False, f"Linux {u.release} ({u.machine})",
                       data={"release": u.release, "machine": u.machine,
                             "version": ".".join(map(str, version))})


def probe_kernel_headers() -> ProbeResult:
    """The headers BCC compiles against: /lib/modules/$(uname -r)/build (and source)."""
    release = os.uname().release
    build = Path("/lib/modules", release, "build")
    title = "kernel headers (BCC)"
    fix = f"{SETUP_FIX} (installs headers and links them at {build})"
    if not build.is_dir():
        return ProbeResult("kernel_headers", title, False, False,
                           f"{build} is missing: BCC cannot compile the XDP lock", fix=fix)
    target = os.path.realpath(build)
    data = {"path": str(build), "target": target, "symlink": build.is_symlink()}
    other = headers_version(target)
    if other is not None and other != release:
        data["headers_for"] = other
        return ProbeResult(
            "kernel_headers", title, True, False,
            f"{build} links to headers of {other}, not {release}: fine for UAPI-only programs "
            "such as the XDP lock, not for programs that read kernel structures",
            warning=True, data=data)
    return ProbeResult("kernel_headers", title, True, False, f"{build} -> {target}", data=data)


XDP_PROGRAM = "orthros_probe_xdp"
XDP_SOURCE = f"""
#include <uapi/linux/bpf.h>
int {XDP_PROGRAM}(struct xdp_md *ctx) {{ return XDP_PASS; }}
"""


def _scratch_netns_name(what: str) -> str:
    return f"orthros-{what}-{os.getpid()}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def scratch_netns(what: str) -> Iterator[str]:
    """A network namespace that exists only inside the ``with`` block (pyroute2; root)."""
    from pyroute2 import netns

    name = _scratch_netns_name(what)
    netns.create(name)
    try:
        yield name
    finally:
        # Unmounting the bind mount and unlinking the file frees the namespace and every
        # interface (and attached XDP program) in it.
        netns.remove(name)


def _attach_xdp_in_scratch_netns(prog_fd: int) -> str:
    """Attach the program to a fresh veth inside a throwaway namespace, read back the attach mode,
    detach. Never touches an interface of the host."""
    from pyroute2 import IPRoute

    with scratch_netns("xdp") as name, IPRoute(netns=name) as ipr:
        ipr.link("add", ifname="oprobe0", kind="veth", peer={"ifname": "oprobe1"})
        index = ipr.link_lookup(ifname="oprobe0")[0]
        ipr.link("set", index=index, state="up")
        ipr.link("set", index=index, xdp_fd=prog_fd)
        try:
            link = ipr.link("get", index=index)[0]
            xdp = link.get_attr("IFLA_XDP")
            mode = xdp.get_attr("IFLA_XDP_ATTACHED") if xdp is not None else None
        finally:
            ipr.link("set", index=index, xdp_fd=-1)
    if not mode:
        raise OSError(errno.ENOENT, "the kernel accepted the XDP program but shows none attached")
    return str(mode)


IFF_UP = 0x1
IFF_LOOPBACK = 0x8
SYS_NET = Path("/sys/class/net")
# XDP's netlink interface (linux/if_link.h), as orthros_py.netlock.xdp uses it: the layers keep
# host from importing netlock.
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4  # only if the program attached is IFLA_XDP_EXPECTED_FD's
# IFLA_XDP_ATTACHED's values, and the names pyroute2 decodes them to.
_XDP_ATTACHED = {1: "native", 2: "generic", 3: "offload", 4: "multi",
                 "xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload",
                 "xdpmulti": "multi"}


@dataclass(frozen=True)
class Nic:
    """An interface of the caller's network namespace, as the native XDP probe chooses them."""

    name: str
    index: int
    flags: int  # IFF_* of the link
    device: bool  # /sys/class/net/NAME/device exists: a NIC with a driver, not veth or bridge
    addresses: tuple[str, ...] = ()  # its IPv4 addresses


def cluster_nics(nics: Iterable[Nic], subnet: ipaddress.IPv4Network) -> list[Nic]:
    """The host's interfaces on the cluster network: up, not loopback, with a driver of their
    own (no veth, bridge or other virtual kind), holding an IPv4 address inside ``subnet``."""
    return [n for n in nics
            if n.flags & IFF_UP and not n.flags & IFF_LOOPBACK and n.device
            and any(ipaddress.ip_address(a) in subnet for a in n.addresses)]


def cluster_subnet(inventory: Path | str | None = None
                   ) -> tuple[ipaddress.IPv4Network | None, str]:
    """The inventory's ``[cluster] subnet`` (the file ``orthros lab`` and ``orthros hosts`` read
    by default), or None and why there is none."""
    from orthros_py.inventory import load_inventory

    try:
        return load_inventory(inventory).subnet, ""
    except OrthrosError as err:
        return None, err.msg


def xdp_attached_mode(value: object) -> str | None:
    """The mode an IFLA_XDP_ATTACHED value names ("native", "generic", "offload", or "multi" for
    programs in several modes at once); None when no program is attached."""
    if not value:
        return None
    return _XDP_ATTACHED.get(value, f"unknown ({value})")


def _set_xdp(ipr: Any, index: int, attrs: list[tuple[str, int]]) -> None:
    ipr.link("set", index=index, xdp={"attrs": attrs})


def _nic_driver(name: str) -> str | None:
    link = SYS_NET / name / "device" / "driver"
    return os.path.basename(os.path.realpath(link)) if link.exists() else None


def _host_nics(ipr: Any) -> list[Nic]:
    addrs: dict[int, list[str]] = {}
    for msg in ipr.get_addr(family=socket.AF_INET):
        ip = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if ip:
            addrs.setdefault(int(msg["index"]), []).append(str(ip))
    nics = []
    for link in ipr.get_links():
        name = str(link.get_attr("IFLA_IFNAME"))
        nics.append(Nic(name, int(link["index"]), int(link["flags"]),
                        (SYS_NET / name / "device").exists(),
                        tuple(addrs.get(int(link["index"]), ()))))
    return nics


def _native_xdp_on(ipr: Any, nic: Nic, prog_fd: int) -> dict[str, Any]:
    """Attach ``prog_fd`` (a pass-through program) to ``nic`` in native mode, read the mode back,
    detach at once. A program already there is left alone."""
    from pyroute2 import NetlinkError

    out: dict[str, Any] = {"driver": _nic_driver(nic.name)}
    xdp = ipr.link("get", index=nic.index)[0].get_attr("IFLA_XDP")
    present = xdp_attached_mode(xdp.get_attr("IFLA_XDP_ATTACHED") if xdp is not None else None)
    if present:
        # Not ours to take off (the network lock's, perhaps); its mode still tells something.
        pid = next((xdp.get_attr(a) for a in ("IFLA_XDP_PROG_ID", "IFLA_XDP_DRV_PROG_ID",
                                              "IFLA_XDP_SKB_PROG_ID", "IFLA_XDP_HW_PROG_ID")
                    if xdp.get_attr(a)), "?")
        native = present == "native" or bool(xdp.get_attr("IFLA_XDP_DRV_PROG_ID"))
        out.update(mode="native" if native else "not probed",
                   reason=f"XDP program {pid} is already attached ({present} mode)")
        return out
    try:
        flags = XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST
        _set_xdp(ipr, nic.index, [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", flags)])
    except NetlinkError as err:
        reason = str(err.args[1]) if len(err.args) > 1 and err.args[1] else os.strerror(err.code)
        if err.code in (errno.EPERM, errno.EACCES):
            out.update(mode="not probed", reason=reason)
        else:
            out.update(mode="generic only", reason=reason)
        return out
    try:
        xdp = ipr.link("get", index=nic.index)[0].get_attr("IFLA_XDP")
        got = xdp_attached_mode(xdp.get_attr("IFLA_XDP_ATTACHED") if xdp is not None else None)
    finally:
        # Only if it is still the probe's: whoever attached since keeps their program (EEXIST).
        try:
            _set_xdp(ipr, nic.index, [("IFLA_XDP_FD", -1), ("IFLA_XDP_EXPECTED_FD", prog_fd),
                                      ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE | XDP_FLAGS_REPLACE)])
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise
    if got == "native":
        out["mode"] = "native"
    else:
        out.update(mode="generic only", reason=f"the kernel took it but reports {got} mode")
    return out


def probe_native_xdp(prog_fd: int, inventory: Path | str | None = None
                     ) -> tuple[str, dict[str, Any], bool]:
    """Native mode on the host's cluster interfaces: (summary, {iface: result}, whether one
    refused it or could not be probed). Never raises: what goes wrong becomes the summary or
    that interface's reason."""
    from pyroute2 import IPRoute

    subnet, why = cluster_subnet(inventory)
    if subnet is None:
        return f"no cluster subnet ({why}): native mode not probed", {}, False
    results: dict[str, dict[str, Any]] = {}
    try:
        # ext_ack: the driver's own reason for refusing native mode, not just EOPNOTSUPP.
        with IPRoute(ext_ack=True) as ipr:
            for nic in cluster_nics(_host_nics(ipr), subnet):
                try:
                    results[nic.name] = _native_xdp_on(ipr, nic, prog_fd)
                except Exception as err:  # pyroute2 raises NetlinkError and OSError alike
                    results[nic.name] = {"driver": _nic_driver(nic.name), "mode": "unknown",
                                         "reason": f"probe failed: {err}"}
    except Exception as err:  # the netlink socket itself, or listing the interfaces
        return f"cannot list this host's interfaces ({err}): native mode not probed", {}, True
    if not results:
        return f"no interface in the cluster subnet {subnet}: native mode not probed", {}, False
    parts = []
    for name, r in results.items():
        where = f"{name} ({r['driver'] or 'no driver'})"
        if r["mode"] == "native":
            parts.append(f"native XDP on {where}")
        elif r["mode"] == "generic only":
            parts.append(f"generic XDP only on {where}: {r['reason']}")
        else:
            parts.append(f"native XDP {r['mode']} on {where}: {r['reason']}")
    # Another program in the way says nothing against the driver: no caveat for that.
    refused = any(r["mode"] in ("generic only", "unknown") for r in results.values())
    return "; ".join(parts), results, refused


def probe_bpf_xdp(*, quick: bool = False, inventory: Path | str | None = None) -> ProbeResult:
    """BCC compiles an XDP program, the kernel loads it, and it attaches to a scratch veth; then
    native mode is tried on the host's cluster interfaces (``probe_native_xdp``).

    With ``quick``, only what compiling needs is looked at (BCC importable, kernel headers
    present): compiling takes seconds on a busy host.
    """
    title = "BPF / XDP"
    fix_lock = "the network lock falls back to CRIU's iptables method"
    try:
        import bcc
    except ImportError as err:
        return ProbeResult("bpf_xdp", title, False, False,
                           f"BCC's Python module cannot be imported ({err}): {fix_lock}",
                           fix=f"{SETUP_FIX} (installs python3-bpfcc)")
    version = str(getattr(bcc, "__version__", "?"))
    build = Path("/lib/modules", os.uname().release, "build")
    if quick:
        if not build.is_dir():
            return ProbeResult("bpf_xdp", title, False, False,
                               f"no kernel headers at {build}: BCC cannot compile; {fix_lock}",
                               fix=SETUP_FIX, data={"bcc": version})
        return ProbeResult(
            "bpf_xdp", title, True, False,
            f"not compiled (--quick): BCC {version} and kernel headers are present",
            warning=True, data={"bcc": version, "compiled": False})
    started = time.monotonic()
    stage = "compile"
    try:
        # The module wraps libbcc (clang) and bpf(2); a failure at any stage is a bare Exception.
        with bcc.BPF(text=XDP_SOURCE) as prog:
            compiled = time.monotonic() - started
            stage = "load"
            fn = prog.load_func(XDP_PROGRAM, bcc.BPF.XDP)
            stage = "attach"
            mode = _attach_xdp_in_scratch_netns(fn.fd)
            native, nics, refused = probe_native_xdp(fn.fd, inventory)
    except Exception as err:  # bcc raises bare Exception, pyroute2 NetlinkError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fix = {"compile": f"{SETUP_FIX} (kernel headers for BCC)",
               "load": "run as root on a kernel with BPF_SYSCALL and XDP",
               "attach": "run as root on a kernel with VETH and XDP"}[stage]
        return ProbeResult("bpf_xdp", title, False, False,
                           f"{stage} of a test XDP program failed: {reason}; {fix_lock}",
                           fix=fix, data={"bcc": version, "stage": stage})
    total = time.monotonic() - started
    return ProbeResult(
        "bpf_xdp", title, True, False,
        f"BCC {version} compiled a test XDP program in {compiled:.1f} s; loaded and attached to "
        f"a veth in a scratch namespace ({mode} mode), then removed; {native}",
        # A cluster interface without native mode: the lock works there, in slower generic mode.
        warning=refused,
        data={"bcc": version, "compiled": True, "compile_s": round(compiled, 2),
              "total_s": round(total, 2), "mode": mode, "nics": nics})


def _mounts_text() -> str:
    return Path("/proc/self/mounts").read_text()


def probe_bpffs(mounts_text: str | None = None) -> ProbeResult:
    """The BPF filesystem, where a loaded XDP lock can be pinned to outlive its loader."""
    text = _mounts_text() if mounts_text is None else mounts_text
    points = [m.target for m in parse_mounts(text) if m.fstype == "bpf"]
    if points:
        return ProbeResult("bpffs", "BPF filesystem", True, False,
                           f"mounted at {', '.join(points)}: BPF programs can be pinned",
                           data={"mounts": points})
    return ProbeResult(
        "bpffs", "BPF filesystem", False, False,
        "not mounted: the XDP lock cannot be pinned and lives only while the process holding it "
        "(the agent) runs",
        fix="mount -t bpf bpf /sys/fs/bpf", data={"mounts": []})


def probe_netns() -> ProbeResult:
    """Create and remove a network namespace through pyroute2 (needs CAP_SYS_ADMIN)."""
    from pyroute2 import netns

    title = "network namespaces"
    try:
        with scratch_netns("probe") as name:
            listed = name in netns.listnetns()
    except OSError as err:
        return ProbeResult("netns", title, False, False,
                           f"cannot create a network namespace: {err}",
                           fix="run as root on a kernel with NET_NS")
    if not listed:
        return ProbeResult("netns", title, False, False,
                           "a created namespace did not appear under /run/netns",
                           fix="check that /run/netns is writable")
    return ProbeResult("netns", title, True, False,
                       "created and removed a scratch network namespace")


def probe_cgroups(mounts_text: str | None = None) -> ProbeResult:
    """Which cgroup hierarchies are mounted (CRIU saves and recreates a tree's cgroups)."""
    layout = cgroup_layout(_mounts_text() if mounts_text is None else mounts_text)
    title = "cgroups"
    data = layout.to_dict()
    v2_controllers: list[str] = []
    if layout.v2 is not None:
        with contextlib.suppress(OSError):
            v2_controllers = Path(layout.v2, "cgroup.controllers").read_text().split()
        data["v2_controllers"] = v2_controllers
    parts = []
    if layout.v1:
        parts.append("v1 " + ", ".join(sorted(layout.v1)))
    if layout.v2 is not None:
        ctl = ", ".join(v2_controllers) if v2_controllers else "no controllers"
        parts.append(f"cgroup2 at {layout.v2} ({ctl})")
    if layout.mode is CgroupMode.NONE:
        return ProbeResult("cgroups", title, False, False, "no cgroup hierarchy is mounted",
                           fix="mount -t cgroup2 none /sys/fs/cgroup", data=data)
    return ProbeResult("cgroups", title, True, False,
                       f"{layout.mode.value}: " + "; ".join(parts), data=data)


def probe_sync(mounts_text: str | None = None) -> ProbeResult:
    """What ``orthros sync`` needs beyond a dump: a cgroup freezer to stop a tree at an instant,
    time namespaces (a member's clock goes on from its save), and ``SO_PEEK_OFF`` on UDP
    (datagrams waiting in a member's sockets read in place; Linux 6.9+)."""
    import socket

    layout = cgroup_layout(_mounts_text() if mounts_text is None else mounts_text)
    title = "sync (freezer, time namespaces, UDP queues)"
    freezer = None
    if layout.v2 is not None and parse_kernel_release(os.uname().release) >= (5, 2):
        freezer = "cgroup v2 cgroup.freeze"
    elif "freezer" in layout.v1:
        freezer = "cgroup v1 freezer"
    timens = Path("/proc/self/ns/time").exists()
    peek = True
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sk:
        try:
            sk.setsockopt(socket.SOL_SOCKET, 42, 0)  # SO_PEEK_OFF
        except OSError:
            peek = False
    data = {"freezer": freezer, "time_namespaces": timens, "udp_peek_off": peek}
    if freezer is None:
        return ProbeResult("sync", title, False, False, "no cgroup freezer is mounted",
                           fix="mount cgroup2 (or the v1 freezer hierarchy)", data=data)
    missing = [what for what, ok in (("time namespaces", timens),
                                     ("SO_PEEK_OFF on UDP: datagrams waiting in members' "
                                      "sockets are not kept", peek)) if not ok]
    detail = f"{freezer}; time namespaces {'yes' if timens else 'no'}; UDP queues " + \
        ("read in place" if peek else "not kept")
    return ProbeResult("sync", title, True, False, detail, warning=bool(missing),
                       fix=("a kernel with TIME_NS and Linux 6.9+" if missing else None),
                       data=data)


def _which(tool: str) -> tuple[str | None, bool]:
    """(path, found on PATH). CRIU runs iptables through ``sh -c``, so PATH matters."""
    path = shutil.which(tool)
    if path is not None:
        return path, True
    return shutil.which(tool, path=SBIN_PATH), False


def probe_iptables() -> ProbeResult:
    """iptables, which CRIU's own network lock (``--network-lock iptables``) calls."""
    title = "iptables"
    path, on_path = _which("iptables")
    if path is None:
        return ProbeResult("iptables", title, False, False,
                           "not installed: CRIU's iptables network lock cannot work",
                           fix="apt-get install iptables")
    try:
        out = run([path, "--version"], timeout=10)
    except OrthrosError as err:
        return ProbeResult("iptables", title, False, False, err.msg,
                           fix="apt-get install --reinstall iptables", data={"path": path})
    ver = parse_iptables_version(out.stdout + out.stderr)
    if ver is None:
        return ProbeResult("iptables", title, False, False,
                           f"cannot read the version of {path}", data={"path": path})
    data = {"path": path, "version": ver.version, "backend": ver.backend, "on_path": on_path}
    detail = f"{ver.version} ({ver.backend} backend) at {path}"
    if not on_path:
        return ProbeResult("iptables", title, True, False,
                           f"{detail}, not on PATH: CRIU's lock runs it through sh and PATH",
                           fix=f"add {Path(path).parent} to PATH", warning=True, data=data)
    return ProbeResult("iptables", title, True, False, detail, data=data)


def probe_nft() -> ProbeResult:
    """nft, the command-line face of the nftables network lock backend."""
    title = "nft"
    path, _ = _which("nft")
    if path is None:
        return ProbeResult("nft", title, False, False, "not installed: no nftables lock",
                           fix="apt-get install nftables")
    try:
        out = run([path, "--version"], timeout=10)
    except OrthrosError as err:
        return ProbeResult("nft", title, False, False, err.msg, data={"path": path})
    ver = parse_nft_version(out.stdout + out.stderr)
    if ver is None:
        return ProbeResult("nft", title, False, False, f"cannot read the version of {path}",
                           data={"path": path})
    return ProbeResult("nft", title, True, False, f"{ver.version} at {path}",
                       data={"path": path, "version": ver.version})


def probe_cap_sys_resource(status_text: str | None = None) -> ProbeResult:
    """CAP_SYS_RESOURCE in our effective set (bit 24 of CapEff in /proc/self/status)."""
    title = "CAP_SYS_RESOURCE"
    text = Path("/proc/self/status").read_text() if status_text is None else status_text
    mask = parse_cap_eff(text)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    data = {"cap_eff": f"{mask:016x}", "nofile_soft": soft, "nofile_hard": hard}
    if has_cap(mask, CAP_SYS_RESOURCE):
        return ProbeResult("cap_sys_resource", title, True, False, "present", data=data)
    return ProbeResult(
        "cap_sys_resource", title, False, False,
        f"absent: RLIMIT_NOFILE stays at {soft}/{hard} and cannot be raised, and CRIU cannot "
        "read the rlimits of processes of another uid, so a service whose workers drop to "
        "another user (nginx's www-data) cannot be dumped",
        fix="grant the capability (a less confined container or VM), or run such services as "
            "root",
        data=data)


def run_probes(*, quick: bool = False, progress: ProgressHook | None = None) -> Report:
    """Run every probe once, in the order the report shows them.

    ``quick`` skips compiling a BPF program (seconds); ``progress`` is told which item is next.
    """

    def step(what: str) -> None:
        if progress is not None:
            progress(what)

    results: list[ProbeResult] = []
    step("privileges")
    results.append(probe_root())
    step("CRIU")
    criu, binary = probe_criu()
    results.append(criu)
    step("criu check")
    results.append(probe_criu_check(binary))
    step("CRIU features")
    features = criu_features(binary)
    results.append(probe_mem_track(features))
    results.append(probe_lazy_pages(features))
    step("kernel")
    results.append(probe_kernel())
    results.append(probe_kernel_headers())
    step("BPF / XDP" if quick else "BPF / XDP (compiling a test program)")
    results.append(probe_bpf_xdp(quick=quick))
    results.append(probe_bpffs())
    step("network namespaces")
    results.append(probe_netns())
    step("cgroups")
    results.append(probe_cgroups())
    results.append(probe_sync())
    step("firewall tools")
    results.append(probe_iptables())
    results.append(probe_nft())
    results.append(probe_cap_sys_resource())
    return Report(tuple(results), quick=quick)
