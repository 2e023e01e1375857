"""The iptables network lock: one DROP rule pair (INPUT and OUTPUT) per connection.

A baseline for benchmarks against the XDP lock, close to what CRIU's ``iptables`` method does,
but batched: rules go in and out through ``iptables-restore --noflush`` (one fork per call, not
per rule), and are found again by their comment. Interface: the iptables/ip6tables commands
(legacy or nft flavour, whichever the host has), run through ``orthros_py.run`` as argument
lists, inside another network namespace with ``nsenter --net``. Needs root (CAP_NET_ADMIN;
CAP_SYS_ADMIN for nsenter).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from orthros_py.errors import CommandError, MissingFeatureError, NetlockError
from orthros_py.net.addr import netns_path
from orthros_py.netlock.base import Conn, FlushResult, LockedConn, LockStatus, NetLock
from orthros_py.run import run

COMMENT = "orthros-netlock"
_TOOLS: dict[int, tuple[str, str]] = {socket.AF_INET: ("iptables-save", "iptables-restore"),
          socket.AF_INET6: ("ip6tables-save", "ip6tables-restore")}


def rule_specs(conn: Conn) -> list[str]:
    """The two rules (iptables-restore syntax, without the -A/-D) that silence ``conn``."""
    def rule(chain: str, src: tuple[str, int], dst: tuple[str, int]) -> str:
        return (f"{chain} -s {src[0]} -d {dst[0]} -p tcp -m tcp --sport {src[1]} --dport {dst[1]}"
                f" -m comment --comment {COMMENT} -j DROP")
    return [rule("INPUT", conn.remote, conn.local), rule("OUTPUT", conn.local, conn.remote)]


def parse_rule(line: str) -> tuple[str, Conn] | None:
    """(chain, connection) of one of our ``-A`` lines from iptables-save, else None."""
    words = line.split()
    if len(words) < 2 or words[0] != "-A" or COMMENT not in words:
        return None
    opts = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("-")}
    try:
        src = (opts["-s"].split("/")[0], int(opts["--sport"]))
        dst = (opts["-d"].split("/")[0], int(opts["--dport"]))
    except (KeyError, ValueError):
        return None
    chain = words[1]
    if chain == "INPUT":
        return chain, Conn.of(dst, src)
    if chain == "OUTPUT":
        return chain, Conn.of(src, dst)
    return None


class IptablesNetLock(NetLock):
    backend = "iptables"

    def __init__(self, netns: str | None = None) -> None:
        super().__init__()
        self.netns = str(netns_path(netns)) if netns is not None else None

    def _argv(self, *argv: str) -> list[str]:
        return [*(["nsenter", f"--net={self.netns}"] if self.netns else []), *argv]

    def _run(self, argv: list[str], input: str | None = None) -> str:
        try:
            return run(self._argv(*argv), input=input, timeout=120).stdout
        except CommandError as err:
            if err.returncode is None and "not installed" in err.msg:
                raise MissingFeatureError(f"{argv[0]} is not installed",
                                          hint="apt-get install iptables") from err
            raise NetlockError(f"{argv[0]} failed: {err.msg}") from err

    def _ours(self, family: int) -> list[tuple[str, Conn, str]]:
        """(chain, connection, -A line) of every orthros rule of one family."""
        out = []
        for line in self._run([_TOOLS[family][0], "-t", "filter"]).splitlines():
            parsed = parse_rule(line)
            if parsed:
                out.append((parsed[0], parsed[1], line))
        return out

    def _restore(self, family: int, lines: Sequence[str]) -> None:
        if lines:
            script = "*filter\n" + "\n".join(lines) + "\nCOMMIT\n"
            self._run([_TOOLS[family][1], "-w", "--noflush"], input=script)

    def _add(self, conns: Sequence[Conn]) -> None:
        for family in _TOOLS:
            todo = [c for c in conns if c.family == family]
            if not todo:
                continue
            have = {(chain, conn) for chain, conn, _ in self._ours(family)}
            lines = [f"-I {spec}" for c in todo for spec in rule_specs(c)
                     if (spec.split()[0], c) not in have]
            self._restore(family, lines)

    def _remove(self, conns: Sequence[Conn], everything: bool = False) -> None:
        wanted = set(conns)
        for family in _TOOLS:
            if not everything and not any(c.family == family for c in wanted):
                continue
            lines = ["-D" + line[2:] for _, conn, line in self._ours(family)
                     if everything or conn in wanted]
            self._restore(family, lines)

    def status(self) -> LockStatus:
        st = LockStatus(self.backend, loaded=True, details={"netns": self.netns})
        for family in _TOOLS:
            chains: dict[Conn, set[str]] = {}
            for chain, conn, _ in self._ours(family):
                chains.setdefault(conn, set()).add(chain)
            st.conns += [LockedConn(c) for c in sorted(chains)]
            st.problems += [f"{c} is locked in {' '.join(sorted(ch))} only"
                            for c, ch in chains.items() if len(ch) < 2]
        return st

    def flush(self) -> FlushResult:
        count = len(self.status().conns)
        self._remove([], everything=True)
        self._held.clear()
        return FlushResult(self.backend, unlocked=count)


# CRIU's own iptables lock (criu/netfilter.c, IPTABLES_CONN_CMD): packets of its repair
# sockets carry SOCCR_MARK and pass.
CRIU_MARK = "0xc114"


def criu_rule_argvs(conn: Conn) -> list[list[str]]:
    """The ``iptables -D`` commands that take CRIU's lock of ``conn`` off, as CRIU words them."""
    tool = "iptables" if conn.family == socket.AF_INET else "ip6tables"

    def rule(chain: str, src: tuple[str, int], dst: tuple[str, int]) -> list[str]:
        return [tool, "-w", "-t", "filter", "-D", chain, "--protocol", "tcp", "-m", "mark", "!",
                "--mark", CRIU_MARK, "--source", src[0], "--sport", str(src[1]),
                "--destination", dst[0], "--dport", str(dst[1]), "-j", "DROP"]
    return [rule("INPUT", conn.remote, conn.local), rule("OUTPUT", conn.local, conn.remote)]


def drop_criu_locks(conns: Sequence[Conn]) -> int:
    """Remove what CRIU's iptables lock left of ``conns``; how many rules went. CRIU 4.2.1
    keeps a dump's rules after a restore with --tcp-close (rst_unlock_tcp_connections returns
    early), which would silence the clients it means to reset."""
    removed = 0
    for conn in conns:
        for argv in criu_rule_argvs(conn):
            # Exit 1: no such rule (never locked, or gone already); nothing to undo.
            removed += run(argv, timeout=30, check=False).returncode == 0
    return removed
