// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-faults restart: catalogue entry 9 with a backend that comes back.
 * The backend process is killed (SIGKILL) while a migration is in flight,
 * and the runner starts a new one on the same socket and VRAM file (QEMU
 * reconnects); the new one executes nothing and posts a RESTARTED event, the
 * driver resets the device and submits its commands again. With 2 MiB in device-private VRAM (P)
 * and 2 MiB in device-coherent VRAM (C) from before the kill, and 8 MiB (M)
 * migrating to device-private VRAM across it (slowed down to about 2 s by
 * a bandwidth cap, so that the kill lands in the middle):
 *
 * - the migration in flight succeeds and moves every page of M;
 * - every byte of M, P and C reads back intact through the CPU (M and P
 *   through the new backend: migrate_to_ram copies them out of VRAM);
 * - a device READ through the mirror (device faults on the recreated
 *   contexts) reads 2 MiB of system memory right;
 * - the checksummed workload of `data` runs right on the new backend;
 * - then the backend is killed again in the middle of a device READ of
 *   8 MiB of system memory (R), through the device MMU of a context: the
 *   READ succeeds and returns every byte of R.
 *
 * Test: fault-backend-restart (ci/xtask/src/tests/loss.rs), which also
 * checks that exactly two backends were restarted and the driver reset the
 * device exactly twice.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "faults.h"

/*
 * Forks a child that asks the host to kill the backend `after_ms` from now
 * and writes the time the host confirmed it (now_ms) to `pipe_w`.
 */
static pid_t kill_backend_soon(int pipe_w, unsigned int after_ms)
{
	pid_t pid;

	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		say("FAIL: fork: %s", strerror(errno));
		exit(1);
	}
	if (pid == 0) {
		double killed;

		usleep(after_ms * 1000);
		inject("{\"kind\":\"kill_backend\"}");
		killed = now_ms();
		if (write(pipe_w, &killed, sizeof(killed)) != sizeof(killed))
			_exit(1);
		_exit(0);
	}
	return pid;
}

/*
 * Reaps the child of kill_backend_soon() (exits 3 if it did not get the
 * kill done) and checks that the host killed the backend between t0 and
 * t1, while `what` was in flight.
 */
static void check_killed_during(pid_t child, int pipe_r, double t0, double t1, const char *what)
{
	char msg[96];
	double killed = 0;
	int status;

	if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status)) {
		say("FAIL: the child asking for the kill ended with status %#x", status);
		exit(3);
	}
	if (read(pipe_r, &killed, sizeof(killed)) != sizeof(killed))
		killed = 0;
	say("  the host killed the backend %.0f ms into the %s", killed - t0, what);
	snprintf(msg, sizeof(msg), "the backend was killed while the %s was in flight", what);
	check(killed > t0 && killed < t1, msg);
}

static int run_restart(int argc, char **argv)
{
	const size_t n = 512, size = n * PAGE_SZ;
	const size_t mn = 4 * n, msize = mn * PAGE_SZ;
	uint8_t *p = map_buffer(size, false), *c = map_buffer(size, false);
	uint8_t *s = map_buffer(size, false), *m = map_buffer(msize, false);
	uint8_t *r = map_buffer(msize, false), *out = map_buffer(msize, false);
	struct hmm_dmirror_cmd cmd;
	int fdp, fdc, e, fds[2];
	double t0, t1;
	size_t moved;
	pid_t child;

	(void)argv;
	if (argc != 0)
		usage();
	fdp = open_dev();
	fdc = open_dev_at(COHERENT_DEV_PATH);
	fill_pattern(p, size, 101);
	fill_pattern(c, size, 102);
	fill_pattern(m, msize, 103);
	fill_pattern(s, size, 104);
	fill_pattern(r, msize, 106);
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, p, out, n, &cmd);
	check(!e && cmd.cpages == n, "P migrated to device-private VRAM");
	e = dmirror(fdc, HMM_DMIRROR_MIGRATE_TO_DEV, c, out, n, &cmd);
	check(!e && cmd.cpages == n, "C migrated to device-coherent VRAM");

	/*
	 * The child asking for the kill must not share the buffers: pages a
	 * forked child maps too are migrated through its mappings as well, and
	 * its exit races the migration (pages it still holds are skipped).
	 */
	if (madvise(m, msize, MADV_DONTFORK) || madvise(p, size, MADV_DONTFORK) ||
	    madvise(c, size, MADV_DONTFORK) || madvise(s, size, MADV_DONTFORK) ||
	    madvise(r, msize, MADV_DONTFORK) || madvise(out, msize, MADV_DONTFORK)) {
		say("FAIL: madvise(MADV_DONTFORK): %s", strerror(errno));
		exit(1);
	}
	/* 8 MiB at 4 MiB/s: the kill comes 0.5 s into about 2 s of copying. */
	inject("{\"kind\":\"bandwidth\",\"bytes_per_sec\":4194304}");
	if (pipe(fds)) {
		say("FAIL: pipe: %s", strerror(errno));
		exit(1);
	}
	t0 = now_ms();
	child = kill_backend_soon(fds[1], 500);
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, m, out, mn, &cmd);
	t1 = now_ms();
	say("  MIGRATE_TO_DEV of M across the kill: %s, %llu of %zu pages, %.0f ms",
	    e ? strerror(e) : "success", e ? 0ULL : (unsigned long long)cmd.cpages, mn, t1 - t0);
	check_killed_during(child, fds[0], t0, t1, "migration");
	check(!e && cmd.cpages == mn, "the migration in flight completed, every page of M moved");
	moved = device_pages(fdp, m, mn);
	say("  %zu of %zu pages of M in device-private VRAM", moved, mn);
	check(moved == mn, "M is in device-private VRAM");

	check(pattern_ok(m, msize, 103, "buffer M"),
	      "M (migrated across the kill) reads back intact through the new backend");
	check(pattern_ok(p, size, 101, "buffer P"),
	      "P (in VRAM before the kill) reads back intact through the new backend");
	check(pattern_ok(c, size, 102, "buffer C"), "C (device-coherent) reads intact");

	memset(out, 0, size);
	e = dmirror(fdp, HMM_DMIRROR_READ, s, out, n, &cmd);
	check(!e && cmd.cpages == n && !memcmp(out, s, size),
	      "a device READ through the mirror (recreated contexts) reads S right");
	check(data_round(fdp, 4 << 20, 105, false) >= 0,
	      "the checksummed workload runs right on the new backend");

	/*
	 * Again, in the middle of a device READ (VREAD through the device MMU
	 * of a context, which faults): its first access waits a second in the
	 * backend, and the kill comes 0.3 s into it.
	 */
	inject("{\"kind\":\"latency\",\"us\":1000000,\"count\":1}");
	memset(out, 0, msize);
	t0 = now_ms();
	child = kill_backend_soon(fds[1], 300);
	e = dmirror(fdp, HMM_DMIRROR_READ, r, out, mn, &cmd);
	t1 = now_ms();
	say("  device READ of R across the kill: %s, %.0f ms", e ? strerror(e) : "success", t1 - t0);
	check_killed_during(child, fds[0], t0, t1, "READ");
	check(!e && cmd.cpages == mn && !memcmp(out, r, msize),
	      "the READ in flight completed and returned every byte of R");
	check(pattern_ok(r, msize, 106, "buffer R"), "R is intact");

	print_counters();
	close(fdp);
	close(fdc);
	return verdict("restart", NULL);
}

const struct fault_mode mode_restart = {
	.name = "restart",
	.args = "",
	.run = run_restart,
};
