#!/usr/bin/env bash
# Builds the hmmgpu guest kernel from Debian's linux-source-7.3 with the config
# fragments in images/config/, cached under $HMMGPU_CACHE by a hash of every
# input. Prints the kernel directory (KDIR) on stdout when done:
#   $KDIR/build     the O= build tree (out-of-tree modules build against it)
#   $KDIR/image     the bootable kernel image
#   $KDIR/make.env  the make variables the tree was built with (ARCH, LLVM, ...)
#
#   build-kernel.sh [--arch x86_64|ppc64le] [--flavour release|debug|gcov] [--print-dir]
#
# --print-dir prints the cache directory the inputs map to, building nothing.
#
# HMMGPU_KERNEL_DIR=/path/to/built/tree uses your own x86_64 kernel instead
# (HMMGPU_KERNEL_DIR_PPC64LE a ppc64le one): a configured and built tree
# (in-tree or O=) with the options of base.config and <arch>.config.
set -euo pipefail
LOG_TAG=kernel
source "$(dirname "$0")/lib.sh"

ARCH_NAME=x86_64 FLAVOUR=release PRINT_DIR=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --print-dir) PRINT_DIR=1; shift ;;
        --arch) ARCH_NAME="$2"; shift 2 ;;
        --flavour) FLAVOUR="$2"; shift 2 ;;
        *) die "unknown argument '$1' (usage: build-kernel.sh [--arch x86_64|ppc64le] [--flavour release|debug|gcov])" ;;
    esac
done
case "$FLAVOUR" in release|debug|gcov) ;; *) die "--flavour must be release, debug or gcov, not '$FLAVOUR'" ;; esac

KERNEL_VERSION="7.3.4-1~bpo13+1"
KERNEL_TARBALL=/usr/src/linux-source-7.3.tar.xz
RUST_LIB_SRC=/usr/lib/rustlib/src/rust/library
export LIBCLANG_PATH=/usr/lib/llvm-19/lib

case "$ARCH_NAME" in
    x86_64)  KARCH=x86_64;  IMAGE_PATH=arch/x86/boot/bzImage; BASE_TARGET=allnoconfig
             MAKE_VARS=(ARCH=x86_64) ;;
    ppc64le) KARCH=powerpc; IMAGE_PATH=vmlinux; BASE_TARGET=allnoconfig
             # bindgen (libclang) cannot parse gcc's powerpc flags: build with LLVM.
             MAKE_VARS=(ARCH=powerpc LLVM=-19 CROSS_COMPILE=powerpc64le-linux-gnu-) ;;
    *) die "unknown --arch '$ARCH_NAME' (x86_64 or ppc64le)" ;;
esac
fragments=("$IMAGES_DIR/config/base.config")
[[ -f "$IMAGES_DIR/config/$ARCH_NAME.config" ]] && fragments+=("$IMAGES_DIR/config/$ARCH_NAME.config")
if [[ "$FLAVOUR" == debug ]]; then
    fragments+=("$IMAGES_DIR/config/debug.config")
    # Rust with KASAN requires a clang-built kernel.
    [[ " ${MAKE_VARS[*]} " == *" LLVM="* ]] || MAKE_VARS+=(LLVM=-19)
fi
if [[ "$FLAVOUR" == gcov ]]; then
    fragments+=("$IMAGES_DIR/config/gcov.config")
    # The files cargo xtask coverage reports, profiled one by one (the whole
    # kernel, GCOV_PROFILE_ALL, would slow every TCG boot down): Makefile.lib
    # reads GCOV_PROFILE_<stem>.o, and no other object of this config has
    # these stems.
    MAKE_VARS+=(GCOV_PROFILE_hmm.o=y GCOV_PROFILE_migrate_device.o=y
                GCOV_PROFILE_memremap.o=y GCOV_PROFILE_migrate.o=y)
fi

# Checks that every CONFIG_ line of the fragments holds in a .config.
check_config() {
    local config="$1" frag line sym val missing=0
    for frag in "${fragments[@]}"; do
        while IFS= read -r line; do
            [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]] || continue
            sym="${BASH_REMATCH[1]}" val="${BASH_REMATCH[2]}"
            if ! grep -qx "$sym=$val" "$config"; then
                echo "  $sym=$val wanted, got: $(grep -E "^$sym=|^# $sym is not set" "$config" || echo unset)" >&2
                missing=1
            fi
        done <"$frag"
    done
    return $missing
}

own_var=HMMGPU_KERNEL_DIR
[[ "$ARCH_NAME" == x86_64 ]] || own_var="HMMGPU_KERNEL_DIR_${ARCH_NAME^^}"
own="${!own_var:-}"
if [[ -n "$own" ]]; then
    [[ -f "$own/.config" ]] || die "$own_var=$own has no .config"
    [[ -f "$own/$IMAGE_PATH" ]] || die "$own_var has no $IMAGE_PATH: build it first"
    [[ "$(kdir_arch "$own")" == "$ARCH_NAME" ]] || die "$own_var=$own is a $(kdir_arch "$own") kernel, not $ARCH_NAME"
    check_config "$own/.config" || die "$own_var lacks options hmmgpu needs (listed above)"
    echo "$own"
    exit 0
fi

[[ -f "$KERNEL_TARBALL" ]] || die "$KERNEL_TARBALL missing: run ci/setup-host.sh (installs linux-source-7.3=$KERNEL_VERSION)"
installed=$(dpkg-query -W -f='${Version}' linux-source-7.3 2>/dev/null || true)
[[ "$installed" == "$KERNEL_VERSION" ]] || die "linux-source-7.3 is '$installed', want $KERNEL_VERSION: run ci/setup-host.sh"

patches=()
if [[ -d "$IMAGES_DIR/patches/$ARCH_NAME" ]]; then
    mapfile -t patches < <(find "$IMAGES_DIR/patches/$ARCH_NAME" -name '*.patch' | sort)
fi
toolchain="$(rustc --version) $(bindgen --version 2>&1) $(gcc --version | head -1) $(clang-19 --version 2>/dev/null | head -1)"
src_key=$(hash_inputs "$KERNEL_VERSION" "${patches[@]}")
# Bump when this script changes how a kernel is built.
RECIPE=1
key=$(hash_inputs "$src_key" "$ARCH_NAME" "$FLAVOUR" "${fragments[@]}" "$toolchain" "${MAKE_VARS[*]}" "recipe-$RECIPE")
SRC="$HMMGPU_CACHE/linux-src-$src_key"
KDIR="$HMMGPU_CACHE/kernel-$ARCH_NAME-$FLAVOUR-$key"
LOGDIR="$KDIR/logs"
if [[ $PRINT_DIR == 1 ]]; then
    echo "$KDIR"
    exit 0
fi

if [[ -f "$KDIR/done" ]]; then
    log "cached: $KDIR"
    echo "$KDIR"
    exit 0
fi

unpack_patched "$SRC" "$KERNEL_TARBALL" "linux-source $KERNEL_VERSION" "${patches[@]}"

# One heavy build at a time on this machine (kernel and QEMU share the lock).
exec 9>"$HMMGPU_CACHE/heavy-build.lock"
if ! flock -n 9; then
    log "waiting for another kernel/QEMU build to finish"
    flock 9
fi
if [[ -f "$KDIR/done" ]]; then
    log "built meanwhile by another process: $KDIR"
    echo "$KDIR"
    exit 0
fi
rm -rf "$KDIR" && mkdir -p "$KDIR/build"
MAKE=(make -C "$SRC" O="$KDIR/build" "${MAKE_VARS[@]}" RUST_LIB_SRC="$RUST_LIB_SRC")
log "configuring $ARCH_NAME/$FLAVOUR ($BASE_TARGET + ${fragments[*]##*/})"
"${MAKE[@]}" -s "$BASE_TARGET" >/dev/null
"${MAKE[@]}" -s rustavailable >&2 || die "the Rust toolchain is not usable for the kernel (see above)"
# merge_config.sh -m merges fragments without running make; olddefconfig resolves.
(cd "$KDIR/build" && "$SRC/scripts/kconfig/merge_config.sh" -m -O "$KDIR/build" .config "${fragments[@]}" >/dev/null)
"${MAKE[@]}" -s olddefconfig >/dev/null
check_config "$KDIR/build/.config" || die "config fragments did not apply (listed above)"

jobs=$(nproc)
run_logged build "${MAKE[@]}" -j"$jobs" all
cp "$KDIR/build/$IMAGE_PATH" "$KDIR/image"
printf '%s\n' "${MAKE_VARS[@]}" "RUST_LIB_SRC=$RUST_LIB_SRC" >"$KDIR/make.env"
echo "$SRC" >"$KDIR/src"
touch "$KDIR/done"
log "built $KDIR"
echo "$KDIR"
