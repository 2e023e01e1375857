"""The Orthros paper's container migration, timed part by part (seed 000's table).

The workload (``orthros_py.workloads.unixpair``): two processes in their own PID, UTS, IPC and mount
namespaces, each holding N accepted UNIX stream sockets to the other and exchanging messages on
all of them, in cgroups that limit CPU cores (cpuset) and CPU time (cpu quota). It is migrated
between the lab's hosts back and forth with ``orthros_py.policies.migrate`` and each migration is
split into the paper's parts:

- *cgroup*: orthros's own work (reading the groups at the dump, checking the destination,
  creating and verifying them at the restore) plus CRIU's cgroup lines in its logs;
- *namespaces*: CRIU's namespace lines (pid, UTS, IPC), and apart from them the mount namespace,
  which the paper's workload did not have;
- *UNIX sockets*: CRIU's unix socket lines;
- *whole*: dump to running on the destination (dump, transfer, address move, restore).

CRIU's parts come from its level-4 log, read from the images both hosts keep (see
``criu.log.part_times``: the time between consecutive lines of a part in one task; a lower
bound). Level 4 logging costs time of its own, so every repetition also runs one migration at
level 2, from which the *whole* times are taken. Needs root.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthros_py.bench.stats import fmt_ms, fmt_pct, median, ratio
from orthros_py.criu.log import part_times_in

# Seed 000 (Orthros), its table of one container failover, ms.
PAPER_MS: dict[str, float] = {"cgroup": 287.90, "namespaces": 0.02, "unix": 0.97,
                              "container": 288.89, "whole": 783.05}
GOAL_WHOLE_MS = 783.05
GOAL_CGROUP_MS = 10.0
PARTS_LOG_LEVEL = 4
WHOLE_LOG_LEVEL = 2
ROWS = ("cgroup", "namespaces", "unix", "container", "whole")
ROW_LABELS = {"cgroup": "cgroup", "namespaces": "namespaces", "unix": "UNIX sockets",
              "container": "container part", "whole": "whole migration"}


@dataclass
class Run:
    """One migration of the workload."""

    sockets: int
    rep: int
    source: str
    dest: str
    log_level: int
    ok: bool = False
    error: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    # orthros's cgroup work: read (dump), check (prepare), create and verify (restore)
    cgroup_orthros: dict[str, float] = field(default_factory=dict)
    # CRIU's log, level 4 only: {"dump": {part: ms}, "restore": {part: ms}}
    criu_parts: dict[str, dict[str, float]] = field(default_factory=dict)
    frozen_ms: float | None = None
    rounds_after: int = 0  # rounds the workload made after the restore, errors checked
    mismatches: list[str] = field(default_factory=list)

    @property
    def whole_ms(self) -> float:
        """Dump to running on the destination."""
        return sum(self.timings_ms.get(r, 0.0) for r in ("dump", "transfer", "address move",
                                                         "restore"))

    def part(self, name: str) -> float | None:
        """The paper's parts, in ms (None: not measured in this run)."""
        if name == "whole":
            return self.whole_ms
        if not self.criu_parts:
            return None
        criu = {k: sum(p.get(k, 0.0) for p in self.criu_parts.values())
                for k in ("cgroup", "namespaces", "mounts", "unix")}
        values = {"cgroup": sum(self.cgroup_orthros.values()) + criu["cgroup"],
                  "namespaces": criu["namespaces"] + criu["mounts"],
                  "unix": criu["unix"]}
        if name == "container":
            return sum(values.values())
        if name == "mounts":
            return criu["mounts"]
        if name == "cgroup criu":
            return criu["cgroup"]
        if name == "cgroup orthros":
            return sum(self.cgroup_orthros.values())
        return values.get(name)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["whole_ms"] = round(self.whole_ms, 3)
        d["parts_ms"] = {r: self.part(r) for r in (*ROWS, "mounts", "cgroup criu",
                                                  "cgroup orthros")}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Run:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Summary:
    sockets: int
    migrations: int  # at the parts log level, and at the whole log level
    medians: dict[str, float | None]  # the paper's rows (whole: from level-2 runs)
    detail: dict[str, float | None]  # mounts, cgroup criu/orthros, whole at level 4, downtime

    def share(self, row: str) -> float | None:
        return ratio(self.medians.get(row), self.medians.get("whole"))


def summarize(runs: Sequence[Run]) -> list[Summary]:
    out: list[Summary] = []
    for n in sorted({r.sockets for r in runs}):
        ok = [r for r in runs if r.sockets == n and r.ok]
        parts = [r for r in ok if r.log_level == PARTS_LOG_LEVEL]
        whole = [r for r in ok if r.log_level == WHOLE_LOG_LEVEL] or parts
        med = {row: median([r.part(row) for r in parts]) for row in ROWS if row != "whole"}
        med["whole"] = median([r.whole_ms for r in whole])
        detail = {
            "mounts": median([r.part("mounts") for r in parts]),
            "cgroup criu": median([r.part("cgroup criu") for r in parts]),
            "cgroup orthros": median([r.part("cgroup orthros") for r in parts]),
            "whole at level 4": median([r.whole_ms for r in parts]),
            "downtime": median([r.timings_ms.get("downtime") for r in whole]),
            "total": median([r.timings_ms.get("total") for r in whole]),
            "frozen": median([r.frozen_ms for r in whole]),
        }
        out.append(Summary(n, len(ok), med, detail))
    return out


# --- outputs --------------------------------------------------------------------------------------


def markdown(runs: Sequence[Run], meta: dict[str, Any]) -> str:
    sums = summarize(runs)
    lines = ["# Container migration, part by part (seed 000's table)", "",
             f"Host: {meta.get('host', '?')}. {meta.get('note', '')}", "",
             "Medians in ms. Parts from migrations at CRIU log level 4; *whole* (dump to "
             "running on the destination) from the migrations at level 2 of the same "
             "repetitions. *share* = part / whole.", ""]
    head = "| part | paper | " + " | ".join(f"{s.sockets:,} sockets | share" for s in sums) + " |"
    lines += [head, "|---|---:|" + "---:|---:|" * len(sums)]
    for row in ROWS:
        cells = [f"{ROW_LABELS[row]}", fmt_ms(PAPER_MS[row])]
        for s in sums:
            share = s.share(row)
            cells += [fmt_ms(s.medians.get(row)), fmt_pct(share)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Detail (medians, ms):", "",
              "| | " + " | ".join(f"{s.sockets:,} sockets" for s in sums) + " |",
              "|---|" + "---:|" * len(sums)]
    for key in ("cgroup orthros", "cgroup criu", "mounts", "whole at level 4", "frozen",
                "downtime", "total"):
        lines.append(f"| {key} | " + " | ".join(fmt_ms(s.detail.get(key)) for s in sums) + " |")
    lines += ["", f"Migrations: {', '.join(f'{s.sockets:,} sockets: {s.migrations}' for s in sums)}"
              f"; failed: {sum(1 for r in runs if not r.ok)}."]
    if len(sums) > 1:
        a, b = sums[0], sums[-1]
        growth = []
        for row in ROWS:
            x, y = a.medians.get(row), b.medians.get(row)
            if x and y is not None:
                growth.append(f"{ROW_LABELS[row]} x{y / x:.1f}")
        lines += ["", f"From {a.sockets:,} to {b.sockets:,} sockets per process: "
                  + ", ".join(growth) + "."]
    for r in runs:
        if not r.ok:
            lines.append(f"- failed: {r.sockets} sockets rep {r.rep} {r.source}->{r.dest}: "
                         f"{r.error}")
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[Run], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sums = summarize(runs)
    rows = list(ROWS)
    labels = ["paper", *(f"{s.sockets:,} sockets" for s in sums)]
    series = [[PAPER_MS[r] for r in rows],
              *([s.medians.get(r) or 0.0 for r in rows] for s in sums)]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(zip(labels, series, strict=True)):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, vals, width, label=label)
    ax.set_xticks(range(len(rows)), [ROW_LABELS[r] for r in rows])
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("ms (medians; symlog scale)")
    ax.set_title("container migration: time per part")
    ax.axhline(GOAL_WHOLE_MS, color="grey", linestyle=":", linewidth=1)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "parts.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(runs: Sequence[Run], meta: dict[str, Any], out: Path, *,
                  plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps({"meta": meta, "runs": [r.to_dict() for r in runs],
                                    "summary": [dataclasses.asdict(s)
                                                for s in summarize(runs)]}, indent=2))
    paths[1].write_text(markdown(runs, meta))
    if plots and any(r.ok for r in runs):
        paths.append(plot(runs, out))
    return paths


def load_runs(path: Path) -> tuple[list[Run], dict[str, Any]]:
    data = json.loads(path.read_text())
    return [Run.from_dict(r) for r in data["runs"]], dict(data.get("meta", {}))


# --- the measurement ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    sockets: tuple[int, ...] = (500, 4980)
    reps: int = 5
    hierarchy: str = "v1"  # where the limits live: v1 (cpuset + cpu) or v2 (what v2 offers)
    interval: float = 0.02  # the workload's pause between rounds
    # Mount cgroup v2 with favordynmods for the run (put back after): see cgroup.fs.
    favordynmods: bool = False


class ContainerBench:
    """Builds the lab, the groups and the workload; migrates it back and forth."""

    def __init__(self, config: BenchConfig, out: Path,
                 progress: Callable[[str], None] = lambda _m: None) -> None:
        self.config = config
        self.out = out
        self.progress = progress
        self.runs: list[Run] = []

    @contextmanager
    def _lab(self) -> Iterator[Any]:
        from orthros_py.cgroup.fs import favors_dynmods, set_favor_dynmods
        from orthros_py.lab import Lab, teardown

        before = favors_dynmods()
        teardown()
        try:
            if self.config.favordynmods:
                set_favor_dynmods(True)
            yield Lab.up(2, rebuild=True)
        finally:
            teardown()
            if before is not None and favors_dynmods() != before:
                set_favor_dynmods(before)

    def _groups(self, name: str) -> list[Path]:
        """The container's groups on alpha, with its limits; returned in join order."""
        from orthros_py.cgroup.fs import CgroupFs
        from orthros_py.cgroup.model import V2, CgroupFile, Group, parse_cpu_list
        from orthros_py.lab.lab import cgroup_root

        fs = CgroupFs.here()
        path = f"{cgroup_root('alpha')}/{name}"
        groups: tuple[Group, ...]
        if self.config.hierarchy == "v2":
            groups = (Group(V2, path, (("cgroup.max.descendants", "3"),
                                       ("cgroup.max.depth", "2"))),)
        else:
            cpus = sorted(parse_cpu_list(
                (fs.dir("cpuset", "/") / "cpuset.effective_cpus").read_text()))
            groups = (Group("cpu", path, (("cpu.cfs_period_us", "100000"),
                                          ("cpu.cfs_quota_us", "50000"))),
                      Group("cpuset", path, (("cpuset.cpus", str(cpus[-1])),
                                             ("cpuset.mems", "0"))))
        fs.apply(CgroupFile(groups=groups))
        return [fs.dir(g.hierarchy, g.path) for g in groups]

    def run(self) -> list[Run]:
        from orthros_py.errors import OrthrosError
        from orthros_py.workloads.unixpair import max_restorable_sockets, start

        limit = max_restorable_sockets()
        too_many = [n for n in self.config.sockets if n > limit]
        if too_many:
            raise OrthrosError(
                f"CRIU cannot restore {too_many[0]:,} sockets per process here: it restores "
                f"each connection as a pair in one task (4 descriptors per socket) under "
                f"RLIMIT_NOFILE, which it cannot raise without CAP_SYS_RESOURCE; at most "
                f"{limit:,}", hint=f"use --sockets 500,{limit}")

        with self._lab() as lab:
            for n in self.config.sockets:
                name = f"bench-{uuid.uuid4().hex[:6]}"
                dirs = self._groups(name)
                work = self.out / "work" / name
                c = start(work, sockets=n, cgroup_dirs=dirs, interval=self.config.interval,
                          prefix=lab.argv("alpha", []))
                try:
                    c.wait_ready(timeout=300)
                    self.progress(f"{n} sockets per process: the workload is ready on alpha")
                    where = "alpha"
                    for rep in range(1, self.config.reps + 1):
                        for level in (PARTS_LOG_LEVEL, WHOLE_LOG_LEVEL):
                            other = "beta" if where == "alpha" else "alpha"
                            run = self._migrate(lab, c, n, rep, where, other, level)
                            self.runs.append(run)
                            self.progress(_line(run))
                            if not run.ok:
                                return self.runs
                            where = other
                finally:
                    c.stop()
                    shutil.rmtree(work, ignore_errors=True)
        return self.runs

    def _migrate(self, lab: Any, c: Any, n: int, rep: int, src: str, dst: str,
                 level: int) -> Run:
        from orthros_py.cluster import Cluster
        from orthros_py.policies.migrate import Host, MigrateConfig, Migration

        cluster = Cluster.of_lab(lab)
        run = Run(n, rep, src, dst, level)
        image = f"bench-{n}-{rep}-{level}-{uuid.uuid4().hex[:4]}"
        source, dest = Host.of(cluster, src), Host.of(cluster, dst)
        cfg = MigrateConfig(criu_log_level=level, keep_images=True)
        try:
            before = c.status()
            # The policy speaks the hosts' pids; this machine knows the tree by others.
            result = Migration(lab.host_pid(src, c.init_pid), source, dest, cfg,
                               image=image).run()
            c.adopt(lab.machine_pid(dst, result.new_pid) or result.new_pid)
            after = c.wait_progress(5, timeout=120)
            run.rounds_after = min(int(after[r]["rounds"]) - int(before[r]["rounds"])
                                   for r in after)
            run.timings_ms = dict(result.timings_ms)
            run.frozen_ms = result.frozen_ms
            dumped, restored = (result.cgroups.get("dump") or {},
                                result.cgroups.get("restore") or {})
            run.cgroup_orthros = {
                "read": float(dumped.get("read_ms") or 0.0),
                "check": float(result.timings_ms.get("cgroup check", 0.0)),
                "create": float(restored.get("check_ms") or 0.0)
                + float(restored.get("apply_ms") or 0.0),
                "verify": float(restored.get("verify_ms") or 0.0)}
            run.mismatches = list(restored.get("mismatches") or [])
            if level == PARTS_LOG_LEVEL:
                run.criu_parts = {
                    "dump": part_times_in(lab.host(src).images_root / image / "dump.log"),
                    "restore": part_times_in(lab.host(dst).images_root / image / "restore.log")}
            run.ok = not run.mismatches
            if run.mismatches:
                run.error = "cgroup limits differ after the restore: " + run.mismatches[0]
        except Exception as err:  # recorded: the table names what failed
            run.error = str(err)
        finally:
            for h in (source, dest):
                try:
                    h.agent.remove_image(image)
                except Exception as err:
                    run.error = run.error or f"removing image {image} on {h.name}: {err}"
        return run


def _line(r: Run) -> str:
    if not r.ok:
        return f"{r.sockets} sockets rep {r.rep} {r.source}->{r.dest}: FAILED: {r.error}"
    parts = ""
    if r.criu_parts:
        parts = ", ".join(f"{ROW_LABELS[k]} {fmt_ms(r.part(k))}" for k in ROWS[:3]) + "; "
    return (f"{r.sockets} sockets rep {r.rep} {r.source}->{r.dest} (log level {r.log_level}): "
            f"{parts}whole {fmt_ms(r.whole_ms)} ms, downtime "
            f"{fmt_ms(r.timings_ms.get('downtime'))} ms; {r.rounds_after} rounds after, no error")


def meta_now(config: BenchConfig) -> dict[str, Any]:
    return {"host": f"Linux {platform.release()}, {len(os.sched_getaffinity(0))} CPUs",
            "config": dataclasses.asdict(config),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "note": f"Limits in cgroup {config.hierarchy}; the workload pauses "
                    f"{config.interval} s between rounds; cgroup v2 "
                    f"{'with' if config.favordynmods else 'without'} favordynmods."}
