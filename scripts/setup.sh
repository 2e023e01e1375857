#!/usr/bin/env bash
# Installs everything orthros needs on a fresh Debian 12 host, idempotently:
#   Debian packages, a CRIU that works on this kernel (>= 4.2, `criu check` passing),
#   pycriu from the same CRIU source, BCC with kernel headers it can find,
#   a virtual environment at .venv with orthros installed, and `orthros` on PATH.
# A second run with everything in place changes nothing and takes a few seconds.
# Needs root (apt, /usr/local, /lib/modules).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/.venv"
SRC_BASE=/usr/local/src/orthros
MIN_CRIU=4.2
PREFIX=/usr/local

say()  { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
warn() { printf '\033[33m[setup] warning:\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get, /usr/local and /lib/modules are written)"

# --tests: also what only the test suite needs (vagrant, to validate vagrant/Vagrantfile).
# --image: set up a root filesystem that will boot another kernel (scripts/vm-box.sh runs this in
#   a chroot): nothing is checked against, or configured for, the kernel running now; the
#   guest's own run of this script at provisioning does that.
WITH_TESTS=0
IMAGE=0
for arg in "$@"; do
  case "$arg" in
    --tests) WITH_TESTS=1 ;;
    --image) IMAGE=1 ;;
    *) die "unknown option $arg (known: --tests, --image)" ;;
  esac
done

# --- Debian packages ------------------------------------------------------------------------
# Build dependencies of CRIU (PLATFORM.md), BCC, the lab's tools, the benchmark workloads,
# and btrfs-progs for orthros sync's data directory snapshots (btrfs subvolumes).
PKGS=(
  build-essential pkg-config libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler
  protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev
  libnftables-dev uuid-dev libgnutls28-dev libaio-dev xz-utils dpkg-dev
  python3 python3-venv python3-pip
  python3-bpfcc bpfcc-tools libbpfcc linux-headers-amd64
  iproute2 iptables nftables iputils-arping util-linux procps
  nginx apache2-utils wrk redis-server python3-matplotlib
  etcd-server etcd-client btrfs-progs
)
# vagrant alone finds "No usable default provider"; vagrant-libvirt is the provider the
# Vagrantfile names (a libvirt/QEMU host needs no hypervisor package to validate it).
[ "$WITH_TESTS" = 1 ] && PKGS+=(vagrant vagrant-libvirt)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  # nginx and redis would start as services on a host with systemd; orthros starts its own.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present"
fi

# --- kernel settings ---------------------------------------------------------------------------
# CRIU drains a frozen tree's memory into pipes of up to 4 MiB (819 pages, rounded up). Without
# CAP_SYS_RESOURCE (containers, VMs, this machine's root) no pipe may grow beyond
# fs.pipe-max-size, 1 MiB by default: the drain then takes twice as long, all of it frozen
# (measured with a lazy dump of 1 GiB: 130 against 65 ms). Kept across reboots in sysctl.d.
PIPE_MAX=4194304
if [ "$IMAGE" = 1 ]; then
  printf '# orthros: CRIU drains a frozen tree'"'"'s memory into 4 MiB pipes\nfs.pipe-max-size = %s\n' \
    "$PIPE_MAX" > /etc/sysctl.d/60-orthros.conf
elif [ "$(cat /proc/sys/fs/pipe-max-size)" -lt "$PIPE_MAX" ]; then
  printf '# orthros: CRIU drains a frozen tree'"'"'s memory into 4 MiB pipes\nfs.pipe-max-size = %s\n' \
    "$PIPE_MAX" > /etc/sysctl.d/60-orthros.conf
  sysctl -qw fs.pipe-max-size="$PIPE_MAX" || die "cannot raise fs.pipe-max-size to $PIPE_MAX"
  say "fs.pipe-max-size raised to 4 MiB (/etc/sysctl.d/60-orthros.conf): CRIU freezes a tree half as long per GiB"
fi

# --- CRIU -------------------------------------------------------------------------------------
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

criu_ok() {  # $1: binary. True when it is new enough and `criu check` passes on this kernel.
  local bin=$1 v
  [ -x "$bin" ] || return 1
  v=$("$bin" --version 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$v" ] && version_ge "$v" "$MIN_CRIU" && { [ "$IMAGE" = 1 ] || "$bin" check >/dev/null 2>&1; }
}

# Fixes orthros carries for CRIU (each says why in its header); a CRIU orthros built is built
# again when this set changes. A working system CRIU is used as it is, without them.
PATCHES=("$ROOT"/scripts/criu-patches/*.patch)
patch_sum=$(cat "${PATCHES[@]}" | sha256sum | cut -d' ' -f1)
PATCH_STAMP="$SRC_BASE/patches.applied"

criu_src=$(ls -d "$SRC_BASE"/criu-* 2>/dev/null | sort -V | tail -n1 || true)
sys_criu=$(command -v criu || true)
ours_current() {  # True unless the CRIU on PATH is orthros's build from an older patch set.
  [ "$sys_criu" != "$PREFIX/sbin/criu" ] || [ "$(cat "$PATCH_STAMP" 2>/dev/null)" = "$patch_sum" ]
}
if [ -n "$sys_criu" ] && criu_ok "$sys_criu" && ours_current && [ -n "$criu_src" ] \
    && [ -d "$criu_src/lib/pycriu/images" ]; then
  say "CRIU present: $("$sys_criu" --version | head -n1) at $sys_criu"
else
  if [ -n "$sys_criu" ] && criu_ok "$sys_criu"; then
    say "system CRIU works; fetching its source only for pycriu"
  fi
  mkdir -p "$SRC_BASE"
  if [ -z "$criu_src" ]; then
    # bookworm has no working CRIU (3.17 fails on kernels >= 6.13, 4.1 cannot dump TCP on >= 6.16);
    # take the newest upstream source tarball that Debian unstable carries, through an apt
    # configuration of its own so that the system's binary sources stay bookworm.
    APTDIR="$SRC_BASE/apt"
    mkdir -p "$APTDIR/lists/partial"
    echo "deb-src http://deb.debian.org/debian unstable main" > "$APTDIR/sources.list"
    APTOPT=(-o "Dir::Etc::SourceList=$APTDIR/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
            -o "Dir::State::Lists=$APTDIR/lists" -o "APT::Sandbox::User=root")
    say "fetching CRIU source from Debian unstable"
    apt-get "${APTOPT[@]}" update -qq
    ver=$(apt-cache "${APTOPT[@]}" showsrc criu | awk '/^Version:/ {print $2}' | sort -V | tail -n1)
    upstream=${ver#*:}; upstream=${upstream%-*}
    version_ge "$upstream" "$MIN_CRIU" || die "Debian unstable offers CRIU $upstream; orthros needs >= $MIN_CRIU"
    # Only the upstream tarball is wanted; the Debian packaging part may be missing (404): ignore it.
    (cd "$SRC_BASE" && apt-get "${APTOPT[@]}" source --download-only "criu=$ver" >/dev/null 2>&1 || true)
    tarball="$SRC_BASE/criu_${upstream}.orig.tar.xz"
    [ -f "$tarball" ] || die "could not download $tarball from the Debian archive"
    tar -C "$SRC_BASE" -xf "$tarball"
    criu_src="$SRC_BASE/criu-$upstream"
  fi
  # A tree patched with another version of orthros's patches cannot take the new ones (nor give
  # them back): unpack it again from the tarball kept beside it.
  TREE_STAMP="$criu_src/.orthros-patches"
  tarball="$SRC_BASE/criu_${criu_src##*/criu-}.orig.tar.xz"
  built_with=$(cat "$TREE_STAMP" 2>/dev/null || cat "$PATCH_STAMP" 2>/dev/null || true)
  if [ -n "$built_with" ] && [ "$built_with" != "$patch_sum" ] && [ -f "$tarball" ]; then
    say "orthros's CRIU patches changed: unpacking $(basename "$tarball") again"
    rm -rf "$criu_src"
    tar -C "$SRC_BASE" -xf "$tarball"
  fi
  for p in "${PATCHES[@]}"; do
    if patch -d "$criu_src" -p1 -R --dry-run -s -f <"$p" >/dev/null 2>&1; then
      continue  # applied already
    fi
    patch -d "$criu_src" -p1 -N -s <"$p" >/dev/null || die "cannot apply $(basename "$p") to $criu_src"
    say "applied $(basename "$p")"
  done
  echo "$patch_sum" > "$TREE_STAMP"
  say "building CRIU in $criu_src (about 30 s)"
  make -C "$criu_src" -j"$(nproc)" criu >"$SRC_BASE/build.log" 2>&1 || die "CRIU build failed, see $SRC_BASE/build.log"
  make -C "$criu_src" lib >>"$SRC_BASE/build.log" 2>&1 || die "pycriu build failed, see $SRC_BASE/build.log"
  if [ "$sys_criu" = "$PREFIX/sbin/criu" ] || ! { [ -n "$sys_criu" ] && criu_ok "$sys_criu"; }; then
    install -m 0755 "$criu_src/criu/criu" "$PREFIX/sbin/criu"
    hash -r
    criu_ok "$PREFIX/sbin/criu" || die "the CRIU built from $criu_src does not pass 'criu check' here"
    echo "$patch_sum" > "$PATCH_STAMP"
  fi
  # The patches may extend CRIU's RPC messages, which pycriu carries: the venv's pycriu must
  # come from this build (on a first run the venv section below installs it).
  if [ -x "$VENV/bin/pip" ]; then
    "$VENV/bin/pip" install -q --force-reinstall --no-deps "$criu_src/lib" >>"$SRC_BASE/build.log" 2>&1 \
      || die "cannot install pycriu from $criu_src/lib into $VENV, see $SRC_BASE/build.log"
    say "pycriu reinstalled into $VENV from $criu_src/lib"
  fi
  say "CRIU ready: $(criu --version | head -n1)"
fi
[ "$(command -v criu)" ] || die "criu is not on PATH after install"

# --- Kernel headers for BCC -------------------------------------------------------------------
KREL=$(uname -r)
if [ "$IMAGE" = 1 ]; then
  ls -d /usr/src/linux-headers-*-amd64 >/dev/null 2>&1 || die "no kernel headers under /usr/src for BCC"
  say "image: the kernel's own headers (linux-headers-amd64) serve BCC there"
elif [ -e "/lib/modules/$KREL/build" ]; then
  say "kernel headers found at /lib/modules/$KREL/build"
else
  # No headers for this kernel exist in the archive. An XDP program that uses only UAPI headers
  # compiles against bookworm's 6.1 headers, which come in an -amd64 and a -common half.
  amd=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  [ -n "$amd" ] && [ -n "$common" ] || die "no kernel headers under /usr/src for BCC"
  warn "no headers for kernel $KREL: linking BCC to $amd (UAPI-only BPF programs build against it)"
  mkdir -p "/lib/modules/$KREL"
  ln -sfn "$amd" "/lib/modules/$KREL/build"
  ln -sfn "$common" "/lib/modules/$KREL/source"
fi

# --- Virtual environment ----------------------------------------------------------------------
# Debian's python3 is the one the bcc package was built for; bcc is pure Python over libbcc.so,
# so the venv gets a path entry for that one package rather than all of dist-packages.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  /usr/bin/python3 -m venv "$VENV"
fi
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$SITE/bcc"

stamp="$VENV/.orthros-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $criu_src"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing orthros and pycriu into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q "$criu_src/lib"
  "$VENV/bin/pip" install -q -e "$ROOT[test,bench]"
  echo "$want" > "$stamp"
else
  say "virtual environment up to date"
fi
"$VENV/bin/python" -c 'import pycriu, bcc, orthros_py' || die "the virtual environment cannot import pycriu, bcc and orthros"

ln -sfn "$VENV/bin/orthros" "$PREFIX/bin/orthros"
say "done: $(orthros --version)"
