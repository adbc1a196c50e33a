// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-faults irq: catalogue entry 5: data rounds with command interrupts
 * dropped, then late, then across a stalled command queue (the driver
 * polls, then resets the device after its command timeout); data kept in
 * VRAM across the reset reads back intact.
 *
 * Test: fault-interrupts-stall (ci/xtask/src/tests/reset.rs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "faults.h"

static int run_irq(int argc, char **argv)
{
	const size_t size = 1 << 20, keep_size = 2 << 20;
	uint8_t *keep = map_buffer(keep_size, true), *out = map_buffer(keep_size, false);
	uint64_t polled0, resets0;
	struct hmm_dmirror_cmd cmd;
	double t, ms;
	int fd = open_dev(), e;

	polled0 = counter("driver_polled_completions");
	resets0 = counter("driver_resets");

	inject("{\"kind\":\"drop_interrupts\",\"count\":8}");
	ms = data_round(fd, size, 51, true);
	check(ms >= 0, "with 8 command interrupts dropped, a data round verifies every byte");
	say("  completions found by polling: %" PRIu64, counter("driver_polled_completions") - polled0);
	check(counter("driver_polled_completions") > polled0,
	      "the driver found the completions whose interrupt was dropped by polling");

	inject("{\"kind\":\"delay_interrupts\",\"ms\":600,\"count\":4}");
	ms = data_round(fd, size, 52, true);
	check(ms >= 0, "with 4 command interrupts 600 ms late, a data round verifies every byte");

	/* Data in VRAM before the stall must survive the reset that ends it. */
	fill_pattern(keep, keep_size, 53);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, keep, out, keep_size / PAGE_SZ, &cmd);
	check(!e && device_pages(fd, keep, keep_size / PAGE_SZ) == keep_size / PAGE_SZ,
	      "K (2 MiB) migrated to VRAM before the stall");
	inject("{\"kind\":\"stall_queue\"}");
	t = now_ms();
	ms = data_round(fd, size, 54, true);
	t = now_ms() - t;
	say("  the data round across the stall took %.0f ms", t);
	check(ms >= 0, "a data round across the stalled queue verifies every byte");
	check(t >= 9000, "it waited for the driver's command timeout (10 s)");
	check(counter("driver_resets") == resets0 + 1, "the driver reset the device once");
	check(pattern_ok(keep, keep_size, 53, "buffer K"), "K, in VRAM across the reset, reads back intact");
	check(data_round(fd, size, 55, false) >= 0, "after the reset the device works (a data round verifies)");
	print_counters();
	close(fd);
	return verdict("irq", NULL);
}

const struct fault_mode mode_irq = {
	.name = "irq",
	.args = "",
	.run = run_irq,
};
