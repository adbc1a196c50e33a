#!/usr/bin/env bash
# Builds QEMU with the hmmgpu device: Debian's QEMU source (the version below)
# plus the patch series in this directory, for x86_64 and ppc64 system
# emulation only. Cached under $HMMGPU_CACHE by a hash of every input. Prints
# the install prefix (QDIR) on stdout when done:
#   $QDIR/bin/qemu-system-x86_64, $QDIR/bin/qemu-system-ppc64
#   $QDIR/share/qemu   firmware (SeaBIOS, SLOF, option ROMs), found by QEMU
#                      relative to its binary: no -L needed
#
#   build-qemu.sh
#
# Needs deb-src for trixie and the build packages of ci/setup-host.sh. The
# source and firmware packages are fetched with apt into $HMMGPU_CACHE/src.
set -euo pipefail
LOG_TAG=qemu
source "$(dirname "$0")/../images/lib.sh"
PATCH_DIR="$(cd "$(dirname "$0")" && pwd)"

QEMU_DEB_VERSION="1:10.0.13+ds-0+deb13u1"
QEMU_UPSTREAM="10.0.13"
# The Debian QEMU build uses trixie's SeaBIOS; the +ds source has no firmware
# blobs, so they come from Debian's binary packages, unpacked (not installed).
SEABIOS_DEB_VERSION="1.16.3-2"
# Firmware the x86_64 (q35/pc) and ppc64 (pseries) machines load.
QEMU_DATA_FIRMWARE=(kvmvapic.bin linuxboot.bin linuxboot_dma.bin multiboot.bin
                    multiboot_dma.bin pvh.bin slof.bin vof.bin)
SEABIOS_FIRMWARE=(bios.bin bios-256k.bin vgabios-stdvga.bin)
# Debian patches the +ds source needs: the stripped blobs and python wheels.
DEBIAN_PATCHES=(skip-unpack-edk2-blobs.patch disable-pycotap.patch)

SRCDIR="$HMMGPU_CACHE/src"
dsc_base="qemu_${QEMU_DEB_VERSION#*:}"
DSC="$SRCDIR/$dsc_base.dsc"
ORIG="$SRCDIR/qemu_${QEMU_UPSTREAM}+ds.orig.tar.xz"
DEBIAN_TAR="$SRCDIR/$dsc_base.debian.tar.xz"
DATA_DEB="$SRCDIR/qemu-system-data_${QEMU_DEB_VERSION/:/%3a}_all.deb"  # apt url-encodes the epoch
SEABIOS_DEB="$SRCDIR/seabios_${SEABIOS_DEB_VERSION}_all.deb"

mkdir -p "$SRCDIR"

# Checks the source files against the sha256 sums in the .dsc.
verify_source() {
    local sum name
    while read -r sum _ name; do
        [[ -f "$SRCDIR/$name" ]] || return 1
        echo "$sum  $SRCDIR/$name" | sha256sum --quiet -c - >/dev/null 2>&1 || return 1
    done < <(sed -n '/^Checksums-Sha256:/,/^[^ ]/p' "$DSC" | grep '^ ')
}

if [[ ! -f "$DSC" ]] || ! verify_source; then
    log "downloading the QEMU source package qemu=$QEMU_DEB_VERSION into $SRCDIR"
    (cd "$SRCDIR" && apt-get source --download-only -q "qemu=$QEMU_DEB_VERSION" >&2) ||
        die "apt-get source failed: is deb-src for trixie configured (ci/setup-host.sh) and still carrying qemu $QEMU_DEB_VERSION?"
    verify_source || die "downloaded QEMU source does not match $DSC"
fi
for pkg in "qemu-system-data=$QEMU_DEB_VERSION:$DATA_DEB" "seabios=$SEABIOS_DEB_VERSION:$SEABIOS_DEB"; do
    deb="${pkg##*:}" pkg="${pkg%:*}"
    if [[ ! -f "$deb" ]]; then
        log "downloading $pkg (firmware) into $SRCDIR"
        (cd "$SRCDIR" && apt-get download -q "$pkg" >&2) || die "apt-get download $pkg failed"
        [[ -f "$deb" ]] || die "apt-get download $pkg did not produce $deb"
    fi
done

mapfile -t patches < <(find "$PATCH_DIR" -maxdepth 1 -name '[0-9]*.patch' | sort)
[[ ${#patches[@]} -gt 0 ]] || die "no patches in $PATCH_DIR"
DEBIAN_PATCH_DIR="$(mktemp -d)"
trap 'rm -rf "$DEBIAN_PATCH_DIR"' EXIT
tar -xf "$DEBIAN_TAR" -C "$DEBIAN_PATCH_DIR" "${DEBIAN_PATCHES[@]/#/debian/patches/}" ||
    die "$DEBIAN_TAR lacks one of ${DEBIAN_PATCHES[*]}"
debian_patches=("${DEBIAN_PATCHES[@]/#/$DEBIAN_PATCH_DIR/debian/patches/}")

CONFIGURE_ARGS=(
    --target-list=x86_64-softmmu,ppc64-softmmu
    --python=/usr/bin/python3
    --without-default-features
    --disable-download --disable-docs --disable-werror --disable-debug-info
    --disable-install-blobs
    --enable-tcg --enable-kvm --enable-vhost-user --enable-fdt=system --enable-pixman
    # virtio-9p for `cargo xtask run --share`; glibc has the xattr calls.
    --enable-virtfs --enable-attr
)
# Names and contents only: the key must not depend on where the files are.
contents() { local f; for f; do echo "$(basename "$f") $(sha256sum <"$f" | cut -c1-64)"; done; }
src_key=$(hash_inputs "$QEMU_DEB_VERSION" "$(contents "${debian_patches[@]}" "${patches[@]}")")
# Bump when this script changes how QEMU is built or installed.
RECIPE=1
key=$(hash_inputs "$src_key" "${CONFIGURE_ARGS[*]}" "$(gcc --version | head -1)" \
    "$SEABIOS_DEB_VERSION" "${QEMU_DATA_FIRMWARE[*]}" "${SEABIOS_FIRMWARE[*]}" "recipe-$RECIPE")
SRC="$HMMGPU_CACHE/qemu-src-$src_key"
QDIR="$HMMGPU_CACHE/qemu-$key"
LOGDIR="$QDIR/logs"

if [[ -f "$QDIR/done" ]]; then
    log "cached: $QDIR"
    echo "$QDIR"
    exit 0
fi

unpack_patched "$SRC" "$ORIG" "qemu $QEMU_DEB_VERSION" "${debian_patches[@]}" "${patches[@]}"

# One heavy build at a time on this machine (kernel and QEMU share the lock).
exec 9>"$HMMGPU_CACHE/heavy-build.lock"
if ! flock -n 9; then
    log "waiting for another kernel/QEMU build to finish"
    flock 9
fi
if [[ -f "$QDIR/done" ]]; then
    log "built meanwhile by another process: $QDIR"
    echo "$QDIR"
    exit 0
fi
start=$SECONDS
rm -rf "$QDIR" && mkdir -p "$QDIR/build"
cd "$QDIR/build"
run_logged configure "$SRC/configure" --prefix="$QDIR" "${CONFIGURE_ARGS[@]}"
run_logged build ninja -j"$(nproc)"
run_logged install pyvenv/bin/meson install --no-rebuild --quiet

log "installing firmware from $(basename "$DATA_DEB") and $(basename "$SEABIOS_DEB")"
fw_tmp="$QDIR/fw.tmp"
rm -rf "$fw_tmp" && mkdir -p "$fw_tmp" "$QDIR/share/qemu"
dpkg-deb -x "$DATA_DEB" "$fw_tmp"
dpkg-deb -x "$SEABIOS_DEB" "$fw_tmp"
for f in "${QEMU_DATA_FIRMWARE[@]}"; do
    cp "$fw_tmp/usr/share/qemu/$f" "$QDIR/share/qemu/" || die "$(basename "$DATA_DEB") has no $f"
done
for f in "${SEABIOS_FIRMWARE[@]}"; do
    cp "$fw_tmp/usr/share/seabios/$f" "$QDIR/share/qemu/" || die "$(basename "$SEABIOS_DEB") has no $f"
done
rm -rf "$fw_tmp"

for t in x86_64 ppc64; do
    "$QDIR/bin/qemu-system-$t" -device help 2>/dev/null | grep -q '"vhost-user-hmmgpu-pci"' ||
        die "qemu-system-$t has no vhost-user-hmmgpu-pci device (log: $LOGDIR/configure.log)"
done
cd / && rm -rf "$QDIR/build"
touch "$QDIR/done"
log "built $QDIR in $((SECONDS - start))s"
echo "$QDIR"
