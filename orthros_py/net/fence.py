"""Fence devices: what cuts a host off from outside before another takes its service.

Two kinds behind one small interface (``Fence``: off, on, status, describe):

- ``LabFence``: fabric fencing of a lab host (``orthros lab``): its bridge port ``b-NAME``, in the
  lab's bridge namespace, set down or up over rtnetlink (pyroute2), as a managed switch would
  disable a port. The host keeps running, cut off from every other. Needs root (CAP_NET_ADMIN,
  CAP_SYS_ADMIN for setns).
- ``FenceAgent``: a ClusterLabs fence-agents command (``fence_virsh`` for VMs, ``fence_ipmilan``,
  ``fence_redfish`` for machines), run as an argument list through ``orthros_py.run``, never a
  shell, with options from a fixed allow-list. Exit codes follow the fence-agents API: ``off``
  and ``on`` 0 on success; ``status`` 0 for on, 2 for off, 1 when the device cannot be reached.
  Debian packages them as ``fence-agents``.

``fence_from_config`` builds either from an inventory host's ``fence`` settings, and
``check_fence_config`` validates those settings without touching anything, so that a typo fails
when the inventory is read, not at failover.
"""

from __future__ import annotations

import abc
import enum
import re
import shutil
from collections.abc import Mapping
from typing import Any

from orthros_py.errors import MissingFeatureError, OrthrosError, UsageError
from orthros_py.run import run

LAB_AGENT = "lab"
LAB_BRIDGE_NETNS = "orthros-lab"  # the lab's default ([lab] bridge_netns)
LAB_PORT_PREFIX = "b-"  # the lab names a host's bridge port b-NAME
INSTALL_HINT = "apt-get install fence-agents"
DEFAULT_TIMEOUT = 60.0  # an agent waits up to its power-timeout (20 s) after its login

_AGENT_RE = re.compile(r"^fence_[a-z0-9_]+$")
# Option values go into one argv element each ("--ip=VALUE"), so they cannot add options; a
# control character would still mangle an agent's own stdin-style parsing or its logs.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

# The fence-agents options orthros passes on (their long names): where the device is, how to
# log in, which machine. Left out on purpose: "password" (visible to every user in ps; use
# password-script), "action" (orthros sets it), and options that name a program to run or pass
# options on to ssh (ssh-options, ssh-path, ipmitool-path, sudo-path, ...).
VALUE_OPTIONS = frozenset({
    "ip", "ipport", "username", "password-script", "identity-file", "plug", "method",
    "systems-uri", "redfish-uri", "cipher", "privlvl", "auth",
    "power-timeout", "power-wait", "login-timeout", "shell-timeout",
})
FLAG_OPTIONS = frozenset({
    "ssl", "ssl-insecure", "ssl-secure", "notls", "lanplus", "ssh", "inet4-only", "inet6-only",
})
FENCE_OPTIONS = VALUE_OPTIONS | FLAG_OPTIONS
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
LAB_OPTIONS = frozenset({"netns", "ifname"})


class FenceError(OrthrosError):
    """A fence device refused, failed or could not be reached: the host is NOT known to be
    fenced (a timeout is a failure, never a success)."""


class PowerState(enum.StrEnum):
    ON = "on"  # the host can reach the others (powered, or its link up)
    OFF = "off"  # fenced


class Fence(abc.ABC):
    """Something that cuts one host off from outside, and lets it back."""

    @abc.abstractmethod
    def off(self) -> None:
        """Fence the host; returns only once it is fenced, else raises FenceError."""

    @abc.abstractmethod
    def on(self) -> None:
        """Let the host back."""

    @abc.abstractmethod
    def status(self) -> str:
        """``"on"`` or ``"off"`` (a PowerState); FenceError if the device cannot say."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line naming the device and the host, for logs and messages."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class LabFence(Fence):
    """A lab host's bridge port (``ifname``, in the bridge namespace ``netns``) set down/up."""

    def __init__(self, netns: str, ifname: str) -> None:
        if not netns or not ifname:
            raise UsageError("a lab fence needs the bridge namespace and the port's name")
        self.netns = netns
        self.ifname = ifname

    def describe(self) -> str:
        return f"lab port {self.ifname} in namespace {self.netns}"

    def _set(self, state: str) -> None:
        # pyroute2 only when a lab fence acts: the inventory imports this module to validate.
        from pyroute2 import NetlinkError

        from orthros_py.net.addr import iproute

        try:
            with iproute(self.netns) as ipr:
                ipr.link("set", index=self._index(ipr), state=state)
        except NetlinkError as err:
            raise FenceError(f"cannot set {self.describe()} {state}: {err}",
                             host=self.netns) from err

    def _index(self, ipr: Any) -> int:
        found = ipr.link_lookup(ifname=self.ifname)
        if not found:
            raise FenceError(f"no {self.describe()}: is the lab up?", host=self.netns)
        return int(found[0])

    def off(self) -> None:
        self._set("down")

    def on(self) -> None:
        self._set("up")

    def status(self) -> str:
        from orthros_py.net.addr import iproute

        iff_up = 0x1  # IFF_UP: the administrative state, what off/on set
        with iproute(self.netns) as ipr:
            link = ipr.get_links(self._index(ipr))[0]
        return PowerState.ON if int(link["flags"]) & iff_up else PowerState.OFF


def check_agent_options(agent: str, options: Mapping[str, str]) -> dict[str, str]:
    """The options of fence-agents command ``agent``, validated (a copy); UsageError names
    the first one refused and why."""
    if not isinstance(agent, str) or not _AGENT_RE.match(agent):
        raise UsageError(f"{agent!r} is not a fence-agents command: its name must be "
                         "fence_ followed by a-z, 0-9 and _ (as fence_virsh, fence_ipmilan)")
    out: dict[str, str] = {}
    for name, value in options.items():
        if name == "password":
            raise UsageError(f"{agent}: a password on the command line is visible to every user "
                             "(ps): give password-script, a program that prints it")
        if name == "action":
            raise UsageError(f"{agent}: action is set by orthros (off, on, status)")
        if name not in FENCE_OPTIONS:
            raise UsageError(f"{agent}: option {name!r} is not one orthros passes on "
                             f"(allowed: {', '.join(sorted(FENCE_OPTIONS))})")
        if not isinstance(value, str):
            raise UsageError(f"{agent}: option {name} must be a string, not {value!r}")
        if name in FLAG_OPTIONS:
            if value.lower() not in _TRUE | _FALSE:
                raise UsageError(f"{agent}: option {name} is a flag: true or false, "
                                 f"not {value!r}")
        elif not value or _CONTROL_RE.search(value):
            raise UsageError(f"{agent}: option {name} must be a non-empty value on one line, "
                             f"not {value!r}")
        out[name] = value
    return out


class FenceAgent(Fence):
    """A fence-agents command with its options (long names, without the dashes)."""

    def __init__(self, agent: str, options: Mapping[str, str], *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.options = check_agent_options(agent, options)
        self.agent = agent
        self.timeout = timeout

    def describe(self) -> str:
        target = self.options.get("plug") or self.options.get("ip") or "?"
        where = f" via {self.options['ip']}" if "plug" in self.options and "ip" in self.options \
            else ""
        return f"{self.agent} {target}{where}"

    def argv(self, action: str, command: str | None = None) -> list[str]:
        """The argument list for ``action`` (off, on, status): ``--name=value`` for each option,
        ``--name`` for each flag that is set; ``command``: the agent's path."""
        args = [command or self.agent, f"--action={action}"]
        for name in sorted(self.options):
            value = self.options[name]
            if name in FLAG_OPTIONS:
                if value.lower() in _TRUE:
                    args.append(f"--{name}")
            else:
                args.append(f"--{name}={value}")
        return args

    def _command(self) -> str:
        path = shutil.which(self.agent)
        if path is None:
            raise MissingFeatureError(f"fence-agents is not installed: no {self.agent} on PATH",
                                      hint=INSTALL_HINT)
        return path

    def _run(self, action: str) -> int:
        argv = self.argv(action, self._command())
        proc = run(argv, timeout=self.timeout, check=False)
        rc = proc.returncode
        if action == "status" and rc in (0, 2):
            return rc
        if rc != 0:
            last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines()
                    or ["no output"])[-1]
            raise FenceError(f"{self.describe()}: {action} failed with exit code {rc}: {last}")
        return rc

    def off(self) -> None:
        self._run("off")

    def on(self) -> None:
        self._run("on")

    def status(self) -> str:
        return PowerState.ON if self._run("status") == 0 else PowerState.OFF


def check_fence_config(cfg: Mapping[str, str]) -> dict[str, str]:
    """An inventory host's fence settings, validated without touching anything (a copy):
    ``{"agent": "lab"}`` (optionally ``netns``, ``ifname``) or ``{"agent": "fence_NAME",
    OPTION: VALUE, ...}``."""
    agent = cfg.get("agent")
    if not agent:
        raise UsageError("a fence needs an agent: lab, or a fence-agents command such as "
                         "fence_virsh")
    rest = {k: v for k, v in cfg.items() if k != "agent"}
    if agent == LAB_AGENT:
        extra = sorted(set(rest) - LAB_OPTIONS)
        if extra:
            raise UsageError(f"the lab fence takes only {', '.join(sorted(LAB_OPTIONS))}, "
                             f"not {', '.join(extra)}")
        return {"agent": agent, **rest}
    return {"agent": agent, **check_agent_options(agent, rest)}


def fence_from_config(cfg: Mapping[str, str], *, host: str | None = None,
                      bridge_netns: str = LAB_BRIDGE_NETNS,
                      timeout: float = DEFAULT_TIMEOUT) -> Fence:
    """The fence an inventory host's ``fence`` settings describe. For the lab fence, ``host``
    names the host (its port is ``b-HOST``) and ``bridge_netns`` the lab's bridge namespace,
    unless the settings name ``ifname`` and ``netns`` themselves."""
    checked = check_fence_config(cfg)
    agent = checked.pop("agent")
    if agent == LAB_AGENT:
        ifname = checked.get("ifname") or (f"{LAB_PORT_PREFIX}{host}" if host else None)
        if ifname is None:
            raise UsageError("a lab fence needs the host's name (or ifname)")
        return LabFence(checked.get("netns", bridge_netns), ifname)
    return FenceAgent(agent, checked, timeout=timeout)
