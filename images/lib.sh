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
