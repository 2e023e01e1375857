"""The VM tier: the Vagrant cluster of vagrant/Vagrantfile and vagrant/inventory.toml booted for
real by scripts/vm.sh (the inventory's first two hosts and its client, Debian 12 guests with
their own 6.1 kernel, pure cgroup v2 and a virtio NIC), and orthros driven across it from this
machine, the cluster network's .1, as a user's controller would.

This module: the cluster as the tests see it (ssh into a guest, orthros on this machine with the
VMs' inventory and key); conftest.py brings it up and down.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
SSH_CONFIG = VAGRANT_DIR / ".vagrant" / "ssh-config"
KEY = VAGRANT_DIR / ".vagrant" / "orthros-cluster.key"
INVENTORY = VAGRANT_DIR / "inventory.toml"
VM_SH = REPO / "scripts" / "vm.sh"
# Where the guests find the repository (the Vagrantfile's rsync folder) and orthros's venv.
GUEST_REPO = "/orthros"
GUEST_PY = f"{GUEST_REPO}/.venv/bin/python"
# The tier's time on this machine is mostly the box build and the guests' boot under emulation.
UP_TIMEOUT_S = 40 * 60


@dataclass
class Cluster:
    log: Path

    def ssh(self, host: str, script: str, *, timeout: float = 300, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with bash as root in guest ``host`` (over Vagrant's ssh), ``input`` on
        its stdin."""
        argv = ["ssh", "-F", str(SSH_CONFIG), "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                host, "sudo bash -c " + shlex.quote(script)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                           input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"{host}$ {script}\nexit {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def orthros(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """orthros on this machine, the cluster's controller, with the VMs' inventory and key."""
        argv = [str(Path(sys.executable).parent / "orthros"), *args,
                "--inventory", str(INVENTORY), "--key", str(KEY)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def orthros_json(self, *args: str, timeout: float = 600) -> dict[str, object]:
        r = self.orthros(*args, "--json", timeout=timeout)
        assert r.returncode == 0, f"orthros {' '.join(args)}: exit {r.returncode}\n{r.stderr}"
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def addresses(self, host: str) -> set[str]:
        out = self.ssh(host, "ip -o -4 addr show").stdout
        return {line.split()[3].split("/")[0] for line in out.splitlines()}

    def domain(self, host: str) -> str:
        # vagrant-libvirt names a domain after the Vagrantfile's directory and the machine.
        return f"{VAGRANT_DIR.name}_{host}"

    def wait_for(self, what: str, cond: object, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():  # type: ignore[operator]
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def vm_sh(cmd: str, log: Path, timeout: float) -> None:
    with log.open("a") as out:
        out.write(f"\n$ scripts/vm.sh {cmd}\n")
        out.flush()
        r = subprocess.run(["bash", str(VM_SH), cmd], stdout=out, stderr=subprocess.STDOUT,
                           timeout=timeout, check=False)
    if r.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise AssertionError(f"scripts/vm.sh {cmd} failed (exit {r.returncode}); log {log}:\n{tail}")


