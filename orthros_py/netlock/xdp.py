"""The XDP network lock: bpf/netlock.c loaded once through BCC, pinned, and driven by map writes.

Interfaces: the bpf(2) syscall through ``orthros_py.netlock.bpf`` (maps, pins, object info);
BCC (``bcc.BPF``, imported lazily) only to compile and load the program
the first time; rtnetlink through pyroute2 to attach the XDP program (native/driver mode where
the driver offers it, such as virtio_net; generic/SKB mode on veth and loopback, and wherever
the driver refuses native mode) and the clsact egress classifier; setns(2) to reach interfaces
in other network namespaces. Needs root: CAP_BPF and CAP_SYS_ADMIN (load, pin, map writes),
CAP_NET_ADMIN (attach), CAP_SYS_ADMIN (setns, mounting bpffs if it is not mounted).

Lifetime: the programs and maps are pinned under ``/sys/fs/bpf/orthros/`` and attached through
netlink, so a lock outlives the process that took it (a crash cannot leave connections half
open; ``orthros netlock flush`` clears what is left). A later process opens the pinned map and
writes entries: locking N connections costs 2N map writes in one batch syscall, no compile.
Which interfaces carry the programs is recorded in ``/run/orthros/netlock-xdp.json`` (guarded by
an flock on that directory) so that ``status`` and ``flush`` can find them in every network
namespace.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from pyroute2 import NetlinkError

from orthros_py.errors import MissingFeatureError, NetlockError, OrthrosError
from orthros_py.net.addr import iproute, netns_path
from orthros_py.netlock.base import (
    Attachment,
    Conn,
    FlushResult,
    LockedConn,
    LockStatus,
    NetLock,
)
from orthros_py.netlock.bpf import (
    BPFFS,
    BpfMap,
    bpf_error,
    ensure_bpffs,
    obj_get,
    obj_pin,
    possible_cpus,
    prog_info,
    prog_name_by_id,
    require_caps,
)

SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "netlock.c"
PIN_DIR = BPFFS / "orthros"
STATE_DIR = Path("/run/orthros")

XDP_PROG = "xdp_netlock"  # function names in netlock.c, also the kernel's program names
TC_PROG = "tc_netlock"
CONNS_MAP = "conns"
COUNTERS_MAP = "counters"
CAUGHT_MAP = "caught"
PINS = {"xdp": XDP_PROG, "tc": TC_PROG, "conns": CONNS_MAP, "counters": COUNTERS_MAP,
        "caught": CAUGHT_MAP}

# The clsact egress filter: a low priority number so that it runs before other classifiers that
# could redirect a packet past it; a handle of our own so that it is never confused with theirs.
TC_FILTER_NAME = "orthros_netlock"
TC_PRIO = 7
TC_HANDLE = 0x4F52
TC_EGRESS = 0xFFFFFFF3  # "ffff:fff3": clsact's egress hook
TC_INGRESS = 0xFFFFFFF2

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4  # only if the program attached is IFLA_XDP_EXPECTED_FD's
IFF_LOOPBACK = 0x8

# XDP attach modes, as Attachment.mode and `orthros check` name them.
NATIVE = "native"  # in the driver, before an skb exists
GENERIC = "generic"  # in the stack (SKB mode): any interface, slower
OFFLOAD = "offload"  # on the NIC itself; orthros never attaches so, but may find it
MODE_FLAGS = {NATIVE: XDP_FLAGS_DRV_MODE, GENERIC: XDP_FLAGS_SKB_MODE, OFFLOAD: XDP_FLAGS_HW_MODE}
_MODE_PROG_ATTR = {NATIVE: "IFLA_XDP_DRV_PROG_ID", GENERIC: "IFLA_XDP_SKB_PROG_ID",
                   OFFLOAD: "IFLA_XDP_HW_PROG_ID"}
# IFLA_XDP_ATTACHED: XDP_ATTACHED_* of linux/if_link.h, and the names pyroute2 decodes them to.
_ATTACHED = {1: NATIVE, 2: GENERIC, 3: OFFLOAD, 4: "multi",
             "xdp": NATIVE, "xdpgeneric": GENERIC, "xdpoffload": OFFLOAD, "xdpmulti": "multi"}
# Link kinds that keep generic mode although they offer native: the lab's hosts sit behind veths,
# and generic mode is what its migrations were proven with.
GENERIC_KINDS = frozenset({"veth"})

# --- map layout: mirrors struct netlock_key / netlock_val in bpf/netlock.c --------------------
# Key: packet source address, destination address (16 bytes each, network order, IPv4 mapped
# into ::ffff:0:0/96), source port, destination port (network order), family, 3 zero bytes.
KEY = struct.Struct("!16s16sHHB3x")
# Value: drop count (written by the programs), flags, padding; native byte order.
VAL = struct.Struct("=QII")
F_LOCAL_FIRST = 1  # this entry is the local->remote orientation of its connection
_VAL_LOCAL_FIRST = VAL.pack(0, F_LOCAL_FIRST, 0)
_VAL_REMOTE_FIRST = VAL.pack(0, 0, 0)
COUNTER_NAMES = ("xdp_passed", "xdp_dropped", "tc_passed", "tc_dropped", "xdp_caught")
# A caught segment (struct netlock_caught): bytes used, TCP seq, flags, padding, then the IP
# packet (CAUGHT_MAX bytes of room).
CAUGHT_HEAD = struct.Struct("=IIII")


_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def _addr16(ip: str, family: int) -> bytes:
    # inet_pton rather than ipaddress: this runs 4 times per connection on the locking path.
    if family == socket.AF_INET:
        return _V4_MAPPED + socket.inet_pton(socket.AF_INET, ip)
    return socket.inet_pton(socket.AF_INET6, ip)


def pack_key(src: tuple[str, int], dst: tuple[str, int], family: int) -> bytes:
    """The map key of a packet from ``src`` to ``dst``."""
    return KEY.pack(_addr16(src[0], family), _addr16(dst[0], family), src[1], dst[1], family)


def unpack_key(raw: bytes) -> tuple[int, tuple[str, int], tuple[str, int]]:
    """(family, (src ip, port), (dst ip, port)) of a map key."""
    saddr, daddr, sport, dport, family = KEY.unpack(raw)

    def ip(b: bytes) -> str:
        if family == socket.AF_INET:
            return str(ipaddress.IPv4Address(b[12:]))
        return ipaddress.IPv6Address(b).compressed

    return family, (ip(saddr), sport), (ip(daddr), dport)


def conn_entries(conn: Conn) -> list[tuple[bytes, bytes]]:
    """The two (key, value) map entries that lock ``conn``: what leaves (tc egress sees
    local->remote) and what arrives (XDP sees remote->local)."""
    fam = conn.family
    local, remote = _addr16(conn.local_ip, fam), _addr16(conn.remote_ip, fam)
    return [(KEY.pack(local, remote, conn.local_port, conn.remote_port, fam), _VAL_LOCAL_FIRST),
            (KEY.pack(remote, local, conn.remote_port, conn.local_port, fam), _VAL_REMOTE_FIRST)]


# --- XDP attach modes -------------------------------------------------------------------------

def xdp_attached_mode(value: object) -> str | None:
    """The mode an IFLA_XDP_ATTACHED value names ("native", "generic", "offload", or "multi" for
    programs in several modes at once); None when no program is attached."""
    if not value:
        return None
    return _ATTACHED.get(value, f"unknown ({value})")


def xdp_programs(xdp: Any) -> dict[str, int]:
    """{mode: program id} of the XDP programs an interface carries, from its IFLA_XDP attribute
    (a pyroute2 nla, or None)."""
    if xdp is None:
        return {}
    mode = xdp_attached_mode(xdp.get_attr("IFLA_XDP_ATTACHED"))
    if mode is None:
        return {}
    if mode in MODE_FLAGS:
        pid = xdp.get_attr("IFLA_XDP_PROG_ID") or xdp.get_attr(_MODE_PROG_ATTR[mode])
        return {mode: int(pid)} if pid else {}
    # Several modes at once: only the per-mode attributes tell the programs apart.
    return {m: int(xdp.get_attr(a)) for m, a in _MODE_PROG_ATTR.items() if xdp.get_attr(a)}


def native_first(ifname: str, flags: int, kind: str | None) -> bool:
    """Whether the lock tries native mode first on an interface: everywhere but on loopback (no
    driver mode) and veth (generic mode proven in the lab)."""
    return not (flags & IFF_LOOPBACK or ifname == "lo" or kind in GENERIC_KINDS)


def link_native_first(link: Any) -> bool:
    """``native_first`` for a pyroute2 link message."""
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return native_first(str(link.get_attr("IFLA_IFNAME")), int(link["flags"]), kind)


def set_xdp(ipr: Any, index: int, prog_fd: int, flags: int) -> None:
    """Attach (``prog_fd`` -1: detach) the XDP program of interface ``index``."""
    ipr.link("set", index=index, xdp={"attrs": [("IFLA_XDP_FD", prog_fd),
                                                ("IFLA_XDP_FLAGS", flags)]})


def attach_xdp(ipr: Any, index: int, prog_fd: int, *, native: bool) -> None:
    """Attach ``prog_fd`` to interface ``index``, which has no XDP program: in native mode first
    when ``native``, in generic mode when not or when the driver refuses native mode."""
    if native:
        try:
            set_xdp(ipr, index, prog_fd, XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST)
            return
        except NetlinkError as err:
            # EOPNOTSUPP (no driver mode), EINVAL (MTU, buffer layout) and the like: generic
            # mode still works. No permission is no permission in either mode.
            if err.code in (errno.EPERM, errno.EACCES):
                raise
    set_xdp(ipr, index, prog_fd, XDP_FLAGS_SKB_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST)


# --- the pinned objects -----------------------------------------------------------------------

@dataclass
class _Objects:
    """Open fds of the pinned objects."""

    xdp_fd: int
    tc_fd: int
    conns: BpfMap
    counters: BpfMap
    caught: BpfMap
    xdp_id: int
    tc_id: int
    pin_ino: int  # inode of the map's pin: a new pin (after a flush) means reopen

    def close(self) -> None:
        for fd in (self.xdp_fd, self.tc_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.conns.close()
        self.counters.close()
        self.caught.close()


@dataclass
class _Compiled:
    """What BCC loaded in this process: kept so that pins removed by a flush elsewhere can be
    made again without compiling (the agent and the test session hold one)."""

    bpf: Any  # bcc.BPF
    fds: dict[str, int]  # PINS key -> fd owned by the bcc object

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.bpf.cleanup()


def _netns_id(path: str | None) -> tuple[int, int]:
    st = os.stat(path or "/proc/thread-self/ns/net")
    return (st.st_dev, st.st_ino)


def _candidate_netns() -> Iterator[str]:
    yield "/proc/1/ns/net"
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir("/run/netns")):
            yield f"/run/netns/{name}"
    # Last resort: a namespace kept alive only by its processes.
    with contextlib.suppress(OSError):
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                yield f"/proc/{pid}/ns/net"


def _find_netns(att: Attachment) -> tuple[bool, str | None]:
    """(found, path to enter; None = here) for a recorded attachment's namespace."""
    want = att.netns_id
    with contextlib.suppress(OSError):
        if att.netns is None and (want is None or _netns_id(None) == want):
            return True, None
        if att.netns is not None and (want is None or _netns_id(att.netns) == want):
            return True, att.netns
    if want is None:
        return False, None
    if _netns_id(None) == want:
        return True, None
    for path in _candidate_netns():
        with contextlib.suppress(OSError):
            if _netns_id(path) == want:
                return True, path
    return False, None


@contextlib.contextmanager
def _iproute(path: str | None) -> Iterator[Any]:
    """An rtnetlink socket in the namespace at ``path``; setns errors become NetlockError."""
    try:
        with iproute(path) as ipr:
            yield ipr
    except OrthrosError as err:
        if isinstance(err, NetlockError):
            raise
        raise NetlockError(err.msg, hint=err.hint) from err


class XdpNetLock(NetLock):
    """The XDP + tc egress lock. Cheap to construct: nothing is compiled or opened until used.

    Typical use around a checkpoint (see ``orthros_py.netlock`` for the whole recipe)::

        lock = XdpNetLock()
        lock.prepare()                         # compile once (~10 s) or open the pins (~ms)
        lock.attach(["eth0", "lo"], netns="/proc/PID/ns/net")
        lock.lock(conns)                       # 2 map writes per connection
        ...                                    # dump, move, restore
        lock.unlock(conns)                     # from this or any later process
    """

    backend = "xdp"

    def __init__(self, *, pin_dir: Path = PIN_DIR, state_dir: Path = STATE_DIR,
                 source: Path = SOURCE) -> None:
        super().__init__()
        self.pin_dir = pin_dir
        self.state_dir = state_dir
        self.state_file = state_dir / "netlock-xdp.json"
        self.source = source
        self._objs: _Objects | None = None
        self._compiled: _Compiled | None = None
        self.compile_seconds: float | None = None  # set when this object compiled the program
        self._compiles = 0

    # -- loading ---------------------------------------------------------------------------

    def _pin(self, what: str) -> Path:
        return self.pin_dir / PINS[what]

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialize loading, attaching and flushing between orthros processes.

        The flock is on the state directory itself, so no lock file is left behind.
        """
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise bpf_error(err, f"open {self.state_dir}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _open_pins(self) -> _Objects | None:
        """Open the pinned objects, or None if they are not (all) pinned."""
        try:
            ino = os.stat(self._pin("conns")).st_ino
        except FileNotFoundError:
            return None
        except OSError as err:
            raise bpf_error(err, f"read {self.pin_dir}") from err
        fds: list[int] = []
        try:
            for what in ("xdp", "tc", "conns", "counters", "caught"):
                try:
                    fds.append(obj_get(self._pin(what)))
                except FileNotFoundError:
                    # Pinned by an orthros without "caught": the next load pins anew.
                    for fd in fds:
                        os.close(fd)
                    return None
            conns, counters, caught = BpfMap(fds[2]), BpfMap(fds[3]), BpfMap(fds[4])
            objs = _Objects(fds[0], fds[1], conns, counters, caught, prog_info(fds[0])[0],
                            prog_info(fds[1])[0], ino)
        except OSError as err:
            for fd in fds:
                os.close(fd)
            raise bpf_error(err, f"open the pinned network lock in {self.pin_dir}") from err
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        if (conns.key_size, conns.value_size) != (KEY.size, VAL.size):
            objs.close()
            raise NetlockError(
                f"the map pinned at {self._pin('conns')} has {conns.key_size}-byte keys and "
                f"{conns.value_size}-byte values, not {KEY.size} and {VAL.size}: it was made by "
                "another orthros version", hint="run 'orthros netlock flush' first")
        return objs

    def _objects(self, *, create: bool) -> _Objects | None:
        """The open pinned objects; with ``create``, compile and pin them if they are missing."""
        if self._objs is not None:
            try:
                if os.stat(self._pin("conns")).st_ino == self._objs.pin_ino:
                    return self._objs
            except FileNotFoundError:
                pass
            # Flushed (and maybe loaded again) by another process since we opened them.
            self._objs.close()
            self._objs = None
        objs = self._open_pins()
        if objs is None and create:
            require_caps()
            with self._exclusive():
                objs = self._open_pins()  # another process may have won the race
                if objs is None:
                    self._load_and_pin()
                    objs = self._open_pins()
            if objs is None:
                raise NetlockError(f"the network lock was pinned in {self.pin_dir} but is gone")
        self._objs = objs
        return objs

    def _compile(self) -> _Compiled:
        try:
            import bcc
        except ImportError as err:
            raise MissingFeatureError(
                "BCC's Python module cannot be imported, so the XDP network lock cannot be "
                "compiled", hint="run scripts/setup.sh (installs python3-bpfcc)") from err
        if not self.source.is_file():
            raise MissingFeatureError(f"the BPF source {self.source} is missing")
        started = time.monotonic()
        stage = "compile"
        b: Any = None
        try:
            b = bcc.BPF(src_file=os.fsencode(self.source))
            stage = "load"
            xdp = b.load_func(XDP_PROG.encode(), bcc.BPF.XDP)
            tc = b.load_func(TC_PROG.encode(), bcc.BPF.SCHED_CLS)
            fds = {"xdp": int(xdp.fd), "tc": int(tc.fd),
                   "conns": int(b[CONNS_MAP.encode()].map_fd),
                   "counters": int(b[COUNTERS_MAP.encode()].map_fd),
                   "caught": int(b[CAUGHT_MAP.encode()].map_fd)}
        except Exception as err:  # BCC raises bare Exception for every failure
            if b is not None:
                with contextlib.suppress(Exception):
                    b.cleanup()  # close what was loaded: nothing half made stays around
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "kernel headers" in text.lower():
                raise MissingFeatureError(
                    "BCC cannot find kernel headers to compile the XDP network lock",
                    hint="run scripts/setup.sh (links /lib/modules/$(uname -r)/build)") from err
            if stage == "load" and ("permitted" in text or "denied" in text):
                raise NetlockError("no permission to load BPF programs",
                                   hint="run as root (CAP_BPF, CAP_SYS_ADMIN)") from err
            raise NetlockError(f"BCC could not {stage} {self.source.name}: {text}") from err
        self.compile_seconds = time.monotonic() - started
        self._compiles += 1
        return _Compiled(b, fds)

    def _load_and_pin(self) -> None:
        """Compile (unless this process still holds a compiled copy) and pin; caller holds
        ``_exclusive``. On failure no pin is left half made."""
        ensure_bpffs()
        if self._compiled is None:
            self._compiled = self._compile()
        made: list[Path] = []
        try:
            self.pin_dir.mkdir(mode=0o700, exist_ok=True)
            # The map last: _open_pins() treats its pin as "all pinned".
            for what in ("xdp", "tc", "counters", "caught", "conns"):
                path = self._pin(what)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # a stale pin from an interrupted load
                obj_pin(self._compiled.fds[what], path)
                made.append(path)
        except OSError as err:
            for path in made:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise bpf_error(err, f"pin the network lock under {self.pin_dir}") from err

    def prepare(self) -> dict[str, Any]:
        """Have the programs loaded and pinned: compile now if nobody has. Call it before the
        time-critical part (a dump), never inside it."""
        before = self._compiles
        objs = self._objects(create=True)
        assert objs is not None
        compiled = self._compiles > before
        return {"compiled": compiled, "compile_seconds": self.compile_seconds if compiled else None,
                "xdp_prog_id": objs.xdp_id, "tc_prog_id": objs.tc_id, "map_id": objs.conns.id,
                "pin_dir": str(self.pin_dir)}

    def close(self) -> None:
        """Close the pinned objects' fds (a compiled copy stays: see ``unload``)."""
        if self._objs is not None:
            self._objs.close()
            self._objs = None

    def unload(self) -> None:
        """Close everything this process holds, the compiled copy included."""
        self.close()
        if self._compiled is not None:
            self._compiled.close()
            self._compiled = None

    # -- state file -------------------------------------------------------------------------

    def _read_state(self) -> list[Attachment]:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as err:
            raise NetlockError(f"cannot read {self.state_file}: {err}",
                               hint="remove it and run 'orthros netlock flush'") from err
        return [Attachment.from_dict(a) for a in data.get("attachments", [])]

    def _write_state(self, atts: Sequence[Attachment]) -> None:
        if not atts:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": 1, "pin_dir": str(self.pin_dir),
                                   "attachments": [a.to_dict() for a in atts]}, indent=2))
        tmp.replace(self.state_file)  # atomic: a crash leaves the old or the new record

    @staticmethod
    def _same(a: Attachment, b: Attachment) -> bool:
        return a.iface == b.iface and a.netns_id == b.netns_id

    # -- attaching ---------------------------------------------------------------------------

    def attach(self, ifaces: Sequence[str], netns: str | None = None, *,
               native: bool | None = None) -> list[Attachment]:
        """Put the XDP program and the egress filter on each of ``ifaces`` in ``netns`` (a name
        under /run/netns or a path such as /proc/PID/ns/net; None: this process's namespace).

        The XDP program goes on in native mode where the driver takes it, else in generic mode;
        ``native`` None tries native mode on every interface but loopback and veth, True on all
        of them, False on none. A program already there keeps its mode.

        Idempotent. All or nothing: on failure, what this call attached is removed again.
        """
        XdpNetLock.attaches += 1  # voids a detach deferred from before (TreeLock.tidy_later)
        ifaces = list(dict.fromkeys(ifaces))
        if not ifaces:
            return []
        path = str(netns_path(netns)) if netns is not None else None
        try:
            nsid = _netns_id(path)
        except OSError as err:
            raise NetlockError(f"no network namespace {netns} ({path}: {err.strerror})") from err
        require_caps(attach=True)
        # Check the interfaces before loading anything, so that a typo attaches nothing.
        indexes = self._lookup(ifaces, path, netns)
        objs = self._objects(create=True)
        assert objs is not None
        done: list[Attachment] = []
        with self._exclusive():
            state = self._read_state()
            try:
                with _iproute(path) as ipr:
                    for iface in ifaces:
                        att = Attachment(iface, path, nsid, indexes[iface])
                        prior = [a for a in state if self._same(a, att)]
                        if prior and prior[0].ifindex == att.ifindex:
                            # Attached before: whether orthros made the clsact qdisc is only
                            # known from that first time.
                            att = replace(att, clsact_created=prior[0].clsact_created)
                        # Record the intent first: a crash while attaching leaves a record
                        # that flush can act on.
                        state = [a for a in state if not self._same(a, att)]
                        self._write_state([*state, att])
                        att = self._attach_one(ipr, att, objs, native=native)
                        state.append(att)
                        self._write_state(state)
                        done.append(att)
            except BaseException:
                with contextlib.suppress(Exception), _iproute(path) as ipr:
                    for att in done:
                        with contextlib.suppress(Exception):
                            self._detach_one(ipr, att)
                state = [a for a in state if not any(self._same(a, d) for d in done)]
                with contextlib.suppress(Exception):
                    self._write_state(state)
                raise
        return done

    def _lookup(self, ifaces: Sequence[str], path: str | None, netns: str | None
                ) -> dict[str, int]:
        with _iproute(path) as ipr:
            found = {name: ipr.link_lookup(ifname=name) for name in ifaces}
        missing = [name for name, idx in found.items() if not idx]
        if missing:
            where = f"network namespace {netns}" if netns else "this network namespace"
            raise NetlockError(f"no interface named {', '.join(missing)} in {where}")
        return {name: int(idx[0]) for name, idx in found.items()}

    def _attach_one(self, ipr: Any, att: Attachment, objs: _Objects, *,
                    native: bool | None = None) -> Attachment:
        """Attach both programs to one interface; on failure undo what this call did."""
        idx = att.ifindex
        try:
            link = ipr.link("get", index=idx)[0]
            current = xdp_programs(link.get_attr("IFLA_XDP"))
            if objs.xdp_id not in current.values():
                for pid in current.values():
                    name = prog_name_by_id(pid)
                    if name != XDP_PROG:
                        raise NetlockError(
                            f"interface {att.where} already has an XDP program (id {pid}"
                            f"{', ' + name if name else ''}) that is not orthros's")
                if current:
                    # An older orthros load (pins flushed and made again): replace it in its
                    # mode, at once, so that no packet passes between the two.
                    set_xdp(ipr, idx, objs.xdp_fd, MODE_FLAGS[next(iter(current))])
                else:
                    attach_xdp(ipr, idx, objs.xdp_fd,
                               native=link_native_first(link) if native is None else native)
            mode = self._xdp_mode(ipr, idx, objs.xdp_id)
            if mode is None:
                raise NetlockError(f"the kernel took the XDP program for {att.where} but does "
                                   "not show it attached")
            att = replace(att, xdp=True, mode=mode)
            try:
                ipr.tc("add", "clsact", index=idx)
                att = replace(att, clsact_created=True)
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise
            for f in self._filters(ipr, idx, TC_EGRESS):
                if (f["info"] >> 16, f["handle"]) == (TC_PRIO, TC_HANDLE) and \
                        f.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") != TC_FILTER_NAME:
                    raise NetlockError(f"interface {att.where} has a foreign tc filter at "
                                       f"priority {TC_PRIO}, handle {TC_HANDLE:#x}")
            # "replace" creates the filter or swaps in the current program for an old one.
            ipr.tc("replace-filter", "bpf", index=idx, handle=TC_HANDLE, prio=TC_PRIO,
                   fd=objs.tc_fd, name=TC_FILTER_NAME, parent=TC_EGRESS, classid=1,
                   direct_action=True)
            return replace(att, tc=True)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self._detach_one(ipr, att)
            if isinstance(exc, NetlinkError):
                if exc.code in (errno.EPERM, errno.EACCES):
                    raise NetlockError(f"no permission to attach programs to {att.where}",
                                       hint="run as root (CAP_NET_ADMIN)") from exc
                reason = os.strerror(exc.code) if exc.code else str(exc)
                raise NetlockError(f"cannot attach the network lock to {att.where}: "
                                   f"{reason}") from exc
            raise

    @staticmethod
    def _xdp_progs(ipr: Any, idx: int) -> dict[str, int]:
        """{mode: program id} of the XDP programs on interface ``idx``."""
        return xdp_programs(ipr.link("get", index=idx)[0].get_attr("IFLA_XDP"))

    @classmethod
    def _xdp_mode(cls, ipr: Any, idx: int, prog_id: int) -> str | None:
        """The mode program ``prog_id`` is attached in on interface ``idx``, as the kernel says."""
        return next((m for m, p in cls._xdp_progs(ipr, idx).items() if p == prog_id), None)

    @staticmethod
    def _filters(ipr: Any, idx: int, parent: int) -> list[Any]:
        # The chain's head message carries no options; keep only real filters.
        return [f for f in ipr.get_filters(index=idx, parent=parent)
                if f.get_attr("TCA_OPTIONS") is not None]

    def _detach_one(self, ipr: Any, att: Attachment) -> list[str]:
        """Remove orthros's programs from one interface; returns problems met."""
        problems: list[str] = []
        found = ipr.link_lookup(ifname=att.iface)
        if not found:
            return problems  # the interface is gone, and its programs with it
        idx = int(found[0])
        for mode, pid in self._xdp_progs(ipr, idx).items():
            if prog_name_by_id(pid) != XDP_PROG:
                problems.append(f"left XDP program {pid} on {att.where}: it is not orthros's")
                continue
            # The flag of the mode it is attached in: a detach in another mode is a no-op the
            # kernel does not even refuse.
            set_xdp(ipr, idx, -1, MODE_FLAGS[mode])
            if self._xdp_mode(ipr, idx, pid) is not None:
                problems.append(f"XDP program {pid} is still on {att.where} after detaching it "
                                f"({mode} mode)")
        try:
            for f in self._filters(ipr, idx, TC_EGRESS):
                if f.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") == TC_FILTER_NAME:
                    ipr.tc("del-filter", "bpf", index=idx, parent=TC_EGRESS,
                           prio=f["info"] >> 16, handle=f["handle"])
            if att.clsact_created and not self._filters(ipr, idx, TC_EGRESS) and \
                    not self._filters(ipr, idx, TC_INGRESS):
                ipr.tc("del", "clsact", index=idx)
        except NetlinkError as err:
            if err.code not in (errno.EINVAL, errno.ENOENT):  # no clsact: nothing of ours there
                raise
        return problems

    def detach(self, ifaces: Sequence[str] | None = None, netns: str | None = None
               ) -> FlushResult:
        """Take the programs off ``ifaces`` in ``netns`` (None: every recorded interface of that
        namespace). Locked connections stay in the map."""
        path = str(netns_path(netns)) if netns is not None else None
        try:
            nsid = _netns_id(path)
        except OSError as err:
            raise NetlockError(f"no network namespace {netns} ({path}: {err.strerror})") from err
        with self._exclusive():
            state = self._read_state()
            chosen = [a for a in state if a.netns_id == nsid and
                      (ifaces is None or a.iface in ifaces)]
            result = FlushResult(self.backend)
            self._detach_many(chosen, result)
            gone = {(a.iface, a.netns_id) for a in result.detached}
            self._write_state([a for a in state if (a.iface, a.netns_id) not in gone])
        return result

    def _detach_many(self, atts: Sequence[Attachment], result: FlushResult) -> None:
        for att in atts:
            found, path = _find_netns(att)
            if not found:
                # A namespace that no longer exists took its interfaces and programs with it.
                result.detached.append(att)
                continue
            try:
                with _iproute(path) as ipr:
                    result.problems += self._detach_one(ipr, att)
                result.detached.append(att)
            except Exception as err:
                result.problems.append(f"cannot detach from {att.where}: {err}")

    # -- locking ---------------------------------------------------------------------------

    def _add(self, conns: Sequence[Conn], *, inbound_only: bool = False) -> None:
        objs = self._objects(create=True)
        assert objs is not None
        items = ([conn_entries(c)[1] for c in conns] if inbound_only
                 else [e for c in conns for e in conn_entries(c)])
        if not inbound_only:
            self._inbound_only.difference_update(conns)  # both of their entries now
        try:
            # What an earlier lock caught is not cleared here: on one kernel (the lab's hosts)
            # the destination locks the very connections whose segments the source caught.
            # Every unlock clears them, and a stale one would be an old duplicate TCP ignores.
            objs.conns.update(items)
        except OSError as err:
            if err.errno == errno.E2BIG:
                raise NetlockError(f"the lock map is full ({objs.conns.max_entries} entries, "
                                   f"{objs.conns.max_entries // 2} connections)") from err
            raise bpf_error(err, f"lock {len(conns)} connections") from err

    # Connections this process locked inbound only (``lock_inbound``), across instances: their
    # outbound twin is not in the map.
    _inbound_only: ClassVar[set[Conn]] = set()
    # attach() calls in this process, for a deferred detach to see whether one came since.
    attaches: ClassVar[int] = 0

    @classmethod
    def _delete_present(cls, objs: _Objects, conns: Sequence[Conn]) -> None:
        """Delete the map entries of ``conns``. A connection locked inbound only has one, and
        a batch delete stops at every missing key (thousands of syscalls for thousands of
        connections): those this process locked so are deleted by their one key."""
        known = [c for c in conns if c in cls._inbound_only]
        other = [c for c in conns if c not in cls._inbound_only]
        objs.conns.delete([conn_entries(c)[1][0] for c in known])
        cls._inbound_only.difference_update(known)
        if other:
            # Both entries, as ``lock`` writes them: one batch (a missing twin costs a
            # syscall more each, for inbound-only locks another process made).
            objs.conns.delete([k for c in other for k, _ in conn_entries(c)])

    def _remove(self, conns: Sequence[Conn]) -> None:
        objs = self._objects(create=False)
        if objs is None:
            return  # nothing pinned: nothing is locked
        try:
            self._delete_present(objs, conns)
            self._caught_of(objs, conns, take=False)  # nothing of a lock stays in the kernel
        except OSError as err:
            raise bpf_error(err, f"unlock {len(conns)} connections") from err

    @staticmethod
    def _caught_of(objs: _Objects, conns: Sequence[Conn], *, take: bool
                   ) -> dict[Conn, bytes]:
        """Remove what the lock caught for ``conns`` ({connection: IP packet}, with ``take``).
        Walks the caught map (only what is caught: few entries), not the connections."""
        inbound = {conn_entries(c)[1][0]: c for c in conns}
        out: dict[Conn, bytes] = {}
        if take:
            keys = []
            for k, raw in objs.caught.items():
                if k in inbound:
                    keys.append(k)
                    used = CAUGHT_HEAD.unpack_from(raw)[0]
                    out[inbound[k]] = raw[CAUGHT_HEAD.size:CAUGHT_HEAD.size + used]
        else:
            keys = [k for k in objs.caught.list_keys() if k in inbound]
        objs.caught.delete(keys)
        return out

    def lock_inbound(self, conns: Iterable[Conn], *, fresh: bool = False) -> list[Conn]:
        """Lock only what arrives for ``conns`` (XDP), not what leaves. For a tree not yet
        frozen: what it still sends (answers to requests that arrived before the lock) reaches
        its peers, instead of waiting in the restored socket for a retransmission timeout of
        a second (a restored socket has no RTT estimate). Their acknowledgements are caught
        and given back. ``lock`` later adds the other direction. ``fresh``: forget what an
        earlier lock of the same 4-tuples caught and nobody took (a crash, a lab torn down):
        the catch keeps the earliest segment, and a stale one would be kept instead of the
        segment missing now. Not for a second host's lock of connections whose segments the
        first caught (the lab's hosts share one kernel and map)."""
        todo = list(dict.fromkeys(conns))
        if todo:
            if fresh:
                objs = self._objects(create=True)
                assert objs is not None
                try:
                    self._caught_of(objs, todo, take=False)
                except OSError as err:
                    raise bpf_error(err, "clear the caught segments") from err
            self._add(todo, inbound_only=True)
            self._held.update(todo)
            self._inbound_only.update(todo)
        return todo

    def take_caught(self, conns: Iterable[Conn]) -> dict[Conn, bytes]:
        """The segment the lock kept for each of ``conns`` that had one (see bpf/netlock.c,
        "Caught segments"), removed from the kernel: {connection: IP packet}."""
        objs = self._objects(create=False)
        if objs is None:
            return {}
        try:
            return self._caught_of(objs, list(conns), take=True)
        except OSError as err:
            raise bpf_error(err, "read the caught segments") from err

    def unlock_taking(self, conns: Iterable[Conn]) -> dict[Conn, bytes]:
        """Unlock ``conns`` and return what the lock caught of them (``take_caught``)."""
        todo = list(dict.fromkeys(conns))
        if not todo:
            return {}
        objs = self._objects(create=False)
        if objs is None:
            return {}
        try:
            self._delete_present(objs, todo)
            caught = self._caught_of(objs, todo, take=True)
        except OSError as err:
            raise bpf_error(err, f"unlock {len(todo)} connections") from err
        self._held.difference_update(todo)
        return caught

    def unlock_all(self) -> int:
        """Unlock every connection, whoever locked it; returns how many there were."""
        objs = self._objects(create=False)
        if objs is None:
            return 0
        try:
            keys = objs.conns.list_keys()
            objs.conns.delete(keys)
            objs.caught.delete(objs.caught.list_keys())
        except OSError as err:
            raise bpf_error(err, "clear the lock map") from err
        self._held.clear()
        return len(keys) // 2

    def locks_on(self, ips: Iterable[str]) -> bool:
        """Whether any connection with an end on one of ``ips`` is locked. Compares raw keys:
        a tree's tidy asks this with thousands of entries in the map."""
        objs = self._objects(create=False)
        if objs is None:
            return False
        wanted = set()
        for ip in ips:
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            wanted.add(_addr16(ip, fam))
        try:
            keys = objs.conns.list_keys()
        except OSError as err:
            raise bpf_error(err, "read the lock map") from err
        return any(k[:16] in wanted or k[16:32] in wanted for k in keys)

    def locked(self) -> list[LockedConn]:
        """Every locked connection (local end first) with its packets dropped so far."""
        objs = self._objects(create=False)
        if objs is None:
            return []
        entries: dict[bytes, tuple[int, int]] = {}
        try:
            for key in objs.conns.list_keys():
                raw = objs.conns.lookup(key)
                if raw is not None:
                    packets, flags, _ = VAL.unpack(raw)
                    entries[key] = (packets, flags)
        except OSError as err:
            raise bpf_error(err, "read the lock map") from err
        out: list[LockedConn] = []
        for key, (packets, flags) in entries.items():
            family, src, dst = unpack_key(key)
            if not flags & F_LOCAL_FIRST:
                if pack_key(dst, src, family) not in entries:  # locked inbound only
                    out.append(LockedConn(Conn(family, dst[0], dst[1], src[0], src[1]),
                                          packets))
                continue
            back = entries.get(pack_key(dst, src, family), (0, 0))[0]
            out.append(LockedConn(Conn(family, src[0], src[1], dst[0], dst[1]), packets + back))
        return sorted(out, key=lambda lc: lc.conn)

    def counters(self) -> dict[str, int]:
        """Packets looked up by the programs since they were loaded, summed over CPUs."""
        objs = self._objects(create=False)
        if objs is None:
            return dict.fromkeys(COUNTER_NAMES, 0)
        ncpu = possible_cpus()
        slot = (objs.counters.value_size + 7) // 8 * 8
        out: dict[str, int] = {}
        for i, name in enumerate(COUNTER_NAMES):
            raw = objs.counters.lookup(struct.pack("=I", i), value_size=slot * ncpu) or b""
            out[name] = sum(struct.unpack_from("=Q", raw, c * slot)[0]
                            for c in range(len(raw) // slot))
        return out

    def release_subnets(self, subnets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
                        ) -> list[Conn]:
        """Unlock every connection with an end in one of ``subnets``, whoever locked it; returns
        them. Map writes only, no flock: a caller may hold the state directory's lock."""
        nets = list(subnets)
        ours = [lc.conn for lc in self.locked()
                if any(ipaddress.ip_address(ip) in net for net in nets
                       for ip in (lc.conn.local_ip, lc.conn.remote_ip))]
        unlocked = self.unlock(ours)
        objs = self._objects(create=False)
        if objs is not None:
            # And what was caught for them and never taken (a run that died half way).
            stale = []
            for key in objs.caught.list_keys():
                _, src, dst = unpack_key(key)
                if any(ipaddress.ip_address(ip) in net for net in nets for ip in (src[0], dst[0])):
                    stale.append(key)
            objs.caught.delete(stale)
        return unlocked

    # -- status and flush -------------------------------------------------------------------

    @property
    def pinned(self) -> bool:
        """Whether the programs and map are pinned on this host (by anyone, at any time)."""
        return self.pin_dir.exists()

    def flush_if_unused(self) -> FlushResult | None:
        """``flush`` if nobody holds a lock or an attachment in the pins, else None (kept)."""
        st = self.status()
        if st.conns or st.attachments:
            return None
        return self.flush()

    def status(self) -> LockStatus:
        objs = self._objects(create=False)
        st = LockStatus(self.backend, loaded=objs is not None)
        st.attachments = self._read_state()
        st.details = {"pin_dir": str(self.pin_dir), "state_file": str(self.state_file)}
        if objs is not None:
            st.conns = self.locked()
            st.counters = self.counters()
            st.details.update(xdp_prog_id=objs.xdp_id, tc_prog_id=objs.tc_id,
                              map_id=objs.conns.id, map_max_entries=objs.conns.max_entries)
        for att in st.attachments:
            found, _ = _find_netns(att)
            if not found:
                st.problems.append(f"network namespace of {att.where} is gone")
            elif not (att.xdp and att.tc):
                st.problems.append(f"attaching to {att.where} did not finish")
        if st.attachments and objs is None:
            st.problems.append(f"programs are attached but nothing is pinned in {self.pin_dir}: "
                               "run 'orthros netlock flush'")
        return st

    def flush(self) -> FlushResult:
        """Detach from every recorded interface, unlock everything, remove pins and state."""
        result = FlushResult(self.backend)
        with self._exclusive():
            state = self._read_state()
            self._detach_many(state, result)
            kept = [a for a in state if a not in result.detached]
            # Clear the map before unpinning: a process that still holds it (an agent) must not
            # keep dropping packets for connections nobody can list any more.
            result.unlocked = self.unlock_all()
            self.close()
            if not kept:
                for what in ("conns", "xdp", "tc", "counters", "caught"):
                    path = self._pin(what)
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        result.removed.append(str(path))
                with contextlib.suppress(OSError):
                    self.pin_dir.rmdir()
                    result.removed.append(str(self.pin_dir))
                if self.state_file.exists():
                    result.removed.append(str(self.state_file))
            else:
                result.problems.append(f"kept the pins in {self.pin_dir}: programs are still "
                                       "attached where orthros could not detach them")
            self._write_state(kept)
            if not kept:
                with contextlib.suppress(OSError):
                    self.state_dir.rmdir()  # only if empty: other parts of orthros use it too
        return result


def source_text(path: Path = SOURCE) -> str:
    """The BPF C source that ``XdpNetLock`` compiles (for ``--print-source``)."""
    return path.read_text()
