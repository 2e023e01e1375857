#!/usr/bin/env bash
# The orthros cluster as Vagrant VMs on this machine: vagrant/Vagrantfile and its inventory, as
# users get them, booted with libvirt.
#
#   scripts/vm.sh up      install what VMs need, build the box once (cached), start libvirt,
#                         `vagrant up` the inventory's first two hosts and its client (make vm)
#   scripts/vm.sh down    destroy the VMs and stop the libvirt daemons this script started
#                         (make vm-down)
#   scripts/vm.sh box     only build (or find) the box
#   scripts/vm.sh status  what runs
#
# Without hardware virtualization (no vmx/svm flag in /proc/cpuinfo, as on orthros's development
# machines) the guests run under QEMU's software emulation (TCG): the same Vagrantfile, slower.
# Every step says what it does; each is skipped when already done, so `up` can be run again.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${ORTHROS_VM_STATE:-/var/lib/orthros/vm}
BOX_NAME=orthros-bookworm
export VAGRANT_HOME="$STATE/vagrant.d"   # the box and plugins of this cluster, not the user's
export VAGRANT_CWD="$ROOT/vagrant"
export VAGRANT_DEFAULT_PROVIDER=libvirt
export LIBVIRT_DEFAULT_URI=qemu:///system
export ORTHROS_VAGRANT_BOX=${ORTHROS_VAGRANT_BOX:-$BOX_NAME}
export ORTHROS_VM_CONSOLE=${ORTHROS_VM_CONSOLE:-$STATE/console}   # each guest's serial console, NAME.log

say()  { printf '\033[1m[vm]\033[0m %s\n' "$*"; }
die()  { printf '\033[31m[vm] error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (libvirt's system daemon, the box build)"
mkdir -p "$STATE" "$ORTHROS_VM_CONSOLE"

# Hardware virtualization or QEMU's emulation; the Vagrantfile reads the choice.
if [ -z "${ORTHROS_VM_DRIVER:-}" ]; then
  if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ]; then
    ORTHROS_VM_DRIVER=kvm
  else
    ORTHROS_VM_DRIVER=qemu
  fi
fi
export ORTHROS_VM_DRIVER

PKGS=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu
      dnsmasq-base debootstrap e2fsprogs rsync openssh-client vagrant vagrant-libvirt)

install_packages() {
  local missing=() p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "QEMU, libvirt and Vagrant present"
    return
  fi
  say "installing ${missing[*]}"
  apt-get update -qq
  # Their daemons must not start from the postinst: this script starts libvirt itself.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 0755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' RETURN
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The box is rebuilt when anything that goes into it changes: its build script, orthros's
# set-up (and with it the package list and CRIU's patches), the Python dependencies.
box_hash() {
  cat "$ROOT/scripts/vm-box.sh" "$ROOT/scripts/setup.sh" "$ROOT/pyproject.toml" \
      "$ROOT"/scripts/criu-patches/*.patch | sha256sum | cut -c1-16
}

ensure_box() {
  local h file have
  h=$(box_hash)
  file="$STATE/$BOX_NAME-$h.box"
  if [ ! -f "$file" ]; then
    say "building the box $BOX_NAME ($h): Debian 12 with orthros set up, about 10 minutes"
    rm -f "$STATE/$BOX_NAME"-*.box
    bash "$ROOT/scripts/vm-box.sh" "$file"
  else
    say "box $BOX_NAME ($h) built already: $file"
  fi
  have=$(cat "$STATE/box-added" 2>/dev/null || true)
  if [ "$have" != "$h" ] || [[ "$(vagrant box list 2>/dev/null)" != *"$BOX_NAME "* ]]; then
    say "adding the box to Vagrant ($VAGRANT_HOME)"
    vagrant box add --force --name "$BOX_NAME" "$file" >/dev/null
    # A new box also needs a new base volume in libvirt's pool (vagrant-libvirt keeps the old).
    virsh -q vol-delete --pool default "${BOX_NAME}_vagrant_box_image_0_box.img" >/dev/null 2>&1 || true
    echo "$h" >"$STATE/box-added"
  fi
}

libvirt_running() { virsh -q version >/dev/null 2>&1; }

start_libvirt() {
  if libvirt_running; then
    say "libvirt is running"
  else
    # No systemd here to socket-activate them: start the daemons directly, and remember that
    # this script did, so that `down` stops them and only them.
    say "starting virtlogd and libvirtd"
    # libvirt turns IP forwarding on for its NAT network (Vagrant's management network) and
    # leaves it on: `down` puts back what was here before.
    sysctl -n net.ipv4.ip_forward >"$STATE/ip_forward-before"
    mkdir -p /run/libvirt
    pgrep -x virtlogd >/dev/null || virtlogd -d
    libvirtd -d
    for _ in $(seq 50); do libvirt_running && break; sleep 0.2; done
    libvirt_running || die "libvirtd did not answer (see journal or /var/log/libvirt)"
    touch "$STATE/libvirt-started"
  fi
  if ! virsh -q pool-info default >/dev/null 2>&1; then
    say "defining libvirt's storage pool 'default' (/var/lib/libvirt/images)"
    mkdir -p /var/lib/libvirt/images
    virsh -q pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
    virsh -q pool-autostart default >/dev/null
  fi
  # (no `| grep -q`: under pipefail its early exit fails the pipe)
  [[ "$(virsh -q pool-info default)" == *running* ]] || virsh -q pool-start default >/dev/null
}

stop_libvirt() {
  [ -f "$STATE/libvirt-started" ] || { say "libvirt was not started by this script: left running"; return; }
  say "stopping libvirtd and virtlogd"
  # The networks vagrant-libvirt defined stay defined (inactive) for the next `up`.
  for n in $(virsh -q net-list --name 2>/dev/null); do virsh -q net-destroy "$n" >/dev/null 2>&1 || true; done
  pkill -x libvirtd || true
  pkill -x virtlogd || true
  for _ in $(seq 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.2; done
  # libvirt leaves its (empty) firewall chains and the jumps to them: remove both; its next
  # start makes them again.
  local ipt t rule chain
  for ipt in iptables ip6tables; do
    command -v "$ipt" >/dev/null || continue
    for t in filter nat mangle; do
      "$ipt" -t "$t" -S 2>/dev/null | grep -E '^-A .* -j LIBVIRT_' | while read -r _ rule; do
        # shellcheck disable=SC2086  # the rule's words, as iptables printed them
        "$ipt" -t "$t" -D $rule 2>/dev/null || true
      done
      for chain in $("$ipt" -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^LIBVIRT_/ {print $2}'); do
        "$ipt" -t "$t" -F "$chain" 2>/dev/null || true
        "$ipt" -t "$t" -X "$chain" 2>/dev/null || true
      done
    done
  done
  if [ -f "$STATE/ip_forward-before" ]; then
    sysctl -qw net.ipv4.ip_forward="$(cat "$STATE/ip_forward-before")"
    rm -f "$STATE/ip_forward-before"
  fi
  rm -f "$STATE/libvirt-started"
}

cmd=${1:-up}
case "$cmd" in
  up)
    install_packages
    start_libvirt
    ensure_box
    say "vagrant up (driver $ORTHROS_VM_DRIVER$([ "$ORTHROS_VM_DRIVER" = qemu ] && echo ': software emulation, a few minutes'))"
    # (without its progress bars: the box upload draws thousands)
    vagrant up --provider libvirt --no-parallel | stdbuf -o0 tr '\r' '\n' | grep --line-buffered -v 'Progress: '
    # Machines that were running already keep their old copy of the repository.
    say "syncing the repository to /orthros in every guest"
    vagrant rsync >/dev/null
    vagrant ssh-config >"$ROOT/vagrant/.vagrant/ssh-config"
    # Agents that were running already run the code of their start: restart them on the new
    # copy (the unit's KillMode=process leaves the trees they restored running).
    for m in $(vagrant status --machine-readable | awk -F, '$3=="state" && $4=="running" {print $2}'); do
      ssh -F "$ROOT/vagrant/.vagrant/ssh-config" -o LogLevel=ERROR "$m" \
        'systemctl -q is-active orthros-agent.service || exit 0
         sudo systemctl restart orthros-agent.service
         run=$(systemctl show -p InvocationID --value orthros-agent.service)
         for _ in $(seq 120); do sudo journalctl -q _SYSTEMD_INVOCATION_ID="$run" \
           | grep -q " listening on " && exit 0; sleep 0.5; done; exit 1' \
        || die "the agent on $m did not come back after a restart (journalctl -u orthros-agent there)"
    done
    say "up: $(vagrant status --machine-readable | awk -F, '$3=="state" {printf "%s=%s ", $2, $4}')"
    say "ssh: ssh -F vagrant/.vagrant/ssh-config alpha; agents' key: vagrant/.vagrant/orthros-cluster.key"
    ;;
  down)
    if libvirt_running && [ -d "$ROOT/vagrant/.vagrant/machines" ]; then
      say "destroying the VMs"
      vagrant destroy -f || true
    fi
    rm -f "$ROOT/vagrant/.vagrant/ssh-config"
    libvirt_running && stop_libvirt
    say "down"
    ;;
  box)
    install_packages
    start_libvirt
    ensure_box
    ;;
  status)
    libvirt_running || { say "libvirt is not running: no VMs"; exit 0; }
    vagrant status
    ;;
  *) die "unknown command $cmd (up, down, box, status)" ;;
esac
