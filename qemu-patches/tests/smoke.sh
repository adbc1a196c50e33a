#!/usr/bin/env bash
# Smoke test of the QEMU side of hmmgpu (no guest driver needed):
#  1. the error messages for a bad memdev or a backend with another VRAM size;
#  2. a q35 VM under TCG with vhost-user-hmmgpu-pci: QEMU's `info pci`, and
#     the guest's view from sysfs (ids, BAR 2, the shared memory capability).
#
#   tests/smoke.sh QDIR KERNEL_IMAGE [BACKEND_BINARY]
#
# QDIR is what build-qemu.sh prints. BACKEND_BINARY is hmmgpu-device; without
# it, tests/dummy-backend.py stands in (it answers GET_CONFIG, nothing more).
# SMOKE_KEEP=1 keeps the logs (QEMU, serial console, monitor, backend).
set -euo pipefail
LOG_TAG=qemu-smoke
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../../images/lib.sh"

[[ $# -ge 2 ]] || die "usage: smoke.sh QDIR KERNEL_IMAGE [BACKEND_BINARY]"
QDIR="$1" KERNEL="$2" BACKEND="${3:-}"
QEMU="$QDIR/bin/qemu-system-x86_64"
[[ -x "$QEMU" ]] || die "$QEMU missing"
[[ -f "$KERNEL" ]] || die "$KERNEL missing"

work="$(mktemp -d /tmp/hmmgpu-qemu-smoke.XXXXXX)"
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    if [[ -n "${SMOKE_KEEP:-}" ]]; then
        echo "[qemu-smoke] SMOKE_KEEP: logs kept in $work" >&2
    else
        rm -rf "$work"
    fi
    rm -f "$vram" "$vram".*
}
trap cleanup EXIT
vram="/dev/shm/hmmgpu-smoke-vram.$$"
VRAM_SIZE=64M

# Starts the backend on socket $1 with VRAM file $2 of size $3 and waits for
# its socket.
start_backend() {
    local sock="$1" file="$2" size="$3"
    if [[ -n "$BACKEND" ]]; then
        "$BACKEND" --socket "$sock" --vram-path "$file" --vram-size "$size" 2>>"$work/backend.log" &
    else
        "$here/dummy-backend.py" --socket "$sock" --vram-size "$size" 2>>"$work/backend.log" &
    fi
    pids+=($!)
    for _ in $(seq 50); do [[ -S "$sock" ]] && return 0; sleep 0.1; done
    die "backend did not create $sock (log: $(cat "$work/backend.log"))"
}

BASE=(-M q35,memory-backend=mem -m 1G -accel tcg -nographic -vga none -nodefaults
      -object memory-backend-memfd,id=mem,size=1G,share=on)

# expect_error NAME PATTERN QEMU-ARGS...: QEMU must exit with PATTERN on stderr.
expect_error() {
    local name="$1" pattern="$2"; shift 2
    local out
    rm -f "$vram"
    if out=$(timeout 30 "$QEMU" "${BASE[@]}" -S "$@" 2>&1 </dev/null); then
        die "$name: QEMU started, expected an error"
    fi
    grep -q -- "$pattern" <<<"$out" || die "$name: expected '$pattern', got: $out"
    log "ok: $name: $(grep -- "$pattern" <<<"$out" | head -1)"
}
# A chardev QEMU listens on itself: the memdev checks run before connecting.
LISTEN=(-chardev "socket,id=gpu0,path=$work/listen.sock,server=on,wait=off")
expect_error "no memdev" "'memdev' is not set" "${LISTEN[@]}" \
    -device vhost-user-hmmgpu-pci,chardev=gpu0
expect_error "share=off" "needs share=on" "${LISTEN[@]}" \
    -object "memory-backend-file,id=vram0,mem-path=$vram,size=64M" \
    -device vhost-user-hmmgpu-pci,chardev=gpu0,memdev=vram0
expect_error "size not a power of two" "is not a power of two" "${LISTEN[@]}" \
    -object "memory-backend-file,id=vram0,mem-path=$vram,size=96M,share=on" \
    -device vhost-user-hmmgpu-pci,chardev=gpu0,memdev=vram0
# (The backends of the error cases get VRAM files of their own.)
start_backend "$work/twice0.sock" "$vram.0" 64M
start_backend "$work/twice1.sock" "$vram.1" 64M
expect_error "memdev used twice" "is already in use" \
    -chardev "socket,id=gpu0,path=$work/twice0.sock" \
    -chardev "socket,id=gpu1,path=$work/twice1.sock" \
    -object "memory-backend-file,id=vram0,mem-path=$vram,size=64M,share=on" \
    -device vhost-user-hmmgpu-pci,chardev=gpu0,memdev=vram0 \
    -device vhost-user-hmmgpu-pci,chardev=gpu1,memdev=vram0
start_backend "$work/small.sock" "$vram.small" 32M
expect_error "backend VRAM size differs" "the backend's VRAM is 33554432 bytes" \
    -chardev "socket,id=gpu0,path=$work/small.sock" \
    -object "memory-backend-file,id=vram0,mem-path=$vram,size=64M,share=on" \
    -device vhost-user-hmmgpu-pci,chardev=gpu0,memdev=vram0
rm -f "$vram"

# The guest: busybox prints the hmmgpu function's sysfs view, then waits.
mkdir -p "$work/root/bin"
cp /bin/busybox "$work/root/bin/busybox"
cat >"$work/root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys
mount -t proc proc /proc
mount -t sysfs sysfs /sys
byte() { eval echo "\$b$1"; }
le32() { echo $(( $(byte $(($1 + 3))) << 24 | $(byte $(($1 + 2))) << 16 | $(byte $(($1 + 1))) << 8 | $(byte $1) )); }
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor):$(cat $d/device)" = "0x1af4:0x107f" ] || continue
    echo "GUEST: $(basename $d) vendor=$(cat $d/vendor) device=$(cat $d/device) class=$(cat $d/class)"
    i=0
    while read start end flags; do
        [ "$start" != 0x0000000000000000 ] && echo "GUEST: BAR $i start=$start end=$end flags=$flags"
        i=$((i + 1)); [ $i -ge 6 ] && break
    done <$d/resource
    i=0
    for v in $(od -An -tu1 -v -N256 $d/config); do eval "b$i=$v"; i=$((i + 1)); done
    p=$(byte 52)
    while [ "$p" != 0 ]; do
        if [ "$(byte $p)" = 9 ] && [ "$(byte $((p + 3)))" = 8 ]; then
            echo "GUEST: virtio shared memory cap: bar=$(byte $((p + 4))) id=$(byte $((p + 5))) offset=$(le32 $((p + 8)))+$(le32 $((p + 16)))<<32 length=$(le32 $((p + 12)))+$(le32 $((p + 20)))<<32"
        fi
        p=$(byte $((p + 1)))
    done
done
echo GUEST-DONE
exec sleep 3600
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet) >"$work/initramfs.cpio"

start_backend "$work/gpu0.sock" "$vram" "$VRAM_SIZE"
cmd=("$QEMU" "${BASE[@]}" -no-reboot
     -object "memory-backend-file,id=vram0,mem-path=$vram,size=$VRAM_SIZE,share=on"
     -chardev "socket,id=gpu0,path=$work/gpu0.sock"
     -device vhost-user-hmmgpu-pci,chardev=gpu0,memdev=vram0
     -serial "file:$work/serial.log" -monitor "unix:$work/mon.sock,server=on,wait=off"
     -kernel "$KERNEL" -initrd "$work/initramfs.cpio" -append "console=ttyS0 panic=-1")
log "running: ${cmd[*]}"
"${cmd[@]}" >"$work/qemu.log" 2>&1 </dev/null &
qemu_pid=$!
pids+=($qemu_pid)
for _ in $(seq 120); do
    grep -q GUEST-DONE "$work/serial.log" 2>/dev/null && break
    kill -0 $qemu_pid 2>/dev/null || break
    sleep 1
done
if kill -0 $qemu_pid 2>/dev/null && [[ -S "$work/mon.sock" ]]; then
    printf 'info pci\ninfo qtree\nqom-get /machine/peripheral-anon/device[0] memdev\nquit\n' | timeout 10 socat - "UNIX-CONNECT:$work/mon.sock" >"$work/monitor.log" 2>&1 || true
fi
kill $qemu_pid 2>/dev/null || true
wait $qemu_pid 2>/dev/null || true
grep -q GUEST-DONE "$work/serial.log" 2>/dev/null && [[ -f "$work/monitor.log" ]] || {
    cat "$work/qemu.log" "$work/serial.log" >&2 2>/dev/null; die "the guest did not finish"; }
# The monitor echoes each typed character with cursor escapes: drop them.
tr -d '\r' <"$work/monitor.log" | sed 's/\x1b\[[0-9]*[A-Z]//g' >"$work/monitor.txt"
echo "== QEMU: info pci =="
awk '/^  Bus/ { show = 0 } /PCI device 1af4:107f/ { show = 1; print prev } show { print } { prev = $0 }' "$work/monitor.txt"
echo "== QEMU: info qtree =="
awk '/dev: vhost-user-hmmgpu-pci/ { show = 1 } show && /dev: / && !/vhost-user-hmmgpu/ { show = 0 }
     show && /dev: |class |^ *bar [0-9]|chardev/ { print }' "$work/monitor.txt"
echo "== QEMU: qom-get device[0] memdev =="
grep -A1 'qom-get /machine/peripheral-anon/device\[0\] memdev$' "$work/monitor.txt" | tail -1
echo "== guest =="
grep '^GUEST:' "$work/serial.log"
grep -q 'GUEST: .*vendor=0x1af4 device=0x107f' "$work/serial.log" || die "the guest does not see 1af4:107f"
grep -q 'GUEST: BAR 2 .*end=.*flags=0x0*14220c' "$work/serial.log" || die "BAR 2 is not a 64-bit prefetchable memory BAR"
grep -q 'GUEST: virtio shared memory cap: bar=2 id=0 offset=0+0<<32 length=67108864+0<<32' "$work/serial.log" ||
    die "no shared memory capability for region 0 on BAR 2"
log "ok: guest sees 1af4:107f with a 64 MiB 64-bit prefetchable BAR 2 as shared memory region 0"
