#!/usr/bin/env bash
# Builds the hmmgpu guest driver against a kernel from build-kernel.sh, with
# warnings as errors (C: W=1 -Werror; Rust: the kernel's lints and clippy
# (CLIPPY=1), -Dwarnings), after checking that the Rust code is formatted the
# kernel's way (rustfmt --check with the kernel's .rustfmt.toml). Prints the
# path of hmmgpu.ko.
#
#   build-driver.sh KDIR    (a kernel build directory: xtask passes the
#                           tree's, with its make variables in the environment)
set -euo pipefail
LOG_TAG=driver
source "$(dirname "$0")/lib.sh"

KDIR="${1:?usage: build-driver.sh KDIR (a kernel build directory)}"
[[ -d "$KDIR" ]] || die "no kernel directory $KDIR"
MAKE_VARS=()
BUILD="$KDIR"
# An O= build links its sources as `source`; an in-tree build is them.
SRCTREE="$KDIR"
[[ -e "$KDIR/source" ]] && SRCTREE="$KDIR/source"
export LIBCLANG_PATH=/usr/lib/llvm-19/lib
# On a gcov kernel the driver's C is profiled too (cargo xtask coverage);
# its Rust cannot be (gcov instruments C only).
# GCOV_PROFILE applies to every object of the module's own directory.
if grep -qx 'CONFIG_GCOV_KERNEL=y' "$BUILD/.config" 2>/dev/null; then
    MAKE_VARS+=(GCOV_PROFILE=y)
fi

# Build in a copy so the source tree stays clean and parallel builds for
# several kernels, or from several checkouts, do not collide (the .ko is used
# after this script returns, so each checkout needs its own).
OUT="$HMMGPU_CACHE/driver-$(hash_inputs "$KDIR" "$REPO_DIR")"
mkdir -p "$OUT/guest-driver" "$OUT/device/abi/src"
# Two builds against one kernel (two runs at once) share $OUT: one at a time.
exec 8>"$OUT.lock"
flock 8
rsync -a --delete "$REPO_DIR/guest-driver/" "$OUT/guest-driver/"
rsync -a "$REPO_DIR/device/abi/src/" "$OUT/device/abi/src/"

# rustfmt follows the module tree from the crate root (the device's abi.rs,
# formatted with the workspace's rustfmt.toml, is skipped there).
if ! rustfmt --check --config-path "$SRCTREE/.rustfmt.toml" \
        "$OUT/guest-driver/hmmgpu_main.rs" >"$OUT/rustfmt.log" 2>&1; then
    cat "$OUT/rustfmt.log" >&2
    die "the driver's Rust code is not formatted the kernel's way (diff above; fix: rustfmt --config-path $SRCTREE/.rustfmt.toml guest-driver/hmmgpu_main.rs)"
fi

log "building hmmgpu.ko against $BUILD"
if ! make -C "$BUILD" M="$OUT/guest-driver" "${MAKE_VARS[@]}" W=1 CLIPPY=1 \
        KCFLAGS=-Werror KRUSTFLAGS=-Dwarnings modules >"$OUT/build.log" 2>&1; then
    cat "$OUT/build.log" >&2
    die "driver build failed"
fi
# Warnings that do not fail the build on their own still fail ours, except
# rustc's about the kernel's own powerpc flags (arch/powerpc/Makefile passes
# -Ctarget-feature=-mma,-vsx,-hard-float,-altivec, which rustc 1.95 calls
# unstable; every Rust object of a ppc64 kernel gets them) and the per-crate
# "N warnings emitted" summary that counts them.
if grep -E "warning:|warning\[" "$OUT/build.log" |
        grep -vE 'feature specified for `-Ctarget-feature`|^warning: [0-9]+ warnings? emitted' >&2; then
    die "driver build produced warnings (above)"
fi
echo "$OUT/guest-driver/hmmgpu.ko"
