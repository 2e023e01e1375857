#!/usr/bin/env bash
# Builds the orthros Vagrant box (provider libvirt) from Debian 12's packages, with no download
# of a box: debootstrap a bookworm root with Debian's 6.1 kernel, run orthros's own set-up inside
# it (so that provisioning in a slow emulated guest finds everything in place), and package the
# root filesystem as a qcow2 disk booted by its kernel and initrd directly (no boot loader: the
# box's own Vagrantfile names them).
#
#   scripts/vm-box.sh OUT.box    build into OUT.box (about 10 minutes, mostly apt and CRIU)
#
# Called by scripts/vm.sh, which caches the box by the hash of what goes into it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:?usage: vm-box.sh OUT.box}
MIRROR=${ORTHROS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DISK_GB=8

say()  { printf '\033[1m[vm-box]\033[0m %s\n' "$*"; }
die()  { printf '\033[31m[vm-box] error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot)"

WORK=$(mktemp -d "${OUT%/*}/.build.XXXXXX")
RFS="$WORK/root"
mounted=()
cleanup() {
  local i
  for ((i=${#mounted[@]}-1; i>=0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# The packages a Vagrant guest needs (ssh with sudo, rsync for the synced folder, ifupdown and a
# DHCP client for Vagrant's Debian network configuration) and a bootable kernel; set-up adds
# orthros's own (its PKGS list), kernel headers matching this kernel among them.
INCLUDE=linux-image-amd64,initramfs-tools,zstd,systemd-sysv,udev,dbus,kmod,ifupdown,isc-dhcp-client
INCLUDE+=,openssh-server,sudo,rsync,iproute2,procps,ca-certificates,less,curl

say "debootstrap of Debian 12 (bookworm) into $RFS"
mkdir -p "$RFS"
# The host's package cache serves what it holds, so a rebuild downloads little.
debootstrap --variant=minbase --include="$INCLUDE" --cache-dir=/var/cache/apt/archives \
  bookworm "$RFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }

for m in proc sys dev dev/pts; do
  mkdir -p "$RFS/$m"
  case $m in
    proc) mount -t proc proc "$RFS/proc" ;;
    sys) mount -t sysfs sys "$RFS/sys" ;;
    *) mount --bind "/$m" "$RFS/$m" ;;
  esac
  mounted+=("$RFS/$m")
done
mount --bind /var/cache/apt/archives "$RFS/var/cache/apt/archives"
mounted+=("$RFS/var/cache/apt/archives")
cp /etc/resolv.conf "$RFS/etc/resolv.conf"
# The guest takes this machine's apt sources and its Acquire settings (a proxy, a snapshot
# archive whose Release files are past their Valid-Until), so that it installs what this machine
# can; debootstrap's single-line sources.list gives way to them when there are any.
if ls /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list >/dev/null 2>&1; then
  rm -f "$RFS/etc/apt/sources.list"
  cp /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list "$RFS/etc/apt/sources.list.d/" 2>/dev/null || true
fi
[ -f /etc/apt/sources.list ] && [ -s /etc/apt/sources.list ] && cp /etc/apt/sources.list "$RFS/etc/apt/"
for f in /etc/apt/apt.conf.d/*; do
  grep -q '^[[:space:]]*Acquire::' "$f" 2>/dev/null && cp "$f" "$RFS/etc/apt/apt.conf.d/"
done
# And what it trusts: local certificate authorities (a TLS-inspecting egress proxy's, for pip)
# and pip's system configuration.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  mkdir -p "$RFS/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$RFS/usr/local/share/ca-certificates/"
fi
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$RFS/etc/pip.conf"
# Nothing starts inside the chroot (nginx, redis and etcd would, from their postinst).
printf '#!/bin/sh\nexit 101\n' >"$RFS/usr/sbin/policy-rc.d"
chmod 0755 "$RFS/usr/sbin/policy-rc.d"
in_root() { chroot "$RFS" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
in_root update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed in the guest root"

# debootstrap took the kernel from the release alone; the headers set-up installs come from the
# sources above (updates, security): bring everything to those versions first, so that the
# kernel the guest boots and the headers BCC compiles against are one version.
say "upgrading the guest root to this machine's apt sources"
in_root apt-get update -qq >/dev/null
in_root env DEBIAN_FRONTEND=noninteractive apt-get -y -qq dist-upgrade >/dev/null 2>&1 \
  || die "apt-get dist-upgrade failed in the guest root"

say "configuring the guest: disk, network, console, the vagrant user"
cat >"$RFS/etc/fstab" <<'EOF'
/dev/vda  /  ext4  rw,relatime,errors=remount-ro  0 1
EOF
echo orthros >"$RFS/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 orthros\n' >"$RFS/etc/hosts"
# net.ifnames=0 on the kernel's command line makes the first NIC eth0: Vagrant's management
# network, reached by DHCP; Vagrant writes the private network's stanza itself.
cat >"$RFS/etc/network/interfaces" <<'EOF'
source /etc/network/interfaces.d/*
auto lo
iface lo inet loopback
allow-hotplug eth0
iface eth0 inet dhcp
EOF
# Only the modules a virtio guest needs to mount its root: a small initramfs unpacks quickly
# under software emulation.
sed -i 's/^MODULES=.*/MODULES=list/' "$RFS/etc/initramfs-tools/initramfs.conf"
printf 'virtio_pci\nvirtio_blk\nvirtio_net\next4\n' >>"$RFS/etc/initramfs-tools/modules"
in_root update-initramfs -u -k all >/dev/null 2>&1 || die "update-initramfs failed in the guest root"

in_root useradd -m -s /bin/bash vagrant
echo 'vagrant:vagrant' | in_root chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$RFS/etc/sudoers.d/vagrant"
chmod 0440 "$RFS/etc/sudoers.d/vagrant"
install -d -m 0700 -o 1000 -g 1000 "$RFS/home/vagrant/.ssh"
pub=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n1)
[ -n "$pub" ] || die "Vagrant's insecure public key is not installed (the vagrant package)"
install -m 0600 -o 1000 -g 1000 "$pub" "$RFS/home/vagrant/.ssh/authorized_keys"
# DNS lookups of the client's name would stall every ssh login in an isolated network.
echo 'UseDNS no' >"$RFS/etc/ssh/sshd_config.d/vagrant.conf"

say "running orthros's set-up inside the guest root (Debian packages, CRIU, BCC, the venv)"
mkdir -p "$RFS/orthros"
# What `vagrant up` syncs (the Vagrantfile's rsync excludes), so that its set-up finds its venv.
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) \
  | rsync -a --from0 --files-from=- "$ROOT/" "$RFS/orthros/"
in_root bash /orthros/scripts/setup.sh --image >"$WORK/setup.log" 2>&1 \
  || { tail -30 "$WORK/setup.log" >&2; die "orthros's set-up failed inside the guest root (log above)"; }
grep '^\S*\[setup\]' "$WORK/setup.log" | sed 's/^/  /' || true
say "trimming what would run for nothing in a slow guest"
# The services orthros's tests start themselves; timers that would compete for an emulated CPU.
for unit in nginx.service redis-server.service etcd.service apt-daily.timer \
            apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer; do
  in_root systemctl disable "$unit" >/dev/null 2>&1 || true
  in_root systemctl mask "$unit" >/dev/null 2>&1 || true
done
rm -f "$RFS/usr/sbin/policy-rc.d" "$RFS/etc/resolv.conf"
in_root apt-get clean
for ((i=${#mounted[@]}-1; i>=0; i--)); do umount -l "${mounted[$i]}"; done
mounted=()

kernel=$(ls "$RFS"/boot/vmlinuz-* | sort -V | tail -n1)
initrd=$(ls "$RFS"/boot/initrd.img-* | sort -V | tail -n1)
[ -f "$kernel" ] && [ -f "$initrd" ] || die "no kernel or initrd in the guest root's /boot"
krel=${kernel##*/vmlinuz-}
[ -d "$RFS/usr/src/linux-headers-$krel" ] || die "the guest root has no headers for its kernel $krel (BCC needs them)"

say "making the disk: ext4 of ${DISK_GB} GiB from the root, as qcow2"
mkdir -p "$WORK/box"
truncate -s "${DISK_GB}G" "$WORK/root.raw"
mkfs.ext4 -q -L orthros-root -d "$RFS" "$WORK/root.raw" || die "mkfs.ext4 -d failed"
qemu-img convert -O qcow2 "$WORK/root.raw" "$WORK/box/box.img"
rm -f "$WORK/root.raw"
cp "$kernel" "$WORK/box/vmlinuz"
cp "$initrd" "$WORK/box/initrd.img"
cat >"$WORK/box/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $DISK_GB}
EOF
# The box's own Vagrantfile: boot its kernel and initrd directly, root on the first disk.
cat >"$WORK/box/Vagrantfile" <<EOF
# orthros's Debian 12 box (kernel $krel), built by scripts/vm-box.sh.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0 quiet"
  end
end
EOF
echo "$krel" >"$WORK/box/kernel-release"
say "packaging $OUT"
tar -C "$WORK/box" -cf "$OUT.part" metadata.json Vagrantfile vmlinuz initrd.img kernel-release box.img
mv "$OUT.part" "$OUT"
say "box ready: $OUT ($(du -h "$OUT" | cut -f1), kernel $krel)"
