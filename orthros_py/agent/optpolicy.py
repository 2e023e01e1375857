"""What paths and external resources a request from the network may name: one fixed policy.

The cluster key already makes a caller root on every host, so this is defence in depth: a
stolen or replayed option set, or a bug in a coordinator, must not point CRIU at arbitrary files
of the host (a restore's ``root``, a cgroup yard, a bind mount's source, a namespace file). Each
path must be absolute, spelled without ``.``/``..`` steps or doubled slashes, and lie inside the
host's own allowed roots; ``external`` entries must have one of CRIU's known forms.

Pure: strings in, strings out, ``OptionPolicyError`` (a BAD_REQUEST refusal) otherwise. No
interface is touched here, not even the filesystem (symlinks are the caller's concern: CRIU
opens the paths as root, so the roots allowed must be directories only root can write).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from orthros_py.agent.errors import ProtocolError, Refusal

CGROUP_FS = "/sys/fs/cgroup"
NETNS_DIR = "/run/netns"
# Where containers' root filesystems and bind-mount sources usually live on a host.
DEFAULT_ROOTFS_ROOTS = ("/var/lib/orthros", "/var/lib/machines", "/var/lib/lxc",
                        "/var/lib/containers", "/run/orthros")

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")  # names CRIU keeps in its images
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")  # IFNAMSIZ - 1
_NUM = r"[0-9a-fA-F]{1,16}"
# "cpu,cpuacct", "name=systemd", "" (v2), "*" (all)
_CTRL = re.compile(r"\*|[a-z0-9_=.-]*(,[a-z0-9_=.-]+)*")
_PROC_NETNS = re.compile(r"/proc/[1-9][0-9]{0,9}/(task/[1-9][0-9]{0,9}/)?ns/net")


class OptionPolicyError(ProtocolError):
    """An option from the network names something outside what this host allows."""

    def __init__(self, msg: str, **context: Any) -> None:
        super().__init__(msg, code=Refusal.BAD_REQUEST, **context)


@dataclass(frozen=True)
class Policy:
    """The roots one host allows: its images root, and where root filesystems and bind-mount
    sources may come from."""

    images_root: str
    rootfs_roots: tuple[str, ...] = DEFAULT_ROOTFS_ROOTS
    cgroup_fs: str = CGROUP_FS

    # -- paths ----------------------------------------------------------------------------

    def clean(self, path: str, what: str) -> str:
        """``path`` if it is absolute and spelled plainly; OptionPolicyError otherwise."""
        if not isinstance(path, str) or not path.startswith("/"):
            raise OptionPolicyError(f"{what} must be an absolute path, not {path!r}")
        if "\x00" in path or any(ord(c) < 32 for c in path):
            raise OptionPolicyError(f"{what} holds control characters")
        parts = path.split("/")[1:]
        if any(p in (".", "..") for p in parts) or "" in parts[:-1]:
            raise OptionPolicyError(f"{what} {path!r} must not hold '.', '..' or '//'")
        return str(PurePosixPath(path))

    def inside(self, path: str, roots: Iterable[str], what: str, *,
               itself: bool = False) -> str:
        """``path``, clean and strictly below one of ``roots`` (or one of them, ``itself``)."""
        p = PurePosixPath(self.clean(path, what))
        allowed = [PurePosixPath(r) for r in roots]
        if not any((itself or p != r) and p.is_relative_to(r) for r in allowed):
            raise OptionPolicyError(
                f"{what} {path!r} is outside what this host allows "
                f"({', '.join(str(r) for r in allowed)})")
        return str(p)

    @property
    def rootfs_allowed(self) -> tuple[str, ...]:
        return (self.images_root, *self.rootfs_roots)

    # -- options --------------------------------------------------------------------------

    def root(self, path: str) -> str:
        """A restore's root filesystem (CRIU's ``--root``)."""
        return self.inside(path, self.rootfs_allowed, "root")

    def cgroup_yard(self, path: str) -> str:
        """Where the hierarchies are mounted (CRIU's ``--cgroup-yard``)."""
        return self.inside(path, (self.cgroup_fs,), "cgroup_yard", itself=True)

    def cgroup_roots(self, roots: Mapping[str, str]) -> dict[str, str]:
        """{hierarchy: cgroup path}: paths inside each hierarchy, not filesystem paths, so
        absolute within it and never stepping out of it."""
        out = {}
        for ctrl, path in roots.items():
            if not isinstance(ctrl, str) or not _CTRL.fullmatch(ctrl):
                raise OptionPolicyError(f"cgroup_roots: {ctrl!r} is not a hierarchy name")
            out[ctrl] = self.clean(path, f"cgroup_roots[{ctrl!r}]")
        return out

    def netns(self, value: str) -> str:
        """A network namespace: a name (bound in /run/netns), /run/netns/NAME or
        /proc/PID/ns/net."""
        if "/" not in value:
            if not _LABEL.fullmatch(value):
                raise OptionPolicyError(f"{value!r} is not a network namespace name")
            return value
        path = self.clean(value, "netns")
        if _PROC_NETNS.fullmatch(path):
            return path
        parent, name = path.rsplit("/", 1)
        if parent == NETNS_DIR and _LABEL.fullmatch(name):
            return path
        raise OptionPolicyError(f"netns {value!r} is neither /run/netns/NAME nor "
                                "/proc/PID/ns/net")

    def external(self, entries: Iterable[str], *, restore: bool) -> tuple[str, ...]:
        """CRIU ``--external`` entries of a dump (``restore`` False) or a restore, each of
        one of the forms in criu(8); a restore's bind-mount sources and devices checked."""
        return tuple(self._external(e, restore) for e in entries)

    def _external(self, entry: str, restore: bool) -> str:
        m = re.fullmatch(r"([a-z]+)\[([^\]]*)\](?::(.*))?", entry, re.DOTALL)
        if m is None:
            raise OptionPolicyError(f"external {entry!r} is not TYPE[ID] or TYPE[ID]:VALUE")
        kind, ident, value = m[1], m[2], m[3]

        def fail(form: str) -> OptionPolicyError:
            return OptionPolicyError(f"external {entry!r}: expected {form}")

        if kind == "mnt":
            if ident == "":
                if value is not None and not re.fullmatch(r"[ms]{0,2}", value):
                    raise fail("mnt[] or mnt[]:FLAGS (m, s)")
                return entry
            if value is None:
                raise fail("mnt[...]:VALUE")
            if restore:  # mnt[NAME]:HOST_PATH, bind-mounted into the restored tree
                if not _LABEL.fullmatch(ident):
                    raise fail("mnt[NAME]:PATH")
                self.inside(value, self.rootfs_allowed, f"external {entry!r}: its source")
            else:  # mnt[MOUNTPOINT]:NAME, a path in the tree's own mount namespace
                self.clean(ident, f"external {entry!r}: its mount point")
                if not _LABEL.fullmatch(value):
                    raise fail("mnt[MOUNTPOINT]:NAME")
            return entry
        if kind == "dev":
            if restore:
                if not (_LABEL.fullmatch(ident) and value is not None):
                    raise fail("dev[NAME]:/dev/PATH")
                self.inside(value, ("/dev",), f"external {entry!r}: its device")
            elif not (re.fullmatch(r"\d{1,10}/\d{1,10}", ident) and value is not None
                      and _LABEL.fullmatch(value)):
                raise fail("dev[MAJOR/MINOR]:NAME")
            return entry
        if kind in ("veth", "macvlan") and restore:
            if value is None or not _IFNAME.fullmatch(ident):
                raise fail(f"{kind}[INNER]:OUTER")
            outer, _, bridge = value.partition("@")
            if not _IFNAME.fullmatch(outer) or (bridge and not _IFNAME.fullmatch(bridge)) \
                    or (kind == "macvlan" and bridge):
                raise fail(f"{kind}[INNER]:OUTER" + ("[@BRIDGE]" if kind == "veth" else ""))
            return entry
        if not restore:
            forms = {"file": rf"{_NUM}:{_NUM}", "tty": rf"{_NUM}:{_NUM}", "unix": _NUM}
            if kind in forms:
                if value is not None or not re.fullmatch(forms[kind], ident):
                    raise fail(f"{kind}[{forms[kind]}]")
                return entry
            if kind in ("net", "pid"):
                if not re.fullmatch(_NUM, ident) or value is None or not _LABEL.fullmatch(value):
                    raise fail(f"{kind}[INODE]:NAME")
                return entry
        raise OptionPolicyError(f"external {entry!r}: CRIU has no {kind!r} resource for a "
                                f"{'restore' if restore else 'dump'}")


def vet_dump(policy: Policy, external: Iterable[str]) -> None:
    """Refuse a dump whose options from the network break the policy."""
    policy.external(external, restore=False)


def vet_restore(policy: Policy, *, root: str | None, cgroup_yard: str | None,
                cgroup_roots: Mapping[str, str], external: Iterable[str]) -> None:
    """Refuse a restore whose options from the network break the policy."""
    if root is not None:
        policy.root(root)
    if cgroup_yard is not None:
        policy.cgroup_yard(cgroup_yard)
    policy.cgroup_roots(cgroup_roots)
    policy.external(external, restore=True)
