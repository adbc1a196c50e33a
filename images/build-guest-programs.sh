#!/usr/bin/env bash
# Builds the guest test programs (ci/guest/*.c) as static binaries with the
# dmirror uAPI header (lib/test_hmm_uapi.h) from the guest kernel's source.
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
command -v gcc >/dev/null || die "gcc missing: run ci/setup-host.sh"

GUEST_SRC="$REPO_DIR/ci/guest"
mkdir -p "$OUT"
shopt -s nullglob
sources=("$GUEST_SRC"/*.c)
[[ ${#sources[@]} -gt 0 ]] || die "no guest programs in $GUEST_SRC"
CFLAGS=(-static -O2 -g -Wall -Wextra -Wno-unused-parameter -Werror -I"$SRC/lib")
for c in "${sources[@]}"; do
    name="$(basename "$c" .c)"
    gcc "${CFLAGS[@]}" -o "$OUT/$name.tmp" "$c" || die "compiling $c failed"
    mv "$OUT/$name.tmp" "$OUT/$name"
done
log "built ${#sources[@]} program(s) in $OUT: $(cd "$OUT" && echo *)"
echo "$OUT"
