#!/usr/bin/env bash
# Builds the guest test programs as static binaries for the kernel's
# architecture (a cross gcc for another one) with the dmirror uAPI header
# (lib/test_hmm_uapi.h) of the kernel's sources: one program per
# ci/guest/NAME.c (NAME), and one per directory ci/guest/DIR/ (hmmgpu-DIR,
# from every DIR/*.c; ci/guest/faults/ is hmmgpu-faults); every source sees
# ci/guest/*.h. Then copies the guest scripts (ci/guest/*.sh, installed
# without the .sh) and builds the kernel's own hmm-tests, unmodified, with
# `hmm-tests -l`'s list of its cases beside it (hmm-tests.list: which cases
# this kernel's selftest has).
# Prints the output directory on stdout when done.
#
#   build-guest-programs.sh --build BUILD --source SRC --arch ARCH --out DIR [-- MAKEVAR=VALUE...]
#
# BUILD is a built kernel tree (where make ran), SRC its sources (the same
# directory for an in-tree build), MAKEVARs what make needs for it (ARCH=,
# LLVM=): xtask reads them from the tree (ci/xtask/src/build/tree.rs).
# hmm-tests needs the tree's uapi headers: `make headers` (the kernel's own
# way for its selftests) runs in BUILD if BUILD/usr/include has none yet.
set -euo pipefail
LOG_TAG=guest-programs
source "$(dirname "$0")/lib.sh"

usage="usage: build-guest-programs.sh --build BUILD --source SRC --arch x86_64|ppc64le --out DIR [-- MAKEVAR=VALUE...]"
BUILD="" SRC="" ARCH_NAME="" OUT=""
make_vars=()
while [[ $# -gt 0 ]]; do
    if [[ "$1" == -- ]]; then shift; make_vars=("$@"); break; fi
    [[ $# -ge 2 ]] || die "$1 needs a value ($usage)"
    case "$1" in
        --build) BUILD="$2" ;;
        --source) SRC="$2" ;;
        --arch) ARCH_NAME="$2" ;;
        --out) OUT="$2" ;;
        *) die "unknown argument '$1' ($usage)" ;;
    esac
    shift 2
done
[[ -n "$BUILD" && -n "$SRC" && -n "$ARCH_NAME" && -n "$OUT" ]] || die "--build, --source, --arch and --out are required ($usage)"
UAPI="$SRC/lib/test_hmm_uapi.h"
[[ -f "$UAPI" ]] || die "$UAPI missing (kernel source $SRC)"
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
[[ -f "$SELFTESTS/mm/hmm-tests.c" ]] || die "$SELFTESTS/mm/hmm-tests.c missing (kernel source $SRC)"
if [[ ! -f "$BUILD/usr/include/linux/mman.h" ]]; then
    # Two runs against one tree at once: one `make headers` at a time.
    mkdir -p "$HMMGPU_CACHE"
    exec 7>"$HMMGPU_CACHE/headers-$(hash_inputs "$BUILD").lock"
    flock 7
    if [[ ! -f "$BUILD/usr/include/linux/mman.h" ]]; then
        log "make headers in $BUILD (the uapi headers hmm-tests is built with)"
        make -s -C "$BUILD" "${make_vars[@]}" headers >/dev/null ||
            die "make -C $BUILD ${make_vars[*]} headers failed"
    fi
    exec 7>&-
fi
(cd "$SELFTESTS/mm" && "$CC" -static -Wall -O2 -I"$SELFTESTS" -I"$SRC" \
    -isystem "$BUILD/usr/include" -isystem "$SRC/tools/include/uapi" \
    hmm-tests.c vm_util.c hugepage_settings.c -lrt -lpthread -lm -o "$OUT/hmm-tests.tmp") ||
    die "building tools/testing/selftests/mm/hmm-tests failed"
mv "$OUT/hmm-tests.tmp" "$OUT/hmm-tests"
# `-l` lists the cases (on stderr) and exits with KSFT_SKIP (4) without
# running any: the truth about which cases this kernel's hmm-tests has.
status=0
run_guest_binary "$ARCH_NAME" "$OUT/hmm-tests" -l 2>"$OUT/hmm-tests.list.tmp" >/dev/null || status=$?
[[ $status == 4 || $status == 0 ]] || die "hmm-tests -l exited with $status: $(head -c 300 "$OUT/hmm-tests.list.tmp")"
mv "$OUT/hmm-tests.list.tmp" "$OUT/hmm-tests.list"

log "built $((programs + ${#scripts[@]} + 1)) $ARCH_NAME program(s) in $OUT: $(cd "$OUT" && echo *)"
echo "$OUT"
