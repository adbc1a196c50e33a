// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-faults [-d DEV] responsive --seed N [--no-device]: what the tests
 * run after a fault workload (`&&`) to show that the guest still works: a
 * fresh 1 MiB buffer with the pattern of seed N goes to the device DEV and
 * back (MIGRATE_TO_DEV, a device READ of it in VRAM, the CPU reading it
 * back), or with --no-device (the workload removed the driver) is read by
 * a forked child. Then it prints
 *     hmmgpu-faults: responsive: seed=N bytes=B fnv1a=H
 * with the FNV-1a of the data read back (by the device, or by the child);
 * the host recomputes H from N (expect_responsive in
 * ci/xtask/src/tests/faults.rs), so only a guest that ran the round can
 * print the line: the kernel command line init echoes has N, not H.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "faults.h"

#define RESPONSIVE_BYTES (1UL << 20)

/* The checksum of buf as a device round reads it back: 0 on a failure (reported). */
static uint64_t device_round(uint8_t *buf, size_t size, uint64_t seed)
{
	size_t npages = size / PAGE_SZ;
	uint8_t *out = map_buffer(size, false);
	struct hmm_dmirror_cmd cmd;
	int fd = open_dev(), e;
	uint64_t sum;

	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, out, npages, &cmd);
	check(!e && cmd.cpages == npages, "the buffer migrated to the device");
	memset(out, 0, size);
	e = dmirror(fd, HMM_DMIRROR_READ, buf, out, npages, &cmd);
	check(!e && cmd.cpages == npages, "the device read it");
	sum = fnv1a(out, size);
	check(pattern_ok(buf, size, seed, "CPU read back"), "the CPU reads it back intact");
	close(fd);
	return sum;
}

/* The checksum of buf as a forked child reads it: 0 on a failure (reported). */
static uint64_t child_round(const uint8_t *buf, size_t size)
{
	uint64_t sum = 0;
	int pipefd[2], status;
	pid_t pid;

	if (pipe(pipefd)) {
		fail("pipe: %s", strerror(errno));
		return 0;
	}
	pid = fork();
	if (pid < 0) {
		fail("fork: %s", strerror(errno));
		return 0;
	}
	if (pid == 0) {
		sum = fnv1a(buf, size);
		_exit(write(pipefd[1], &sum, sizeof(sum)) == sizeof(sum) ? 0 : 1);
	}
	close(pipefd[1]);
	if (read(pipefd[0], &sum, sizeof(sum)) != sizeof(sum))
		sum = 0;
	close(pipefd[0]);
	check(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && !WEXITSTATUS(status) && sum,
	      "a forked child read the buffer");
	return sum;
}

static int run_responsive(int argc, char **argv)
{
	bool device = true, seeded = false;
	uint64_t seed = 0, sum;
	uint8_t *buf;
	int i;

	for (i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--no-device")) {
			device = false;
		} else if (!strcmp(argv[i], "--seed") && i + 1 < argc) {
			seed = number(argv[i], argv[i + 1]);
			seeded = true;
			i++;
		} else {
			usage();
		}
	}
	if (!seeded)
		usage();
	buf = map_buffer(RESPONSIVE_BYTES, false);
	fill_pattern(buf, RESPONSIVE_BYTES, seed);
	sum = device ? device_round(buf, RESPONSIVE_BYTES, seed) : child_round(buf, RESPONSIVE_BYTES);
	say("responsive: seed=%" PRIu64 " bytes=%lu fnv1a=%016" PRIx64 " (read back by %s)", seed,
	    RESPONSIVE_BYTES, sum, device ? dev_path : "a forked child");
	return verdict("responsive", device ? dev_path : "no device");
}

const struct fault_mode mode_responsive = {
	.name = "responsive",
	.args = "--seed N [--no-device]",
	.run = run_responsive,
};
