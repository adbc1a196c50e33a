// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-faults mce: catalogue entry 10, a machine check on a
 * device-coherent page: 2 MiB in device-coherent VRAM (/dev/hmm_dmirror2),
 * then a machine check (an action-optional uncorrected memory error) at
 * the BAR address of one of its pages, found in /proc/self/pagemap: a child
 * touching that page dies of SIGBUS (within 20 s: the kernel handles the
 * error asynchronously), the driver retired the VRAM page, every other page
 * reads intact, the device still migrates and reads data, rmmod works.
 *
 * Test: fault-machine-check (ci/xtask/src/tests/loss.rs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "faults.h"

static int run_mce(int argc, char **argv)
{
	const size_t n = 512, size = n * PAGE_SZ, bad = 5;
	uint8_t *c = map_buffer(size, false), *want = map_buffer(size, false);
	uint8_t *s = map_buffer(size, false), *out = map_buffer(size, false);
	struct hmm_dmirror_cmd cmd;
	char fault[128];
	uint64_t pa, retired0;
	enum touch t;
	int fd, e;
	size_t i, mismatched = 0;

	fd = open_dev_at(COHERENT_DEV_PATH);
	retired0 = counter("driver_retired_pages");
	fill_pattern(c, size, 94);
	memcpy(want, c, size);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, c, out, n, &cmd);
	check(!e && cmd.cpages == n, "C migrated to device-coherent VRAM");
	pa = phys_of(c + bad * PAGE_SZ);
	say("  page %zu of C is at physical address %#" PRIx64, bad, pa);
	check(pa != 0, "its physical address is known (pagemap)");
	if (!pa)
		return 1;
	snprintf(fault, sizeof(fault), "{\"kind\":\"mce\",\"addr\":%" PRIu64 "}", pa);
	/*
	 * The CPU reads device-coherent pages in place: a child reads this one
	 * before the fault, so the check of what children read after it is
	 * seen to pass on the right data (and fail on a wrong read).
	 */
	check(touch_page(c + bad * PAGE_SZ, want + bad * PAGE_SZ, false, "page 5 of C") == TOUCH_READ,
	      "before the machine check a child reads the page's data");
	inject(fault);
	/*
	 * The kernel handles the error asynchronously: until it does, a child
	 * reads the page's data (the machine check corrupted nothing); then the
	 * driver's all-ones stand-in, until that is poisoned too.
	 */
	t = poll_for_sigbus(c + bad * PAGE_SZ, want + bad * PAGE_SZ, true, "page 5 of C");
	check(t != TOUCH_WRONG_DATA,
	      "children that read the page before its SIGBUS read its data or the all-ones stand-in");
	check(t == TOUCH_SIGBUS, "a child touching the page with the machine check dies of SIGBUS");
	check(counter("driver_retired_pages") == retired0 + 1, "the driver retired the VRAM page");
	for (i = 0; i < n; i++)
		if (i != bad && memcmp(c + i * PAGE_SZ, want + i * PAGE_SZ, PAGE_SZ))
			mismatched++;
	check(mismatched == 0, "every other page of C reads intact");
	fill_pattern(s, size, 95);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, s, out, n, &cmd);
	check(!e && cmd.cpages == n && pattern_ok(out, size, 95, "S read by the device"),
	      "the device still migrates and reads data");
	close(fd);
	check(system("rmmod hmmgpu") == 0, "rmmod hmmgpu succeeds");
	check(pattern_ok(s, size, 95, "buffer S"), "after rmmod, S is intact");
	return verdict("mce", NULL);
}

const struct fault_mode mode_mce = {
	.name = "mce",
	.args = "",
	.run = run_mce,
};
