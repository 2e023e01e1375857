"""Fence devices without touching one (orthros_py.net.fence): the argument lists built for
fence-agents commands, never a shell; the option allow-list; a missing command; the fence-agents
exit codes, through a stand-in agent on PATH; the inventory's settings into a Fence. No root."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from orthros_py.errors import ExitStatus, MissingFeatureError, UsageError
from orthros_py.net.fence import (
    FENCE_OPTIONS,
    Fence,
    FenceAgent,
    FenceError,
    LabFence,
    PowerState,
    check_fence_config,
    fence_from_config,
)

VIRSH = {
    "ip": "10.77.0.1",
    "username": "root",
    "password-script": "/etc/orthros/virsh-password",
    "plug": "orthros_alpha",
    "ipport": "22",
    "ssl-insecure": "false",
    "inet4-only": "true",
}

# A stand-in for a fence-agents command: records its argv, keeps the plug's state in a file,
# and answers with the fence-agents exit codes (status: 0 on, 2 off; 1 on failure).
STUB = """\
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
state = os.path.join(here, "state")
action = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--action="))
if os.path.exists(os.path.join(here, "unreachable")):
    sys.stderr.write("Failed: Unable to connect/login to fencing device\\n")
    sys.exit(1)
if action in ("on", "off"):
    open(state, "w").write(action)
    sys.exit(0)
if action == "status":
    sys.exit(2 if os.path.exists(state) and open(state).read() == "off" else 0)
sys.exit(1)
"""


@pytest.fixture
def stub_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding a fence_virsh stand-in, and PATH set to it alone."""
    d = tmp_path / "bin"
    d.mkdir()
    agent = d / "fence_virsh"
    agent.write_text(f"#!{sys.executable}\n{STUB}")
    agent.chmod(agent.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(d))
    return d


def calls(d: Path) -> list[list[str]]:
    return [json.loads(line) for line in (d / "calls.jsonl").read_text().splitlines()]


def test_argv_for_fence_virsh() -> None:
    fence = FenceAgent("fence_virsh", VIRSH)
    assert fence.argv("off") == [
        "fence_virsh", "--action=off",
        "--inet4-only",  # a flag that is set; ssl-insecure = false is left out
        "--ip=10.77.0.1", "--ipport=22",
        "--password-script=/etc/orthros/virsh-password",
        "--plug=orthros_alpha", "--username=root",
    ]
    assert fence.argv("status", "/usr/sbin/fence_virsh")[:2] == ["/usr/sbin/fence_virsh",
                                                                 "--action=status"]
    assert fence.describe() == "fence_virsh orthros_alpha via 10.77.0.1"


def test_runs_through_an_argument_list_never_a_shell(stub_path: Path) -> None:
    fence = FenceAgent("fence_virsh", {"ip": "host; touch /tmp/pwned", "plug": "$(id)"})
    fence.off()
    (argv,) = calls(stub_path)
    assert argv == ["--action=off", "--ip=host; touch /tmp/pwned", "--plug=$(id)"]


def test_off_on_status_follow_the_fence_agents_exit_codes(stub_path: Path) -> None:
    fence = FenceAgent("fence_virsh", {"ip": "10.77.0.1", "plug": "alpha"})
    assert fence.status() == PowerState.ON
    assert PowerState.ON.value == "on"
    fence.off()
    assert fence.status() == "off"
    fence.on()
    assert fence.status() == "on"
    assert [c[0] for c in calls(stub_path)] == ["--action=status", "--action=off",
                                                "--action=status", "--action=on",
                                                "--action=status"]


def test_an_unreachable_device_is_a_failure(stub_path: Path) -> None:
    (stub_path / "unreachable").touch()
    fence = FenceAgent("fence_virsh", {"ip": "10.77.0.1", "plug": "alpha"})
    with pytest.raises(FenceError, match="off failed with exit code 1: Failed: Unable to connect"):
        fence.off()
    with pytest.raises(FenceError, match="status failed with exit code 1"):
        fence.status()


def test_a_missing_command_says_what_to_install(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    fence = FenceAgent("fence_ipmilan", {"ip": "10.0.0.9", "lanplus": "true"})
    with pytest.raises(MissingFeatureError) as info:
        fence.off()
    assert "fence-agents is not installed: no fence_ipmilan on PATH" in str(info.value)
    assert info.value.hint == "apt-get install fence-agents"
    assert info.value.exit_status == ExitStatus.MISSING_FEATURE


@pytest.mark.parametrize(("options", "why"), [
    ({"password": "secret"}, "visible to every user"),
    ({"action": "reboot"}, "action is set by orthros"),
    ({"ssh-options": "-o ProxyCommand=evil"}, "'ssh-options' is not one orthros passes on"),
    ({"ipmitool-path": "/tmp/x"}, "'ipmitool-path' is not one"),
    ({"pulg": "alpha"}, "'pulg' is not one orthros passes on (allowed: "),
    ({"ssl-insecure": "maybe"}, "is a flag: true or false"),
    ({"plug": "a\nb"}, "non-empty value on one line"),
    ({"plug": ""}, "non-empty value"),
    ({"ipport": 22}, "must be a string"),
])
def test_options_outside_the_allow_list_are_refused(options: dict[str, str], why: str) -> None:
    with pytest.raises(UsageError) as info:
        FenceAgent("fence_virsh", options)
    assert why in str(info.value)


@pytest.mark.parametrize("agent", ["virsh", "fence_virsh; ls", "/usr/sbin/fence_virsh",
                                   "fence_../x", "fence_", "Fence_virsh", "fence-virsh"])
def test_only_fence_agents_command_names(agent: str) -> None:
    with pytest.raises(UsageError, match="is not a fence-agents command"):
        FenceAgent(agent, {})


def test_the_allow_list_covers_the_documented_options() -> None:
    assert {"ip", "ipport", "username", "password-script", "plug", "ssl", "ssl-insecure",
            "method"} <= FENCE_OPTIONS
    assert "password" not in FENCE_OPTIONS


def test_fence_from_config() -> None:
    lab = fence_from_config({"agent": "lab"}, host="alpha")
    assert isinstance(lab, LabFence)
    assert (lab.netns, lab.ifname) == ("orthros-lab", "b-alpha")
    other = fence_from_config({"agent": "lab", "netns": "my-lab"}, host="beta",
                              bridge_netns="ignored")
    assert isinstance(other, LabFence) and (other.netns, other.ifname) == ("my-lab", "b-beta")
    assert fence_from_config({"agent": "lab"}, host="beta",
                             bridge_netns="lab2").describe() == "lab port b-beta in namespace lab2"
    virsh = fence_from_config({"agent": "fence_virsh", "ip": "10.77.0.1", "plug": "alpha"})
    assert isinstance(virsh, FenceAgent) and virsh.options == {"ip": "10.77.0.1",
                                                               "plug": "alpha"}


@pytest.mark.parametrize(("cfg", "why"), [
    ({}, "a fence needs an agent"),
    ({"agent": "lab", "plug": "x"}, "the lab fence takes only ifname, netns, not plug"),
    ({"agent": "fence_virsh", "password": "x"}, "visible to every user"),
    ({"agent": "ipmi"}, "is not a fence-agents command"),
])
def test_bad_fence_settings(cfg: dict[str, str], why: str) -> None:
    with pytest.raises(UsageError) as info:
        check_fence_config(cfg)
    assert why in str(info.value)


def test_a_lab_fence_needs_its_host() -> None:
    with pytest.raises(UsageError, match="needs the host's name"):
        fence_from_config({"agent": "lab"})


def test_the_interface_is_abstract() -> None:
    with pytest.raises(TypeError):
        Fence()  # type: ignore[abstract]
