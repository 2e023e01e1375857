"""The inventory: parsing, validation with clear messages, and agreement between the Python
reader and the Vagrantfile's Ruby reader of the same file. No root needed."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from orthros_py.errors import ExitStatus
from orthros_py.inventory import (
    DEFAULT_INVENTORY,
    Inventory,
    InventoryError,
    load_inventory,
    parse_inventory,
)

VAGRANTFILE = DEFAULT_INVENTORY.parent / "Vagrantfile"

BASE = """
[cluster]
subnet = "10.9.0.0/24"
agent_port = 7000

[lab]
controller = "10.9.0.1/24"

[[host]]
name = "alpha"
address = "10.9.0.11/24"

[[host]]
name = "beta"
address = "10.9.0.12"
agent_port = 7001

[client]
name = "client"
address = "10.9.0.50/24"

[[service]]
name = "web"
address = "10.9.0.100"
hosts = ["alpha", "beta"]
"""


def parse(text: str) -> Inventory:
    return parse_inventory(text, source=Path("test.toml"))


def error_of(text: str) -> str:
    with pytest.raises(InventoryError) as info:
        parse(text)
    return str(info.value)


def test_default_inventory_is_valid() -> None:
    inv = load_inventory(DEFAULT_INVENTORY)
    assert len(inv.hosts) >= 2
    assert [h.name for h in inv.hosts[:2]] == ["alpha", "beta"]
    assert inv.subnet.is_private
    for iface in (*(h.interface for h in inv.hosts), inv.client.interface):
        assert iface.ip in inv.subnet
    assert inv.lab.state_dir == Path("/run/orthros/lab")


def test_parse_fills_defaults_and_prefixes() -> None:
    inv = parse(BASE)
    assert inv.subnet == ipaddress.IPv4Network("10.9.0.0/24")
    alpha, beta = inv.hosts
    assert (alpha.address, alpha.cidr, alpha.agent_port) == ("10.9.0.11", "10.9.0.11/24", 7000)
    assert (beta.cidr, beta.agent_port) == ("10.9.0.12/24", 7001)  # the subnet's prefix
    assert inv.client.cidr == "10.9.0.50/24"
    (web,) = inv.services
    assert web.cidr == "10.9.0.100/32"  # a service address moves alone
    assert inv.may_hold("beta", "10.9.0.100") and not inv.may_hold("beta", "10.9.0.101")
    assert inv.host("beta") is beta
    assert inv.to_dict()["hosts"][1] == {"name": "beta", "address": "10.9.0.12/24",
                                         "agent_port": 7001}


def test_first_cuts_hosts_and_services() -> None:
    inv = parse(BASE).first(1)
    assert [h.name for h in inv.hosts] == ["alpha"]
    assert inv.services[0].hosts == ("alpha",)
    with pytest.raises(InventoryError, match="defines 2 hosts; 3 were asked for"):
        parse(BASE).first(3)


def test_duplicate_host_names() -> None:
    text = BASE.replace('name = "beta"', 'name = "alpha"')
    assert "duplicate host name 'alpha'" in error_of(text)


def test_duplicate_addresses() -> None:
    text = BASE.replace('"10.9.0.12"', '"10.9.0.11"')
    assert "address 10.9.0.11 is already used by host 'alpha'" in error_of(text)
    text = BASE.replace('address = "10.9.0.100"', 'address = "10.9.0.1"')
    assert "already used by [lab] controller" in error_of(text)


@pytest.mark.parametrize("address", ["10.8.0.11/24", "192.168.1.5", "10.9.0.0", "10.9.0.255"])
def test_address_outside_the_subnet(address: str) -> None:
    msg = error_of(BASE.replace('"10.9.0.11/24"', f'"{address}"'))
    assert msg.startswith("test.toml: host 'alpha'")
    assert "outside the subnet 10.9.0.0/24" in msg or "network or broadcast" in msg


def test_host_prefix_must_match_the_subnet() -> None:
    assert "is not on the subnet" in error_of(BASE.replace('"10.9.0.11/24"', '"10.9.0.11/16"'))


def test_service_outside_the_subnet() -> None:
    msg = error_of(BASE.replace('"10.9.0.100"', '"10.10.0.100"'))
    assert "service 'web': address 10.10.0.100 is outside the subnet" in msg


@pytest.mark.parametrize(("value", "why"), [
    ("0", "outside 1-65535"),
    ("65536", "outside 1-65535"),
    ("-1", "outside 1-65535"),
    ('"7070"', "must be an integer"),
    ("true", "must be an integer"),
])
def test_bad_ports(value: str, why: str) -> None:
    msg = error_of(BASE.replace("agent_port = 7001", f"agent_port = {value}"))
    assert "host 'beta': agent_port" in msg and why in msg


def test_bad_cluster_port() -> None:
    assert "[cluster]: agent_port 99999 is outside" in error_of(
        BASE.replace("agent_port = 7000", "agent_port = 99999"))


def test_service_names_unknown_host() -> None:
    msg = error_of(BASE.replace('hosts = ["alpha", "beta"]', 'hosts = ["alpha", "omega"]'))
    assert "service 'web': 'omega' is not a host of the inventory" in msg


@pytest.mark.parametrize("name", ["Alpha", "1st", "a_b", "averyveryverylongname", ""])
def test_bad_names(name: str) -> None:
    msg = error_of(BASE.replace('name = "alpha"', f'name = "{name}"'))
    assert "name" in msg


def test_unknown_keys_and_missing_tables() -> None:
    assert "unknown key in host 'alpha': adress" in error_of(
        BASE.replace('address = "10.9.0.11/24"', 'adress = "10.9.0.11/24"'))
    assert "missing [client] table" in error_of(BASE.split("[client]")[0])
    no_hosts = BASE.split("[[host]]")[0] + '[client]\naddress = "10.9.0.50"\n'
    assert "no hosts: add at least one [[host]] table" in error_of(no_hosts)


def test_client_name_clashes() -> None:
    assert "also a host's" in error_of(BASE.replace('name = "client"', 'name = "beta"'))


def test_not_toml() -> None:
    msg = error_of("[cluster\nsubnet = 1")
    assert msg.startswith("test.toml is not valid TOML")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="no inventory file at") as info:
        load_inventory(tmp_path / "nope.toml")
    assert info.value.exit_status == ExitStatus.USAGE


def test_environment_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "inv.toml"
    path.write_text(BASE)
    monkeypatch.setenv("ORTHROS_INVENTORY", str(path))
    assert load_inventory().source == path


RUBY_READ = """
module Vagrant
  def self.configure(*) end  # only the inventory is wanted, no VM
end
load ARGV[0]
require "json"
puts JSON.generate({"inventory" => INVENTORY, "machines" => MACHINES})
"""


def ruby_read(path: Path, hosts: int = 2) -> dict[str, object]:
    ruby = shutil.which("ruby")
    # ruby comes with vagrant, which test set-up installs: missing, it fails, not skips.
    assert ruby is not None, "ruby is not installed: run 'make setup-tests' (vagrant brings it)"
    res = subprocess.run([ruby, "-e", RUBY_READ, str(VAGRANTFILE)], capture_output=True,
                         text=True, timeout=60,
                         env={"ORTHROS_INVENTORY": str(path), "ORTHROS_HOSTS": str(hosts),
                              "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    data: dict[str, object] = json.loads(res.stdout)
    return data


def test_vagrantfile_reads_the_same_inventory() -> None:
    data = ruby_read(DEFAULT_INVENTORY, hosts=3)
    assert data["inventory"] == tomllib.loads(DEFAULT_INVENTORY.read_text())
    inv = load_inventory(DEFAULT_INVENTORY)
    machines = data["machines"]
    assert isinstance(machines, list)
    assert [(m["name"], m["ip"], m["role"]) for m in machines] == [
        *((h.name, h.address, "host") for h in inv.hosts[:3]),
        (inv.client.name, inv.client.address, "client")]
    assert {m["netmask"] for m in machines} == {str(inv.subnet.netmask)}
    assert [m["agent_port"] for m in machines if m["role"] == "host"] == [
        h.agent_port for h in inv.hosts[:3]]


def test_vagrantfile_reader_handles_the_subset(tmp_path: Path) -> None:
    text = BASE + '\n[vagrant]\nbox = "a # not a comment \\" quoted"  # a comment\ncpus = 2\n'
    path = tmp_path / "inv.toml"
    path.write_text(text)
    assert ruby_read(path)["inventory"] == tomllib.loads(text)


# --- fence devices and the witness ---------------------------------------------------------------

FENCED = BASE.replace('name = "alpha"\naddress = "10.9.0.11/24"\n', '''name = "alpha"
address = "10.9.0.11/24"
fence_agent = "fence_virsh"
fence_ip = "10.9.0.1"
fence_username = "root"
fence_password_script = "/etc/orthros/virsh-password"  # prints the password
fence_plug = "orthros_alpha"
fence_ipport = 22
fence_ssl_insecure = true
''').replace('agent_port = 7001\n', 'agent_port = 7001\nfence_agent = "lab"\n').replace(
    'agent_port = 7000\n', 'agent_port = 7000\nwitness = "beta"\n')


def test_hosts_name_their_fence() -> None:
    inv = parse(FENCED)
    alpha, beta = inv.hosts
    assert alpha.fence == {"agent": "fence_virsh", "ip": "10.9.0.1", "username": "root",
                           "password-script": "/etc/orthros/virsh-password",
                           "plug": "orthros_alpha", "ipport": "22", "ssl-insecure": "true"}
    assert beta.fence == {"agent": "lab"}
    assert inv.to_dict()["hosts"][1]["fence"] == {"agent": "lab"}
    assert hash(alpha) == hash(alpha)  # still usable in sets and as keys
    plain = parse(BASE)
    assert plain.hosts[0].fence is None and "fence" not in plain.hosts[0].to_dict()


def test_the_fence_settings_build_a_fence() -> None:
    from orthros_py.net.fence import FenceAgent, LabFence, fence_from_config

    inv = parse(FENCED)
    alpha, beta = inv.hosts
    assert alpha.fence is not None and beta.fence is not None
    virsh = fence_from_config(alpha.fence)
    assert isinstance(virsh, FenceAgent)
    assert "--password-script=/etc/orthros/virsh-password" in virsh.argv("off")
    lab = fence_from_config(beta.fence, host=beta.name, bridge_netns=inv.lab.bridge_netns)
    assert isinstance(lab, LabFence) and (lab.netns, lab.ifname) == ("orthros-lab", "b-beta")


@pytest.mark.parametrize(("line", "why"), [
    ('fence_plug = "alpha"', "fence settings (fence_plug) need fence_agent"),
    ('fence_agent = "virsh"', "is not a fence-agents command"),
    ('fence_agent = "fence_virsh"\nfence_password = "x"', "visible to every user"),
    ('fence_agent = "fence_virsh"\nfence_pulg = "alpha"', "option 'pulg' is not one"),
    ('fence_agent = "lab"\nfence_plug = "alpha"', "the lab fence takes only"),
    ('fence_agent = "fence_virsh"\nfence_plug = ["a"]', "fence_plug must be a string"),
])
def test_bad_fence_settings_fail_when_read(line: str, why: str) -> None:
    msg = error_of(BASE.replace('address = "10.9.0.11/24"', f'address = "10.9.0.11/24"\n{line}'))
    assert msg.startswith("test.toml: host 'alpha': ")
    assert why in msg


def test_the_witness_is_a_known_host() -> None:
    inv = parse(FENCED)
    assert inv.witness == "beta" and inv.to_dict()["witness"] == "beta"
    assert parse(BASE).witness is None
    assert "[cluster]: witness 'omega' is not a host of the inventory (hosts: alpha, beta)" in \
        error_of(FENCED.replace('witness = "beta"', 'witness = "omega"'))
    assert "witness must be a non-empty string" in error_of(
        FENCED.replace('witness = "beta"', "witness = 3"))


def test_first_drops_a_witness_left_out() -> None:
    inv = parse(FENCED)
    assert inv.first(1).witness is None
    assert inv.first(2).witness == "beta"
    assert inv.first(1).hosts[0].fence == inv.hosts[0].fence


def test_vagrantfile_reads_fence_keys_and_the_witness(tmp_path: Path) -> None:
    path = tmp_path / "inv.toml"
    path.write_text(FENCED)
    data = ruby_read(path)
    assert data["inventory"] == tomllib.loads(FENCED)
    machines = data["machines"]
    assert isinstance(machines, list)
    assert [m["name"] for m in machines] == ["alpha", "beta", "client"]


def test_groups_name_members_and_data_on_known_hosts() -> None:
    inv = parse(BASE + '\n[[group]]\nname = "db"\nmembers = ["alpha:etcd", "beta:1234"]\n'
                'data = ["alpha:/var/lib/etcd"]\n')
    g = inv.group("db")
    assert g.members == ("alpha:etcd", "beta:1234") and g.data == ("alpha:/var/lib/etcd",)
    assert inv.first(1).groups == inv.groups
    with pytest.raises(InventoryError, match="groups: db"):
        inv.group("web")
    assert "names no host" in error_of(BASE + '\n[[group]]\nname = "x"\nmembers = ["omega:1"]\n')
    assert "must not be empty" in error_of(BASE + '\n[[group]]\nname = "x"\nmembers = []\n')
    assert "list of" in error_of(BASE + '\n[[group]]\nname = "x"\nmembers = "alpha:1"\n')


def test_the_default_inventory_has_the_etcd_group() -> None:
    g = load_inventory(DEFAULT_INVENTORY).group("etcd")
    assert [m.partition(":")[0] for m in g.members] == ["alpha", "beta", "gamma"]
