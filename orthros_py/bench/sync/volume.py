"""The sync benchmark's data volume: a btrfs file system on a loop device over a sparse file,
mounted under /var/lib/orthros (where the agents take data directories from), so that the etcd
members' data directories are snapshotted by reflink and a snapshot costs next to nothing.

It must be mounted before the lab is built: a lab host's mount namespace is a copy made at
``Lab.up``, and a file system mounted later is not in it. Released in the reverse order
(unmounted, the loop device detached, the file removed), always; ``sweep_stale`` releases what
a killed run left (``bench-sync-*`` only).

Interfaces: mkfs.btrfs (btrfs-progs), losetup and mount/umount (util-linux), run through
``orthros_py.run.run`` with argument lists; /proc/self/mountinfo. Needs root.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from orthros_py.errors import MissingFeatureError, OrthrosError
from orthros_py.run import run

ROOT = Path("/var/lib/orthros")
PREFIX = "bench-sync-"
TOOLS = ("mkfs.btrfs", "losetup", "mount", "umount")
_SBIN = "/usr/sbin:/sbin:/usr/local/sbin"


def tool(name: str) -> str:
    exe = shutil.which(name) or shutil.which(name, path=_SBIN)
    if exe is None:
        raise MissingFeatureError(f"{name} is not installed (the sync benchmark needs it)",
                                  hint="apt-get install btrfs-progs util-linux")
    return exe


@dataclass
class Volume:
    """A mounted volume: where, over which file and loop device, and what releasing it could
    not do (``problems``, filled in on release)."""

    mount: Path
    image: Path
    size_mib: int
    loop: str | None = None
    problems: list[str] = field(default_factory=list)

    def used_bytes(self, *, sync: bool = False) -> int | None:
        """What the file system has allocated (data and metadata), as df counts it; btrfs
        updates it at a transaction's commit, which ``sync`` forces first (syncfs)."""
        if sync:
            with contextlib.suppress(OrthrosError, OSError):
                run(["sync", "-f", str(self.mount)], check=False, timeout=120)
        try:
            st = os.statvfs(self.mount)
        except OSError:
            return None
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def to_dict(self) -> dict[str, object]:
        return {"mount": str(self.mount), "image": str(self.image), "size_mib": self.size_mib,
                "loop": self.loop}


# --- pure helpers (unit-tested) ---------------------------------------------------------------


def parse_losetup(text: str) -> dict[str, str]:
    """``losetup --list --noheadings --output NAME,BACK-FILE``: {loop device: backing file}
    (a backing file removed meanwhile reads ``PATH (deleted)``: the suffix is dropped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) != 2:
            continue
        out[parts[0]] = re.sub(r"\s+\(deleted\)$", "", parts[1].strip())
    return out


def mount_points(mountinfo: str) -> list[str]:
    """Every mount point in a /proc/PID/mountinfo text (octal escapes decoded)."""
    out = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            out.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
    return out


def is_ours(path: str | Path, root: Path = ROOT) -> bool:
    """A path this module made: ``ROOT/bench-sync-*`` (a mount point or its ``.img``)."""
    p = Path(path)
    return p.parent == root and p.name.startswith(PREFIX)


# --- the volume -------------------------------------------------------------------------------


def _loops() -> dict[str, str]:
    out = run([tool("losetup"), "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
              check=False, timeout=30)
    return parse_losetup(out.stdout)


def _mounted(path: Path) -> bool:
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return os.path.ismount(path)
    return str(path) in mount_points(text)


def _release(mount: Path, image: Path, loop: str | None) -> list[str]:
    """Unmount ``mount``, detach every loop device over ``image``, remove both; what could not
    be done, one sentence each (never raises: it runs in cleanups)."""
    problems: list[str] = []
    if _mounted(mount):
        res = run([tool("umount"), str(mount)], check=False, timeout=60)
        if res.returncode != 0:
            # Busy (a process of a lab not yet gone): detached now, freed when the last user
            # goes.
            lazy = run([tool("umount"), "-l", str(mount)], check=False, timeout=60)
            if lazy.returncode != 0:
                problems.append(f"cannot unmount {mount}: {lazy.stderr.strip() or res.stderr}")
    loops = {loop} if loop else set()
    with contextlib.suppress(OrthrosError, OSError):
        loops |= {dev for dev, back in _loops().items() if back == str(image)}
    for dev in sorted(loops):
        res = run([tool("losetup"), "-d", dev], check=False, timeout=30)
        if res.returncode != 0 and dev in _loops():
            problems.append(f"cannot detach {dev}: {res.stderr.strip()}")
    with contextlib.suppress(FileNotFoundError):
        try:
            image.unlink()
        except OSError as err:
            problems.append(f"cannot remove {image}: {err}")
    if mount.exists() and not _mounted(mount):
        try:
            mount.rmdir()
        except OSError as err:
            problems.append(f"cannot remove {mount}: {err}")
    return problems


def sweep_stale(root: Path = ROOT) -> list[str]:
    """Release every volume a killed run of this benchmark left under ``root`` (mounted or not,
    its loop device attached or not); what was found, one line each."""
    found: list[str] = []
    if not root.is_dir():
        return found
    names = {p.name.removesuffix(".img") for p in root.iterdir() if p.name.startswith(PREFIX)}
    with contextlib.suppress(OrthrosError, OSError):
        names |= {Path(back).name.removesuffix(".img") for back in _loops().values()
                  if is_ours(back, root)}
    for name in sorted(names):
        mount, image = root / name, root / f"{name}.img"
        problems = _release(mount, image, None)
        found.append(f"removed a stale volume {mount}"
                     + (f" ({'; '.join(problems)})" if problems else ""))
    return found


@contextlib.contextmanager
def btrfs_volume(size_mib: int = 2048, *, root: Path = ROOT) -> Iterator[Volume]:
    """A fresh btrfs of ``size_mib`` (a sparse file: only what is written takes room) mounted
    at ``root/bench-sync-XXXXXXXX``; released on the way out, also on failure or Ctrl-C (what
    could not be released is in ``Volume.problems``)."""
    if size_mib < 256:
        raise ValueError("a btrfs volume of less than 256 MiB is too small for three etcd "
                         "members")
    for t in TOOLS:
        tool(t)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    vol = Volume(root / name, root / f"{name}.img", size_mib)
    vol.mount.mkdir(mode=0o700)
    try:
        with open(vol.image, "wb") as f:
            f.truncate(size_mib << 20)
        run([tool("mkfs.btrfs"), "-q", str(vol.image)], timeout=120)
        vol.loop = run([tool("losetup"), "--find", "--show", str(vol.image)],
                       timeout=30).stdout.strip()
        run([tool("mount"), vol.loop, str(vol.mount)], timeout=60)
        vol.mount.chmod(0o700)
        yield vol
    finally:
        vol.problems = _release(vol.mount, vol.image, vol.loop)
