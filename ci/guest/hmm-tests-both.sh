#!/bin/sh
# hmm-tests-both [DRIVER...]: the kernel's hmm-tests (tools/testing/selftests/
# mm, unmodified, run directly: the tools' test_hmm.sh always exits 0) once
# per dmirror driver, in this boot. Installed as /usr/bin/hmm-tests-both.
#
# DRIVER is test_hmm (the kernel's /lib/modules/test_hmm.ko) or hmmgpu
# (/lib/modules/hmmgpu.ko); default: test_hmm hmmgpu. Both create
# /dev/hmm_dmirror0.., so only one is loaded at a time: before each run the
# other is removed and DRIVER loaded (if it is not already). At the end
# hmmgpu is loaded again if it was loaded at the start.
#
# Output per DRIVER, for `cargo xtask test hmm-tests` (ci/xtask/src/tests/
# selftest.rs), each marker on its own line:
#   HMMGPU-SELFTEST-BEGIN DRIVER
#   ... hmm-tests' TAP output ...
#   HMMGPU-SELFTEST-END DRIVER seconds=S status=N    (wall time, exit status)
# Exits 0 when every run took place, whatever hmm-tests reported (the host
# judges the TAP output); 90..93 when a module could not be swapped.

uptime_s() { cut -d' ' -f1 /proc/uptime; }
loaded() { [ -d "/sys/module/$1" ]; }

hmmgpu_at_start=0
loaded hmmgpu && hmmgpu_at_start=1

[ $# -gt 0 ] || set -- test_hmm hmmgpu
for d in "$@"; do
    case "$d" in
        test_hmm) other=hmmgpu ;;
        hmmgpu) other=test_hmm ;;
        *) echo "hmm-tests-both: unknown driver '$d' (test_hmm or hmmgpu)"; exit 2 ;;
    esac
    if loaded "$other"; then
        rmmod "$other" || { echo "hmm-tests-both: rmmod $other failed"; exit 90; }
    fi
    if ! loaded "$d"; then
        insmod "/lib/modules/$d.ko" || { echo "hmm-tests-both: insmod /lib/modules/$d.ko failed"; exit 91; }
    fi
    echo
    echo "HMMGPU-SELFTEST-BEGIN $d"
    t0=$(uptime_s)
    hmm-tests
    status=$?
    t1=$(uptime_s)
    echo
    echo "HMMGPU-SELFTEST-END $d seconds=$(awk "BEGIN { print $t1 - $t0 }") status=$status"
done

if [ "$hmmgpu_at_start" = 1 ] && ! loaded hmmgpu; then
    if loaded test_hmm; then
        rmmod test_hmm || { echo "hmm-tests-both: rmmod test_hmm failed"; exit 92; }
    fi
    insmod /lib/modules/hmmgpu.ko || { echo "hmm-tests-both: insmod /lib/modules/hmmgpu.ko failed"; exit 93; }
fi
exit 0
