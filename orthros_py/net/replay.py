"""Giving a restored TCP socket the segments its peer sent while the lock dropped them: raw IP
sockets (IPPROTO_RAW, the header included), in the socket's network namespace.

Why: a peer whose segment the lock dropped retransmits on its timer, which doubles with every
dropped retransmission (200, 400, 800 ms ...); after the unlock it sits out the rest of the
current interval before trying again, so it waited up to twice the lock window. The XDP lock
keeps the earliest dropped segment of each connection (``bpf/netlock.c``, "caught"); sent
again here, addressed to the restored socket (a local address: it loops back into the stack
without crossing the interface), it is acknowledged at once, which ends the peer's backoff and
lets it send the rest.

What is checked before sending, since the segments may come from another host: IPv4 or IPv6
carrying TCP, from the remote end to the local end of one of the given connections (those the
caller unlocked), with no SYN and no RST. The TCP checksum is computed anew: a segment caught
from a veth or offloading NIC may carry only the pseudo-header's partial sum. Needs CAP_NET_RAW.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from orthros_py.net.conn import Conn

__all__ = ["Segment", "SegmentError", "give_back", "parse_segment", "tcp_checksum"]

_SYN, _RST = 0x02, 0x04
# Segments per sending thread at least, and threads at most.
PER_WORKER = 64
MAX_WORKERS = 8


class SegmentError(ValueError):
    """A segment that is not one to give back (malformed, or for another connection)."""


@dataclass(frozen=True)
class Segment:
    """A caught IP packet carrying TCP, and where it goes."""

    conn: Conn  # local end = its destination, remote end = its source
    packet: bytes
    ip_header: int  # bytes of IP header before the TCP header
    version: int


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_checksum(pseudo: bytes, tcp: bytes) -> int:
    """RFC 793's checksum of ``tcp`` (its checksum field zeroed) under ``pseudo``."""
    data = pseudo + tcp
    if len(data) % 2:
        data += b"\0"
    return ~_fold(sum(struct.unpack(f"!{len(data) // 2}H", data))) & 0xFFFF


def parse_segment(packet: bytes) -> Segment:
    """The segment in ``packet`` (from its IP header on); SegmentError if it is none."""
    if len(packet) < 40:
        raise SegmentError(f"{len(packet)} bytes is too short for an IP packet with TCP")
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or packet[9] != socket.IPPROTO_TCP:
            raise SegmentError("not an IPv4 packet carrying TCP")
        if struct.unpack_from("!H", packet, 6)[0] & 0x1FFF:
            raise SegmentError("an IPv4 fragment")
        total = min(struct.unpack_from("!H", packet, 2)[0], len(packet))
        src = str(ipaddress.IPv4Address(packet[12:16]))
        dst = str(ipaddress.IPv4Address(packet[16:20]))
        family = socket.AF_INET
    elif version == 6:
        ihl = 40
        if packet[6] != socket.IPPROTO_TCP:
            raise SegmentError("not an IPv6 packet carrying TCP directly")
        total = min(40 + struct.unpack_from("!H", packet, 4)[0], len(packet))
        src = ipaddress.IPv6Address(packet[8:24]).compressed
        dst = ipaddress.IPv6Address(packet[24:40]).compressed
        family = socket.AF_INET6
    else:
        raise SegmentError(f"IP version {version}")
    if total < ihl + 20:
        raise SegmentError("the TCP header is cut")
    sport, dport = struct.unpack_from("!HH", packet, ihl)
    doff = (packet[ihl + 12] >> 4) * 4
    if doff < 20 or ihl + doff > total:
        raise SegmentError("a bad TCP header length")
    if packet[ihl + 13] & (_SYN | _RST):
        raise SegmentError("a SYN or RST")
    return Segment(Conn(family, dst, dport, src, sport), packet[:total], ihl, version)


def _finished(seg: Segment) -> tuple[bytes, tuple[str, int]]:
    """The packet to send, its lengths and TCP checksum made right; and where to."""
    p = bytearray(seg.packet)
    tcp_len = len(p) - seg.ip_header
    if seg.version == 4:
        struct.pack_into("!H", p, 2, len(p))  # the kernel fills the IP checksum itself
        pseudo = bytes(p[12:20]) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, tcp_len)
    else:
        struct.pack_into("!H", p, 4, tcp_len)
        pseudo = bytes(p[8:40]) + struct.pack("!I3xB", tcp_len, socket.IPPROTO_TCP)
    struct.pack_into("!H", p, seg.ip_header + 16, 0)
    csum = tcp_checksum(pseudo, bytes(p[seg.ip_header:]))
    struct.pack_into("!H", p, seg.ip_header + 16, csum)
    return bytes(p), (seg.conn.local_ip, 0)


def give_back(packets: Iterable[bytes], conns: Sequence[Conn],
              netns: str | None = None) -> tuple[int, list[str]]:
    """Send each packet that is a segment of one of ``conns`` (from its remote end to its local
    end) to the local end, in ``netns`` (a name or ``/proc/PID/ns/net``; None: here). Returns
    how many were sent and one reason per packet refused or failed."""
    allowed = set(conns)
    todo: list[Segment] = []
    refused: list[str] = []
    for raw in packets:
        try:
            seg = parse_segment(raw)
        except SegmentError as err:
            refused.append(str(err))
            continue
        if seg.conn not in allowed:
            refused.append(f"{seg.conn} is not a connection given back here")
            continue
        todo.append(seg)
    if not todo:
        return 0, refused
    # A segment sent to a local address is taken in by the receiving stack within the send
    # (loopback): hundreds of them are real work, shared out over the CPUs.
    workers = max(1, min(os.cpu_count() or 1, len(todo) // PER_WORKER, MAX_WORKERS))
    parts = [todo[i::workers] for i in range(workers)]
    results: list[tuple[int, list[str]]] = [(0, [])] * workers

    def send(k: int) -> None:
        results[k] = _send_all(parts[k], netns)

    threads = [threading.Thread(target=send, args=(k,), name=f"give-back-{k}")
               for k in range(1, workers)]
    for t in threads:
        t.start()
    try:
        send(0)
    finally:
        for t in threads:
            t.join()
    for _, errs in results:
        refused += errs
    return sum(n for n, _ in results), refused


def _send_all(segs: Sequence[Segment], netns: str | None) -> tuple[int, list[str]]:
    from orthros_py.net.addr import in_netns

    sent, failed = 0, []
    with in_netns(netns), contextlib.ExitStack() as stack:
        socks: dict[int, socket.socket] = {}
        for seg in segs:
            fam = socket.AF_INET if seg.version == 4 else socket.AF_INET6
            if fam not in socks:
                # IPPROTO_RAW: the header is ours (IPv6 too, since Linux 4.5).
                socks[fam] = stack.enter_context(
                    socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW))
            packet, dest = _finished(seg)
            try:
                socks[fam].sendto(packet, dest)
                sent += 1
            except OSError as err:
                failed.append(f"{seg.conn}: {err.strerror or err}")
    return sent, failed
