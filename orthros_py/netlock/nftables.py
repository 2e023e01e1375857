"""The nftables network lock: one drop rule pair per connection in a table of orthros's own.

A baseline for benchmarks against the XDP lock. Interface: the ``nft`` command, run through
``orthros_py.run`` as an argument list with its script on stdin (one fork per call, however many
rules), inside another network namespace with ``nsenter --net``; rules are found again through
``nft -j`` (JSON), by their comment, which also carries their drop counter. Needs root
(CAP_NET_ADMIN; CAP_SYS_ADMIN for nsenter).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from typing import Any

from orthros_py.errors import CommandError, MissingFeatureError, NetlockError
from orthros_py.net.addr import netns_path
from orthros_py.netlock.base import Conn, FlushResult, LockedConn, LockStatus, NetLock
from orthros_py.run import run

TABLE = "orthros_netlock"  # in the inet family: one table for IPv4 and IPv6
COMMENT_PREFIX = "orthros:"
# Just before the default filter priority (0), so that the drop comes before accept rules there.
PRIORITY = -1


def rules(conn: Conn) -> list[tuple[str, str]]:
    """(chain, rule text) of the two rules that silence ``conn``."""
    ip = "ip" if conn.family == socket.AF_INET else "ip6"
    comment = f'comment "{COMMENT_PREFIX}{conn}"'

    def rule(src: tuple[str, int], dst: tuple[str, int]) -> str:
        return (f"{ip} saddr {src[0]} {ip} daddr {dst[0]} tcp sport {src[1]} tcp dport {dst[1]}"
                f" counter drop {comment}")
    return [("input", rule(conn.remote, conn.local)), ("output", rule(conn.local, conn.remote))]


def setup_script() -> str:
    # "add" is idempotent for tables and chains: no need to look first.
    return "".join([f"add table inet {TABLE}\n"] + [
        f"add chain inet {TABLE} {chain} {{ type filter hook {chain} priority {PRIORITY}; }}\n"
        for chain in ("input", "output")])


def parse_ruleset(data: dict[str, Any]) -> list[tuple[str, int, Conn, int]]:
    """(chain, handle, connection, packets) of each orthros rule in ``nft -j`` output."""
    out = []
    for item in data.get("nftables", []):
        rule = item.get("rule")
        if not rule or rule.get("table") != TABLE:
            continue
        comment = str(rule.get("comment", ""))
        if not comment.startswith(COMMENT_PREFIX):
            continue
        try:
            conn = Conn.parse(comment[len(COMMENT_PREFIX):])
        except ValueError:
            continue
        packets = sum(int(e["counter"].get("packets", 0)) for e in rule.get("expr", [])
                      if isinstance(e, dict) and isinstance(e.get("counter"), dict))
        out.append((str(rule["chain"]), int(rule["handle"]), conn, packets))
    return out


class NftablesNetLock(NetLock):
    backend = "nftables"

    def __init__(self, netns: str | None = None) -> None:
        super().__init__()
        self.netns = str(netns_path(netns)) if netns is not None else None

    def _nft(self, *argv: str, script: str | None = None, check: bool = True) -> str:
        prefix = ["nsenter", f"--net={self.netns}"] if self.netns else []
        try:
            proc = run([*prefix, "nft", *argv], input=script, timeout=120, check=check)
        except CommandError as err:
            if err.returncode is None and "not installed" in err.msg:
                raise MissingFeatureError("nft is not installed",
                                          hint="apt-get install nftables") from err
            raise NetlockError(f"nft failed: {err.msg}") from err
        return proc.stdout if proc.returncode == 0 else ""

    def _ours(self) -> list[tuple[str, int, Conn, int]]:
        text = self._nft("-j", "list", "table", "inet", TABLE, check=False)
        return parse_ruleset(json.loads(text)) if text.strip() else []

    def _add(self, conns: Sequence[Conn]) -> None:
        have = {(chain, conn) for chain, _, conn, _ in self._ours()}
        lines = [f"add rule inet {TABLE} {chain} {text}\n"
                 for c in conns for chain, text in rules(c) if (chain, c) not in have]
        if lines:
            self._nft("-f", "-", script=setup_script() + "".join(lines))

    def _remove(self, conns: Sequence[Conn]) -> None:
        wanted = set(conns)
        lines = [f"delete rule inet {TABLE} {chain} handle {handle}\n"
                 for chain, handle, conn, _ in self._ours() if conn in wanted]
        if lines:
            self._nft("-f", "-", script="".join(lines))

    def status(self) -> LockStatus:
        st = LockStatus(self.backend, loaded=False, details={"netns": self.netns, "table": TABLE})
        text = self._nft("-j", "list", "table", "inet", TABLE, check=False)
        if not text.strip():
            return st
        st.loaded = True
        dropped: dict[Conn, int] = {}
        for _, _, conn, packets in parse_ruleset(json.loads(text)):
            dropped[conn] = dropped.get(conn, 0) + packets
        st.conns = [LockedConn(c, n) for c, n in sorted(dropped.items())]
        return st

    def flush(self) -> FlushResult:
        result = FlushResult(self.backend, unlocked=len(self.status().conns))
        if self._nft("list", "table", "inet", TABLE, check=False):
            self._nft("delete", "table", "inet", TABLE)
            result.removed.append(f"inet {TABLE}")
        self._held.clear()
        return result
