"""The sync benchmark's runner: ``SyncBench`` mounts a btrfs volume (``volume``), builds a lab of
three hosts (alpha, beta, gamma) and the client, and for each heartbeat interval starts a
3-member etcd cluster on it (``orthros_py.workloads.etcd``: one member per host under
``unshare --time``, its data directory on the btrfs) with a writer on the client host, then
measures rounds through the sync policy (``orthros_py.policies.sync``):

1. per heartbeat, ``reps`` rounds of: ``SyncSave(..., leave_running=True)``, the writer writes,
   ``SyncRestore`` of that snapshot, the cluster looked at at once and a moment later; whether
   the raft term grew (an election) across the save and across the restore; the times, the
   skews, the sizes, the writer's longest gap; the snapshot deleted;
2. the control: on a cluster at ``stagger_heartbeat_ms``, restores whose members resume
   ``stagger`` ms apart in turn, every stagger once per round in a shuffled order; a cluster
   that elected is waited for before the next round.

Interfaces: the lab (namespaces, its hosts' init to spawn etcd), etcd's HTTP gateway, the
agents through the sync policy, the btrfs volume (mkfs.btrfs, losetup, mount). Needs root.
Nothing here prints: progress goes to a callback, results to files in the output directory.
etcd is stopped, the snapshots deleted, the lab torn down and the volume released at the end,
also on Ctrl-C or failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import platform
import random
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orthros_py.bench.labkit import keep_agent_logs, recorded, wait_until
from orthros_py.bench.labkit import reason as _reason
from orthros_py.bench.sync.model import (
    HEARTBEAT,
    BenchConfig,
    BenchResults,
    PlannedRound,
    SyncRound,
    count_campaigns,
    log_events,
    longest_gap,
    member_facts,
    plan,
    stamps_us,
)
from orthros_py.bench.sync.report import notes_for, write_outputs
from orthros_py.bench.sync.volume import Volume, btrfs_volume, sweep_stale
from orthros_py.errors import MissingFeatureError, NotRootError, OrthrosError
from orthros_py.workloads import etcd

if TYPE_CHECKING:
    from orthros_py.lab import Lab
    from orthros_py.policies.hosts import Host
    from orthros_py.policies.sync import MemberSpec, SyncReport

HOSTS = ("alpha", "beta", "gamma")
LAB_HOSTS = len(HOSTS)
WARMUP = "warmup"
# etcd at info level: raft's lines about campaigns and leaders are info (what a round with an
# election is explained by); quiet otherwise.
ETCD_LOG_LEVEL = "info"
Progress = Callable[[str], None]
OnRound = Callable[[SyncRound, int, int], None]


def default_out() -> Path:
    return Path("results") / f"sync-{datetime.now():%Y%m%d-%H%M%S}"


def _tool(name: str) -> str:
    exe = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if exe is None:
        raise MissingFeatureError(f"{name} is not installed (the benchmark needs it)",
                                  hint="apt-get install etcd-server util-linux btrfs-progs")
    return exe


def watch_s(configured: float, election_ms: int) -> float:
    """How long to watch the cluster after an operation: ``configured``, but at least two
    election timeouts (raft's randomized timeout lies in [1, 2) of it), so that an election the
    operation set off has happened by then."""
    return max(configured, 2 * election_ms / 1000)


@dataclass
class _Cluster:
    """One cluster and what its rounds share."""

    key: tuple[str, int]
    tag: str
    heartbeat_ms: int
    election_ms: int
    data_root: Path
    cluster: etcd.EtcdCluster | None = None
    members: list[MemberSpec] = field(default_factory=list)
    writer: etcd.Writer | None = None
    error: str | None = None  # it did not start: every round of it fails with this
    info: dict[str, Any] = field(default_factory=dict)


class SyncBench:
    """Runs both sweeps; ``run()`` returns the results and has written them to ``config.out``
    (also when it is interrupted: then partial, and marked so)."""

    def __init__(self, config: BenchConfig, *, progress: Progress | None = None,
                 on_round: OnRound | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda _m: None)
        self.on_round = on_round or (lambda _r, _i, _n: None)
        self.seed = config.seed if config.seed is not None else random.randrange(2**31)
        self.results = BenchResults(config, seed=self.seed)
        self.lab: Lab | None = None
        self.volume: Volume | None = None
        self.hosts: dict[str, Host] = {}
        self.ctx: _Cluster | None = None
        self._n = 0
        self._warm = False

    # -- setup ------------------------------------------------------------------------------

    def preflight(self) -> None:
        if os.geteuid() != 0:
            raise NotRootError("the benchmark needs root (the lab, CRIU, a loop device)",
                               hint="run it with sudo")
        for name in ("etcd", "unshare", "nsenter", "mkfs.btrfs", "losetup", "mount", "umount"):
            _tool(name)

    @contextlib.contextmanager
    def _lab(self) -> Iterator[Lab]:
        from orthros_py.cluster import Cluster
        from orthros_py.lab import Lab, teardown
        from orthros_py.policies.hosts import Host

        try:
            self.progress(f"building the lab ({LAB_HOSTS} hosts and the client)")
            self.lab = Lab.up(LAB_HOSTS, rebuild=True)
            cluster = Cluster.of_lab(self.lab)
            self.hosts = {h.name: Host.of(cluster, h.name) for h in self.lab.hosts}
            yield self.lab
        finally:
            try:
                self._close_cluster()
            finally:
                keep_agent_logs(self.lab, self.config.out / "logs")
                self.lab = None
                self.progress("tearing the lab down")
                teardown()

    def _environment(self) -> dict[str, Any]:
        from orthros_py.run import run

        env: dict[str, Any] = {"kernel": platform.release(),
                               "cpus": len(os.sched_getaffinity(0))}
        with contextlib.suppress(OrthrosError, OSError):
            env["etcd"] = run([_tool("etcd"), "--version"]).stdout.splitlines()[0].strip()
        with contextlib.suppress(OrthrosError, OSError):
            env["btrfs"] = run([_tool("mkfs.btrfs"), "--version"]).stdout.strip()
        with contextlib.suppress(OrthrosError, OSError, StopIteration):
            env["criu"] = next(iter(self.hosts.values())).agent.status().get("criu")
        if self.volume is not None:
            env["volume"] = self.volume.to_dict()
        return env

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> BenchResults:
        from orthros_py.lab import teardown

        self.preflight()
        cfg, res = self.config, self.results
        with recorded(res, cfg.out, notes_for, write_outputs):
            try:
                # Whatever a killed run left: its lab first (its hosts hold the volume's
                # mount), then its volume.
                teardown()
                res.leftovers += sweep_stale()
                with btrfs_volume(cfg.volume_mib) as vol:
                    self.volume = vol
                    self.progress(f"btrfs volume of {cfg.volume_mib:,} MiB at {vol.mount} "
                                  f"({vol.loop})")
                    with self._lab():
                        res.env = self._environment()
                        self._rounds()
            finally:
                if self.volume is not None:
                    res.leftovers += [f"volume: {p}" for p in self.volume.problems]
        return res

    def _save(self) -> None:
        with contextlib.suppress(Exception):
            write_outputs(self.results, self.config.out, plots=False)  # a long run keeps it

    def _rounds(self) -> None:
        rounds = plan(self.config, self.seed)
        for i, item in enumerate(rounds, 1):
            if self.ctx is None or self.ctx.key != item.cluster_key:
                self._close_cluster()
                self._open_cluster(item)
            assert self.ctx is not None
            if not self._warm and self.ctx.error is None:
                self._warmup()
            rec = self._one_round(item, i)
            self.results.rounds.append(rec)
            self.ctx.info["rounds"] = self.ctx.info.get("rounds", 0) + 1
            self.on_round(rec, i, len(rounds))
            self._save()
            if not rec.ok and self.ctx.error is None:
                self._restart_cluster(item, rec.error or "a round failed")
        self._close_cluster()

    # -- clusters --------------------------------------------------------------------------------

    def _open_cluster(self, item: PlannedRound) -> None:
        assert self.lab is not None and self.volume is not None
        cfg = self.config
        self._n += 1
        hb = item.heartbeat_ms
        tag = (f"hb{hb}" if item.part == HEARTBEAT else f"stagger-hb{hb}") + \
            (f"-{self._n}" if any(c.get("heartbeat_ms") == hb and c.get("part") == item.part
                                  for c in self.results.clusters) else "")
        ctx = _Cluster(item.cluster_key, tag, hb, cfg.election_ms(hb),
                       self.volume.mount / f"c{self._n}-{tag}")
        self.ctx = ctx
        ctx.info = {"tag": tag, "part": item.part, "heartbeat_ms": hb,
                    "election_ms": ctx.election_ms, "data_root": str(ctx.data_root),
                    "rounds": 0}
        self.results.clusters.append(ctx.info)
        self.progress(f"starting etcd: heartbeat {hb} ms, election timeout "
                      f"{ctx.election_ms} ms ({tag})")
        try:
            dirs = {h: ctx.data_root / h for h in HOSTS}
            ctx.cluster = etcd.start_cluster(
                self.lab, HOSTS, data_root=ctx.data_root, data_dirs=dirs,
                log_dir=(cfg.out / "logs" / tag).resolve(), heartbeat_ms=hb,
                election_ms=ctx.election_ms, timeout=60 + 4 * ctx.election_ms / 1000,
                log_level=ETCD_LOG_LEVEL)
            ctx.info["start_s"] = round(ctx.cluster.start_seconds or 0.0, 2)
            ctx.info["token"] = ctx.cluster.token
            from orthros_py.policies.sync import parse_members

            ctx.members = parse_members(
                [f"{m.host}:{m.process.host_pid}" for m in ctx.cluster.members
                 if m.process is not None],
                [f"{m.host}:{dirs[m.host]}" for m in ctx.cluster.members])
            ctx.writer = etcd.Writer(self.lab, ctx.cluster).start()
            ctx.writer.wait_acked(50, timeout=30)
            mem = etcd.memory(self.lab, ctx.cluster)
            ctx.info["rss_kib"] = {k: v.rss_kib for k, v in mem.items()}
            ctx.info["threads"] = {k: v.threads for k, v in mem.items()}
        except (OrthrosError, OSError, ValueError) as err:
            ctx.error = f"the cluster did not start: {_reason(err)}"
            ctx.info["error"] = ctx.error
            self.progress(ctx.error)

    def _close_cluster(self) -> None:
        """The writer stopped, the cluster's etcd killed everywhere, its data removed (the
        volume holds a few clusters' preallocated WALs at most)."""
        ctx, self.ctx = self.ctx, None
        if ctx is None:
            return
        if ctx.writer is not None:
            try:
                ctx.writer.stop()
            except (OrthrosError, RuntimeError) as err:
                self.results.leftovers.append(f"{ctx.tag}: the writer: {_reason(err)}")
        if ctx.cluster is not None:
            try:
                etcd.stop_cluster(self.lab, ctx.cluster)
            except OrthrosError as err:
                self.results.leftovers.append(f"{ctx.tag}: {_reason(err)}")
        shutil.rmtree(ctx.data_root, ignore_errors=True)

    def _restart_cluster(self, item: PlannedRound, why: str) -> None:
        self.progress(f"the round failed ({why}): a fresh cluster for the next one")
        self._close_cluster()
        self._open_cluster(item)

    def _warmup(self) -> None:
        """One save and restore, not recorded: the first one loads the XDP lock's program on
        every host, which would be counted in the first round's save."""
        ctx = self.ctx
        assert ctx is not None and ctx.cluster is not None and self.lab is not None
        from orthros_py.policies.sync import SyncRestore, SyncSave, delete_snapshot

        self._warm = True
        self.progress("warming up: one save and restore, not recorded")
        t0 = time.monotonic()
        saved = False
        try:
            etcd.wait_healthy(self.lab, ctx.cluster, timeout=self.config.recover_timeout_s)
            SyncSave(self.hosts, WARMUP, ctx.members, leave_running=True).run()
            saved = True
            SyncRestore(self.hosts, WARMUP).run()
            etcd.wait_healthy(self.lab, ctx.cluster, timeout=self.config.recover_timeout_s)
            self.results.env["warmup_s"] = round(time.monotonic() - t0, 1)
        except (OrthrosError, OSError, ValueError) as err:
            self.results.env["warmup_error"] = _reason(err)
            self.progress(f"warm-up failed: {_reason(err)}")
        finally:
            if saved:
                with contextlib.suppress(OrthrosError, OSError):
                    delete_snapshot(list(self.hosts.values()), WARMUP)

    # -- one round ---------------------------------------------------------------------------------

    def _one_round(self, item: PlannedRound, seq: int) -> SyncRound:
        from orthros_py.policies.sync import SyncRestore, SyncSave, delete_snapshot

        ctx = self.ctx
        assert ctx is not None and self.lab is not None
        cfg = self.config
        rec = SyncRound(item.part, item.heartbeat_ms, ctx.election_ms, item.stagger_ms,
                        item.rep, seq, item.name)
        self.progress(f"[{seq}] {item.name}: save, {cfg.write_s:g} s of writes, restore"
                      + (f" (members resumed {item.stagger_ms} ms apart)" if item.stagger_ms
                         else ""))
        if ctx.error is not None or ctx.cluster is None or ctx.writer is None:
            rec.error, rec.stage = ctx.error or "no cluster", "cluster start"
            return rec
        lab, cluster, writer = self.lab, ctx.cluster, ctx.writer
        started = time.monotonic()
        stage = "before the save"
        saved = False
        try:
            if item.leader_position is not None:
                stage = "moving the leader"
                order = sorted(m.host for m in ctx.members)
                self._move_leader(ctx, order[item.leader_position % len(order)])
                stage = "before the save"
            etcd.wait_healthy(lab, cluster, timeout=cfg.recover_timeout_s)
            before = self._committed(ctx)
            if not before.healthy():
                raise OrthrosError(f"the cluster was not healthy before the save: "
                                   f"{before.describe()}")
            rec.term_before, rec.leader_before = before.term(), before.leader_name()

            stage = "save"
            rec.t_save = time.time()
            saved_rep = SyncSave(self.hosts, item.name, ctx.members, leave_running=True).run()
            saved = True
            t_saved = time.time()
            after = etcd.status(lab, cluster)
            rec.term_after_save, rec.leader_after_save = after.term(), after.leader_name()
            self._save_facts(rec, saved_rep)

            stage = "writes"
            time.sleep(max(0.0, watch_s(cfg.write_s, ctx.election_ms)
                           - (time.time() - t_saved)))
            # The restore must have writes to undo: a put the freeze caught may time out and be
            # retried only after the window, so wait for one acknowledged since the save.
            writer.wait_acked_after(t_saved, timeout=cfg.recover_timeout_s)
            pre = self._committed(ctx)
            rec.term_before_restore = pre.term()
            rec.leader_before_restore = pre.leader_name()

            stage = "restore"
            rec.t_restore = time.time()
            restored = SyncRestore(self.hosts, item.name, stagger_ms=item.stagger_ms).run()
            t_restored = time.time()

            stage = "after the restore"
            now = etcd.status(lab, cluster)
            rec.term_after_restore, rec.leader_after_restore = now.term(), now.leader_name()
            rec.healthy_after_restore = now.healthy()
            self._restore_facts(rec, saved_rep, restored)
            time.sleep(max(0.0, watch_s(cfg.settle_s, ctx.election_ms)
                           - (time.time() - t_restored)))
            settled = self._committed(ctx)
            rec.term_settled, rec.leader_settled = settled.term(), settled.leader_name()
            rec.healthy_settled = settled.healthy()
            if not rec.healthy_settled:
                stage = "waiting for the cluster to be healthy again"
                etcd.wait_healthy(lab, cluster, timeout=cfg.recover_timeout_s)
                rec.recovered_s = round(time.time() - t_restored, 3)
                rec.term_recovered = self._committed(ctx).term()
            rec.t_end = time.time()
            rec.campaigns_save = self._campaigns(ctx, rec.t_save, rec.t_restore)
            rec.campaigns_restore = self._campaigns(ctx, rec.t_restore, rec.t_end)

            report = writer.report()
            acks = [a.acked for a in report.acked]
            rec.gap_save_s = round(longest_gap(acks, rec.t_save, t_saved, rec.t_restore), 4)
            rec.gap_restore_s = round(longest_gap(acks, rec.t_restore, t_restored,
                                                  rec.t_end), 4)
            rec.acked_between = len(report.acked_between(t_saved, rec.t_restore))
            rec.failures_restore = sum(1 for f in report.failures
                                       if rec.t_restore <= f.at <= rec.t_end)
            if writer.crash is not None:
                raise OrthrosError(f"the etcd writer crashed: {writer.crash!r}")
            # After the round's measurements, the snapshot still kept: what it all takes.
            assert self.volume is not None
            rec.volume_used_bytes = self.volume.used_bytes(sync=True)
            rec.ok = True
        except (OrthrosError, OSError, ValueError) as err:
            rec.error, rec.stage = _reason(err), stage
        finally:
            rec.t_end = rec.t_end or time.time()
            if not rec.ok:
                self._keep_criu_logs(item.name)
            if saved:
                try:
                    delete_snapshot(list(self.hosts.values()), item.name)
                except (OrthrosError, OSError) as err:
                    msg = f"snapshot {item.name} not deleted: {_reason(err)}"
                    rec.warnings.append(msg)
                    self.results.leftovers.append(msg)
            rec.wall_s = round(time.monotonic() - started, 3)
            if rec.t_save is not None:
                rec.log = self._log_events(ctx, rec.t_save, rec.t_end)
        return rec

    def _committed(self, ctx: _Cluster) -> etcd.ClusterState:
        """The cluster's state once a put through its leader is committed: the status' raft
        term is the last applied entry's, so a leader elected since is seen only once it has
        committed in its term. Unhealthy as read if it has no leader or the put fails."""
        assert self.lab is not None and ctx.cluster is not None
        state = etcd.status(self.lab, ctx.cluster)
        if not state.healthy():
            return state
        try:
            etcd.put(self.lab, ctx.cluster, "orthros/bench-probe", str(time.time()),
                     via=state.leader_name(), timeout=2.0)
        except etcd.EtcdError:
            return etcd.ClusterState(tuple(dataclasses.replace(m, leader_id=0)
                                           for m in state.members), state.at)
        return etcd.status(self.lab, ctx.cluster)

    def _campaigns(self, ctx: _Cluster, t0: float, t1: float) -> int | None:
        """Campaigns in every member's log between ``t0`` and ``t1``; None if no log was read."""
        if ctx.cluster is None:
            return None
        found, read = 0, False
        for m in ctx.cluster.members:
            if m.log is None:
                continue
            try:
                lines = m.log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            read = True
            found += count_campaigns(lines, t0, t1)
        return found if read else None

    def _move_leader(self, ctx: _Cluster, to: str) -> None:
        """Make member ``to`` the leader (etcd's MoveLeader, asked of the leader), and wait
        until every member agrees; its election happens before the round looks at the term."""
        assert self.lab is not None and ctx.cluster is not None
        lab, cluster = self.lab, ctx.cluster
        state = etcd.wait_healthy(lab, cluster, timeout=self.config.recover_timeout_s)
        if state.leader_name() == to:
            return
        target = state.member(to).member_id
        leader = cluster.member(str(state.leader_name()))
        _post(lab.netns(lab.client), leader.client_url, "/v3/maintenance/transfer-leadership",
              {"targetID": str(target)}, timeout=10.0)
        wait_until(lambda: etcd.status(lab, cluster).leader_name() == to,
                   timeout=self.config.recover_timeout_s, what=f"{to} to lead", every=0.05)

    def _save_facts(self, rec: SyncRound, rep: SyncReport) -> None:
        rec.save_ms = _r(rep.timings.get("total"))
        rec.save_stages_ms = {str(k): round(float(v), 3) for k, v in rep.timings.items()
                              if str(k) != "total"}
        rec.freeze_skew_us = rep.freeze_skew_us
        rec.freeze_settled_skew_us = rep.freeze_settled_skew_us
        rec.save_resume_skew_us = rep.resume_skew_us
        rec.save_resume_settled_skew_us = rep.resume_settled_skew_us
        rec.save_clock_error_us = rep.clock_error_us
        rec.members = [member_facts(m, None) for m in rep.members]
        rec.freeze_stamps_us = stamps_us(rep.members, rep.clocks, "freeze")
        rec.save_resume_stamps_us = stamps_us(rep.members, rep.clocks, "resume")
        rec.warnings += [w for w in rep.warnings if w not in rec.warnings]

    def _restore_facts(self, rec: SyncRound, saved: SyncReport, rep: SyncReport) -> None:
        rec.restore_ms = _r(rep.timings.get("total"))
        rec.restore_stages_ms = {str(k): round(float(v), 3) for k, v in rep.timings.items()
                                 if str(k) != "total"}
        rec.resume_skew_us = rep.resume_skew_us
        rec.resume_settled_skew_us = rep.resume_settled_skew_us
        rec.restore_clock_error_us = rep.clock_error_us
        rec.resume_stamps_us = stamps_us(rep.members, rep.clocks, "resume")
        rec.resume_order = [str(m.get("host")) for m in rep.members]
        by = {(m.get("host"), m.get("member")): m for m in rep.members}
        rec.members = [member_facts(m, by.get((m.get("host"), m.get("member"))))
                       for m in saved.members]
        rec.warnings += [w for w in rep.warnings if w not in rec.warnings]

    def _keep_criu_logs(self, name: str) -> None:
        """CRIU's logs and the manifest of snapshot ``name``'s members into
        ``out/logs/criu/NAME/`` before the snapshot is deleted: for a round that failed."""
        if self.lab is None:
            return
        dest = self.config.out / "logs" / "criu" / name
        for h in self.lab.hosts:
            if h.images_root is None:
                continue
            with contextlib.suppress(OSError):
                for image in Path(h.images_root).glob(f"sync-{name}.*"):
                    for f in [*image.glob("*.log"), *image.glob("sync.json")]:
                        (dest / image.name).mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, dest / image.name / f.name)

    def _log_events(self, ctx: _Cluster, t0: float, t1: float) -> list[str]:
        """etcd's lines about elections, leaders and stalls in ``[t0, t1]``, every member's,
        in time order."""
        if ctx.cluster is None:
            return []
        found: list[tuple[float, str]] = []
        for m in ctx.cluster.members:
            if m.log is None:
                continue
            try:
                lines = m.log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            found += log_events(lines, t0, t1, host=m.name, limit=40)
        return [e for _, e in sorted(found)][:12]


def _post(netns: str, url: str, path: str, body: dict[str, Any], *,
          timeout: float) -> dict[str, Any]:
    """One POST to an etcd member's gateway from the lab namespace ``netns``."""
    from orthros_py.net.addr import in_netns

    host, port = etcd.split_url(url)
    with in_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        conn.sock = sock
        conn.request("POST", path, body=json.dumps(body).encode(), headers=etcd.JSON_HEADERS)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
        sock.close()
    return etcd.parse_reply(resp.status, raw, f"{path} at {host}")


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 3)
