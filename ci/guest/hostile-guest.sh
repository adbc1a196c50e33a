#!/bin/sh
# hostile-guest MODULE SECONDS SEED PHASE...: the guest side of the
# hostile-guest VM test (ci/xtask/src/tests/hostile.rs). Installed as
# /usr/bin/hostile-guest.
#
# Two GPUs. Takes GPU 1 away from hmmgpu.ko (sysfs unbind), loads MODULE
# (the test-only hmmgpu_hostile.ko, ci/guest/hostile/) and binds it to that
# device once per PHASE (idle, fill, vread, ring, flood) for SECONDS each.
# All along, beside it, two bystanders: hmmgpu-bystander spins on the CPU
# (its stalls are the VM's), and hmmgpu-demo rounds run one after another
# on GPU 0 (/dev/hmm_dmirror0), every byte of each checked. Then it unloads
# the module, binds hmmgpu.ko to GPU 1 again and runs a data round on it:
# the demo and a buffer of seed SEED left in its VRAM for the host to find
# in GPU 1's VRAM file.
#
# The host follows the phases by the module's kernel messages (HOSTILE-PHASE
# when a bind starts one, HOSTILE-CONFIG and HOSTILE-CHAINS when the unbind
# ended it) and reads the bystanders' kernel records:
#   HOSTILE-DATA phase=P end=E round=N status=S start=T0 stop=T1
#                                            one GPU 0 round (S: the demo's
#                                            exit status; P, E: the phases
#                                            it started and ended in; T0, T1:
#                                            /proc/uptime around it)
#   HOSTILE-BYSTANDER ...                    hmmgpu-bystander's figures
# Kernel records reach the console whole, where this script's own echo can
# be cut by them. Exits 0 when every step ran (the host judges the figures),
# 1 otherwise.

set -u
[ $# -ge 4 ] || { echo "usage: hostile-guest MODULE SECONDS SEED PHASE..." >&2; exit 1; }
module=$1 seconds=$2 seed=$3
shift 3

fail() { echo "hostile-guest: FAIL $*"; exit 1; }

drivers=/sys/bus/virtio/drivers
bystander_dev=/dev/hmm_dmirror0 victim_dmirror=/dev/hmm_dmirror1
# GPU n is the n-th device hmmgpu bound (the driver numbers them in probe
# order, and a rebound device gets its lowest free number back).
dev="" found=""
for d in "$drivers"/hmmgpu/virtio*; do
    [ -e "$d" ] || continue
    [ -n "$found" ] && [ -z "$dev" ] && dev=${d##*/}
    found="$found ${d##*/}"
done
[ -n "$dev" ] || fail "two devices bound to hmmgpu wanted, found:$found"
echo "hostile-guest: taking $dev (GPU 1) from hmmgpu.ko, GPU 0's is $bystander_dev"

# Nothing binds by itself from here on: each bind below is explicit.
echo 0 >/sys/bus/virtio/drivers_autoprobe || fail "drivers_autoprobe=0"
echo "$dev" >"$drivers/hmmgpu/unbind" || fail "unbind $dev from hmmgpu"
insmod "$module" || fail "insmod $module"

work=/tmp/hostile-guest
mkdir -p "$work" || fail "mkdir $work"
hmmgpu-bystander &
bystander=$!
# GPU 0 rounds until the stop file appears; a failed round's output goes to
# the console.
(
    n=0
    while [ ! -e "$work/stop" ]; do
        n=$((n + 1))
        p=$(cat /sys/module/hmmgpu_hostile/parameters/phase)
        t0=$(cut -d' ' -f1 /proc/uptime)
        # 256 KiB: rounds short enough that several start in every phase
        # even on the debug kernel with the other GPU under attack (a 1 MiB
        # round, 256 CPU faults back, once outlasted a whole phase there).
        hmmgpu-demo -d "$bystander_dev" -s 256K --seed "$n" >"$work/demo.log" 2>&1
        s=$?
        t1=$(cut -d' ' -f1 /proc/uptime)
        e=$(cat /sys/module/hmmgpu_hostile/parameters/phase)
        [ "$s" = 0 ] || cat "$work/demo.log"
        echo "<5>HOSTILE-DATA phase=${p:-none} end=${e:-none} round=$n status=$s start=$t0 stop=$t1" >/dev/kmsg
    done
) &
data=$!
sleep 1
for p in "$@"; do
    echo "hostile-guest: phase $p"
    echo "$p" >/sys/module/hmmgpu_hostile/parameters/phase || fail "phase $p"
    echo "$dev" >"$drivers/hmmgpu-hostile/bind" || fail "bind $dev to hmmgpu-hostile ($p)"
    sleep "$seconds"
    echo "$dev" >"$drivers/hmmgpu-hostile/unbind" || fail "unbind $dev from hmmgpu-hostile ($p)"
done
touch "$work/stop"
wait "$data"
kill -TERM "$bystander"
wait "$bystander"

rmmod hmmgpu_hostile || fail "rmmod hmmgpu_hostile"
echo "$dev" >"$drivers/hmmgpu/bind" || fail "bind $dev to hmmgpu again"
echo 1 >/sys/bus/virtio/drivers_autoprobe
echo "hostile-guest: $dev is hmmgpu's again: a data round on $victim_dmirror"
hmmgpu-demo -d "$victim_dmirror" || fail "hmmgpu-demo on GPU 1 after the attacks"
hmmgpu-demo -d "$victim_dmirror" --leave-in-vram "$seed" || fail "hmmgpu-demo --leave-in-vram on GPU 1 after the attacks"
echo "hostile-guest: done"
