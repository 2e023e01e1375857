"""Operations on the host and on trees the agent owns: ``ping``, ``status``, ``check``, ``tree``,
``pids_in_use``, ``kill``, ``resume``, ``cgroup_check``, ``cgroup_release``.

Interfaces and privileges: ``check`` runs ``orthros_py.host.probe`` (see there); ``tree`` reads
/proc and sock_diag through ``orthros_py.net.conns`` and the cgroup filesystem; ``pids_in_use``
reads /proc/PID/status; ``kill`` uses
kill(2), only on processes this agent restored, or left stopped after a dump (checked by pid and
start time); ``resume`` uses ``orthros_py.agent.held`` (pidfd_getfd, TCP_REPAIR, SIGCONT) on a
tree this agent left stopped (``leave_stopped``); the cgroup ops read and remove groups in the
cgroup filesystem. Root, as the agent runs. Modules a host may lack are imported when first
called, so that an agent without one still serves everything else.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal as signals
import socket
import time
from pathlib import Path
from typing import Any

import psutil

from orthros_py import __version__
from orthros_py.agent import held as held_trees
from orthros_py.agent.protocol import PROTOCOL_VERSION
from orthros_py.agent.state import log
from orthros_py.agent.table import OPS, Call, bad_request, feature, op
from orthros_py.errors import NoSuchProcessError

# At most this many PIDs in one ``pids_in_use`` request (the client splits a larger tree).
MAX_PIDS_ASKED = 65536
PID_MAX_LIMIT = 1 << 22  # the kernel's ceiling for pid_max (PID_MAX_LIMIT on 64-bit)

SIGNALS = {"TERM": signals.SIGTERM, "KILL": signals.SIGKILL, "INT": signals.SIGINT,
           "HUP": signals.SIGHUP, "QUIT": signals.SIGQUIT, "USR1": signals.SIGUSR1,
           "USR2": signals.SIGUSR2, "STOP": signals.SIGSTOP, "CONT": signals.SIGCONT}


@op("ping")
def op_ping(call: Call) -> dict[str, Any]:
    """Liveness, the agent's identity and clock (the caller can estimate clock skew)."""
    return {"name": call.agent.name, "version": __version__, "protocol": PROTOCOL_VERSION,
            "time": time.time(), "hostname": socket.gethostname()}


@op("status")
def op_status(call: Call) -> dict[str, Any]:
    """Who and what the agent is, and what it holds: images, restored trees, page servers."""
    a = call.agent
    with a.mutex:
        restored = [t.to_dict() for t in a.restored.values()]
        servers = list(a.page_servers.values())
        held = list(a.held.values())
        lazy = dict(a.lazy)
        trackers = list(a.trackers)
    busy = a.busy_marks()
    with a.netlock_mutex:
        netlocks = sorted(a.netlocks)
    return {
        "name": a.name, "hostname": socket.gethostname(), "pid": os.getpid(),
        "uid": os.geteuid(), "orthros_version": __version__, "protocol": PROTOCOL_VERSION,
        "python": platform.python_version(), "kernel": platform.release(),
        "criu": a.criu_info(), "started": a.started, "uptime_s": round(time.time() - a.started, 3),
        "images_root": str(a.images_root), "images": a.image_names(),
        "restored": restored, "page_servers": [s.to_dict() for s in servers],
        "held": [t.to_dict() for t in held], "busy": busy,
        "netlocks_loaded": netlocks, "ops": sorted(OPS), "cgroup_root": a.cgroup_root,
        "lazy": {name: side.to_dict() for name, side in lazy.items()},
        "trackers": sorted(trackers),
        **_pid_space(),
    }


def _pid_space() -> dict[str, Any]:
    """Which PID space this agent's processes live in: the boot and the PID namespace. Two
    agents that report the same share one PID space (network-namespace hosts on one machine),
    so a tree dumped by one holds the PIDs that a restore by the other needs."""
    out: dict[str, Any] = {"boot_id": None, "pid_ns": None}
    with contextlib.suppress(OSError):
        out["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        out["pid_ns"] = os.stat("/proc/self/ns/pid").st_ino
    return out


@op("check")
def op_check(call: Call, quick: bool = True) -> dict[str, Any]:
    """Run the host probes of ``orthros check`` here (``quick`` skips compiling BPF)."""
    probe = feature("orthros_py.host.probe", "probe the host")
    report = probe.run_probes(quick=quick)
    data: dict[str, Any] = report.to_dict()
    data["host"] = call.agent.name
    return data



# --- trees this agent owns ----------------------------------------------------------------------


@op("kill")
def op_kill(call: Call, pid: int, signal: str = "KILL", wait: float = 5.0) -> dict[str, Any]:
    """Signal a tree this agent restored (root and descendants); wait up to ``wait`` s for the
    root to exit. A tree this agent left stopped after a dump can only be killed (SIGKILL).
    Any other pid is refused."""
    sig = SIGNALS.get(signal.upper().removeprefix("SIG"))
    if sig is None:
        raise bad_request(f"signal {signal!r} is not one of {', '.join(SIGNALS)}")
    with call.agent.mutex:
        stopped = call.agent.held.get(pid)
    if stopped is not None:
        if sig is not signals.SIGKILL:
            raise bad_request(f"pid {pid} is held stopped after a dump: it can be resumed "
                               "(resume) or killed (signal KILL), nothing else")
        done = held_trees.kill(stopped, wait=min(wait, 60.0))
        if done["exited"]:
            with call.agent.mutex:
                call.agent.held.pop(pid, None)
        return {"pid": pid, "signal": sig.name, "signaled": done["signaled"],
                "exited": done["exited"], "exit_status": None, "held": True}
    tree = call.agent.restored_tree(pid)
    signaled: list[int] = []
    if not tree.exited.is_set():
        try:
            root = psutil.Process(pid)
            if not tree.ref.is_same(root):
                raise NoSuchProcessError(f"pid {pid} now belongs to another process", pid=pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
                signaled.append(proc.pid)
        if wait > 0 and sig in (signals.SIGKILL, signals.SIGTERM, signals.SIGINT):
            tree.exited.wait(min(wait, 60.0))
    return {"pid": pid, "signal": sig.name, "signaled": signaled,
            "exited": tree.exited.is_set(), "exit_status": tree.exit_status}


@op("resume")
def op_resume(call: Call, pid: int) -> dict[str, Any]:
    """Resume a tree this agent left stopped after a dump (``leave_stopped``): its TCP sockets
    out of repair mode, then SIGCONT. Its network lock is the caller's to lift."""
    a = call.agent
    with a.mutex:
        tree = a.held.get(pid)
    if tree is None:
        raise NoSuchProcessError(f"pid {pid} is not held stopped by this agent: it resumes "
                                 "only trees it dumped with leave_stopped", pid=pid)
    with a.busy(tree.image, "resume"):
        result = held_trees.resume(tree)
        with a.mutex:
            a.held.pop(pid, None)
    log.info("resumed the tree of pid %d (image %s): %d processes, %d sockets out of repair",
             pid, tree.image, len(result["resumed"]), result["sockets"])
    return result


@op("tree")
def op_tree(call: Call, pid: int) -> dict[str, Any]:
    """The processes of the tree of ``pid`` on this host and its TCP connections (all that a
    lock must cover, and those established), with the interfaces they leave by."""
    conns_mod = feature("orthros_py.net.conns", "find a tree's connections")
    pids = conns_mod.tree_pids(pid)
    procs = []
    for p in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(p)
            procs.append({"pid": p, "name": proc.name(), "status": proc.status(),
                          "threads": proc.num_threads(), "rss": proc.memory_info().rss,
                          # Every task id, the process's own among them: a restore in the
                          # same PID namespace gives each of them back (``pids_in_use``).
                          "tids": _tids(p)})
    found = conns_mod.discover(pids)
    established = conns_mod.discover(pids, (conns_mod.TCP_ESTABLISHED,))
    from orthros_py.cgroup.fs import CgroupError, CgroupFs

    try:
        cgroups: str | None = CgroupFs.here().read_tree(pids).to_text()
    except CgroupError:
        cgroups = None  # the tree went meanwhile: the caller hears of it soon enough
    from orthros_py.criu.dirtytrack import tree_uses_userfaultfd

    return {"pid": pid, "processes": procs, "conns": [str(c) for c in found.conns],
            # A tree with a userfaultfd of its own cannot have its memory tracked (pre-copy).
            "userfaultfd": tree_uses_userfaultfd(pids),
            "cgroups": cgroups,
            "established": [str(c) for c in established.conns],
            "interfaces": found.interfaces, "routes": {str(c): i for c, i in found.routes.items()},
            "netns_id": list(found.netns_id), "agent_netns": _own_netns_id() == found.netns_id,
            # A tree with a mount namespace of its own has CRIU archive its tmpfs mounts,
            # the one holding the agent's scratch root among them.
            "agent_mntns": all(_same_ns(p, "mnt") for p in pids),
            # A root in the agent's PID namespace is restored with the very PIDs (and TIDs) it
            # has here; the init of a PID namespace of its own (a container) into a new one.
            "agent_pidns": _same_ns(pid, "pid")}


def _tids(pid: int) -> list[int]:
    """The task ids of process ``pid`` (its own first), or just ``pid`` if it went."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if t.isdigit())
    except OSError:
        return [pid]
    return [pid, *(t for t in tids if t != pid)]


@op("pids_in_use")
def op_pids_in_use(call: Call, pids: list[int]) -> dict[str, Any]:
    """Which of ``pids`` a live process or thread holds in the agent's PID namespace: ``held``,
    [[pid, name], ...] (a thread's name is its process's, with the process's pid). A zombie does
    not count: its reaper frees its PID soon (a restore waits for that). Reads only."""
    if len(pids) > MAX_PIDS_ASKED:
        raise bad_request(f"pids_in_use takes at most {MAX_PIDS_ASKED} PIDs, not {len(pids)}")
    bad = [p for p in pids if not 0 < p <= PID_MAX_LIMIT]
    if bad:
        raise bad_request(f"{bad[0]} is not a PID")
    held: list[list[int | str]] = []
    for pid in sorted(set(pids)):
        task = _task_status(pid)  # /proc/PID exists for a thread's id too, hidden from listings
        if task is None or task["State"][:1] in ("Z", "X"):
            continue
        name, tgid = task["Name"], int(task.get("Tgid") or pid)
        if tgid != pid:
            leader = _task_status(tgid)
            name = f"{leader['Name'] if leader else name} (a thread of pid {tgid})"
        held.append([pid, name])
    return {"held": held}


def _task_status(pid: int) -> dict[str, str] | None:
    """The fields of /proc/PID/status (a process's or a thread's), or None if there is none."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(errors="replace")
    except OSError:  # gone, or never there
        return None
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out if "State" in out and "Name" in out else None


def _same_ns(pid: int, kind: str) -> bool:
    """Whether process ``pid`` is in the agent's own namespace of ``kind`` (False if gone)."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino == os.stat(f"/proc/self/ns/{kind}").st_ino
    except OSError:
        return False


# --- cgroups ------------------------------------------------------------------------------------


@op("cgroup_check")
def op_cgroup_check(call: Call, text: str, roots: dict[str, str] | None = None
                    ) -> dict[str, Any]:
    """Whether this host can honour a tree's cgroups (a migration file's ``text``) moved to
    ``roots`` ({hierarchy: top group}): the problems found, none if it can. Reads only."""
    from orthros_py.cgroup.fs import CgroupFs
    from orthros_py.cgroup.model import CgroupFile, check_path

    try:
        cgf = CgroupFile.from_text(text)
        for path in (roots or {}).values():
            check_path(path)
    except ValueError as err:
        raise bad_request(f"bad cgroup migration file: {err}") from err
    if roots:
        cgf = cgf.rebased(cgf.new_roots(roots))
    start = time.perf_counter()
    problems = CgroupFs.here().check(cgf)
    return {"problems": problems, "groups": len(cgf.groups),
            "check_ms": round((time.perf_counter() - start) * 1000, 3)}


@op("cgroup_release")
def op_cgroup_release(call: Call, image: str) -> dict[str, Any]:
    """Remove the (now empty) cgroups of a tree this agent dumped into ``image``: its own
    record of them, never paths from the request."""
    from orthros_py.cgroup.fs import CgroupFs, wait_empty
    from orthros_py.checkpoint import load_cgroup_file

    cgf = load_cgroup_file(call.agent.image_path(image, must_exist=True))
    if cgf is None or cgf.empty:
        return {"removed": 0, "left": []}
    fs = CgroupFs.here()
    wait_empty([fs.dir(g.hierarchy, g.path) for g in cgf.groups])
    left = fs.remove(cgf)
    return {"removed": len(cgf.groups) - len(left), "left": left}


def _own_netns_id() -> tuple[int, int]:
    st = os.stat("/proc/self/ns/net")
    return (st.st_dev, st.st_ino)
