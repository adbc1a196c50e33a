#!/usr/bin/env bash
# Builds the guest test programs as static binaries for the kernel's
# architecture (a cross gcc for another one) with the dmirror uAPI header
# (lib/test_hmm_uapi.h) from the guest kernel's source: one program per
# ci/guest/NAME.c (NAME), and one per directory ci/guest/DIR/ (hmmgpu-DIR,
# from every DIR/*.c; ci/guest/faults/ is hmmgpu-faults); every source sees
# ci/guest/*.h. Then copies the guest scripts (ci/guest/*.sh, installed
# without the .sh) and builds the kernel's hmm-tests.
# Prints the output directory on stdout when done.
#
#   build-guest-programs.sh --kdir KDIR --out DIR
set -euo pipefail
LOG_TAG=guest-programs
source "$(dirname "$0")/lib.sh"

usage="usage: build-guest-programs.sh --kdir KDIR --out DIR"
KDIR="" OUT=""
while [[ $# -gt 0 ]]; do
    [[ $# -ge 2 ]] || die "$1 needs a value ($usage)"
    case "$1" in
        --kdir) KDIR="$2" ;;
        --out) OUT="$2" ;;
        *) die "unknown argument '$1' ($usage)" ;;
    esac
    shift 2
done
[[ -n "$KDIR" && -n "$OUT" ]] || die "--kdir and --out are required ($usage)"
[[ -f "$KDIR/src" ]] || die "$KDIR/src missing: not a kernel built by images/build-kernel.sh"
SRC="$(cat "$KDIR/src")"
UAPI="$SRC/lib/test_hmm_uapi.h"
[[ -f "$UAPI" ]] || die "$UAPI missing (kernel source $SRC)"
ARCH_NAME="$(kdir_arch "$KDIR")"
CC="$(guest_cc "$ARCH_NAME")"
command -v "$CC" >/dev/null || die "$CC missing: run ci/setup-host.sh"

GUEST_SRC="$REPO_DIR/ci/guest"
mkdir -p "$OUT"
shopt -s nullglob
CFLAGS=(-static -O2 -g -Wall -Wextra -Wno-unused-parameter -Werror -I"$GUEST_SRC" -I"$SRC/lib")
programs=0
# build_program NAME SOURCE...: one static binary $OUT/NAME.
build_program() {
    local name="$1"
    shift
    "$CC" "${CFLAGS[@]}" -o "$OUT/$name.tmp" "$@" || die "compiling $name ($*) failed"
    mv "$OUT/$name.tmp" "$OUT/$name"
    programs=$((programs + 1))
}
for c in "$GUEST_SRC"/*.c; do
    build_program "$(basename "$c" .c)" "$c"
done
for dir in "$GUEST_SRC"/*/; do
    dir="${dir%/}"
    sources=("$dir"/*.c)
    [[ ${#sources[@]} -gt 0 ]] || die "$dir has no .c files"
    build_program "hmmgpu-$(basename "$dir")" "${sources[@]}"
done
[[ $programs -gt 0 ]] || die "no guest programs in $GUEST_SRC"
# Guest shell scripts (busybox sh), e.g. hmm-tests-both.sh -> hmm-tests-both.
scripts=("$GUEST_SRC"/*.sh)
for sh in "${scripts[@]}"; do
    name="$(basename "$sh" .sh)"
    sh -n "$sh" || die "$sh: syntax error"
    install -m 0755 "$sh" "$OUT/$name"
done

# The kernel's own HMM selftest, unmodified, built the way its Makefile
# does (vm_util.c and hugepage_settings.c linked in), but static.
SELFTESTS="$SRC/tools/testing/selftests"
if [[ ! -f "$KDIR/build/usr/include/linux/mman.h" ]]; then
    log "installing the kernel's uapi headers into $KDIR/build/usr/include"
    make -s -C "$SRC" O="$KDIR/build" $(cat "$KDIR/make.env" 2>/dev/null | grep -E '^ARCH=' || true) headers_install >/dev/null ||
        die "make headers_install failed"
fi
(cd "$SELFTESTS/mm" && "$CC" -static -Wall -O2 -I"$SELFTESTS" -I"$SRC" \
    -isystem "$KDIR/build/usr/include" -isystem "$SRC/tools/include/uapi" \
    hmm-tests.c vm_util.c hugepage_settings.c -lrt -lpthread -lm -o "$OUT/hmm-tests.tmp") ||
    die "building tools/testing/selftests/mm/hmm-tests failed"
mv "$OUT/hmm-tests.tmp" "$OUT/hmm-tests"

log "built $((programs + ${#scripts[@]} + 1)) $ARCH_NAME program(s) in $OUT: $(cd "$OUT" && echo *)"
echo "$OUT"
