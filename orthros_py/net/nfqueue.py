"""Output commit for a protected tree: the packets it sends are held in an NFQUEUE queue until
the checkpoint that produced them is committed on the standby, then released in one batch.

Why NFQUEUE: Remus holds a VM's output with a plug qdisc (``sch_plug``). The kernels orthros
runs on need not have it (the development VM has neither ``sch_plug`` nor ``netem``, nor the
nftables ``queue`` expression), but they have the iptables ``NFQUEUE`` target and
``nfnetlink_queue``. So one iptables rule in the OUTPUT chain of the service's network
namespace (``-s IP [-p tcp --sport PORT] -j NFQUEUE --queue-num N``, found again by its comment)
hands every packet sent from the service address to queue N, and this module holds and
releases them over nfnetlink_queue. Without a port, every packet from the address is held
(any protocol), as Remus holds all of a VM's output.

Semantics:

- A packet is released only in a batch. ``mark()``, taken while the tree is frozen for a
  checkpoint, returns the id of the last packet queued so far: everything the tree sent before
  the freeze is at or below it. ``release(mark)`` accepts every held packet up to the mark with
  one NFQNL_MSG_VERDICT_BATCH, once the standby has committed that checkpoint; packets queued
  after the mark wait for the next release.
- Ids are the kernel's per-queue serial numbers (32 bits, compared as the kernel compares
  them), so the order of release is the kernel's queue order: the order the packets reached
  the hook.
- Holding adds up to one checkpoint interval (plus the commit itself) to the latency of every
  reply. A connection cannot have more held than its congestion window: TCP waits for the
  client's acknowledgements, which come only after a release.
- Held longer than TCP's retransmission timeout (200 ms at least), both ends time out: the
  server's ACKs are held too, so the client resends its request and falls back to a window of
  one segment (it sends nothing new until the release), and the server's duplicate ACKs join
  the queue. Nothing is lost and the connection recovers at the release, but checkpoint
  intervals well below 200 ms keep TCP out of loss recovery.
- A held packet of another protocol (no port given) still counts against its sender's send
  buffer: a UDP sender blocks once that buffer is full of held datagrams.
- Data the tree wrote before the freeze but the kernel transmits later (window-limited) is
  queued after the mark. It is in the checkpoint (the socket's write queue) and leaves with
  the next release: late, never early.
- ``drop_all()`` is for a failover: what the active sent after its last commit must never
  leave. TCP sends it again as after any loss (from the standby's restored sockets, or from
  these ones once the rule is gone).
- Nothing held leaves without a verdict. A full queue does not fail open (the kernel drops the
  packet and TCP resends it later), and the rule has no ``--queue-bypass``: if the holder dies,
  its queue goes with its socket and the rule drops the address's output until ``flush``
  removes it, after which TCP's retransmissions deliver. A held packet whose output device
  goes down is dropped by the kernel.
- GSO packets are queued whole (NFQA_CFG_F_GSO): no segmentation cost, and TCP, seeing its
  segment still in the host's queue, does not resend it while it is held. So a "packet" in the
  counts is one queued skb, which may be several segments on the wire.

Interfaces: nfnetlink_queue (NFQNL_MSG_CONFIG, NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT_BATCH) over
a raw NETLINK_NETFILTER socket, made inside the namespace (a netlink socket stays in the
namespace it was made in); the iptables/ip6tables commands through ``orthros_py.run``, inside
the namespace with ``nsenter --net``. Needs root: CAP_NET_ADMIN (queue, rules,
SO_RCVBUFFORCE) and CAP_SYS_ADMIN (setns).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import shutil
import socket
import struct
import threading
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from orthros_py.errors import (
    CommandError,
    MissingFeatureError,
    NotRootError,
    OrthrosError,
    OutputHoldError,
)
from orthros_py.net.addr import call_in_netns, netns_path
from orthros_py.run import run

COMMENT = "orthros-hold"  # rules are tagged "orthros-hold-qN"

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFNETLINK_V0 = 0
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN = 1 << 0
NFQA_CFG_F_GSO = 1 << 2
NF_DROP = 0
NF_ACCEPT = 1
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLA_TYPE_MASK = 0x3FFF
SO_RCVBUFFORCE = 33
CAP_NET_ADMIN = 12

_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, portid (host order)
_NFGEN = struct.Struct("!BBH")  # nfgenmsg: family, version, res_id (the queue, big-endian)
_NLA = struct.Struct("=HH")  # nlattr: len, type
_U32 = struct.Struct("!I")
_ERR = struct.Struct("=i")
_HDR_LEN = _NLMSG.size + _NFGEN.size
_PACKET = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
_TOOLS = {4: ("iptables", "iptables-save", "iptables-restore"),
          6: ("ip6tables", "ip6tables-save", "ip6tables-restore")}

Verdict = Literal["accept", "drop"]


# --- the wire format (pure: no socket, no root) ------------------------------------------------

def _nla(kind: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def nfq_message(msg_type: int, queue: int, seq: int, attrs: bytes = b"",
                flags: int = NLM_F_REQUEST | NLM_F_ACK) -> bytes:
    """One nfnetlink_queue request for ``queue``: nlmsghdr, nfgenmsg, attributes."""
    body = _NFGEN.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags,
                       seq, 0) + body


def command_message(queue: int, seq: int, command: int) -> bytes:
    """NFQNL_CFG_CMD_BIND or _UNBIND of ``queue``."""
    return nfq_message(NFQNL_MSG_CONFIG, queue, seq,
                       _nla(NFQA_CFG_CMD, struct.pack("!BxH", command, 0)))


def config_message(queue: int, seq: int, *, copy_range: int, maxlen: int) -> bytes:
    """Copy the first ``copy_range`` bytes (the length comes with them), hold up to
    ``maxlen`` packets, never fail open, queue GSO packets whole."""
    attrs = (_nla(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, NFQNL_COPY_PACKET))
             + _nla(NFQA_CFG_QUEUE_MAXLEN, _U32.pack(maxlen))
             + _nla(NFQA_CFG_MASK, _U32.pack(NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO))
             + _nla(NFQA_CFG_FLAGS, _U32.pack(NFQA_CFG_F_GSO)))
    return nfq_message(NFQNL_MSG_CONFIG, queue, seq, attrs)


def verdict_batch_message(queue: int, seq: int, verdict: int, upto: int) -> bytes:
    """``verdict`` for every packet of ``queue`` whose id is at or below ``upto``."""
    return nfq_message(NFQNL_MSG_VERDICT_BATCH, queue, seq,
                       _nla(NFQA_VERDICT_HDR, struct.pack("!II", verdict, upto)))


def parse_packet(buf: bytes | bytearray | memoryview, start: int, end: int
                 ) -> tuple[int | None, int]:
    """(packet id, length) from the attributes of one NFQNL_MSG_PACKET in ``buf[start:end]``.
    The length is NFQA_CAP_LEN when the copy was cut short, else the copied payload's."""
    packet_id: int | None = None
    length = 0
    off = start
    while off + _NLA.size <= end:
        size, kind = _NLA.unpack_from(buf, off)
        if size < _NLA.size:
            break
        kind &= NLA_TYPE_MASK
        if kind == NFQA_PACKET_HDR:
            packet_id = _U32.unpack_from(buf, off + _NLA.size)[0]
        elif kind == NFQA_PAYLOAD:
            length = max(length, size - _NLA.size)
        elif kind == NFQA_CAP_LEN:
            length = max(length, _U32.unpack_from(buf, off + _NLA.size)[0])
        off += (size + 3) & ~3
    return packet_id, length


def id_after(a: int, b: int) -> bool:
    """The kernel's nfq_id_after: id ``a`` came after id ``b`` in a queue's 32-bit sequence."""
    return 0 < ((a - b) & 0xFFFFFFFF) < 0x80000000


def comment(queue: int) -> str:
    return f"{COMMENT}-q{queue}"


def rule_spec(address: str, port: int | None, queue: int) -> list[str]:
    """The rule (iptables words after ``-I``/``-D``) that feeds ``queue`` what is sent from
    ``address`` (and TCP port ``port``)."""
    ip = ipaddress.ip_address(address)
    spec = ["OUTPUT", "-s", f"{ip}/{ip.max_prefixlen}"]
    if port is not None:
        spec += ["-p", "tcp", "-m", "tcp", "--sport", str(port)]
    return [*spec, "-m", "comment", "--comment", comment(queue),
            "-j", "NFQUEUE", "--queue-num", str(queue)]


def _rule_comment(line: str) -> str | None:
    words = line.split()
    if len(words) < 2 or words[0] != "-A" or "--comment" not in words:
        return None
    i = words.index("--comment")
    return words[i + 1].strip('"') if i + 1 < len(words) else None


# --- iptables inside a namespace ---------------------------------------------------------------

def _argv(netns: str | None, *argv: str) -> list[str]:
    return [*(["nsenter", f"--net={netns_path(netns)}"] if netns else []), *argv]


def _iptables(netns: str | None, *argv: str, input: str | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise MissingFeatureError(f"{argv[0]} is not installed", host=netns,
                                  hint="apt-get install iptables")
    try:
        return run(_argv(netns, *argv), input=input, timeout=60).stdout
    except CommandError as err:
        if err.returncode is None and "not installed" in err.msg:  # nsenter
            raise MissingFeatureError(err.msg, host=netns, hint="apt-get install util-linux"
                                      ) from err
        raise


def _ours(netns: str | None, family: int, wanted: str | None) -> list[str]:
    """The ``-A`` lines of our rules in the filter table (all of them, or those tagged
    ``wanted``)."""
    out = _iptables(netns, _TOOLS[family][1], "-t", "filter")
    lines = []
    for line in out.splitlines():
        tag = _rule_comment(line)
        if tag is not None and (tag == wanted if wanted else tag.startswith(f"{COMMENT}-q")):
            lines.append(line)
    return lines


def _delete(netns: str | None, family: int, lines: list[str]) -> None:
    if lines:
        script = "*filter\n" + "".join(f"-D{line[2:]}\n" for line in lines) + "COMMIT\n"
        _iptables(netns, _TOOLS[family][2], "-w", "--noflush", input=script)


def flush(netns: str | None, queue: int | None = None) -> int:
    """Remove every hold rule of orthros (or only queue ``queue``'s) from ``netns`` (None: this
    namespace); how many went. For clean-up and recovery after a holder died: its queue went
    with its socket, but its rule still sends the service's output to a queue nobody reads
    (dropped, not passed)."""
    removed = 0
    for family in _TOOLS:
        if family == 6 and shutil.which(_TOOLS[6][1]) is None:
            continue  # a host without ip6tables has no IPv6 rule of ours either
        lines = _ours(netns, family, comment(queue) if queue is not None else None)
        _delete(netns, family, lines)
        removed += len(lines)
    return removed


# --- the kernel's view -------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelQueue:
    """One line of /proc/net/netfilter/nfnetlink_queue: a bound queue as the kernel sees it."""

    queue: int
    portid: int  # the netlink port of the socket that bound it
    held: int
    dropped: int  # the queue was full
    user_dropped: int  # the holder's socket buffer was full
    id_sequence: int  # the last id given out


def kernel_queues(netns: str | None) -> dict[int, KernelQueue]:
    """The queues bound in ``netns`` (None: this namespace), by number."""
    def read() -> str:
        # thread-self: the namespace of this thread, which call_in_netns moved.
        return Path("/proc/thread-self/net/netfilter/nfnetlink_queue").read_text()

    try:
        text = call_in_netns(netns, read)
    except FileNotFoundError as err:
        raise MissingFeatureError("this kernel has no nfnetlink_queue", host=netns,
                                  hint="needs CONFIG_NETFILTER_NETLINK_QUEUE") from err
    out = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 8:
            q = KernelQueue(int(f[0]), int(f[1]), int(f[2]), int(f[5]), int(f[6]), int(f[7]))
            out[q.queue] = q
    return out


def _has_net_admin() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


# --- the hold ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class HoldStats:
    queue: int
    held: int  # packets held now
    held_bytes: int
    queued: int  # packets queued since start
    queued_bytes: int
    released: int
    released_bytes: int
    dropped: int  # by drop_all/close("drop"), or vanished in the kernel (device down)
    dropped_bytes: int
    max_held: int
    last_id: int  # the last packet id seen (what mark() would return)
    overruns: int  # times our socket buffer was full: the kernel dropped those, TCP resends

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OutputHold:
    """Hold what is sent from ``address`` (and TCP ``port``) in ``netns`` in queue ``queue``.

    ``start()`` binds the queue, then installs the rule; a reader thread counts the packets as
    they are queued. ``mark()`` / ``release(mark)`` are the commit protocol; ``close()`` takes
    the rule out first, then lets go of (or drops) what is held. A context manager: ``with
    OutputHold(...) as hold`` starts it and always closes it.
    """

    def __init__(self, address: str, port: int | None = None, *, queue: int,
                 netns: str | None = None, maxlen: int = 65536, rcvbuf: int = 64 << 20,
                 copy_range: int = 64, timeout: float = 10.0) -> None:
        try:
            self.ip = ipaddress.ip_address(address)
        except ValueError as err:
            raise OutputHoldError(f"{address!r} is not an IP address", host=netns) from err
        if not 0 <= queue <= 0xFFFF:
            raise OutputHoldError(f"queue number {queue} is out of range (0-65535)", host=netns)
        if port is not None and not 0 < port <= 0xFFFF:
            raise OutputHoldError(f"port {port} is out of range (1-65535)", host=netns)
        self.address = str(self.ip)
        self.port = port
        self.queue = queue
        self.netns = netns
        self.maxlen = maxlen
        self.rcvbuf = rcvbuf
        self.copy_range = copy_range
        self.timeout = timeout
        self.comment = comment(queue)
        # One lock for the socket and the counts: the reader thread and the callers both read
        # the socket, so that mark() can drain it itself rather than wait for the thread.
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._rule = False
        self._state: Literal["new", "started", "closed"] = "new"
        self._failure: BaseException | None = None
        self._buf = bytearray(1 << 16)
        self._seq = 0
        self._acks: dict[int, int] = {}
        self._held: deque[tuple[int, int]] = deque()  # (id, length), in queue order
        self._held_bytes = 0
        self._last_id = 0
        self._queued = self._queued_bytes = 0
        self._released = self._released_bytes = 0
        self._dropped = self._dropped_bytes = 0
        self._max_held = 0
        self._overruns = 0

    def __repr__(self) -> str:
        what = f"{self.address}" + (f" tcp/{self.port}" if self.port is not None else "")
        return f"OutputHold({what}, queue={self.queue}, netns={self.netns}, {self._state})"

    @property
    def where(self) -> str:
        return f"network namespace {self.netns}" if self.netns else "this network namespace"

    @property
    def family(self) -> int:
        return self.ip.version

    @property
    def started(self) -> bool:
        return self._state == "started"

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    # --- life cycle ----------------------------------------------------------------------------

    def __enter__(self) -> OutputHold:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        with contextlib.suppress(OrthrosError, OSError):  # keep the body's error
            self.close()

    def start(self) -> None:
        """Bind the queue, then install the rule (so no packet meets a queue nobody reads),
        then start the reader. Undone on any failure."""
        with self._lock:
            if self._state == "started":
                return
            if self._state == "closed":
                raise OutputHoldError(f"the output hold of queue {self.queue} is closed",
                                      host=self.netns)
            if shutil.which(_TOOLS[self.family][0]) is None:
                raise MissingFeatureError(f"{_TOOLS[self.family][0]} is not installed",
                                          host=self.netns, hint="apt-get install iptables")
            self._state = "started"
            try:
                self._open()
                self._bind()
                self._install_rule()
                self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                self._thread = threading.Thread(target=self._reader,
                                                name=f"nfqueue-{self.queue}", daemon=True)
                self._thread.start()
            except BaseException:
                with contextlib.suppress(OrthrosError, OSError):
                    self.close()
                raise

    def _open(self) -> None:
        def make() -> socket.socket:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)

        try:
            sock = call_in_netns(self.netns, make)
        except OSError as err:
            if err.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
                raise MissingFeatureError("this kernel has no nfnetlink (NETLINK_NETFILTER)",
                                          host=self.netns) from err
            raise
        self._sock = sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
        except PermissionError:
            # Without CAP_NET_ADMIN the bind below fails anyway, with the clearer message.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind((0, 0))

    def _bind(self) -> None:
        code = self._request(command_message(self.queue, self._next_seq(), NFQNL_CFG_CMD_BIND))
        if code == errno.EPERM and not _has_net_admin():
            raise NotRootError(f"cannot bind netfilter queue {self.queue}: not permitted",
                               host=self.netns, hint="run as root (needs CAP_NET_ADMIN)")
        if code in (errno.EPERM, errno.EBUSY, errno.EEXIST):
            owner = kernel_queues(self.netns).get(self.queue)
            by = f" (netlink port {owner.portid})" if owner else ""
            raise OutputHoldError(f"netfilter queue {self.queue} in {self.where} is already "
                                  f"bound by another process{by}", host=self.netns,
                                  stage="output hold", hint="pick another queue number")
        if code in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT):
            raise MissingFeatureError("this kernel has no nfnetlink_queue", host=self.netns,
                                      hint="needs CONFIG_NETFILTER_NETLINK_QUEUE")
        self._check(code, "bind")
        code = self._request(config_message(self.queue, self._next_seq(),
                                            copy_range=self.copy_range, maxlen=self.maxlen))
        self._check(code, "configure")

    def _install_rule(self) -> None:
        tool = _TOOLS[self.family][0]
        spec = rule_spec(self.address, self.port, self.queue)
        try:
            _iptables(self.netns, tool, "-w", "-t", "filter", "-I", spec[0], "1", *spec[1:])
        except CommandError as err:
            text = err.stderr
            if any(s in text for s in ("NFQUEUE", "No such file or directory",
                                       "No chain/target/match", "Couldn't load")):
                raise MissingFeatureError(
                    f"{tool} in {self.where} has no NFQUEUE target (or comment match)",
                    host=self.netns, hint="needs CONFIG_NETFILTER_XT_TARGET_NFQUEUE, and "
                    "CONFIG_NFT_COMPAT with iptables-nft") from err
            raise OutputHoldError(f"cannot install the hold rule in {self.where}: {err.msg}",
                                  host=self.netns, stage="output hold") from err
        self._rule = True

    def _remove_rule(self) -> None:
        if not self._rule:
            return
        tool = _TOOLS[self.family][0]
        spec = rule_spec(self.address, self.port, self.queue)
        try:
            _iptables(self.netns, tool, "-w", "-t", "filter", "-D", *spec)
        except CommandError:
            # Not there as we wrote it (flushed, or changed by hand): whatever carries our tag.
            _delete(self.netns, self.family, _ours(self.netns, self.family, self.comment))
        self._rule = False

    def close(self, verdict: Verdict = "accept") -> None:
        """Take the rule out first (new packets pass as usual), then accept (or drop) what is
        held, unbind the queue, close the socket and stop the reader. Idempotent; each step runs
        even when an earlier one failed, and the first failure is raised at the end."""
        if verdict not in ("accept", "drop"):
            raise ValueError(f"verdict must be 'accept' or 'drop', not {verdict!r}")
        with self._lock:
            if self._state == "closed":
                return
            self._state = "closed"
        failures: list[BaseException] = []
        try:
            self._remove_rule()
        except (OrthrosError, OSError) as err:
            failures.append(OutputHoldError(
                f"the hold rule of queue {self.queue} is left in {self.where}: {err}",
                host=self.netns, hint="orthros recovery (nfqueue.flush) removes it"))
        with self._lock:
            if self._sock is not None:
                try:
                    self._drain()
                    self._verdict(NF_ACCEPT if verdict == "accept" else NF_DROP, self._last_id)
                    self._request(command_message(self.queue, self._next_seq(),
                                                  NFQNL_CFG_CMD_UNBIND))
                except (OrthrosError, OSError) as err:
                    failures.append(err)  # closing the socket unbinds (and drops) anyway
        if self._wake is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.timeout)
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._wake is not None:
                for fd in self._wake:
                    os.close(fd)
                self._wake = None
            self._thread = None
        if failures:
            raise failures[0]

    # --- the commit protocol -------------------------------------------------------------------

    def mark(self) -> int:
        """Drain what is queued on the socket and return the last packet id seen (0: none yet).
        Taken while the tree is frozen, every packet it sent before is at or below it."""
        with self._lock:
            self._usable()
            self._drain()
            return self._last_id

    def release(self, upto: int) -> int:
        """Accept every held packet with an id at or below ``upto``, in one verdict batch;
        how many that released."""
        with self._lock:
            self._usable()
            return self._verdict(NF_ACCEPT, upto)

    def release_all(self) -> int:
        with self._lock:
            self._usable()
            self._drain()
            return self._verdict(NF_ACCEPT, self._last_id)

    def drop_all(self) -> int:
        """Drop everything held: after a failover, the active's uncommitted output must never
        leave. How many packets that dropped."""
        with self._lock:
            self._usable()
            self._drain()
            return self._verdict(NF_DROP, self._last_id)

    def stats(self) -> HoldStats:
        with self._lock:
            if self._state == "started" and self._failure is None:
                with contextlib.suppress(OSError):
                    self._drain()
            return HoldStats(
                queue=self.queue, held=len(self._held), held_bytes=self._held_bytes,
                queued=self._queued, queued_bytes=self._queued_bytes,
                released=self._released, released_bytes=self._released_bytes,
                dropped=self._dropped, dropped_bytes=self._dropped_bytes,
                max_held=self._max_held, last_id=self._last_id, overruns=self._overruns)

    # --- internals (callers hold self._lock) ---------------------------------------------------

    def _usable(self) -> None:
        if self._state != "started" or self._sock is None:
            raise OutputHoldError(f"the output hold of queue {self.queue} is not running "
                                  f"({self._state})", host=self.netns)
        if self._failure is not None:
            raise OutputHoldError(f"the reader of queue {self.queue} failed: {self._failure}",
                                  host=self.netns) from self._failure

    def _verdict(self, verdict: int, upto: int) -> int:
        """One batch verdict for the held packets up to ``upto``; how many it covered."""
        self._drain()  # so that our count covers every queued packet at or below upto
        count = size = 0
        top = None
        for packet_id, length in self._held:
            if id_after(packet_id, upto):
                break
            count += 1
            size += length
            top = packet_id
        if top is None:
            return 0
        code = self._request(verdict_batch_message(self.queue, self._next_seq(), verdict, top))
        for _ in range(count):
            self._held.popleft()
        self._held_bytes -= size
        if code == errno.ENOENT:
            # The kernel held none of them any more (their device went down): gone, not sent.
            self._dropped += count
            self._dropped_bytes += size
            return 0
        self._check(code, "release" if verdict == NF_ACCEPT else "drop")
        if verdict == NF_ACCEPT:
            self._released += count
            self._released_bytes += size
        else:
            self._dropped += count
            self._dropped_bytes += size
        return count

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _check(self, code: int, what: str) -> None:
        if code:
            raise OutputHoldError(f"the kernel refused to {what} netfilter queue {self.queue} "
                                  f"in {self.where}: {os.strerror(code)}", host=self.netns,
                                  stage="output hold")

    def _request(self, msg: bytes) -> int:
        """Send one request and wait for its acknowledgement: 0, or the kernel's errno. The
        kernel handles it within send(), so the answer is on the socket when send returns;
        packets queued meanwhile are counted on the way."""
        assert self._sock is not None
        seq = _NLMSG.unpack_from(msg)[3]
        self._sock.send(msg)
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while seq not in self._acks:
            if not self._drain() and not poller.poll(int(self.timeout * 1000)):
                raise OutputHoldError(f"the kernel did not answer a request on netfilter queue "
                                      f"{self.queue} within {self.timeout:g} s",
                                      host=self.netns)
        return self._acks.pop(seq)

    def _drain(self) -> int:
        """Read every message waiting on the socket without blocking; how many datagrams."""
        sock = self._sock
        if sock is None:
            return 0
        count = 0
        buf = self._buf
        while True:
            try:
                n = sock.recv_into(buf, len(buf), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return count
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    self._overruns += 1  # the kernel dropped packets it could not report
                    continue
                raise
            count += 1
            self._parse(buf, n)

    def _parse(self, buf: bytearray, n: int) -> None:
        off = 0
        while off + _NLMSG.size <= n:
            size, kind, _flags, seq, _port = _NLMSG.unpack_from(buf, off)
            if size < _NLMSG.size or off + size > n:
                break
            if kind == _PACKET:
                packet_id, length = parse_packet(buf, off + _HDR_LEN, off + size)
                if packet_id is not None:
                    self._held.append((packet_id, length))
                    self._held_bytes += length
                    self._last_id = packet_id
                    self._queued += 1
                    self._queued_bytes += length
                    self._max_held = max(self._max_held, len(self._held))
            elif kind == NLMSG_ERROR:
                self._acks[seq] = -_ERR.unpack_from(buf, off + _NLMSG.size)[0]
            off += (size + 3) & ~3

    def _reader(self) -> None:
        """Count packets as they are queued, so that the socket buffer never fills between
        checkpoints. Callers read the socket too (under the same lock)."""
        sock, wake = self._sock, self._wake
        assert sock is not None and wake is not None
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(wake[0], select.POLLIN)
        while True:
            events = poller.poll()
            if any(fd == wake[0] for fd, _ in events):
                return
            with self._lock:
                if self._sock is None or self._state != "started":
                    return
                try:
                    self._drain()
                except OSError as err:
                    self._failure = err
                    return
