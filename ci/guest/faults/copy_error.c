// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-faults copy-error: catalogue entry 1, copy-engine errors, each
 * asked of the host at a precise point (common.c, inject()):
 *   1. MIGRATE_TO_DEV whose 17th copy (range) fails: the ioctl fails with
 *      EIO, the pages of the first 16 ranges are in device memory, the rest
 *      stayed in system memory, every byte is intact; a retry migrates
 *      everything.
 *   2. A CPU fault (migrate_to_ram) whose copy fails: a forked child touching
 *      the page dies of SIGBUS; the parent's data (that page included) is
 *      intact afterwards.
 *   3. MIGRATE_TO_SYS while the next copy fails: EIO, the pages stay in
 *      device memory; a retry brings them back intact.
 *   4. MIGRATE_TO_DEV of a 2 MiB THP whose (single, 2 MiB) copy fails: EIO,
 *      the whole THP stays in system memory intact; a retry moves it.
 *
 * Test: fault-copy-error (ci/xtask/src/tests/faults.rs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "faults.h"

/*
 * AnonHugePages (kB) of the mapping that holds addr, from /proc/self/smaps:
 * how much of it the kernel backs with THPs; -1 if it is not found.
 */
static long anon_huge_kib_at(const void *addr)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[512];
	bool in = false;
	long kib = -1;

	if (!f) {
		fail("open /proc/self/smaps: %s", strerror(errno));
		return -1;
	}
	while (fgets(line, sizeof(line), f)) {
		unsigned long lo, hi;
		long v;

		/* A mapping's first line: "lo-hi perms offset dev inode [path]". */
		if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2)
			in = (uintptr_t)addr >= lo && (uintptr_t)addr < hi;
		else if (in && sscanf(line, "AnonHugePages: %ld kB", &v) == 1)
			kib = v;
	}
	fclose(f);
	return kib;
}

/*
 * Faults `npages` pages of `buf` in, in a scattered order (stride 37,
 * coprime to npages), then writes the pattern of `seed`: neighbouring pages
 * get physical pages that are not neighbours, so a migration's COPY has
 * about a range per page. Faulted in address order they can be physically
 * contiguous and merge into fewer than the 17 ranges case 1 needs (then its
 * "17th copy" is the read-back's, not the migration's).
 */
static void fill_scattered(uint8_t *buf, size_t npages, uint64_t seed)
{
	size_t i;

	for (i = 0; i < npages; i++)
		buf[(i * 37 % npages) * PAGE_SZ] = 1;
	fill_pattern(buf, npages * PAGE_SZ, seed);
}

static int run_copy_error(int argc, char **argv)
{
	const size_t na = 256, nb = 64, nc = 128;
	uint8_t *a = map_buffer(na * PAGE_SZ, true), *b = map_buffer(nb * PAGE_SZ, true);
	uint8_t *c = map_buffer(nc * PAGE_SZ, true), *out = map_buffer(na * PAGE_SZ, false);
	struct hmm_dmirror_cmd cmd;
	uint64_t errors0;
	size_t ndev;
	int fd = open_dev(), e;

	errors0 = counter("driver_copy_errors");

	say("[1] migration to VRAM whose 17th copy fails (%zu pages)", na);
	fill_scattered(a, na, 11);
	/* 16 ranges (one or more pages each) go through, the 17th fails. */
	inject("{\"kind\":\"copy_error\",\"count\":1,\"skip\":16}");
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, a, out, na, NULL);
	say("  HMM_DMIRROR_MIGRATE_TO_DEV: %s", e ? strerror(e) : "ok");
	check(e == EIO, "MIGRATE_TO_DEV reports the copy error with EIO");
	ndev = device_pages(fd, a, na);
	say("  after it: %zu pages in device memory, %zu in system memory", ndev, na - ndev);
	check(ndev < na, "the pages whose copy failed stayed in system memory");
	check(ndev > 0 && ndev != (size_t)-1, "the pages copied before the failure moved to device memory");
	check(counter("driver_copy_errors") == errors0 + 1, "the driver counted one COPY_ERROR");
	check(pattern_ok(a, na * PAGE_SZ, 11, "buffer A"), "every byte of A is intact (CPU reads all)");
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, a, out, na, &cmd);
	check(!e && cmd.cpages == na, "a retry without the fault migrates every page");
	check(device_pages(fd, a, na) == na, "SNAPSHOT: all of A is in device memory");
	check(pattern_ok(out, na * PAGE_SZ, 11, "A read by the device"),
	      "the device reads A back intact");

	say("[2] CPU fault (migrate_to_ram) whose copy fails, in a forked child");
	fill_pattern(b, nb * PAGE_SZ, 22);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b, out, nb, &cmd);
	check(!e && cmd.cpages == nb && device_pages(fd, b, nb) == nb, "B is in device memory");
	inject("{\"kind\":\"copy_error\",\"count\":1}");
	check(touch_page(b + 5 * PAGE_SZ, NULL, false, "page 5 of B (its copy fails)") == TOUCH_SIGBUS,
	      "the child touching the page got SIGBUS");
	check(counter("driver_copy_errors") == errors0 + 2, "the driver counted a second COPY_ERROR");
	check(device_pages(fd, b, nb) == nb, "the page stayed in device memory (B all there)");
	check(pattern_ok(b, nb * PAGE_SZ, 22, "buffer B"), "the parent reads all of B intact");
	check(pattern_ok(a, na * PAGE_SZ, 11, "buffer A"), "the parent's other data (A) is intact");

	say("[3] HMM_DMIRROR_MIGRATE_TO_SYS whose copy fails (%zu pages)", nc);
	fill_pattern(c, nc * PAGE_SZ, 33);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, c, out, nc, &cmd);
	check(!e && cmd.cpages == nc && device_pages(fd, c, nc) == nc, "C is in device memory");
	inject("{\"kind\":\"copy_error\",\"count\":1}");
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_SYS, c, NULL, nc, NULL);
	say("  HMM_DMIRROR_MIGRATE_TO_SYS: %s", e ? strerror(e) : "ok");
	check(e == EIO, "MIGRATE_TO_SYS reports the copy error with EIO");
	check(device_pages(fd, c, nc) == nc, "every page of C stayed in device memory");
	check(counter("driver_copy_errors") == errors0 + 3, "the driver counted a third COPY_ERROR");
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_SYS, c, NULL, nc, &cmd);
	check(!e && cmd.cpages == nc, "a retry migrates every page back");
	check(device_pages(fd, c, nc) == 0, "SNAPSHOT: none of C is in device memory");
	check(pattern_ok(c, nc * PAGE_SZ, 33, "buffer C"), "every byte of C is intact");

	say("[4] migration of a THP to VRAM whose copy fails");
	{
		const size_t nh = HUGE_SZ / PAGE_SZ, huge = HUGE_SZ;
		uint8_t *h = map_huge(huge);
		long anon_huge_kib;
		bool pmd = false;

		fill_pattern(h, huge, 44);
		/* Else the case would test 4 KiB copies, as case 1 does. */
		pages_of_kind(fd, h, nh, HMM_DMIRROR_PROT_NONE, &pmd);
		anon_huge_kib = anon_huge_kib_at(h);
		say("  before: SNAPSHOT %s, smaps AnonHugePages %ld kB", pmd ? "one PMD entry" : "4 KiB entries",
		    anon_huge_kib);
		check(pmd && anon_huge_kib == (long)(huge >> 10),
		      "the buffer is a 2 MiB THP (PMD-mapped in SNAPSHOT, AnonHugePages in smaps)");
		inject("{\"kind\":\"copy_error\",\"count\":1}");
		e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, h, out, nh, NULL);
		say("  HMM_DMIRROR_MIGRATE_TO_DEV: %s", e ? strerror(e) : "ok");
		check(e == EIO, "MIGRATE_TO_DEV reports the copy error with EIO");
		check(device_pages(fd, h, nh) == 0, "the whole THP stayed in system memory");
		check(counter("driver_copy_errors") == errors0 + 4, "the driver counted a fourth COPY_ERROR");
		pages_of_kind(fd, h, nh, HMM_DMIRROR_PROT_NONE, &pmd);
		say("  after: SNAPSHOT %s", pmd ? "one PMD entry" : "4 KiB entries");
		check(pattern_ok(h, huge, 44, "THP"), "every byte of the THP is intact");
		e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, h, out, nh, &cmd);
		check(!e && cmd.cpages == nh && device_pages(fd, h, nh) == nh,
		      "a retry moves the whole THP to device memory");
		check(pattern_ok(out, huge, 44, "THP read by the device"), "the device reads it intact");
		check(pattern_ok(h, huge, 44, "THP"), "the CPU reads it back intact");
	}
	close(fd);
	return verdict("copy-error", NULL);
}

const struct fault_mode mode_copy_error = {
	.name = "copy-error",
	.args = "",
	.run = run_copy_error,
};
