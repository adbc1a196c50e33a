#!/bin/sh
# bench-run: the guest side of `cargo xtask bench` (ci/xtask/src/bench.rs,
# docs/running.md). The same workloads on the kernel's test_hmm.ko and on
# hmmgpu.ko, one module loaded at a time (both create /dev/hmm_dmirror0..).
# Workloads come in groups, each run on both drivers back to back, in
# alternating order (test_hmm first, then hmmgpu first, ...), so a change in
# the machine's load during the boot hits both sides of a ratio alike.
# Each workload is a phase the host brackets: the guest prints
#     HMMGPU-BENCH-MARK <driver> <phase> begin|end
# and waits for the host's answer on the console, so the host reads the
# backends' CPU time and counters while the guest is idle. Every figure
# line (BENCH ...) belongs to the phase it is printed in.
#
#   bench-run SIZES_MAX OVERSUB_BYTES CONC_SECONDS CONC_ROUNDS GPUS THP_RUNS
#
# SIZES_MAX: largest migration size; OVERSUB_BYTES: the oversubscription
# working set (twice a GPU's device-private VRAM); CONC_SECONDS and
# CONC_ROUNDS: each concurrency run's length, and how many times each runs
# (interleaved); GPUS: 2 adds one process per GPU on two GPUs; THP_RUNS:
# runs of hmm-tests' own THP benchmark.
# Exit status: 0 done, 91/93 a module did not load/unload, 92 a phase failed.

if [ $# -ne 6 ]; then
    echo "usage: bench-run SIZES_MAX OVERSUB_BYTES CONC_SECONDS CONC_ROUNDS GPUS THP_RUNS" >&2
    exit 2
fi
max=$1 oversub=$2 secs=$3 rounds=$4 gpus=$5 thp_runs=$6
d0=/dev/hmm_dmirror0 d1=/dev/hmm_dmirror1

# The host's answers are typed into the console: no echo of them into the
# output the host parses.
stty -echo 2>/dev/null

# init loaded hmmgpu.ko.
loaded=hmmgpu
params_said=""

# load DRIVER: makes DRIVER's module the one loaded.
load() {
    if [ "$loaded" != "$1" ]; then
        rmmod "$loaded" || exit 93
        loaded=""
        insmod "/lib/modules/$1.ko" || exit 91
        loaded=$1
    fi
    case " $params_said " in
        *" $1 "*) ;;
        *)
            params_said="$params_said $1"
            for p in /sys/module/$1/parameters/*; do
                [ -f "$p" ] && echo "HMMGPU-BENCH-PARAM $1 ${p##*/}=$(cat "$p")"
            done
            ;;
    esac
}

mark() {
    echo "HMMGPU-BENCH-MARK $driver $1 $2"
    # The host answers at once; a lost answer must not hang the benchmark.
    read -r -t 60 _answer || echo "bench-run: no answer from the host to '$driver $1 $2'"
}

phase() {
    name=$1
    shift
    mark "$name" begin
    "$@"
    rc=$?
    mark "$name" end
    if [ "$rc" -ne 0 ]; then
        echo "bench-run: $driver: phase $name failed (status $rc)"
        exit 92
    fi
}

groups_run=0
# group NAME: group_NAME on both drivers, the first one alternating.
group() {
    groups_run=$((groups_run + 1))
    if [ $((groups_run % 2)) = 1 ]; then
        order="test_hmm hmmgpu"
    else
        order="hmmgpu test_hmm"
    fi
    for driver in $order; do
        load "$driver"
        "group_$1"
    done
}

group_sizes() {
    phase sizes hmmgpu-bench sizes "$max"
}

group_latency() {
    phase latency hmmgpu-bench latency
}

# Each configuration CONC_ROUNDS times, the configurations interleaved: the
# figures are medians, and the one-process figure the others are scaled by
# is measured among them.
group_conc() {
    r=0
    while [ "$r" -lt "$rounds" ]; do
        for size in 64K 16M; do
            phase "conc-$size-1p" hmmgpu-bench concurrent "${size}_1p" "$size" "$secs" $d0
            phase "conc-$size-2p" hmmgpu-bench concurrent "${size}_2p" "$size" "$secs" $d0 $d0
            phase "conc-$size-4p" hmmgpu-bench concurrent "${size}_4p" "$size" "$secs" $d0 $d0 $d0 $d0
            if [ "$gpus" -ge 2 ]; then
                phase "conc-$size-2gpu" hmmgpu-bench concurrent "${size}_2gpu" "$size" "$secs" $d0 $d1
            fi
        done
        r=$((r + 1))
    done
}

group_oversub() {
    phase oversub hmmgpu-bench oversub "$oversub"
}

thp_benchmark() {
    i=0
    while [ "$i" -lt "$thp_runs" ]; do
        hmm-tests -r hmm.hmm_device_private.benchmark_thp_migration || return 1
        i=$((i + 1))
    done
}

group_selftest_thp() {
    phase selftest-thp thp_benchmark
}

# The whole selftest, timed in the guest; its output to a file (it is long).
hmm_tests_timed() {
    t0=$(cut -d' ' -f1 /proc/uptime)
    hmm-tests >"/tmp/hmm-tests-$driver.log" 2>&1
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "BENCH hmm_tests_wall_s $(awk "BEGIN {print $t1 - $t0}")"
    echo "HMMGPU-BENCH-HMM-TESTS $(grep '^# Totals:' "/tmp/hmm-tests-$driver.log" || echo 'no Totals line')"
    grep '^not ok' "/tmp/hmm-tests-$driver.log" | sed 's/^/HMMGPU-BENCH-HMM-TESTS-FAILED /'
    return 0
}

group_hmm_tests() {
    phase hmm-tests hmm_tests_timed
}

echo "HMMGPU-BENCH-GUEST kernel=$(uname -r) cpus=$(nproc)"
group sizes
group latency
group conc
group oversub
group selftest_thp
group hmm_tests
echo "HMMGPU-BENCH-DONE"
exit 0
