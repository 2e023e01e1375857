"""A 3-member etcd cluster on lab hosts, and the clients that check it: the workload of
``orthros sync`` (one checkpoint of the whole cluster at one instant, restored later).

``start_cluster`` starts one member per lab host as a daemon of that host (``Lab.spawn``), each
under ``unshare --time --`` so that etcd lives in a time namespace of its own: unshare(1) execs
etcd without forking, and since Linux 5.17 an exec after unshare(CLONE_NEWTIME) moves the
process itself into the new namespace. CRIU then restores that namespace's CLOCK_MONOTONIC
offset so the clock carries on from the dump, and Go's timers (raft ticks, lease and election
timeouts) do not all fire at once after a restore. It waits until the members agree on one
leader and one term and a first put succeeds.

Everything talks to etcd over its HTTP/JSON gRPC gateway (etcd 3.4: POST ``/v3/kv/put``,
``/v3/kv/range``, ``/v3/maintenance/status``, ``/v3/cluster/member/list``; keys and values in
base64, 64-bit integers as decimal strings) from sockets made inside a lab namespace (the
client's unless told), never by forking etcdctl. ``status`` asks every member at once and gives a
``ClusterState`` (reachable, member id, leader, raft term and index, revision); comparing the
terms of two states tells whether an election happened between them (``elections_between``).

``Writer`` is a client thread that puts ``k/000001``, ``k/000002``, ... one after the other,
retrying the same key on the next member after any failure, and records when each key was
acknowledged; it survives members frozen, killed or restored under it (1 s per request). Since
a key is retried until acknowledged, the acknowledged keys are always ``1..N`` without a hole;
only ``pending`` (the key in flight when it stopped) may or may not be in the cluster.

``stop_cluster`` SIGKILLs every etcd of the cluster, wherever it lives now (found by the
cluster's random ``--initial-cluster-token`` in its command line, so also a restored copy).

Interfaces: etcd 3.4 and unshare(1) (util-linux) in the hosts' mount namespaces, sockets made
through setns (orthros_py.net.addr.in_netns), /proc/PID/{status,ns/time,root}, psutil. Needs
root (namespaces), as the lab does.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import psutil

from orthros_py.errors import OperationTimeout, OrthrosError
from orthros_py.net.addr import in_netns

if TYPE_CHECKING:
    from orthros_py.lab import HostProcess, Lab

CLIENT_PORT = 2379
PEER_PORT = 2380
ETCD = "etcd"
# What keeps a member small and quick to dump. bbolt maps its file with MAP_SHARED at
# max(quota + 10 %, file size) rounded up to a power of two (etcd's default is a 10 GiB map);
# 64 MiB gives a 128 MiB map instead, of which only the touched pages are resident.
QUOTA_BACKEND_BYTES = 64 << 20
# etcd 3.4 keeps up to snapshot-count (+5000 for catch-up) raft entries in memory: the default
# 100000 would let a long benchmark grow every member's heap for nothing.
SNAPSHOT_COUNT = 10000
LOG_LEVEL = "warn"
REQUEST_TIMEOUT = 1.0
LOG_TAIL_LINES = 15
JSON_HEADERS = {"Content-Type": "application/json"}


class EtcdError(OrthrosError):
    """etcd refused a request, could not be reached, or the cluster did not become healthy."""

    def __init__(self, msg: str, *, code: int | None = None, http_status: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(msg, **kwargs)
        self.code = code  # the gRPC status code the gateway reported, if any
        self.http_status = http_status


# --- pure helpers (unit-tested) -------------------------------------------------------------------


def b64(data: str | bytes) -> str:
    """What the gateway takes for a key or value (bytes fields are base64 in JSON)."""
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def prefix_end(prefix: str | bytes) -> bytes:
    """The range_end that makes a range ``[prefix, prefix_end)`` every key starting with
    ``prefix`` (etcd's clientv3.GetPrefixRangeEnd): the last byte below 0xff incremented, what
    follows it dropped; ``\\x00`` (every key from ``prefix`` on) if there is no such byte."""
    raw = bytearray(prefix.encode() if isinstance(prefix, str) else prefix)
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\x00"


def peer_url(address: str) -> str:
    return f"http://{address}:{PEER_PORT}"


def client_url(address: str) -> str:
    return f"http://{address}:{CLIENT_PORT}"


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of an ``http://HOST:PORT`` URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise ValueError(f"not an http://HOST:PORT URL: {url!r}")
    return parts.hostname, parts.port


def key_name(seq: int, prefix: str = "k/", width: int = 6) -> str:
    """The Writer's ``seq``-th key: ``k/000001``; zero-padded so that keys sort as numbers."""
    return f"{prefix}{seq:0{width}d}"


def value_for(seq: int, size: int = 16) -> str:
    """The value the Writer puts under its ``seq``-th key: ``v<seq>-`` padded with ``x`` to
    ``size`` characters (never cut: the sequence number is always in it)."""
    head = f"v{seq}-"
    return head + "x" * max(0, size - len(head))


def parse_reply(status: int, body: bytes, what: str = "request") -> dict[str, Any]:
    """The JSON object of a gateway answer; EtcdError with etcd's own message if the answer is
    an error (the gateway maps a gRPC error to an HTTP status and ``{"error", "code"}``)."""
    try:
        data = json.loads(body.decode("utf-8", errors="replace")) if body else {}
    except ValueError as err:
        raise EtcdError(f"{what}: HTTP {status}, not JSON: {body[:200]!r}",
                        http_status=status) from err
    if not isinstance(data, dict):
        raise EtcdError(f"{what}: HTTP {status}, not a JSON object: {body[:200]!r}",
                        http_status=status)
    if status != 200 or "error" in data:
        msg = data.get("message") or data.get("error") or body[:200].decode(errors="replace")
        code = data.get("code")
        raise EtcdError(f"{what}: HTTP {status}: {msg}", http_status=status,
                        code=int(code) if isinstance(code, int) else None)
    return data


def _uint(data: Mapping[str, Any], *names: str) -> int | None:
    """A uint64 field of a gateway answer (a decimal string; absent when 0, as protobuf's JSON
    leaves out default values), under the first of ``names`` present (camelCase or snake_case:
    the 3.4 gateway uses both, snake_case in headers)."""
    for n in names:
        if n in data:
            return int(data[n])
    return None


def initial_cluster(members: Sequence[EtcdMember]) -> str:
    """``name=peer_url,...`` as --initial-cluster takes it."""
    return ",".join(f"{m.name}={m.peer_url}" for m in members)


def etcd_argv(member: EtcdMember, cluster: EtcdCluster, *, heartbeat_ms: int, election_ms: int,
              data_dir: Path | str, snapshot_count: int = SNAPSHOT_COUNT,
              quota_backend_bytes: int = QUOTA_BACKEND_BYTES, log_level: str = LOG_LEVEL,
              pre_vote: bool = False, etcd: str = ETCD) -> list[str]:
    """The command line of one member: etcd under ``unshare --time --`` (see the module's
    docstring), listening on its host's address only (each host is a network namespace of its
    own), and set up to stay small and quiet for a checkpoint.

    ``pre_vote`` stays off by default (etcd 3.4's default): a member whose election timer fired
    after a restore then bumps the term visibly, which is what a test of ``orthros sync`` wants
    to see; with it on, such a member first asks and is refused while a leader is alive."""
    if heartbeat_ms <= 0:
        raise ValueError("the heartbeat interval must be positive")
    # etcd refuses to start otherwise (embed.Config.Validate): say it before spawning anything.
    if election_ms < 5 * heartbeat_ms:
        raise ValueError(f"etcd needs an election timeout of at least 5 heartbeats "
                         f"({5 * heartbeat_ms} ms), not {election_ms} ms")
    if election_ms > 50000:
        raise ValueError("etcd refuses an election timeout above 50000 ms")
    return [
        "unshare", "--time", "--",
        etcd,
        "--name", member.name,
        "--data-dir", str(data_dir),
        "--listen-peer-urls", member.peer_url,
        "--initial-advertise-peer-urls", member.peer_url,
        "--listen-client-urls", member.client_url,
        "--advertise-client-urls", member.client_url,
        "--initial-cluster", initial_cluster(cluster.members),
        "--initial-cluster-state", "new",
        "--initial-cluster-token", cluster.token,
        "--heartbeat-interval", str(heartbeat_ms),
        "--election-timeout", str(election_ms),
        "--snapshot-count", str(snapshot_count),
        "--quota-backend-bytes", str(quota_backend_bytes),
        f"--pre-vote={'true' if pre_vote else 'false'}",
        # zap to stderr (the spawn's log file): capnslog, 3.4's default, is chattier, and
        # "default" outputs would go to journald when it sees one.
        "--logger", "zap", "--log-outputs", "stderr", "--log-level", log_level,
    ]


# --- the cluster --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EtcdMember:
    name: str
    host: str  # the lab host it runs on
    address: str  # the host's address: where it listens
    data_dir: Path
    log: Path | None = None
    process: HostProcess | None = None  # as spawned: host_pid stays, machine_pid not (restores)

    @property
    def peer_url(self) -> str:
        return peer_url(self.address)

    @property
    def client_url(self) -> str:
        return client_url(self.address)


@dataclass(frozen=True)
class EtcdCluster:
    members: tuple[EtcdMember, ...]
    token: str  # --initial-cluster-token: also how stop_cluster finds its processes
    heartbeat_ms: int = 100
    election_ms: int = 500
    client_host: str | None = None  # where requests come from by default (the lab's client)
    start_seconds: float | None = None  # from the first spawn to healthy

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def member(self, name: str) -> EtcdMember:
        """The member called ``name``, or running on host ``name``."""
        for m in self.members:
            if name in (m.name, m.host):
                return m
        raise KeyError(f"the cluster has no member {name!r} (it has {', '.join(self.names)})")

    @property
    def initial_cluster(self) -> str:
        return initial_cluster(self.members)


# --- requests -----------------------------------------------------------------------------------


def _client_netns(lab: Lab, cluster: EtcdCluster, client_host: str | None) -> str:
    return lab.netns(client_host or cluster.client_host or lab.client.name)


def _post(netns: str | None, url: str, path: str, body: Mapping[str, Any], *,
          timeout: float) -> dict[str, Any]:
    """One POST to the gateway at ``url`` on a fresh connection made from ``netns`` (None: the
    calling thread's namespace). A fresh connection each time: after a member was frozen or
    restored, no request waits on a connection whose state went back in time."""
    host, port = split_url(url)
    with in_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        # Connected outside the namespace switch: only the socket's creation decides its
        # namespace, and the thread should not sit in another namespace while it waits.
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock = sock
        conn.request("POST", path, body=json.dumps(body).encode(), headers=JSON_HEADERS)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()  # closes sock too
        sock.close()
    return parse_reply(resp.status, raw, f"{path} at {host}")


def _errtext(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if not isinstance(err, EtcdError) else str(err)


# Everything a request to a member that is frozen, dead, restoring or leaderless may raise.
REQUEST_ERRORS = (OSError, http.client.HTTPException, EtcdError, ValueError)


def _put_one(netns: str | None, member: EtcdMember, key: str, value: str, *,
             timeout: float) -> int:
    """Put on ``member``; the revision etcd gave the write."""
    reply = _post(netns, member.client_url, "/v3/kv/put", {"key": b64(key), "value": b64(value)},
                  timeout=timeout)
    return _uint(reply.get("header", {}), "revision") or 0


def put(lab: Lab, cluster: EtcdCluster, key: str, value: str, *, via: str | None = None,
        timeout: float = 2.0, client_host: str | None = None) -> tuple[str, int]:
    """Put ``key`` = ``value`` through member ``via`` (a name or host), or through the first
    member that accepts it; (member name, revision). EtcdError naming every member's failure."""
    netns = _client_netns(lab, cluster, client_host)
    targets = [cluster.member(via)] if via else list(cluster.members)
    errors = []
    for m in targets:
        try:
            return m.name, _put_one(netns, m, key, value, timeout=timeout)
        except REQUEST_ERRORS as err:
            errors.append(f"{m.name}: {_errtext(err)}")
    raise EtcdError(f"cannot put {key!r}: " + "; ".join(errors))


def get_all(lab: Lab, cluster: EtcdCluster, prefix: str, *, via: str | None = None,
            timeout: float = 5.0, page: int = 5000, serializable: bool = False,
            client_host: str | None = None) -> dict[str, str]:
    """Every key starting with ``prefix`` and its value, read through ``via`` or the first
    member that answers. Linearizable unless ``serializable`` (then it is what that member has
    applied, which is how to read one member alone). Read ``page`` keys a request, each page
    at its own revision; the first page's revision pins the rest, so the whole is one view."""
    netns = _client_netns(lab, cluster, client_host)
    targets = [cluster.member(via)] if via else list(cluster.members)
    errors = []
    for m in targets:
        try:
            return _range_all(netns, m, prefix, timeout=timeout, page=page,
                              serializable=serializable)
        except REQUEST_ERRORS as err:
            errors.append(f"{m.name}: {_errtext(err)}")
    raise EtcdError(f"cannot read {prefix!r}*: " + "; ".join(errors))


def _range_all(netns: str | None, member: EtcdMember, prefix: str, *, timeout: float,
               page: int, serializable: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    start = prefix.encode()
    end = prefix_end(prefix)
    revision = 0
    while True:
        body: dict[str, Any] = {"key": b64(start), "range_end": b64(end), "limit": page}
        if revision:
            body["revision"] = revision
        if serializable:
            body["serializable"] = True
        reply = _post(netns, member.client_url, "/v3/kv/range", body, timeout=timeout)
        if not revision:
            revision = _uint(reply.get("header", {}), "revision") or 0
        kvs = reply.get("kvs", [])
        for kv in kvs:
            out[unb64(kv["key"]).decode()] = unb64(kv.get("value", "")).decode()
        if not reply.get("more") or not kvs:
            return out
        start = unb64(kvs[-1]["key"]) + b"\x00"  # the next key after the last one read


def member_list(lab: Lab, cluster: EtcdCluster, *, via: str | None = None,
                timeout: float = 2.0, client_host: str | None = None) -> dict[str, int]:
    """{name: member id} as the cluster's membership says (through ``via`` or the first
    member that answers)."""
    netns = _client_netns(lab, cluster, client_host)
    errors = []
    for m in [cluster.member(via)] if via else list(cluster.members):
        try:
            reply = _post(netns, m.client_url, "/v3/cluster/member/list", {}, timeout=timeout)
            return {str(x.get("name", "")): int(x["ID"]) for x in reply.get("members", [])}
        except REQUEST_ERRORS as err:
            errors.append(f"{m.name}: {_errtext(err)}")
    raise EtcdError("cannot list the members: " + "; ".join(errors))


# --- status -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberState:
    """What one member said of itself (``/v3/maintenance/status``), or why it said nothing."""

    name: str
    reachable: bool
    at: float  # time.time() of the answer (or of the failure)
    member_id: int | None = None
    leader_id: int | None = None  # None or 0: it knows no leader
    raft_term: int | None = None
    raft_index: int | None = None
    applied_index: int | None = None
    revision: int | None = None
    db_size: int | None = None
    version: str | None = None
    error: str | None = None

    @classmethod
    def of_reply(cls, name: str, reply: Mapping[str, Any], at: float) -> MemberState:
        header = reply.get("header", {})
        return cls(name=name, reachable=True, at=at,
                   member_id=_uint(header, "member_id", "memberId"),
                   leader_id=_uint(reply, "leader"),
                   raft_term=_uint(reply, "raftTerm", "raft_term"),
                   raft_index=_uint(reply, "raftIndex", "raft_index"),
                   applied_index=_uint(reply, "raftAppliedIndex", "raft_applied_index"),
                   revision=_uint(header, "revision"),
                   db_size=_uint(reply, "dbSize", "db_size"),
                   version=reply.get("version"))

    def line(self) -> str:
        if not self.reachable:
            return f"{self.name}: unreachable ({self.error})"
        return (f"{self.name}: id {self.member_id:x} leader {self.leader_id or 0:x} "
                f"term {self.raft_term} index {self.raft_index} rev {self.revision}")


@dataclass(frozen=True)
class ClusterState:
    members: tuple[MemberState, ...]
    at: float

    def member(self, name: str) -> MemberState:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def reachable(self) -> list[MemberState]:
        return [m for m in self.members if m.reachable]

    def leaders(self) -> set[int]:
        """The leader ids the reachable members report (0, no leader known, included)."""
        return {m.leader_id or 0 for m in self.reachable}

    def terms(self) -> set[int]:
        return {m.raft_term or 0 for m in self.reachable}

    def leader(self) -> int | None:
        """The leader every reachable member agrees on, or None (none reachable, one without a
        leader, or two opinions)."""
        found = self.leaders()
        return next(iter(found)) if len(found) == 1 and 0 not in found else None

    def leader_name(self) -> str | None:
        lid = self.leader()
        return next((m.name for m in self.members if lid and m.member_id == lid), None)

    def term(self) -> int | None:
        """The highest raft term any reachable member reports: it only grows, by at least one
        per election (and per failed campaign), so two states' terms tell if one happened."""
        return max(self.terms()) if self.reachable else None

    def healthy(self) -> bool:
        """Every member answers, all agree on one leader that is one of them, and on one
        term."""
        lid = self.leader()
        return (bool(self.members) and len(self.reachable) == len(self.members)
                and lid is not None and any(m.member_id == lid for m in self.members)
                and len(self.terms()) == 1)

    def describe(self) -> str:
        return "; ".join(m.line() for m in self.members)


def member_status(lab: Lab, cluster: EtcdCluster, member: EtcdMember | str, *,
                  timeout: float = REQUEST_TIMEOUT, client_host: str | None = None) -> MemberState:
    m = cluster.member(member) if isinstance(member, str) else member
    netns = _client_netns(lab, cluster, client_host)
    try:
        reply = _post(netns, m.client_url, "/v3/maintenance/status", {}, timeout=timeout)
    except REQUEST_ERRORS as err:
        return MemberState(m.name, False, time.time(), error=_errtext(err))
    return MemberState.of_reply(m.name, reply, time.time())


def status(lab: Lab, cluster: EtcdCluster, *, timeout: float = REQUEST_TIMEOUT,
           client_host: str | None = None) -> ClusterState:
    """Every member asked at once (a frozen member costs ``timeout``, not one per member)."""
    with ThreadPoolExecutor(max_workers=len(cluster.members)) as pool:
        states = list(pool.map(lambda m: member_status(lab, cluster, m, timeout=timeout,
                                                       client_host=client_host),
                               cluster.members))
    return ClusterState(tuple(states), time.time())


def elections_between(before: ClusterState, after: ClusterState) -> int:
    """How much the raft term grew from ``before`` to ``after``: 0 means no election (nor a
    campaign) happened between them; the leader may be the same after one. ValueError if a
    state has no term (no member answered)."""
    t0, t1 = before.term(), after.term()
    if t0 is None or t1 is None:
        raise ValueError("no member answered: no term to compare")
    return max(0, t1 - t0)


def wait_healthy(lab: Lab, cluster: EtcdCluster, *, timeout: float = 30.0,
                 probe_put: bool = True, interval: float = 0.1,
                 client_host: str | None = None,
                 check: Callable[[], None] | None = None) -> ClusterState:
    """Wait until ``status`` is healthy and (``probe_put``) a put through the leader is
    acknowledged: a leader that every member reports may still not have quorum. ``check`` is
    called each round (raise to give up early). OperationTimeout with the last state."""
    deadline = time.monotonic() + timeout
    last: ClusterState | None = None
    why = "no answer yet"
    while True:
        if check is not None:
            check()
        last = status(lab, cluster, client_host=client_host)
        if last.healthy():
            if not probe_put:
                return last
            try:
                put(lab, cluster, "orthros/probe", str(time.time()), via=last.leader_name(),
                    timeout=max(REQUEST_TIMEOUT, 2.0), client_host=client_host)
                return last
            except EtcdError as err:
                why = f"healthy, but a put failed: {err}"
        else:
            why = last.describe()
        if time.monotonic() >= deadline:
            raise OperationTimeout(f"the etcd cluster was not healthy within {timeout:g} s: "
                                   f"{why}", stage="etcd start")
        time.sleep(interval)


# --- processes ----------------------------------------------------------------------------------


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None:
        return "(no log)"
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError as err:
        return f"(cannot read {path}: {err})"
    tail = text[-lines:]
    # A Go panic's reason comes before a stack trace longer than any tail: keep it in view.
    why = [ln for ln in text[:-lines] if ln.startswith(("panic:", "fatal error:"))
           or '"level":"fatal"' in ln or '"level":"panic"' in ln][:1]
    return "\n".join([*why, *(["..."] if why else []), *tail]) or "(empty log)"


def _is_member(proc: psutil.Process, cluster: EtcdCluster,
               member: EtcdMember | None = None) -> bool:
    """``proc`` is an etcd of ``cluster`` (of ``member``, if given): its command line has the
    cluster's token (and the member's name)."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return False
    if cmd and os.path.basename(cmd[0]) == "unshare" and "--" in cmd:
        cmd = cmd[cmd.index("--") + 1:]  # spawned a moment ago: not exec'd into etcd yet
    if not cmd or os.path.basename(cmd[0]) != ETCD:
        return False

    def opt(flag: str) -> str | None:
        return cmd[cmd.index(flag) + 1] if flag in cmd[:-1] else None

    return (opt("--initial-cluster-token") == cluster.token
            and (member is None or opt("--name") == member.name))


def member_pid(lab: Lab, cluster: EtcdCluster, member: EtcdMember | str) -> int | None:
    """The machine pid of ``member``'s etcd now, alive (not a zombie), or None. After a
    restore it is another machine pid (CRIU keeps the pid its host sees)."""
    m = cluster.member(member) if isinstance(member, str) else member
    candidates = []
    if m.process is not None:
        candidates.append(lab.machine_pid(m.host, m.process.host_pid))
        candidates.append(m.process.machine_pid)
    for pid in candidates:
        if pid is None:
            continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE and _is_member(proc, cluster, m):
                return pid
    return None


def cluster_processes(cluster: EtcdCluster) -> list[psutil.Process]:
    """Every process on this machine that is an etcd of ``cluster`` (zombies included)."""
    found = []
    for proc in psutil.process_iter():
        if _is_member(proc, cluster):
            found.append(proc)
    return found


def time_namespace(pid: int) -> int:
    """The inode of ``pid``'s time namespace."""
    return os.stat(f"/proc/{pid}/ns/time").st_ino


@dataclass(frozen=True)
class MemoryUse:
    """What drives the cost of dumping one member: resident and mapped size, threads."""

    rss_kib: int
    vmsize_kib: int
    threads: int

    @classmethod
    def of(cls, pid: int) -> MemoryUse:
        fields: dict[str, str] = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            fields[k] = v.strip()
        return cls(rss_kib=int(fields["VmRSS"].split()[0]),
                   vmsize_kib=int(fields["VmSize"].split()[0]),
                   threads=int(fields["Threads"]))


def memory(lab: Lab, cluster: EtcdCluster) -> dict[str, MemoryUse]:
    """{member name: MemoryUse} of the members alive now."""
    out = {}
    for m in cluster.members:
        pid = member_pid(lab, cluster, m)
        if pid is not None:
            with contextlib.suppress(OSError, KeyError):
                out[m.name] = MemoryUse.of(pid)
    return out


def stop_cluster(lab: Lab | None, cluster: EtcdCluster, *, timeout: float = 10.0) -> list[int]:
    """SIGKILL every etcd of ``cluster`` on this machine (also restored or duplicate copies,
    stopped or frozen ones) and wait until each is gone or a zombie (its host's init reaps it);
    the machine pids killed. Idempotent. ``lab`` is unused: kept so that every call here
    reads alike, and a lab already down does not stop the cleanup."""
    del lab
    procs = cluster_processes(cluster)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + timeout
    left = procs
    while left:
        left = [p for p in left if _alive(p)]
        if not left:
            break
        if time.monotonic() >= deadline:
            raise EtcdError(f"etcd processes survived SIGKILL: {[p.pid for p in left]}",
                            stage="etcd stop")
        time.sleep(0.02)
    return [p.pid for p in procs]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _prepare_dir(lab: Lab, host: str, path: Path, *, reuse: bool) -> None:
    """Make ``path`` (0700, as etcd wants its data dir) and check that the host sees the very
    same directory: a lab host's mount namespace is a private copy made at ``lab up``, so a
    file system mounted on the machine later (a btrfs for snapshots) is not there, and etcd
    would silently write to the directory under it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not reuse and any(path.iterdir()):
        raise EtcdError(f"the data directory {path} is not empty: etcd would restart from it, "
                        f"not make a new cluster", host=host, stage="etcd start")
    init = lab.host(host).init_pid
    if init is None:
        return
    mine = os.stat(path)
    try:
        theirs = os.stat(f"/proc/{init}/root{path.resolve()}")
    except OSError as err:
        raise EtcdError(f"lab host {host} does not see {path}: {err}", host=host,
                        stage="etcd start",
                        hint="make it before `lab up`, or on a file system the lab sees") from err
    if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
        raise EtcdError(f"lab host {host} sees another directory at {path} (mounted after the "
                        f"lab came up?)", host=host, stage="etcd start",
                        hint="mount it before `orthros lab up`, or mount it in the host too")


def start_cluster(lab: Lab, hosts: Sequence[str], *, data_root: Path,
                  data_dirs: Mapping[str, Path] | None = None, log_dir: Path | None = None,
                  heartbeat_ms: int = 100, election_ms: int = 500, timeout: float = 60.0,
                  token: str | None = None, client_host: str | None = None,
                  reuse_data: bool = False, **argv_options: Any) -> EtcdCluster:
    """One member per host of ``hosts`` (named as the host), data in ``data_dirs[host]`` or
    ``data_root/HOST``, logs in ``log_dir`` (``data_root/logs``) as ``HOST.log``, kept out of the
    data dirs so that putting a data dir back (a snapshot) does not roll its log back too.
    Returns once healthy (``wait_healthy``); on failure kills what it started and raises
    EtcdError with every member's state and log tail. ``argv_options`` go to ``etcd_argv``."""
    if len(set(hosts)) != len(hosts) or not hosts:
        raise ValueError(f"one member per host, at least one: {list(hosts)}")
    for exe in ("unshare", ETCD):
        if shutil.which(exe) is None:
            raise EtcdError(f"{exe} is not installed", stage="etcd start",
                            hint="apt-get install etcd-server util-linux")
    logs = log_dir or data_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    members = []
    for h in hosts:
        lh = lab.host(h)
        ddir = Path(data_dirs[h]) if data_dirs and h in data_dirs else data_root / h
        _prepare_dir(lab, h, ddir, reuse=reuse_data)
        members.append(EtcdMember(name=lh.name, host=lh.name, address=lh.address,
                                  data_dir=ddir, log=logs / f"{lh.name}.log"))
    cluster = EtcdCluster(tuple(members), token or f"orthros-{secrets.token_hex(6)}",
                          heartbeat_ms=heartbeat_ms, election_ms=election_ms,
                          client_host=client_host or lab.client.name)
    argvs = [etcd_argv(m, cluster, heartbeat_ms=heartbeat_ms, election_ms=election_ms,
                       data_dir=m.data_dir, **argv_options) for m in members]
    t0 = time.monotonic()
    started = []
    try:
        for m, argv in zip(members, argvs, strict=True):
            # cwd "/": a checkpoint holds the cwd, and "/" is there on every host.
            proc = lab.spawn(m.host, argv, log=m.log, cwd="/")
            started.append(dataclasses.replace(m, process=proc))
        cluster = EtcdCluster(tuple(started), cluster.token, heartbeat_ms, election_ms,
                              cluster.client_host)

        def all_alive() -> None:
            for m in cluster.members:
                if member_pid(lab, cluster, m) is None:
                    raise EtcdError(f"etcd member {m.name} exited", host=m.host,
                                    stage="etcd start")

        wait_healthy(lab, cluster, timeout=max(0.0, timeout - (time.monotonic() - t0)),
                     check=all_alive)
    except BaseException as err:
        state = ""
        if started:
            with contextlib.suppress(Exception):
                state = status(lab, cluster).describe()
            stop_cluster(lab, cluster)
        if not isinstance(err, OrthrosError):
            raise
        tails = "\n".join(f"--- {m.name} ({m.log}):\n{log_tail(m.log)}" for m in members)
        raise EtcdError(f"the etcd cluster did not start: {err}\nstate: {state or '-'}\n{tails}",
                        stage="etcd start") from err
    return EtcdCluster(cluster.members, cluster.token, heartbeat_ms, election_ms,
                       cluster.client_host, start_seconds=time.monotonic() - t0)


# --- the writer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    key: str
    value: str
    member: str  # who acknowledged it
    revision: int
    sent: float  # time.time() when the put that succeeded was sent
    acked: float  # time.time() when its answer came


@dataclass(frozen=True)
class Failure:
    key: str
    member: str
    error: str
    sent: float
    at: float  # time.time() when it failed


@dataclass(frozen=True)
class WriterReport:
    acked: tuple[Ack, ...]
    failures: tuple[Failure, ...]
    # The key being tried when the writer stopped, never acknowledged: it may or may not be in
    # the cluster (a put that timed out may still have been committed).
    pending: str | None
    started: float
    stopped: float | None  # None: a report of a writer still running

    @property
    def acked_keys(self) -> list[str]:
        return [a.key for a in self.acked]

    @property
    def last_acked(self) -> Ack | None:
        return self.acked[-1] if self.acked else None

    def values(self) -> dict[str, str]:
        """{key: value} of every acknowledged put: what the cluster must hold."""
        return {a.key: a.value for a in self.acked}

    def max_gap(self) -> float:
        """The longest time between two consecutive acknowledgements (from the start for the
        first): how long the cluster was unavailable to this writer at worst."""
        times = [self.started, *(a.acked for a in self.acked)]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def acked_between(self, t0: float, t1: float) -> list[Ack]:
        return [a for a in self.acked if t0 <= a.acked < t1]


class Writer:
    """Puts ``k/000001``, ``k/000002``, ... one at a time from ``client_host`` (the lab's
    client), through the members in turn (``rotate``) or through one until it fails; a key that
    fails is retried on the next member after ``backoff`` until acknowledged or stopped.
    ``interval`` paces the puts (0: as fast as acknowledged). Nothing a member does makes the
    thread end: every failure is recorded."""

    def __init__(self, lab: Lab, cluster: EtcdCluster, *, prefix: str = "k/", width: int = 6,
                 value_size: int = 16, timeout: float = REQUEST_TIMEOUT, rotate: bool = True,
                 interval: float = 0.0, backoff: float = 0.05, first: int = 1,
                 client_host: str | None = None) -> None:
        self.lab, self.cluster = lab, cluster
        self.prefix, self.width, self.value_size = prefix, width, value_size
        self.timeout, self.rotate = timeout, rotate
        self.interval, self.backoff = interval, backoff
        self.netns = _client_netns(lab, cluster, client_host)
        self._seq = first
        self._target = 0
        self._acked: list[Ack] = []
        self._failures: list[Failure] = []
        self._pending: str | None = None
        self._started = 0.0
        self._stopped: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._run_ok = threading.Event()  # cleared while paused
        self._run_ok.set()
        self._idle = threading.Event()  # set while paused and no put is in flight
        self._thread: threading.Thread | None = None
        self.crash: BaseException | None = None  # only a bug of this class ends up here

    def __enter__(self) -> Writer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Writer:
        if self._thread is not None:
            raise RuntimeError("the writer was started already")
        self._started = time.time()
        self._thread = threading.Thread(target=self._main, daemon=True, name="etcd-writer")
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            # The whole thread in the client's namespace: every socket it makes is there.
            with in_netns(self.netns):
                self._loop()
        except BaseException as err:
            self.crash = err
            self._idle.set()

    def _loop(self) -> None:
        members = self.cluster.members
        while not self._stop.is_set():
            if not self._run_ok.is_set():
                self._idle.set()
                while not self._run_ok.wait(0.05):
                    if self._stop.is_set():
                        return
                self._idle.clear()
                continue
            key, value = key_name(self._seq, self.prefix, self.width), value_for(
                self._seq, self.value_size)
            m = members[self._target % len(members)]
            with self._lock:
                self._pending = key
            sent = time.time()
            try:
                rev = _put_one(None, m, key, value, timeout=self.timeout)
            except Exception as err:  # a frozen/dead/leaderless member: recorded, not fatal
                with self._lock:
                    self._failures.append(Failure(key, m.name, _errtext(err), sent, time.time()))
                self._target += 1  # the next member, whatever the mode
                self._stop.wait(self.backoff)
                continue
            with self._lock:
                self._acked.append(Ack(key, value, m.name, rev, sent, time.time()))
                self._pending = None
            self._seq += 1
            if self.rotate:
                self._target += 1
            if self.interval:
                self._stop.wait(self.interval)

    def pause(self, timeout: float = 10.0) -> None:
        """Stop writing, and return once no put is in flight (at most one request's timeout
        later): then the acknowledged keys are all the writer will have written."""
        self._run_ok.clear()
        if self._thread is None or not self._thread.is_alive():
            return
        if not self._idle.wait(timeout):
            raise OperationTimeout(f"the etcd writer did not pause within {timeout:g} s")

    def resume(self) -> None:
        self._idle.clear()
        self._run_ok.set()

    def acked_so_far(self) -> int:
        with self._lock:
            return len(self._acked)

    def wait_acked(self, n: int, timeout: float = 30.0) -> None:
        """Until at least ``n`` keys are acknowledged (OperationTimeout otherwise)."""
        deadline = time.monotonic() + timeout
        while self.acked_so_far() < n:
            if time.monotonic() >= deadline or self.crash is not None:
                raise OperationTimeout(f"the etcd writer got {self.acked_so_far()} of {n} "
                                       f"acknowledgements in {timeout:g} s")
            time.sleep(0.01)

    def wait_acked_after(self, t: float, timeout: float = 30.0) -> None:
        """Until a key is acknowledged at or after wall-clock time ``t`` (OperationTimeout
        otherwise): a put caught by a freeze may only time out and be retried after it."""
        deadline = time.monotonic() + timeout
        while not self.report().acked_between(t, float("inf")):
            if time.monotonic() >= deadline or self.crash is not None:
                raise OperationTimeout(f"the etcd writer got no acknowledgement in the "
                                       f"{timeout:g} s after {t:.3f}")
            time.sleep(0.01)

    def report(self) -> WriterReport:
        """What the writer saw so far (it may go on)."""
        with self._lock:
            return WriterReport(tuple(self._acked), tuple(self._failures), self._pending,
                                self._started, self._stopped)

    def stop(self, timeout: float | None = None) -> WriterReport:
        """Stop (a put in flight ends within its timeout) and report. Idempotent."""
        self._stop.set()
        self._run_ok.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.timeout * 3 + 5)
            if self._thread.is_alive():
                raise OperationTimeout("the etcd writer did not stop")
        if self.crash is not None:
            raise RuntimeError(f"the etcd writer crashed: {self.crash!r}") from self.crash
        with self._lock:
            if self._stopped is None:
                self._stopped = time.time()
        return self.report()


@contextlib.contextmanager
def running_cluster(lab: Lab, hosts: Sequence[str], **kwargs: Any) -> Iterator[EtcdCluster]:
    """``start_cluster`` for the body, ``stop_cluster`` after it, also on failure."""
    cluster = start_cluster(lab, hosts, **kwargs)
    try:
        yield cluster
    finally:
        stop_cluster(lab, cluster)


__all__ = [
    "Ack", "ClusterState", "EtcdCluster", "EtcdError", "EtcdMember", "Failure", "MemberState",
    "MemoryUse", "Writer", "WriterReport", "b64", "client_url", "cluster_processes",
    "elections_between", "etcd_argv", "get_all", "initial_cluster", "key_name", "log_tail",
    "member_list", "member_pid", "member_status", "memory", "parse_reply", "peer_url",
    "prefix_end", "put", "running_cluster", "split_url", "start_cluster", "status",
    "stop_cluster", "time_namespace", "unb64", "value_for", "wait_healthy",
]
