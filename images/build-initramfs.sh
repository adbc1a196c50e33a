#!/usr/bin/env bash
# Builds the guest initramfs: a gzip'd newc cpio with Debian's static busybox
# for the kernel's architecture (and its applet links), images/init as /init, kernel modules in
# /lib/modules/, guest programs in /usr/bin/ and extra host files in /host/.
# Cheap (well under a second), so `cargo xtask run` rebuilds it per run.
# Prints the output file on stdout when done.
#
#   build-initramfs.sh --arch x86_64|ppc64le --out FILE [--module PATH.ko]... \
#                      [--prog PATH]... [--add HOSTPATH]...
#
# xtask passes the kernel tree's test_hmm.ko as a --module when it has one.
set -euo pipefail
LOG_TAG=initramfs
source "$(dirname "$0")/lib.sh"

usage="usage: build-initramfs.sh --arch x86_64|ppc64le --out FILE [--module PATH.ko]... [--prog PATH]... [--add HOSTPATH]..."
ARCH_NAME="" OUT=""
modules=() progs=() adds=()
while [[ $# -gt 0 ]]; do
    [[ $# -ge 2 ]] || die "$1 needs a value ($usage)"
    case "$1" in
        --arch) ARCH_NAME="$2" ;;
        --out) OUT="$2" ;;
        --module) modules+=("$2") ;;
        --prog) progs+=("$2") ;;
        --add) adds+=("$2") ;;
        *) die "unknown argument '$1' ($usage)" ;;
    esac
    shift 2
done
[[ -n "$ARCH_NAME" && -n "$OUT" ]] || die "--arch and --out are required ($usage)"
case "$ARCH_NAME" in x86_64|ppc64le) ;; *) die "--arch must be x86_64 or ppc64le, not '$ARCH_NAME'" ;; esac
BUSYBOX="$(guest_busybox "$ARCH_NAME")"
[[ -x "$BUSYBOX" ]] || die "$BUSYBOX missing: run ci/setup-host.sh (installs busybox-static for $ARCH_NAME)"
# The dynamic busybox package installs /bin/busybox too; the initramfs has no libc.
if ! file_out=$(LC_ALL=C readelf -l "$BUSYBOX" 2>&1); then
    die "cannot inspect $BUSYBOX: $file_out"
fi
grep -q 'Requesting program interpreter' <<<"$file_out" \
    && die "$BUSYBOX is dynamically linked: install busybox-static (ci/setup-host.sh)"
command -v cpio >/dev/null || die "cpio missing: run ci/setup-host.sh"

for f in "${modules[@]}" "${progs[@]}" "${adds[@]}"; do
    [[ -f "$f" ]] || die "no such file: $f"
done

out_dir="$(dirname "$OUT")"
[[ -d "$out_dir" ]] || die "output directory $out_dir does not exist"
root="$(mktemp -d "$out_dir/.initramfs-root.XXXXXX")"
trap 'rm -rf "$root"' EXIT

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/modules,proc,sys,dev,tmp,host,root,etc}
cp "$BUSYBOX" "$root/bin/busybox"
# Applet links: the list comes from the binary itself.
while read -r applet; do
    [[ -n "$applet" && "$applet" != busybox ]] || continue
    for d in bin sbin usr/bin usr/sbin; do
        [[ -e "$root/$d/$applet" ]] && continue 2
    done
    ln -s /bin/busybox "$root/bin/$applet"
done < <(run_guest_binary "$ARCH_NAME" "$BUSYBOX" --list)
# /sbin/rmmod, /sbin/insmod, /sbin/poweroff are where programs look for them.
for a in insmod rmmod modprobe lsmod poweroff reboot; do
    ln -sf /bin/busybox "$root/sbin/$a"
done
install -m 0755 "$IMAGES_DIR/init" "$root/init"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"

for m in "${modules[@]}"; do install -m 0644 "$m" "$root/lib/modules/"; done
for p in "${progs[@]}"; do install -m 0755 "$p" "$root/usr/bin/"; done
for a in "${adds[@]}"; do
    name="$(basename "$a")"
    [[ -e "$root/host/$name" ]] && die "two --add files named $name"
    cp -p "$a" "$root/host/$name"
done

tmp_out="$OUT.tmp.$$"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0) \
    | gzip -1 >"$tmp_out"
mv "$tmp_out" "$OUT"
log "$OUT: $(du -k "$OUT" | cut -f1) KiB, modules: ${modules[*]##*/}${modules[*]:+,} programs: ${progs[*]##*/}${progs[*]:+,} host files: ${#adds[@]}"
echo "$OUT"
