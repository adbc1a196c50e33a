#!/bin/sh
# hostile-guest MODULE SECONDS SEED PHASE...: the guest side of the
# hostile-guest VM test (ci/xtask/src/tests/hostile.rs). Installed as
# /usr/bin/hostile-guest.
#
# Takes GPU 0 away from hmmgpu.ko (sysfs unbind), loads MODULE (the
# test-only hmmgpu_hostile.ko, ci/guest/hostile/) and binds it to the device
# once per PHASE (idle, fill, vread, ring, flood) for SECONDS each, with
# hmmgpu-bystander spinning beside it all along. Then it unloads the module,
# binds hmmgpu.ko again and runs a data round on the same device: the demo
# (every byte checked) and a buffer of seed SEED left in VRAM for the host to
# find in the VRAM file.
#
# The host follows the phases by the module's kernel messages (HOSTILE-PHASE
# when a bind starts one, HOSTILE-CONFIG and HOSTILE-CHAINS when the unbind
# ended it) and reads hmmgpu-bystander's HOSTILE-BYSTANDER line: kernel
# records reach the console whole, where this script's own echo can be cut
# by them. Exits 0 when every step ran (the host judges the figures), 1
# otherwise.

set -u
[ $# -ge 4 ] || { echo "usage: hostile-guest MODULE SECONDS SEED PHASE..." >&2; exit 1; }
module=$1 seconds=$2 seed=$3
shift 3

fail() { echo "hostile-guest: FAIL $*"; exit 1; }

drivers=/sys/bus/virtio/drivers
dev=""
for d in "$drivers"/hmmgpu/virtio*; do
    [ -e "$d" ] && { dev=${d##*/}; break; }
done
[ -n "$dev" ] || fail "no device bound to hmmgpu"
echo "hostile-guest: taking $dev from hmmgpu.ko"

# Nothing binds by itself from here on: each bind below is explicit.
echo 0 >/sys/bus/virtio/drivers_autoprobe || fail "drivers_autoprobe=0"
echo "$dev" >"$drivers/hmmgpu/unbind" || fail "unbind $dev from hmmgpu"
insmod "$module" || fail "insmod $module"

hmmgpu-bystander &
bystander=$!
sleep 1
for p in "$@"; do
    echo "hostile-guest: phase $p"
    echo "$p" >/sys/module/hmmgpu_hostile/parameters/phase || fail "phase $p"
    echo "$dev" >"$drivers/hmmgpu-hostile/bind" || fail "bind $dev to hmmgpu-hostile ($p)"
    sleep "$seconds"
    echo "$dev" >"$drivers/hmmgpu-hostile/unbind" || fail "unbind $dev from hmmgpu-hostile ($p)"
done
kill -TERM "$bystander"
wait "$bystander"

rmmod hmmgpu_hostile || fail "rmmod hmmgpu_hostile"
echo "$dev" >"$drivers/hmmgpu/bind" || fail "bind $dev to hmmgpu again"
echo 1 >/sys/bus/virtio/drivers_autoprobe
echo "hostile-guest: $dev is hmmgpu's again: a data round"
hmmgpu-demo || fail "hmmgpu-demo after the attacks"
hmmgpu-demo --leave-in-vram "$seed" || fail "hmmgpu-demo --leave-in-vram after the attacks"
echo "hostile-guest: done"
