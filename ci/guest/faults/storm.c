// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-faults storm [--size BYTES]: catalogue entry 6, spurious FAULT
 * events and fault storms. Run while the host's fault plan posts FAULT
 * events after every device command (a fault storm on this context, ctx 1:
 * the first one opened, cycling over the pages it maps; spurious events on
 * an unused context): it maps a buffer on the device, runs data rounds
 * (with device READs of that buffer) until the driver's FAULT event counter
 * has been still for a round, waits until it is still for a second, checks
 * the data and that the device still works, and prints the driver's
 * counters.
 *
 * Test: fault-storm (ci/xtask/src/tests/faults.rs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "faults.h"

/* FAULT events the driver received that no device fault raised (injected). */
static uint64_t injected_events(void)
{
	return counter("driver_fault_events") - counter("faults");
}

static int run_storm_size(size_t size)
{
	const size_t np = 512;
	uint8_t *p = map_buffer(np * PAGE_SZ, true), *out = map_buffer(np * PAGE_SZ, false);
	uint64_t ev0, sp0, ev, last, seen_during = 0;
	unsigned int r = 0;
	struct hmm_dmirror_cmd cmd;
	double t0, t;
	int fd = open_dev(), e;

	/* Mapped on the device, so the storm cycles over these addresses. */
	fill_pattern(p, np * PAGE_SZ, 77);
	e = dmirror(fd, HMM_DMIRROR_READ, p, out, np, &cmd);
	check(!e && pattern_ok(out, np * PAGE_SZ, 77, "P"), "P is mapped on the device");
	ev0 = injected_events();
	sp0 = counter("driver_spurious_faults");
	t0 = now_ms();
	last = ev0;
	/*
	 * Rounds until the injected events have stopped for a round (at least 3
	 * rounds); the rounds' own device faults are events too, not counted.
	 */
	while (r < 200) {
		uint64_t before = injected_events();

		if (data_round(fd, size, 500 + r, false) < 0)
			break;
		e = dmirror(fd, HMM_DMIRROR_READ, p, out, np, &cmd);
		if (e || !pattern_ok(out, np * PAGE_SZ, 77, "P"))
			fail("round %u: device READ of P (%s)", r, e ? strerror(e) : "data");
		ev = injected_events();
		seen_during += ev - before;
		r++;
		if (ev == last && r >= 3)
			break;
		last = ev;
	}
	t = now_ms();
	say("%u workload rounds in %.0f ms; %" PRIu64 " injected FAULT events arrived during them", r, t - t0,
	    seen_during);
	/* Wait for the storm's end: the counter still for a second. */
	do {
		last = injected_events();
		usleep(1000 * 1000);
	} while (injected_events() != last && now_ms() - t < 120000);
	ev = injected_events();
	say("injected FAULT events received +%" PRIu64 ", driver_spurious_faults +%" PRIu64, ev - ev0,
	    counter("driver_spurious_faults") - sp0);
	check(seen_during > 0, "FAULT events arrived while the workload ran");
	check(counter("driver_spurious_faults") > sp0, "the driver counted spurious FAULT events");
	check(pattern_ok(p, np * PAGE_SZ, 77, "P (CPU)"), "P is intact");
	t = now_ms();
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, p, out, np, &cmd);
	check(!e && cmd.cpages == np && device_pages(fd, p, np) == np,
	      "the device still migrates after the storm");
	say("a 2 MiB migration after the storm took %.1f ms", now_ms() - t);
	print_counters();
	close(fd);
	return verdict("storm", NULL);
}

static int run_storm(int argc, char **argv)
{
	uint64_t size = 4 << 20;

	if (argc == 2 && !strcmp(argv[0], "--size"))
		size = number(argv[0], argv[1]);
	else if (argc != 0)
		usage();
	if (!size || size % PAGE_SZ) {
		fprintf(stderr, "hmmgpu-faults: --size must be a nonzero multiple of 4096\n");
		return 2;
	}
	return run_storm_size(size);
}

const struct fault_mode mode_storm = {
	.name = "storm",
	.args = "[--size BYTES]",
	.run = run_storm,
};
