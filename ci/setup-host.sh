#!/usr/bin/env bash
# Installs the host packages hmmgpu needs on Debian 12 (bookworm): the kernel
# and QEMU build toolchains, Debian's rust-src (the rustup toolchain here has
# no rust-src component), bindgen-cli, busybox for the initramfs, lcov (cargo
# xtask coverage), and for
# PowerPC: cross gcc (ppc64le guest programs; the backend's tests for
# powerpc64le and big-endian powerpc64), qemu-user to run those tests, and
# ppc64el's static busybox.
# Idempotent: a stamp keyed by this file's hash skips it when nothing changed.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${HMMGPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hmmgpu}"
stamp="$cache/setup-host.$(sha256sum "$0" | cut -c1-16).done"
if [[ -e "$stamp" && "${1:-}" != "--force" ]]; then
    exit 0
fi
mkdir -p "$cache"

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "setup-host: need root or sudo to install packages" >&2; exit 1; }
    SUDO="sudo"
fi
log() { echo "[setup-host] $*" >&2; }

host_deb_arch="$(dpkg --print-architecture)"
# The guest architecture that is not the host's; its busybox-static is fetched.
case "$host_deb_arch" in
    amd64) foreign_deb_arch=ppc64el foreign_guest=ppc64le ;;
    ppc64el) foreign_deb_arch=amd64 foreign_guest=x86_64 ;;
    *) echo "setup-host: unsupported host architecture $host_deb_arch (amd64 or ppc64el)" >&2; exit 1 ;;
esac

# apt-get update, retried: a mirror mid-sync fails it now and then.
apt_update() {
    local i
    for i in 1 2 3 4; do
        if $SUDO apt-get update -qq; then return 0; fi
        log "apt-get update failed (attempt $i of 4); retrying in $((i * 10)) s"
        sleep $((i * 10))
    done
    log "apt-get update kept failing"
    return 1
}

# Newer suites with low pin priority: only packages we name with -t come from them.
if ! grep -qs "arch=$host_deb_arch" /etc/apt/sources.list.d/hmmgpu-suites.list; then
    log "adding bookworm-backports, trixie, trixie-backports (pinned low) and deb-src"
    $SUDO tee /etc/apt/sources.list.d/hmmgpu-suites.list >/dev/null <<LIST
deb [arch=$host_deb_arch] http://deb.debian.org/debian bookworm-backports main
deb [arch=$host_deb_arch] http://deb.debian.org/debian trixie main
deb [arch=$host_deb_arch] http://deb.debian.org/debian trixie-backports main
deb-src http://deb.debian.org/debian trixie main
deb-src http://deb.debian.org/debian trixie-updates main
deb-src http://deb.debian.org/debian-security trixie-security main
deb-src http://deb.debian.org/debian trixie-backports main
LIST
    $SUDO tee /etc/apt/preferences.d/hmmgpu-pin >/dev/null <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100

Package: *
Pin: release n=trixie-backports
Pin-Priority: 100

Package: *
Pin: release n=bookworm-backports
Pin-Priority: 100
PIN
fi

log "apt-get update"
apt_update

export DEBIAN_FRONTEND=noninteractive
APT="$SUDO apt-get install -y -qq --no-install-recommends"
log "installing build packages from bookworm"
$APT build-essential flex bison bc libelf-dev libssl-dev cpio kmod xz-utils \
     libclang-19-dev llvm-19 clang-19 lld-19 dpkg-dev busybox-static \
     libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev ninja-build pkg-config \
     python3-venv rsync socat lcov
if [[ "$host_deb_arch" == amd64 ]]; then
    log "installing the PowerPC cross compilers (ppc64le guests, powerpc64(le) backend tests)"
    $APT gcc-powerpc64le-linux-gnu libc6-dev-ppc64el-cross gcc-powerpc64-linux-gnu libc6-dev-ppc64-cross
else
    log "installing the x86_64 cross compiler (x86_64 guests)"
    $APT gcc-x86-64-linux-gnu libc6-dev-amd64-cross
fi
log "installing meson and qemu-user from bookworm-backports"
$APT -t bookworm-backports meson qemu-user

# The other guest architecture's static busybox from bookworm, unpacked (a
# foreign busybox-static cannot be installed beside the native one). A private
# apt state in the cache fetches it: adding the architecture to the system
# would make every `apt-get update` fetch (and possibly fail on) its indices.
bb_dir="$cache/busybox-$foreign_guest"
if [[ ! -x "$bb_dir/bin/busybox" ]]; then
    papt="$cache/apt-$foreign_deb_arch"
    mkdir -p "$papt/lists/partial" "$papt/archives/partial"
    echo "deb [arch=$foreign_deb_arch] http://deb.debian.org/debian bookworm main" >"$papt/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$papt/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$papt/lists" -o "Dir::Cache::Archives=$papt/archives"
              -o "Dir::Cache::pkgcache=$papt/pkgcache.bin" -o "Dir::Cache::srcpkgcache=$papt/srcpkgcache.bin"
              -o "APT::Architecture=$foreign_deb_arch" -o "APT::Architectures::=$foreign_deb_arch"
              -o APT::Sandbox::User=root -o Debug::NoLocking=1)
    log "fetching busybox-static:$foreign_deb_arch from bookworm into $bb_dir"
    apt-get "${apt_opts[@]}" update -qq
    tmp="$(mktemp -d)"
    (cd "$tmp" && apt-get "${apt_opts[@]}" download -qq busybox-static)
    dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/root"
    mkdir -p "$bb_dir/bin"
    install -m 0755 "$tmp/root/bin/busybox" "$bb_dir/bin/busybox.tmp"
    basename "$tmp"/busybox-static_*.deb >"$bb_dir/package"
    mv "$bb_dir/bin/busybox.tmp" "$bb_dir/bin/busybox"
    rm -rf "$tmp"
fi
# Exact versions: rust-src must match rustc (1.95.0); the kernel is pinned.
log "installing rust-src 1.95.0 and linux-source-7.3 from trixie-backports"
$APT --allow-downgrades rust-src=1.95.0+dfsg1-2~bpo13+1 linux-source-7.3=7.3.4-1~bpo13+1

# bindgen-cli, the version the kernel's Rust build is known to work with.
if ! bindgen --version 2>/dev/null | grep -q '0.72.1'; then
    log "cargo install bindgen-cli 0.72.1 (a few minutes)"
    cargo install --locked --quiet bindgen-cli --version 0.72.1
fi

touch "$stamp"
log "done"
