# Shared helpers for the image build scripts (sourced, not run).
HMMGPU_CACHE="${HMMGPU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hmmgpu}"
IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$IMAGES_DIR")"

log() { echo "[$LOG_TAG] $*" >&2; }
die() { echo "[$LOG_TAG] error: $*" >&2; exit 1; }

# run_logged NAME CMD...: runs CMD with its output in $LOGDIR/NAME.log and
# prints a progress line every 30 s, so a long build is never silent; on
# failure prints the log's tail and exits.
run_logged() {
    local name="$1"; shift
    local logf="$LOGDIR/$name.log" start=$SECONDS
    mkdir -p "$LOGDIR"
    log "$name: started (log: $logf)"
    "$@" >"$logf" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name: $((SECONDS - start))s, $(wc -l <"$logf") log lines, last: $(tail -n1 "$logf" | cut -c1-100)"
        fi
    done
    if ! wait "$pid"; then
        tail -n 60 "$logf" >&2
        die "$name failed after $((SECONDS - start))s (full log: $logf)"
    fi
    log "$name: done in $((SECONDS - start))s"
}

# hash_inputs FILE/STRING...: a short stable hash of files' contents (not
# their paths: a clone elsewhere reuses the cache) and strings.
hash_inputs() {
    local a
    for a in "$@"; do
        if [[ -f "$a" ]]; then sha256sum <"$a"; else echo "$a"; fi
    done | sha256sum | cut -c1-16
}

# host_arch: this machine's architecture, in the guest names (x86_64, ppc64le).
host_arch() {
    case "$(uname -m)" in
        x86_64) echo x86_64 ;;
        ppc64le) echo ppc64le ;;
        *) die "unsupported host architecture $(uname -m) (x86_64 or ppc64le)" ;;
    esac
}

# gnu_triple ARCH: the Debian cross-toolchain prefix for a guest architecture.
gnu_triple() {
    case "$1" in
        x86_64) echo x86_64-linux-gnu ;;
        ppc64le) echo powerpc64le-linux-gnu ;;
    esac
}

# guest_cc ARCH: the C compiler for static guest programs of ARCH.
guest_cc() {
    if [[ "$1" == "$(host_arch)" ]]; then echo gcc; else echo "$(gnu_triple "$1")-gcc"; fi
}

# guest_busybox ARCH: Debian's static busybox for ARCH. The host's own comes
# from busybox-static; another architecture's is unpacked by ci/setup-host.sh
# (a foreign busybox-static cannot be installed beside the native one).
guest_busybox() {
    if [[ "$1" == "$(host_arch)" ]]; then
        echo /bin/busybox
    else
        echo "$HMMGPU_CACHE/busybox-$1/bin/busybox"
    fi
}

# run_guest_binary ARCH BINARY ARGS...: runs a static binary of ARCH on this
# host (through qemu-user for another architecture).
run_guest_binary() {
    local arch="$1"; shift
    if [[ "$arch" == "$(host_arch)" ]]; then
        "$@"
    else
        local q
        case "$arch" in x86_64) q=qemu-x86_64 ;; ppc64le) q=qemu-ppc64le ;; esac
        command -v "$q" >/dev/null || die "$q missing: run ci/setup-host.sh (installs qemu-user)"
        "$q" "$@"
    fi
}

# unpack_patched DIR TARBALL WHAT [PATCH...]: unpacks TARBALL (its top
# directory stripped) into DIR with the patches applied, unless DIR is
# complete already. Two runs may do this at once: each unpacks into a private
# directory and the first renames its copy into place.
unpack_patched() {
    local dir="$1" tarball="$2" what="$3" tmp p
    shift 3
    [[ -f "$dir/.hmmgpu-unpacked" ]] && return 0
    log "unpacking $what into $dir"
    tmp="$(mktemp -d "$dir.tmp.XXXXXX")"
    tar -xf "$tarball" -C "$tmp" --strip-components=1 --no-same-owner
    for p in "$@"; do
        log "applying $(basename "$p")"
        patch -d "$tmp" -p1 --quiet --forward <"$p" || die "$(basename "$p") does not apply"
    done
    touch "$tmp/.hmmgpu-unpacked"
    if [[ -f "$dir/.hmmgpu-unpacked" ]]; then
        rm -rf "$tmp"   # another run was first
    else
        rm -rf "$dir" && mv "$tmp" "$dir"
    fi
}
