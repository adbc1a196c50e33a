#!/usr/bin/env bash
# Builds the hmmgpu guest kernel from Debian's linux-source-7.3 (or 7.2) with
# the config fragments in images/config/, cached under $HMMGPU_CACHE by a hash
# of every input. Prints the tree on stdout when done: $KDIR/build, a plain
# O= build directory (its `source` links to the unpacked sources), nothing in
# it but what make wrote. xtask reads it as it reads a user's own tree
# (`--kernel-dir`, ci/xtask/src/build/tree.rs): the image, the make variables
# (LLVM=, ARCH=) and test_hmm.ko all come from the tree itself. $KDIR/logs
# holds the build log.
#
#   build-kernel.sh [--arch x86_64|ppc64le] [--flavour release|debug|gcov]
#                   [--release 7.3|7.2] [--plain] [--print-dir]
#
# --release picks Debian's linux-source package (default 7.3). --plain builds
# the tree the way a user would: Debian's source as shipped, without
# images/patches/ (the own-kernel test's 7.2 tree). --print-dir prints the
# tree the inputs map to, building nothing.
#
# Your own kernel instead: `cargo xtask run --kernel-dir DIR` (docs/running.md).
set -euo pipefail
LOG_TAG=kernel
source "$(dirname "$0")/lib.sh"

usage="usage: build-kernel.sh [--arch x86_64|ppc64le] [--flavour release|debug] [--release 7.3|7.2] [--plain] [--print-dir]"
ARCH_NAME=x86_64 FLAVOUR=release RELEASE=7.3 PLAIN=0 PRINT_DIR=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --print-dir) PRINT_DIR=1; shift ;;
        --plain) PLAIN=1; shift ;;
        --arch|--flavour|--release)
            [[ $# -ge 2 ]] || die "$1 needs a value ($usage)"
            case "$1" in
                --arch) ARCH_NAME="$2" ;;
                --flavour) FLAVOUR="$2" ;;
                --release) RELEASE="$2" ;;
            esac
            shift 2 ;;
        *) die "unknown argument '$1' ($usage)" ;;
    esac
done
case "$FLAVOUR" in release|debug|gcov) ;; *) die "--flavour must be release, debug or gcov, not '$FLAVOUR'" ;; esac

# The Debian source packages (ci/setup-host.sh installs these versions).
case "$RELEASE" in
    7.3) KERNEL_VERSION="7.3.4-1~bpo13+1" ;;
    7.2) KERNEL_VERSION="7.2.12-1~bpo13+1" ;;
    *) die "--release must be 7.3 or 7.2, not '$RELEASE'" ;;
esac
KERNEL_PACKAGE="linux-source-$RELEASE"
KERNEL_TARBALL="/usr/src/$KERNEL_PACKAGE.tar.xz"
RUST_LIB_SRC=/usr/lib/rustlib/src/rust/library
export LIBCLANG_PATH=/usr/lib/llvm-19/lib

case "$ARCH_NAME" in
    x86_64)  BASE_TARGET=allnoconfig
             MAKE_VARS=(ARCH=x86_64) ;;
    ppc64le) BASE_TARGET=allnoconfig
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

# Checks that every CONFIG_ line of the fragments landed in the .config as
# written: a fail-fast check of this recipe before the long make (xtask then
# checks the built tree as it checks any user's, build/tree.rs).
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

[[ -f "$KERNEL_TARBALL" ]] || die "$KERNEL_TARBALL missing: run ci/setup-host.sh (installs $KERNEL_PACKAGE=$KERNEL_VERSION)"
installed=$(dpkg-query -W -f='${Version}' "$KERNEL_PACKAGE" 2>/dev/null || true)
[[ "$installed" == "$KERNEL_VERSION" ]] || die "$KERNEL_PACKAGE is '$installed', want $KERNEL_VERSION: run ci/setup-host.sh"

patches=()
if [[ $PLAIN == 0 && -d "$IMAGES_DIR/patches/$ARCH_NAME" ]]; then
    mapfile -t patches < <(find "$IMAGES_DIR/patches/$ARCH_NAME" -name '*.patch' | sort)
fi
toolchain="$(rustc --version) $(bindgen --version 2>&1) $(gcc --version | head -1) $(clang-19 --version 2>/dev/null | head -1)"
src_key=$(hash_inputs "$KERNEL_VERSION" "${patches[@]}")
# Bump when this script changes how a kernel is built.
RECIPE=1
# The fragments' CONFIG_ lines, in merge order: their comments change no kernel.
config_lines="$(grep -h '^CONFIG_' "${fragments[@]}")"
key=$(hash_inputs "$src_key" "$ARCH_NAME" "$FLAVOUR" "$config_lines" "$toolchain" "${MAKE_VARS[*]}" "recipe-$RECIPE")
SRC="$HMMGPU_CACHE/linux-src-$src_key"
# 7.3 keeps its historical name; other releases and plain trees say so.
name="kernel"
[[ "$RELEASE" == 7.3 ]] || name+="-$RELEASE"
[[ $PLAIN == 0 ]] || name+="-plain"
KDIR="$HMMGPU_CACHE/$name-$ARCH_NAME-$FLAVOUR-$key"
LOGDIR="$KDIR/logs"
if [[ $PRINT_DIR == 1 ]]; then
    echo "$KDIR/build"
    exit 0
fi

if [[ -f "$KDIR/done" ]]; then
    log "cached: $KDIR"
    echo "$KDIR/build"
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
    echo "$KDIR/build"
    exit 0
fi
rm -rf "$KDIR" && mkdir -p "$KDIR/build"
MAKE=(make -C "$SRC" O="$KDIR/build" "${MAKE_VARS[@]}" RUST_LIB_SRC="$RUST_LIB_SRC")
log "configuring $KERNEL_PACKAGE $ARCH_NAME/$FLAVOUR${patches[*]:+ (patched)} ($BASE_TARGET + ${fragments[*]##*/})"
"${MAKE[@]}" -s "$BASE_TARGET" >/dev/null
"${MAKE[@]}" -s rustavailable >&2 || die "the Rust toolchain is not usable for the kernel (see above)"
# merge_config.sh -m merges fragments without running make; olddefconfig resolves.
(cd "$KDIR/build" && "$SRC/scripts/kconfig/merge_config.sh" -m -O "$KDIR/build" .config "${fragments[@]}" >/dev/null)
"${MAKE[@]}" -s olddefconfig >/dev/null
check_config "$KDIR/build/.config" || die "config fragments did not apply (listed above)"

jobs=$(nproc)
run_logged build "${MAKE[@]}" -j"$jobs" all
touch "$KDIR/done"
log "built $KDIR"
echo "$KDIR/build"
