"""The fixed policy for paths and external resources that options from the network name."""

from __future__ import annotations

from typing import Any

import pytest

from orthros_py.agent import optpolicy
from orthros_py.agent.errors import Refusal
from orthros_py.agent.optpolicy import OptionPolicyError, Policy

P = Policy("/var/lib/orthros/images")


def test_a_restore_root_must_lie_below_an_allowed_root() -> None:
    assert P.root("/var/lib/orthros/images/ct1/rootfs") == "/var/lib/orthros/images/ct1/rootfs"
    assert P.root("/var/lib/machines/web/") == "/var/lib/machines/web"
    for bad in ("/", "/etc", "/var/lib/machines", "relative/rootfs", "/var/lib/machinesX/a",
                "/var/lib/machines/../../etc", "/var/lib/machines/./web",
                "/var/lib//machines/web", "/var/lib/machines/web\n"):
        with pytest.raises(OptionPolicyError):
            P.root(bad)


def test_refusals_are_bad_requests_that_say_why() -> None:
    with pytest.raises(OptionPolicyError, match=r"outside what this host allows") as exc:
        P.root("/etc/shadow")
    assert exc.value.code is Refusal.BAD_REQUEST
    with pytest.raises(OptionPolicyError, match=r"'\.\.'"):
        P.cgroup_yard("/sys/fs/cgroup/../../etc")


def test_the_cgroup_yard_is_the_cgroup_filesystem_or_below_it() -> None:
    assert P.cgroup_yard("/sys/fs/cgroup") == "/sys/fs/cgroup"
    assert P.cgroup_yard("/sys/fs/cgroup/yard") == "/sys/fs/cgroup/yard"
    for bad in ("/tmp/yard", "/sys/fs", "/sys/fs/cgroupX"):
        with pytest.raises(OptionPolicyError):
            P.cgroup_yard(bad)


def test_cgroup_roots_are_paths_inside_their_hierarchy() -> None:
    roots = {"": "/orthros/beta/svc", "cpu,cpuacct": "/beta", "name=systemd": "/x", "*": "/"}
    assert P.cgroup_roots(roots) == roots
    for bad in ({"": "../x"}, {"": "/a/../../b"}, {"": "relative"}, {"cpu;rm": "/a"},
                {"CPU": "/a"}):
        with pytest.raises(OptionPolicyError):
            P.cgroup_roots(bad)


@pytest.mark.parametrize("value", ["beta", "orthros-lab-beta", "/run/netns/beta",
                                   "/proc/1234/ns/net", "/proc/12/task/13/ns/net"])
def test_network_namespaces_by_name_or_by_their_files(value: str) -> None:
    assert P.netns(value) == value


@pytest.mark.parametrize("value", ["/etc/passwd", "/run/netns/../../etc/passwd", "/proc/self/ns/net",
                                   "/proc/1/ns/mnt", "/run/netns/a/b", ".hidden", "a b", ""])
def test_other_namespace_files_are_refused(value: str) -> None:
    with pytest.raises(OptionPolicyError):
        P.netns(value)


@pytest.mark.parametrize("entry", [
    "mnt[]", "mnt[]:m", "mnt[]:ms", "mnt[/data]:data", "dev[8/1]:disk", "file[2a:1f3]",
    "tty[8800:d]", "unix[123456]", "net[4026531992]:extnet", "pid[4026531836]:extpid",
])
def test_the_external_forms_of_a_dump(entry: str) -> None:
    assert P.external([entry], restore=False) == (entry,)


@pytest.mark.parametrize("entry", [
    "mnt[]", "mnt[data]:/var/lib/orthros/images/ct1/data", "mnt[data]:/var/lib/machines/d",
    "dev[disk]:/dev/sdb1", "veth[eth0]:veth-ct1", "veth[eth0]:veth-ct1@br0",
    "macvlan[mv0]:mvhost0",
])
def test_the_external_forms_of_a_restore(entry: str) -> None:
    assert P.external([entry], restore=True) == (entry,)


@pytest.mark.parametrize("entry,restore", [
    ("mnt[data]:/etc", True),  # a bind mount of the host's /etc into the restored tree
    ("mnt[data]:/var/lib/machines/../../../etc", True),
    ("dev[disk]:/etc/shadow", True),
    ("dev[disk]:/dev/../etc/shadow", True),
    ("veth[eth0]:a-name-far-too-long", True),
    ("veth[eth0]:v@br0;rm", True),
    ("macvlan[mv0]:m@br0", True),
    ("mnt[]:x", False),
    ("mnt[../x]:data", False),
    ("mnt[/data]:", False),
    ("file[/etc/passwd]", False),
    ("unix[12]:x", False),
    ("net[abc-]:n", False),
    ("tty[1:2]", True),  # a restore takes these through inherit-fd, not external
    ("veth[eth0]:v", False),
    ("bogus[1]", False),
    ("mnt", False),
    ("mnt[/a]:b\nmnt[]", False),
])
def test_other_external_entries_are_refused(entry: str, restore: bool) -> None:
    with pytest.raises(OptionPolicyError):
        P.external([entry], restore=restore)


def test_the_agent_vets_a_restore_as_a_whole() -> None:
    ok: dict[str, Any] = dict(root=None, cgroup_yard="/sys/fs/cgroup",
                              cgroup_roots={"": "/orthros/beta"}, external=("mnt[]",))
    optpolicy.vet_restore(P, **ok)
    with pytest.raises(OptionPolicyError, match="root"):
        optpolicy.vet_restore(P, **{**ok, "root": "/"})
    with pytest.raises(OptionPolicyError, match="external"):
        optpolicy.vet_dump(P, ["mnt[/]:x", "tty[zz:1]"])
