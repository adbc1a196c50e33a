#!/usr/bin/env bash
# Installs the host packages hmmgpu needs on Debian 12 (bookworm): the kernel
# and QEMU build toolchains, Debian's rust-src (the rustup toolchain here has
# no rust-src component), bindgen-cli, and busybox for the initramfs.
# Idempotent: a stamp keyed by this file's hash skips it when nothing changed.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/hmmgpu"
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

# Newer suites with low pin priority: only packages we name with -t come from them.
if [[ ! -e /etc/apt/sources.list.d/hmmgpu-suites.list ]]; then
    log "adding bookworm-backports, trixie, trixie-backports (pinned low) and deb-src"
    $SUDO tee /etc/apt/sources.list.d/hmmgpu-suites.list >/dev/null <<'LIST'
deb http://deb.debian.org/debian bookworm-backports main
deb http://deb.debian.org/debian trixie main
deb http://deb.debian.org/debian trixie-backports main
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
$SUDO apt-get update -qq

export DEBIAN_FRONTEND=noninteractive
APT="$SUDO apt-get install -y -qq --no-install-recommends"
log "installing build packages from bookworm"
$APT build-essential flex bison bc libelf-dev libssl-dev cpio kmod xz-utils \
     libclang-19-dev llvm-19 clang-19 lld-19 dpkg-dev busybox-static \
     libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev ninja-build pkg-config \
     python3-venv rsync socat
log "installing meson from bookworm-backports"
$APT -t bookworm-backports meson
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
