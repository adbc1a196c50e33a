#!/usr/bin/env bash
# Installs the host packages hmmgpu needs on Debian 12 (bookworm): the kernel
# and QEMU build toolchains, Debian's rust-src (the rustup toolchain here has
# no rust-src component), bindgen-cli, busybox for the initramfs, lcov (cargo
# xtask coverage), Debian's
# linux-source-7.3 (the guest kernel) and linux-source-7.2 (the own-kernel
# test's tree), and for PowerPC: cross gcc (ppc64le guest programs; the
# backend's tests for powerpc64le and big-endian powerpc64), qemu-user to run
# those tests, and ppc64el's static busybox.
#
#   ci/setup-host.sh [--yes] [--force]
#
# It checks first and changes only what is missing: it prints what it would
# change (apt sources and pins, packages, bindgen-cli), then asks on a
# terminal; without one it changes nothing unless --yes (or
# HMMGPU_SETUP_YES=1) says so (.ci/run passes --yes). Nothing missing: no
# change at all, not even `apt-get update`. A stamp keyed by this file's hash
# skips even the check on later runs (--force checks again).
#
# On a host without dpkg/apt (Fedora, Arch, ...) it lists what to install and
# exits 3: install those, then run cargo xtask with --no-setup (or
# HMMGPU_NO_SETUP=1); `cargo xtask doctor` checks them.
set -euo pipefail

cache="${HMMGPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hmmgpu}"
stamp="$cache/setup-host.$(sha256sum "$0" | cut -c1-16).done"
YES="${HMMGPU_SETUP_YES:-0}" FORCE=0
for a in "$@"; do
    case "$a" in
        --yes|-y) YES=1 ;;
        --force) FORCE=1 ;;
        *) echo "setup-host: unknown argument '$a' (usage: ci/setup-host.sh [--yes] [--force])" >&2; exit 2 ;;
    esac
done
if [[ -e "$stamp" && $FORCE == 0 ]]; then
    exit 0
fi
log() { echo "[setup-host] $*" >&2; }

# What hmmgpu needs, as Debian packages (from bookworm unless noted).
BUILD_PACKAGES=(build-essential flex bison bc libelf-dev libssl-dev cpio kmod xz-utils
                libclang-19-dev llvm-19 clang-19 lld-19 dpkg-dev busybox-static
                libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev ninja-build pkg-config
                python3-venv rsync socat lcov)
# From bookworm-backports, at least these versions (bookworm's are too old:
# QEMU 10.0 wants meson >= 1.5; the backend's PowerPC tests want qemu-user 10).
BACKPORTS=("meson 1.5" "qemu-user 1:10.0")
# Exact versions from trixie-backports: rust-src must match rustc (1.95.0);
# the kernels are pinned.
PINNED=(rust-src=1.95.0+dfsg1-2~bpo13+1 linux-source-7.3=7.3.4-1~bpo13+1
        linux-source-7.2=7.2.12-1~bpo13+1)
BINDGEN_VERSION=0.72.1

if ! command -v dpkg >/dev/null || ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
    cat >&2 <<EOF
[setup-host] this host has no dpkg/apt-get, so ci/setup-host.sh cannot install
[setup-host] anything. Install your distribution's equivalents of these Debian
[setup-host] packages yourself:
[setup-host]   kernel and guest builds: ${BUILD_PACKAGES[*]}
[setup-host]   cross builds: gcc for powerpc64le-linux-gnu and powerpc64-linux-gnu (with their libc)
[setup-host]   newer than bookworm's: meson >= 1.5, qemu-user >= 10.0 (qemu-ppc64le, qemu-ppc64)
[setup-host]   rust-src of your rustc's version (rustup component add rust-src, or RUST_LIB_SRC),
[setup-host]   bindgen-cli $BINDGEN_VERSION: cargo install --locked bindgen-cli --version $BINDGEN_VERSION
[setup-host] Without Debian's linux-source packages, boot your own kernel tree:
[setup-host]   cargo xtask run --no-setup --kernel-dir /path/to/your/built/tree
[setup-host] (images/config/base.config says how to configure it), and a QEMU with the
[setup-host] patches of qemu-patches/ (HMMGPU_QEMU=/path/to/qemu-system-x86_64).
[setup-host] \`cargo xtask doctor\` checks all of it; then pass --no-setup (or set
[setup-host] HMMGPU_NO_SETUP=1) so cargo xtask does not run this script.
EOF
    exit 3
fi

host_deb_arch="$(dpkg --print-architecture)"
# The guest architecture that is not the host's; its busybox-static is fetched.
case "$host_deb_arch" in
    amd64) foreign_deb_arch=ppc64el foreign_guest=ppc64le
           CROSS_PACKAGES=(gcc-powerpc64le-linux-gnu libc6-dev-ppc64el-cross gcc-powerpc64-linux-gnu libc6-dev-ppc64-cross) ;;
    ppc64el) foreign_deb_arch=amd64 foreign_guest=x86_64
           CROSS_PACKAGES=(gcc-x86-64-linux-gnu libc6-dev-amd64-cross) ;;
    *) echo "setup-host: unsupported host architecture $host_deb_arch (amd64 or ppc64el)" >&2; exit 1 ;;
esac

SOURCES_FILE=/etc/apt/sources.list.d/hmmgpu-suites.list
PIN_FILE=/etc/apt/preferences.d/hmmgpu-pin
# Newer suites with low pin priority: only packages we name with -t or =VERSION come from them.
SOURCES="deb [arch=$host_deb_arch] http://deb.debian.org/debian bookworm-backports main
deb [arch=$host_deb_arch] http://deb.debian.org/debian trixie main
deb [arch=$host_deb_arch] http://deb.debian.org/debian trixie-backports main
deb-src http://deb.debian.org/debian trixie main
deb-src http://deb.debian.org/debian trixie-updates main
deb-src http://deb.debian.org/debian-security trixie-security main
deb-src http://deb.debian.org/debian trixie-backports main"
PINS="Package: *
Pin: release n=trixie
Pin-Priority: 100

Package: *
Pin: release n=trixie-backports
Pin-Priority: 100

Package: *
Pin: release n=bookworm-backports
Pin-Priority: 100"

# The installed version of a package, empty if it is not installed.
# Empty when not installed; never fails (a plain `v=$(installed p)` under
# errexit and pipefail would end the script on a package that is missing).
installed() { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | sed -n 's/^install ok installed //p' || true; }

# --- What is missing (nothing is changed yet) ---
plan=()
write_sources=0 write_pins=0
if [[ "$(cat "$SOURCES_FILE" 2>/dev/null)" != "$SOURCES" ]]; then
    write_sources=1; plan+=("write $SOURCES_FILE (bookworm-backports, trixie, trixie-backports; deb-src trixie for QEMU's source)")
fi
if [[ "$(cat "$PIN_FILE" 2>/dev/null)" != "$PINS" ]]; then
    write_pins=1; plan+=("write $PIN_FILE (those suites at priority 100: only what is named comes from them)")
fi
missing_build=()
for p in "${BUILD_PACKAGES[@]}" "${CROSS_PACKAGES[@]}"; do
    [[ -n "$(installed "$p")" ]] || missing_build+=("$p")
done
[[ ${#missing_build[@]} == 0 ]] || plan+=("apt-get install ${missing_build[*]}")
missing_bpo=()
for pv in "${BACKPORTS[@]}"; do
    p="${pv% *}" min="${pv#* }" v="$(installed "${pv% *}")"
    if [[ -z "$v" ]] || ! dpkg --compare-versions "$v" ge "$min"; then missing_bpo+=("$p"); fi
done
[[ ${#missing_bpo[@]} == 0 ]] || plan+=("apt-get install -t bookworm-backports ${missing_bpo[*]}")
missing_pinned=()
for pv in "${PINNED[@]}"; do
    [[ "$(installed "${pv%%=*}")" == "${pv#*=}" ]] || missing_pinned+=("$pv")
done
[[ ${#missing_pinned[@]} == 0 ]] || plan+=("apt-get install ${missing_pinned[*]}")
bb_dir="$cache/busybox-$foreign_guest"
fetch_busybox=0
if [[ ! -x "$bb_dir/bin/busybox" ]]; then
    fetch_busybox=1; plan+=("fetch busybox-static:$foreign_deb_arch into $bb_dir (the cache only)")
fi
install_bindgen=0
if ! bindgen --version 2>/dev/null | grep -q "$BINDGEN_VERSION"; then
    install_bindgen=1; plan+=("cargo install --locked bindgen-cli --version $BINDGEN_VERSION")
fi

if [[ ${#plan[@]} == 0 ]]; then
    mkdir -p "$cache" && touch "$stamp"
    log "nothing to do: this host has every package hmmgpu needs"
    exit 0
fi

log "this host lacks some of what hmmgpu needs; setup would:"
for step in "${plan[@]}"; do log "  - $step"; done
if [[ $YES != 1 ]]; then
    if [[ -t 0 ]]; then
        read -r -p "[setup-host] go ahead? [y/N] " answer
        [[ "$answer" == [yY]* ]] && YES=1
    fi
fi
if [[ $YES != 1 ]]; then
    log "nothing changed. Run \`ci/setup-host.sh --yes\` to do the above, or do it yourself"
    log "and pass --no-setup (HMMGPU_NO_SETUP=1) to cargo xtask; \`cargo xtask doctor\` checks."
    exit 1
fi

# --- Changes, as listed ---
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { log "need root or sudo to install packages"; exit 1; }
    SUDO="sudo"
fi
mkdir -p "$cache"

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

if [[ $write_sources == 1 ]]; then
    log "writing $SOURCES_FILE"
    printf '%s\n' "$SOURCES" | $SUDO tee "$SOURCES_FILE" >/dev/null
fi
if [[ $write_pins == 1 ]]; then
    log "writing $PIN_FILE"
    printf '%s\n' "$PINS" | $SUDO tee "$PIN_FILE" >/dev/null
fi
if (( ${#missing_build[@]} + ${#missing_bpo[@]} + ${#missing_pinned[@]} > 0 || write_sources == 1 )); then
    log "apt-get update"
    apt_update
fi
export DEBIAN_FRONTEND=noninteractive
APT="$SUDO apt-get install -y -qq --no-install-recommends"
if [[ ${#missing_build[@]} -gt 0 ]]; then
    log "installing ${missing_build[*]}"
    $APT "${missing_build[@]}"
fi
if [[ ${#missing_bpo[@]} -gt 0 ]]; then
    log "installing ${missing_bpo[*]} from bookworm-backports"
    $APT -t bookworm-backports "${missing_bpo[@]}"
fi
if [[ ${#missing_pinned[@]} -gt 0 ]]; then
    log "installing ${missing_pinned[*]} from trixie-backports"
    $APT --allow-downgrades "${missing_pinned[@]}"
fi

# The other guest architecture's static busybox from bookworm, unpacked (a
# foreign busybox-static cannot be installed beside the native one). A private
# apt state in the cache fetches it: adding the architecture to the system
# would make every `apt-get update` fetch (and possibly fail on) its indices.
if [[ $fetch_busybox == 1 ]]; then
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

# bindgen-cli, the version the kernel's Rust build is known to work with.
if [[ $install_bindgen == 1 ]]; then
    log "cargo install bindgen-cli $BINDGEN_VERSION (a few minutes)"
    cargo install --locked --quiet bindgen-cli --version "$BINDGEN_VERSION"
fi

touch "$stamp"
log "done"
