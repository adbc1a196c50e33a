// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-faults data: catalogue entry 2 (latency and bandwidth), and the
 * workload of the plan-replay test; data_round() is the checksummed round
 * the other modes run too.
 *
 *   hmmgpu-faults data [--rounds N] [--size BYTES] [--seed N] [--nohuge]
 *                      [--min-migrate-ms MS]
 *
 * Rounds of a checksummed workload (device READ through device faults,
 * MIGRATE_TO_DEV, SNAPSHOT, CPU read back through migrate_to_ram, device
 * WRITE); --min-migrate-ms fails a round whose MIGRATE_TO_DEV was faster
 * (to show injected latency/bandwidth limits took effect).
 *
 * Tests: fault-slow-copies and fault-plan-replay (ci/xtask/src/tests/faults.rs).
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "faults.h"

double data_round(int fd, size_t size, uint64_t seed, bool nohuge)
{
	size_t npages = size / PAGE_SZ;
	uint8_t *buf = map_buffer(size, nohuge), *out = map_buffer(size, false);
	struct hmm_dmirror_cmd cmd;
	int before = failures, e;
	double t, ms;

	fill_pattern(buf, size, seed);
	e = dmirror(fd, HMM_DMIRROR_READ, buf, out, npages, &cmd);
	if (e || cmd.cpages != npages || !pattern_ok(out, size, seed, "device READ"))
		fail("round %" PRIu64 ": device READ of system memory (%s)", seed, e ? strerror(e) : "data");
	t = now_ms();
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, out, npages, &cmd);
	ms = now_ms() - t;
	if (e || cmd.cpages != npages || !pattern_ok(out, size, seed, "migrated data"))
		fail("round %" PRIu64 ": MIGRATE_TO_DEV (%s, cpages %" PRIu64 ")", seed,
		     e ? strerror(e) : "data", (uint64_t)cmd.cpages);
	if (device_pages(fd, buf, npages) != npages)
		fail("round %" PRIu64 ": not every page is in device memory", seed);
	if (!pattern_ok(buf, size, seed, "CPU read back"))
		fail("round %" PRIu64 ": CPU read back through migrate_to_ram", seed);
	fill_pattern(out, size, seed + 1000);
	e = dmirror(fd, HMM_DMIRROR_WRITE, buf, out, npages, &cmd);
	if (e || !pattern_ok(buf, size, seed + 1000, "device WRITE"))
		fail("round %" PRIu64 ": device WRITE (%s)", seed, e ? strerror(e) : "data");
	munmap(buf, size);
	munmap(out, size);
	return failures == before ? ms : -1;
}

static int run_data(int argc, char **argv)
{
	uint64_t rounds = 1, size = 4 << 20, seed = 1, min_ms = 0, r;
	bool nohuge = false;
	int i, fd;

	for (i = 0; i < argc; i++) {
		const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(o, "--nohuge")) {
			nohuge = true;
			continue;
		}
		if (!strcmp(o, "--rounds"))
			rounds = number(o, v);
		else if (!strcmp(o, "--size"))
			size = number(o, v);
		else if (!strcmp(o, "--seed"))
			seed = number(o, v);
		else if (!strcmp(o, "--min-migrate-ms"))
			min_ms = number(o, v);
		else {
			fprintf(stderr, "hmmgpu-faults: data: unknown option %s\n", o);
			usage();
		}
		i++;
	}
	if (!size || size % PAGE_SZ) {
		fprintf(stderr, "hmmgpu-faults: --size must be a nonzero multiple of 4096\n");
		return 2;
	}
	fd = open_dev();
	for (r = 0; r < rounds; r++) {
		double ms = data_round(fd, size, seed + r, nohuge);

		if (ms < 0)
			continue;
		say("round %" PRIu64 ": %" PRIu64 " bytes verified; MIGRATE_TO_DEV took %.1f ms", r, size, ms);
		if (ms < min_ms)
			fail("round %" PRIu64 ": MIGRATE_TO_DEV took %.1f ms, less than the %" PRIu64
			     " ms the injected limits imply", r, ms, min_ms);
	}
	close(fd);
	if (!failures)
		say("PASS: %" PRIu64 " rounds of %" PRIu64 " bytes, every byte verified", rounds, size);
	return failures ? 1 : 0;
}

const struct fault_mode mode_data = {
	.name = "data",
	.args = "[--rounds N] [--size BYTES] [--seed N] [--nohuge] [--min-migrate-ms MS]",
	.run = run_data,
};
