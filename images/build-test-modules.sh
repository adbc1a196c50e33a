#!/usr/bin/env bash
# Builds the test-only kernel modules, each a folder of ci/guest/ with a
# Kbuild (ci/guest/hostile/: the hostile-guest VM test's module), against a
# kernel from build-kernel.sh, with warnings as errors (W=1 -Werror). They
# include guest-driver/hmmgpu_abi.h, the C header generated from the device
# interface. xtask puts a module only into the initramfs of the test that
# uses it, never beside hmmgpu.ko in /lib/modules.
# Prints the directory holding every built .ko.
#
#   build-test-modules.sh KDIR    (xtask passes the build directory, with the
#                                 make variables in the environment)
set -euo pipefail
LOG_TAG=test-modules
source "$(dirname "$0")/lib.sh"

KDIR="${1:?usage: build-test-modules.sh KDIR (a kernel build directory)}"
[[ -d "$KDIR" ]] || die "no kernel directory $KDIR"
MAKE_VARS=()          # xtask puts the tree's make variables in the environment
BUILD="$KDIR"

shopt -s nullglob
modules=()
for kbuild in "$REPO_DIR"/ci/guest/*/Kbuild; do
    modules+=("$(basename "$(dirname "$kbuild")")")
done
[[ ${#modules[@]} -gt 0 ]] || die "no test modules (ci/guest/*/Kbuild)"

# Built in a copy, like the driver (images/build-driver.sh): the checkout
# stays clean and builds for several kernels do not collide. The copy keeps
# the repository's layout, so a Kbuild finds ../../../guest-driver.
OUT="$HMMGPU_CACHE/test-modules-$(hash_inputs "$KDIR" "$REPO_DIR")"
mkdir -p "$OUT/guest-driver" "$OUT/ko"
exec 8>"$OUT.lock"
flock 8
install -m 0644 "$REPO_DIR/guest-driver/hmmgpu_abi.h" "$OUT/guest-driver/"
rm -f "$OUT"/ko/*.ko
for m in "${modules[@]}"; do
    src="$OUT/ci/guest/$m"
    mkdir -p "$src"
    rsync -a --delete "$REPO_DIR/ci/guest/$m/" "$src/"
    log "building ci/guest/$m against $BUILD"
    if ! make -C "$BUILD" M="$src" "${MAKE_VARS[@]}" W=1 KCFLAGS=-Werror \
            modules >"$src/build.log" 2>&1; then
        cat "$src/build.log" >&2
        die "ci/guest/$m failed to build"
    fi
    # Warnings that do not fail the build on their own (modpost's) still
    # fail ours.
    if grep -E "warning:|WARNING:" "$src/build.log" >&2; then
        die "ci/guest/$m built with warnings (above)"
    fi
    kos=("$src"/*.ko)
    [[ ${#kos[@]} -gt 0 ]] || die "ci/guest/$m built no .ko"
    cp "${kos[@]}" "$OUT/ko/"
done
log "built ${modules[*]} in $OUT/ko: $(cd "$OUT/ko" && echo *.ko)"
echo "$OUT/ko"
