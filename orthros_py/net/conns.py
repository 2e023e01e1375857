"""The TCP connections of a process tree, seen inside the tree's own network namespace.

Interfaces: /proc/PID/fd (the tree's socket inodes), /proc/PID/ns/net (its namespace),
NETLINK_SOCK_DIAG through pyroute2's DiagSocket (every TCP socket of that namespace, with its
inode), and rtnetlink route lookups (RTM_GETROUTE) for the interface that leads to each peer.
The netlink sockets are made inside the tree's namespace through setns(2): psutil's
``net_connections`` reads /proc/net of the caller's namespace only. Needs root (other users'
/proc/PID/fd, setns).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from orthros_py.errors import NoSuchProcessError, NotRootError, OrthrosError
from orthros_py.net.conn import Conn

# TCP states (include/net/tcp_states.h) in which a socket still exchanges packets with its peer,
# so a lock must cover it: established, and the half-closed states CRIU also checkpoints.
TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2 = 1, 4, 5
TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING = 8, 9, 11
LOCKABLE_STATES = (TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT, TCP_LAST_ACK,
                   TCP_CLOSING)


@dataclass
class TreeConns:
    """What a network lock needs to know about one tree."""

    netns: str  # /proc/PID/ns/net of a tree process: valid while the tree lives
    netns_id: tuple[int, int]  # (st_dev, st_ino): the namespace's identity, also after that
    conns: list[Conn] = field(default_factory=list)
    routes: dict[Conn, str] = field(default_factory=dict)  # conn -> interface towards the peer
    unrouted: list[Conn] = field(default_factory=list)  # no route to the peer (yet/any more)

    @property
    def interfaces(self) -> list[str]:
        return sorted(set(self.routes.values()))

    def by_interface(self) -> dict[str, list[Conn]]:
        out: dict[str, list[Conn]] = {}
        for conn, iface in sorted(self.routes.items()):
            out.setdefault(iface, []).append(conn)
        return out


def socket_inodes(pids: Iterable[int]) -> dict[int, int]:
    """{socket inode: pid} over the open fds of ``pids`` (threads share their fd table)."""
    out: dict[int, int] = {}
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except FileNotFoundError as err:
            raise NoSuchProcessError(f"process {pid} exited", pid=pid) from err
        except PermissionError as err:
            raise NotRootError(f"cannot read the open files of process {pid}", pid=pid,
                               hint="run as root") from err
        for name in names:
            try:
                link = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue  # closed meanwhile
            if link.startswith("socket:["):
                out.setdefault(int(link[8:-1]), pid)
    return out


def netns_of(pid: int) -> tuple[str, tuple[int, int]]:
    path = f"/proc/{pid}/ns/net"
    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        raise NoSuchProcessError(f"process {pid} exited", pid=pid) from err
    except PermissionError as err:
        raise NotRootError(f"cannot see the network namespace of process {pid}", pid=pid,
                           hint="run as root") from err
    return path, (st.st_dev, st.st_ino)


def tcp_sockets(netns: str | None, states: Sequence[int] = LOCKABLE_STATES
                ) -> list[tuple[Conn, int]]:
    """(connection, socket inode) of every TCP socket in ``states`` in ``netns``."""
    from pyroute2 import DiagSocket

    from orthros_py.net.addr import in_netns

    mask = 0
    for s in states:
        mask |= 1 << s
    out: list[tuple[Conn, int]] = []
    # Made inside the namespace: a sock_diag socket reports the sockets of its own namespace.
    with in_netns(netns), DiagSocket() as diag:
        diag.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in diag.get_sock_stats(family=family, states=mask):
                conn = Conn.of((msg["idiag_src"], msg["idiag_sport"]),
                               (msg["idiag_dst"], msg["idiag_dport"]))
                out.append((conn, int(msg["idiag_inode"])))
    return out


def route_interfaces(netns: str | None, conns: Iterable[Conn]) -> tuple[dict[Conn, str],
                                                                        list[Conn]]:
    """({conn: interface its packets to the peer leave by}, [conns with no route]).

    A peer on this host (127.0.0.1, or an address of the namespace) routes through ``lo``.
    """
    from pyroute2 import NetlinkError

    from orthros_py.net.addr import iproute

    routes: dict[Conn, str] = {}
    unrouted: list[Conn] = []
    names: dict[int, str] = {}
    cache: dict[str, int | None] = {}
    with iproute(netns) as ipr:
        for conn in conns:
            if conn.remote_ip not in cache:
                try:
                    msgs = ipr.route("get", dst=conn.remote_ip)
                    oif = msgs[0].get("RTA_OIF") if msgs else None
                except NetlinkError:
                    oif = None  # unreachable: the caller decides whether that matters
                cache[conn.remote_ip] = int(oif) if oif else None
            oif = cache[conn.remote_ip]
            if oif is None:
                unrouted.append(conn)
                continue
            if oif not in names:
                names[oif] = str(ipr.link("get", index=oif)[0].get("IFLA_IFNAME"))
            routes[conn] = names[oif]
    return routes, unrouted


TCP_TIME_WAIT = 6
# What a closed connection leaves behind, owned by no process: its 4-tuple is taken until it
# goes (TIME_WAIT: a minute), and a TCP repair-mode connect() of the same 4-tuple (a restore)
# fails with EADDRNOTAVAIL meanwhile.
LINGERING_STATES = (TCP_TIME_WAIT, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSING, TCP_LAST_ACK)


def _diag_addr(family: int, text: str) -> tuple[int, int, int, int]:
    """An address as inet_diag_sockid carries it: four big-endian 32-bit words."""
    packed = socket.inet_pton(family, text)
    w = [int.from_bytes(packed[i:i + 4], "big") for i in range(0, len(packed), 4)] + [0, 0, 0]
    return w[0], w[1], w[2], w[3]


def destroy_lingering(conns: Iterable[Conn], netns: str | None = None) -> list[Conn]:
    """Destroy (SOCK_DESTROY) the sockets left by closed connections whose 4-tuple is one of
    ``conns`` in ``netns``, so that a restore can take those 4-tuples over; which were. An
    orphan still closing (FIN_WAIT, LAST_ACK) sends its peer a reset as it goes."""
    from pyroute2 import DiagSocket
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.diag import SOCK_DESTROY, inet_diag_req

    from orthros_py.net.addr import in_netns

    wanted = set(conns)
    if not wanted:
        return []
    mask = 0
    for st in LINGERING_STATES:
        mask |= 1 << st
    done: list[Conn] = []
    with in_netns(netns), DiagSocket() as diag:
        diag.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in diag.get_sock_stats(family=family, states=mask):
                conn = Conn.of((msg["idiag_src"], msg["idiag_sport"]),
                               (msg["idiag_dst"], msg["idiag_dport"]))
                if conn not in wanted:
                    continue
                req = inet_diag_req()
                req["sdiag_family"] = family
                req["sdiag_protocol"] = socket.IPPROTO_TCP
                req["idiag_states"] = 1 << int(msg["idiag_state"])
                for k in ("idiag_sport", "idiag_dport", "idiag_if", "idiag_cookie"):
                    req[k] = msg[k]
                req["idiag_src"] = _diag_addr(family, msg["idiag_src"])
                req["idiag_dst"] = _diag_addr(family, msg["idiag_dst"])
                try:
                    list(diag.nlm_request(req, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK))
                except OSError as err:
                    raise OrthrosError(f"cannot remove what the closed connection {conn} left "
                                       f"behind: {err}",
                                       hint="a kernel with INET_DIAG_DESTROY") from err
                done.append(conn)
    return done


def discover(pids: Sequence[int], states: Sequence[int] = LOCKABLE_STATES) -> TreeConns:
    """The TCP connections held by ``pids`` (a whole tree), and the interfaces they use.

    Raises OrthrosError if the tree spans several network namespaces (not supported).
    """
    if not pids:
        raise OrthrosError("no processes given")
    spaces = {netns_of(pid)[1] for pid in pids}
    path, nsid = netns_of(pids[0])
    if len(spaces) > 1:
        raise OrthrosError(f"the tree of process {pids[0]} spans {len(spaces)} network "
                           "namespaces: orthros locks the connections of one", pid=pids[0])
    inodes = socket_inodes(pids)
    conns = sorted({conn for conn, ino in tcp_sockets(path, states) if ino in inodes})
    routes, unrouted = route_interfaces(path, conns)
    return TreeConns(path, nsid, conns, routes, unrouted)


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants, root first."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.NoSuchProcess as err:
        raise NoSuchProcessError(f"no process with pid {pid} exists", pid=pid) from err


def discover_tree(pid: int, states: Sequence[int] = LOCKABLE_STATES) -> TreeConns:
    """``discover`` over the tree rooted at ``pid``."""
    return discover(tree_pids(pid), states)


# INET_DIAG_INFO as an idiag_ext bit: ask for each socket's tcp_info.
_EXT_INFO = 1 << (2 - 1)


def bytes_acked(netns: str | None, inodes: set[int]) -> dict[int, int]:
    """tcp_info's ``tcpi_bytes_acked`` of the established TCP sockets ``inodes`` in ``netns``:
    how much of what each sent its peer has acknowledged (it grows when a reply arrives)."""
    from pyroute2 import DiagSocket

    from orthros_py.net.addr import in_netns

    out: dict[int, int] = {}
    with in_netns(netns), DiagSocket() as diag:
        diag.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in diag.get_sock_stats(family=family, states=1 << TCP_ESTABLISHED,
                                           extensions=_EXT_INFO):
                inode = int(msg["idiag_inode"])
                if inode not in inodes:
                    continue
                info = msg.get_attr("INET_DIAG_INFO")
                if info is not None:
                    out[inode] = int(info.get("tcpi_bytes_acked") or 0)
    return out
