"""The lab on this machine: namespace hosts that reach each other over a bridge, a service
address that moves between them with a gratuitous ARP, agents started and stopped, and nothing
left behind by ``down``, also after a crash. Needs root."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import orthros_json, run_orthros, wait_for
from pyroute2 import IPRoute
from pyroute2.netns import listnetns

from orthros_py.lab import Lab, agent_unavailable, teardown
from orthros_py.lab.lab import ALIAS, STATE_FILE
from orthros_py.net.addr import Link, move_address

PORT = 9000

# Answers every connection with its host's name, then closes it. IP_FREEBIND lets it listen on
# a service address its host does not hold (yet), as a restored service would.
NAME_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[3].encode())
    c.close()
"""

# Stands in for `orthros agent` while the real one is not there: listens where it is told.
FAKE_AGENT = """
import socket, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
host, port = args["--listen"].rsplit(":", 1)
assert args["--name"] and args["--images-root"] and open(args["--key"], "rb").read()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(port)))
s.listen(8)
while True:
    s.accept()[0].close()
"""


def lab_netns() -> set[str]:
    return {n for n in listnetns() if n.startswith("orthros-")}


def root_lab_links() -> list[str]:
    """Links in this (the root) namespace that the lab made: they carry its alias."""
    with IPRoute() as ipr:
        return [str(link.get("IFLA_IFNAME")) for link in ipr.get_links()
                if str(link.get("IFLA_IFALIAS") or "").startswith(ALIAS)]


def pids_in(netns: str) -> list[int]:
    st = os.stat(f"/run/netns/{netns}")
    found = []
    for pid in psutil.pids():
        try:
            ns = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
            found.append(pid)
    return found


@pytest.fixture
def servers(lab: Lab) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def serve(lab: Lab, started: list[subprocess.Popen[bytes]], host: str, address: str) -> None:
    p = lab.popen(host, [sys.executable, "-c", NAME_SERVER, address, str(PORT), host],
                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    started.append(p)
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n", f"the name server on {host} did not start"


def ask(lab: Lab, address: str, via: str = "client", timeout: float = 2.0) -> str:
    with lab.connect((address, PORT), via=via, timeout=timeout) as sock:
        return sock.recv(64).decode()


@pytest.mark.lab(agents=False)
def test_hosts_reach_each_other(lab: Lab, servers: list[subprocess.Popen[bytes]]) -> None:
    alpha, beta = lab.hosts
    assert [alpha.name, beta.name, lab.client.name] == ["alpha", "beta", "client"]
    assert set(listnetns()) >= {alpha.netns, beta.netns, lab.client.netns, lab.bridge_netns}
    for h in lab.hosts:
        serve(lab, servers, h.name, h.address)
    for h in lab.hosts:
        assert ask(lab, h.address) == h.name  # from the client's namespace
        assert ask(lab, h.address, via="alpha" if h is beta else "beta") == h.name
    # The caller's namespace reaches them too, over the controller link.
    assert lab.controller is not None
    with socket.create_connection((beta.address, PORT), timeout=2) as sock:
        assert sock.recv(64) == b"beta"
    # Each host sees only its own interfaces.
    assert [a.with_prefixlen for a in Link(beta.netns, "eth0").addresses()] == [beta.cidr]


@pytest.mark.lab(agents=False)
def test_status_json_shows_the_hosts(lab: Lab) -> None:
    st = orthros_json("lab", "status")
    assert st["up"] and st["healthy"]
    assert [(h["name"], h["netns"], h["agent_port"]) for h in st["hosts"]] == [
        (h.name, h.netns, h.agent_port) for h in lab.hosts]
    assert st["hosts"][0]["addresses"][0] == lab.hosts[0].cidr
    assert st["client"]["name"] == "client" and st["client"]["addresses"] == [lab.client.cidr]
    assert st["services"][0]["holder"] == "alpha"
    assert "agent" in (st["agents_note"] or "")  # none were asked for


@pytest.mark.lab(agents=False)
def test_service_address_moves_with_gratuitous_arp(
        lab: Lab, servers: list[subprocess.Popen[bytes]]) -> None:
    web = lab.service("web")
    for h in ("alpha", "beta"):
        serve(lab, servers, h, web.address)
    assert lab.holder(web.address) == lab.host("alpha")
    assert ask(lab, web.address) == "alpha"

    # Control: moved without an announcement, the client still sends to alpha's MAC, and
    # alpha, which no longer holds the address, drops the SYN.
    move = move_address(web.address, lab.host("alpha").link, lab.host("beta").link, arp_count=0)
    assert move.removed and move.added and move.arp_sent == 0
    with pytest.raises(OSError):
        ask(lab, web.address, timeout=1.0)

    # The gratuitous ARP updates the client's neighbour table: beta answers at once.
    assert lab.host("beta").link.gratuitous_arp(web.address) == 1
    assert ask(lab, web.address) == "beta"

    # And back, in one step.
    move = lab.move_service("web", "alpha")
    assert (move.src, move.dst, move.arp_sent) == (lab.host("beta").link,
                                                   lab.host("alpha").link, 1)
    assert ask(lab, web.address) == "alpha"
    assert lab.holder(web.address) == lab.host("alpha")
    assert not lab.host("beta").link.has(web.address)

    # A repeated move only announces again.
    again = move_address(web.address, lab.host("beta").link, lab.host("alpha").link)
    assert not again.removed and not again.added and again.arp_sent == 1


@pytest.mark.lab(agents=False)
def test_up_again_keeps_the_lab(lab: Lab) -> None:
    again = Lab.up(2, agents=False)
    assert again.reused and again.created == lab.created
    bigger = Lab.up(3, agents=False)  # a different lab: rebuilt
    assert not bigger.reused and [h.name for h in bigger.hosts] == ["alpha", "beta", "gamma"]
    smaller = Lab.up(2, agents=False)
    assert not smaller.reused
    assert "orthros-gamma" not in listnetns()


def test_agents_start_and_stop(tmp_path: Path) -> None:
    """The agent plumbing with a stand-in agent: pids recorded, ports waited for, status, and
    the agents killed by down."""
    fake = tmp_path / "fake_agent.py"
    fake.write_text(FAKE_AGENT)
    teardown()
    try:
        lab = Lab.up(2, agent_command=[sys.executable, str(fake)], rebuild=True)
        assert lab.agents_note is None
        pids = [h.agent_pid for h in lab.hosts]
        assert all(pids) and all(h.agent_alive() for h in lab.hosts)
        for h in lab.hosts:
            assert h.agent_pid in pids_in(h.netns)  # inside its namespaces, all three
            for kind in ("pid", "mnt"):
                assert os.readlink(f"/proc/{h.agent_pid}/ns/{kind}") == os.readlink(
                    f"/proc/{h.init_pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}")
            assert psutil.Process(h.agent_pid).ppid() == h.init_pid  # a daemon of its host
            assert h.agent_log is not None and h.agent_log.exists()
        st = Lab.load().status()
        assert all(h.agent_listening for h in st.hosts)
        with socket.create_connection((lab.hosts[1].address, 7070), timeout=2):
            pass  # reachable from here over the controller link
        key = lab.key_file
        assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
        report = lab.down()
        assert set(pids) <= set(report.killed)
        for pid in pids:
            assert pid is not None and not psutil.pid_exists(pid)
    finally:
        teardown()


def test_real_agents_listen(lab: Lab) -> None:
    # The agent command and orthros are part of the install: no reason to skip.
    assert agent_unavailable() is None
    st = lab.status()
    assert lab.agents_note is None
    assert all(h.agent_alive and h.agent_listening for h in st.hosts), st.to_dict()
    # Each agent reports a PID namespace of its own: migrations take the path of separate
    # machines (the source tree stays stopped through the restore).
    from orthros_py.cluster import Cluster
    from orthros_py.policies.hosts import HostFacts, shared_pid_space

    cluster = Cluster.of_lab(lab)
    facts = []
    for h in lab.hosts:
        agent = cluster.client(h.name)
        facts.append(HostFacts.from_agent(h.name, h.address, agent.status(), []))
    assert facts[0].pid_ns == st.hosts[0].namespaces["pid"] != facts[1].pid_ns
    assert shared_pid_space(facts[0], facts[1]) is False


@pytest.mark.lab(agents=False)
def test_down_leaves_nothing(lab: Lab, servers: list[subprocess.Popen[bytes]]) -> None:
    before = lab_netns() - {h.netns for h in lab.all_hosts} - {lab.bridge_netns}
    serve(lab, servers, "alpha", lab.host("alpha").address)
    # The server runs inside alpha's PID namespace, below the nsenter that started it; killing
    # alpha's init ends it and, with it, that nsenter, which may be gone before down looks.
    inside = [c.pid for c in psutil.Process(servers[0].pid).children()]
    report = lab.down()
    assert report.killed
    servers[0].wait(timeout=5)
    assert inside and not any(psutil.pid_exists(p) for p in inside)
    assert lab_netns() <= before, "lab namespaces left behind"
    assert root_lab_links() == []
    assert not lab.state_dir.exists()
    assert Lab.find() is None
    assert not teardown().anything  # and a second down finds nothing


def test_down_after_a_crash() -> None:
    """No state file (a killed `lab up`): down finds the namespaces by the inventory's names
    and by the aliases on the bridge's ports, and kills what runs in them."""
    teardown()
    try:
        lab = Lab.up(3, agents=False, rebuild=True)
        stray = lab.popen("gamma", ["sleep", "600"], start_new_session=True)
        wait_for(lambda: psutil.Process(stray.pid).children(), what="sleep to start in gamma")
        # sleep runs inside gamma's PID namespace, below the nsenter that started it; killing
        # gamma's init ends it and, with it, that nsenter, which may be gone before down looks.
        inside = [c.pid for c in psutil.Process(stray.pid).children()]
        (lab.state_dir / STATE_FILE).unlink()
        shutil.rmtree(lab.state_dir)
        report = teardown()
        assert report.killed
        stray.wait(timeout=5)
        assert not any(psutil.pid_exists(p) for p in inside)
        assert {h.netns for h in lab.all_hosts} | {lab.bridge_netns} <= set(report.namespaces)
        assert not {h.netns for h in lab.all_hosts} & set(listnetns())
        assert root_lab_links() == []
    finally:
        teardown()


def test_cli_up_status_down() -> None:
    teardown()
    try:
        up = orthros_json("lab", "up", "--no-agents", "--hosts", "2")
        assert [h["name"] for h in up["hosts"]] == ["alpha", "beta"] and not up["reused"]
        again = orthros_json("lab", "up", "--no-agents")
        assert again["reused"]
        res = run_orthros("lab", "exec", "beta", "--", sys.executable, "-c",
                          "import socket; print(socket.if_nameindex())")
        assert res.returncode == 0 and "eth0" in res.stdout, res.stderr
        down = orthros_json("lab", "down")
        assert "orthros-alpha" in down["namespaces"] and down["state_dir"]
        assert orthros_json("lab", "status")["up"] is False
        wait_for(lambda: not lab_netns() & {"orthros-alpha", "orthros-beta"}, 5,
                 "the namespaces to go")
    finally:
        teardown()


@pytest.mark.lab(agents=False)
def test_exec_detach_runs_a_daemon_of_the_host(lab: Lab, tmp_path: Path) -> None:
    """`lab exec --detach` starts the command inside the host's network, PID and mount
    namespaces, as a child of the host's init holding nothing of ours, and prints the pid the
    host knows it by; `lab status --json` names each host's namespaces and init."""
    st = orthros_json("lab", "status")
    every = [*st["hosts"], st["client"]]
    for h in every:
        assert set(h["namespaces"]) == {"net", "pid", "mnt"} and h["init_pid"], h
        assert h["namespaces"]["pid"] != os.stat("/proc/self/ns/pid").st_ino
        assert h["namespaces"]["mnt"] != os.stat("/proc/self/ns/mnt").st_ino
    assert len({h["namespaces"]["pid"] for h in every}) == len(every)  # one each

    log = tmp_path / "out.log"
    res = run_orthros("lab", "exec", "alpha", "--detach", "--log", str(log), "--",
                      sys.executable, "-c",
                      "import json, os, time; print(json.dumps([os.getpid(), "
                      "os.listdir('/proc')]), flush=True); time.sleep(600)")
    assert res.returncode == 0, res.stderr
    host_pid = int(res.stdout.strip())
    alpha = lab.host("alpha")
    pid = lab.machine_pid("alpha", host_pid)
    assert pid is not None and pid != host_pid
    try:
        for kind in ("net", "pid", "mnt"):
            assert os.stat(f"/proc/{pid}/ns/{kind}").st_ino == st["hosts"][0]["namespaces"][kind]
        proc = psutil.Process(pid)
        assert proc.ppid() == alpha.init_pid and os.getsid(pid) == pid
        fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert fds == {0: "/dev/null", 1: str(log), 2: str(log)}, fds
        # It sees its own pid as the host numbers it, and only the host's processes in /proc.
        wait_for(lambda: log.read_text().strip() != "", 10, "the daemon's first line")
        seen_pid, listing = json.loads(log.read_text())
        assert seen_pid == host_pid
        assert str(os.getpid()) not in listing and str(host_pid) in listing
    finally:
        os.kill(pid, 9)
    wait_for(lambda: not psutil.pid_exists(pid), 5, "its init to reap it")
