// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-faults ecc: catalogue entry 3, VRAM ECC errors, each asked of the
 * host at a VRAM offset found from /proc/self/pagemap (a device-private page
 * shows as a swap entry whose offset is its pfn) and the driver's debugfs
 * `vram` file: (1) in a free page: retired, 4 KiB less free VRAM; (2) in a
 * page of 2 MiB of device-private 4 KiB pages: a child touching that page
 * dies of SIGBUS, the other 511 read intact; (3) in a subpage of a
 * device-private 2 MiB THP: the same; (4) in a page of 2 MiB of
 * device-coherent VRAM: the same (SIGBUS within 20 s); (5) in the driver's
 * link canary page: the canary moves. Each time driver_retired_pages counts
 * the page. Then, with every buffer gone, the free VRAM is all of it but the
 * retired pages (and the canary), and a migration of a buffer as large as
 * each half of the VRAM (the test boots with a small one) puts exactly the
 * free pages in VRAM, none of them retired, every byte intact; rmmod works.
 *
 * Test: fault-ecc (ci/xtask/src/tests/ecc.rs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "faults.h"

/* One half of the VRAM, from /sys/kernel/debug/hmmgpu0/vram. */
struct vram_half {
	uint64_t base, size, pfn_first, free, retired;
};

struct vram_info {
	struct vram_half private, coherent;
	uint64_t canary;	/* VRAM offset of the link canary; UINT64_MAX: none */
};

/* Reads the driver's VRAM layout and accounting; exits on failure. */
static struct vram_info vram_info(void)
{
	FILE *f = fopen("/sys/kernel/debug/hmmgpu0/vram", "r");
	struct vram_info v = { .canary = UINT64_MAX };
	char line[256], name[16];
	int halves = 0;

	if (!f) {
		say("FAIL: open /sys/kernel/debug/hmmgpu0/vram: %s", strerror(errno));
		exit(1);
	}
	while (fgets(line, sizeof(line), f)) {
		struct vram_half h;

		if (sscanf(line, "%15s base %" SCNx64 " size %" SCNx64 " pfn_first %" SCNx64 " free %" SCNx64
			   " retired %" SCNu64, name, &h.base, &h.size, &h.pfn_first, &h.free, &h.retired) == 6) {
			if (!strcmp(name, "private"))
				v.private = h, halves++;
			else if (!strcmp(name, "coherent"))
				v.coherent = h, halves++;
		} else {
			sscanf(line, "canary %" SCNx64, &v.canary);
		}
	}
	fclose(f);
	if (halves != 2) {
		say("FAIL: /sys/kernel/debug/hmmgpu0/vram does not describe both halves of the VRAM");
		exit(1);
	}
	return v;
}

/* The VRAM offset of the page at va (in device memory), or UINT64_MAX. */
static uint64_t vram_offset_of(const struct vram_info *v, const void *va)
{
	const struct vram_half *halves[] = { &v->private, &v->coherent };
	uint64_t pfn = pfn_of(va);
	size_t i;

	for (i = 0; pfn && i < 2; i++) {
		const struct vram_half *h = halves[i];

		if (h->pfn_first && pfn >= h->pfn_first && pfn < h->pfn_first + h->size / PAGE_SZ)
			return h->base + (pfn - h->pfn_first) * PAGE_SZ;
	}
	return UINT64_MAX;
}

/*
 * Asks the host for an ECC error at VRAM byte `offset` and waits (up to
 * 20 s) until the driver counts it handled.
 */
static bool inject_ecc(uint64_t offset, unsigned int bit)
{
	uint64_t before = counter("driver_ecc_events");
	char fault[128];
	double t0;

	snprintf(fault, sizeof(fault), "{\"kind\":\"ecc\",\"offset\":%" PRIu64 ",\"bit\":%u}", offset, bit);
	inject(fault);
	t0 = now_ms();
	while (counter("driver_ecc_events") == before) {
		if (now_ms() - t0 > 20000) {
			fail("the driver did not handle the ECC event within 20 s");
			return false;
		}
		usleep(10 * 1000);
	}
	say("  the driver handled the ECC event after %.0f ms", now_ms() - t0);
	return true;
}

/* Whether pages [0, n) of buf, except page skip, match the copy in want. */
static bool pages_intact(const uint8_t *buf, const uint8_t *want, size_t n, size_t skip, const char *what)
{
	size_t i, bad = 0;

	for (i = 0; i < n; i++)
		if (i != skip && memcmp(buf + i * PAGE_SZ, want + i * PAGE_SZ, PAGE_SZ)) {
			if (bad < 3)
				say("  %s: page %zu differs", what, i);
			bad++;
		}
	if (bad)
		say("  %s: %zu of %zu pages differ", what, bad, n - 1);
	return bad == 0;
}

/* Fills the VRAM offsets of the n pages at buf; returns how many it found. */
static size_t vram_offsets(const struct vram_info *v, const uint8_t *buf, size_t n, uint64_t *offsets)
{
	size_t i, found = 0;

	for (i = 0; i < n; i++) {
		offsets[i] = vram_offset_of(v, buf + i * PAGE_SZ);
		if (offsets[i] == UINT64_MAX && i == found)
			say("  page %zu at %p: pagemap entry %#" PRIx64 " is not a VRAM page", i,
			    (void *)(buf + i * PAGE_SZ), pagemap_entry(buf + i * PAGE_SZ));
		found += offsets[i] != UINT64_MAX;
	}
	return found;
}

/*
 * A buffer of n pages with pattern seed, migrated to the device `fd`
 * belongs to, with a copy of its data in *want; every page checked to be in
 * VRAM (its offsets in offsets[]).
 */
static uint8_t *vram_buffer(int fd, const struct vram_info *v, size_t n, uint64_t seed, bool huge,
			    uint8_t **want, uint64_t *offsets, const char *what)
{
	size_t size = n * PAGE_SZ;
	uint8_t *raw = map_buffer(huge ? 2 * size : size, !huge), *buf = raw;
	uint8_t *out = map_buffer(size, false);
	struct hmm_dmirror_cmd cmd;
	char msg[128];
	int e;

	if (huge) {
		buf = (uint8_t *)(((uintptr_t)raw + size - 1) & ~(uintptr_t)(size - 1));
		if (madvise(buf, size, MADV_HUGEPAGE))
			say("  madvise(MADV_HUGEPAGE): %s", strerror(errno));
	}
	fill_pattern(buf, size, seed);
	*want = map_buffer(size, false);
	memcpy(*want, buf, size);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, out, n, &cmd);
	snprintf(msg, sizeof(msg), "%s (%zu pages) migrated to VRAM and read back by the device", what, n);
	/* Against the copy: reading buf would bring device-private pages back. */
	check(!e && cmd.cpages == n && !memcmp(out, *want, size), msg);
	snprintf(msg, sizeof(msg), "pagemap gives the VRAM offset of every page of %s", what);
	check(vram_offsets(v, buf, n, offsets) == n, msg);
	munmap(out, size);
	return buf;
}

/*
 * Migrates a buffer as large as one half of the VRAM (`half`) to the
 * device behind fd, which is only as large as the free VRAM allows, and
 * checks that exactly the free pages were used, none of them one of the
 * `nbad` retired pages, and that every byte is intact.
 */
static void fill_vram(int fd, const struct vram_info *v, const struct vram_half *half, const uint64_t *bad,
		      size_t nbad, uint64_t seed, const char *what)
{
	size_t n = half->size / PAGE_SZ, size = half->size, in_vram = 0, on_bad = 0, i, j;
	uint8_t *buf = map_buffer(size, true), *out = map_buffer(size, false);
	uint64_t *offsets = calloc(n, sizeof(uint64_t));
	char msg[200];
	int e;

	if (!offsets)
		exit(1);
	fill_pattern(buf, size, seed);
	e = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, out, n, NULL);
	/* ENOENT: pages left in system memory (no VRAM for them), as test_hmm. */
	say("  MIGRATE_TO_DEV of %zu pages (all of the %s VRAM): %s", n, what, e ? strerror(e) : "ok");
	for (i = 0; i < n; i++) {
		offsets[i] = vram_offset_of(v, buf + i * PAGE_SZ);
		if (offsets[i] == UINT64_MAX)
			continue;
		in_vram++;
		for (j = 0; j < nbad; j++)
			on_bad += offsets[i] == bad[j];
	}
	say("  %zu pages went to VRAM, %zu stayed in system memory; %zu on a retired page", in_vram, n - in_vram,
	    on_bad);
	snprintf(msg, sizeof(msg), "filling the %s VRAM uses every free page (%" PRIu64 ") and none of the %zu retired",
		 what, half->free / PAGE_SZ, nbad);
	check((e == 0 || e == ENOENT) && in_vram == half->free / PAGE_SZ && on_bad == 0, msg);
	snprintf(msg, sizeof(msg), "every byte of the %s fill is intact", what);
	check(pattern_ok(buf, size, seed, what), msg);
	munmap(buf, size);
	munmap(out, size);
	free(offsets);
}

static int run_ecc(int argc, char **argv)
{
	const size_t n = 512, size = n * PAGE_SZ;
	uint64_t *offs_p = calloc(n, sizeof(uint64_t)), *offs_h = calloc(n, sizeof(uint64_t));
	uint64_t *offs_c = calloc(n, sizeof(uint64_t));
	uint64_t events0, retired0, free_p0, free_c0, bad_private[3], bad_coherent[3];
	uint8_t *p, *h, *c, *want_p, *want_h, *want_c;
	struct vram_info v;
	size_t i, k, contiguous = 0;
	static uint8_t ones[PAGE_SZ];
	enum touch t;
	int fdp, fdc;
	uint8_t prot = 0;
	char msg[160];

	if (!offs_p || !offs_h || !offs_c)
		exit(1);
	fdp = open_dev();
	fdc = open_dev_at(COHERENT_DEV_PATH);
	v = vram_info();
	events0 = counter("driver_ecc_events");
	retired0 = counter("driver_retired_pages");
	free_p0 = v.private.free;
	free_c0 = v.coherent.free;
	say("VRAM: private %#" PRIx64 "+%#" PRIx64 " (pfns from %#" PRIx64 ", %#" PRIx64 " free), coherent %#" PRIx64
	    "+%#" PRIx64 " (pfns from %#" PRIx64 ", %#" PRIx64 " free), link canary at %#" PRIx64,
	    v.private.base, v.private.size, v.private.pfn_first, v.private.free, v.coherent.base, v.coherent.size,
	    v.coherent.pfn_first, v.coherent.free, v.canary);

	say("[1] an ECC error in a free VRAM page");
	bad_private[0] = v.private.base + v.private.size - PAGE_SZ;
	if (!inject_ecc(bad_private[0] + 17, 2))
		return 1;
	v = vram_info();
	check(counter("driver_retired_pages") == retired0 + 1, "driver_retired_pages counts the page");
	check(v.private.retired == 1 && v.private.free == free_p0 - PAGE_SZ,
	      "the page left the allocator (device-private free VRAM 4 KiB less)");

	say("[2] an ECC error in a device-private page in use (4 KiB pages)");
	p = vram_buffer(fdp, &v, n, 301, false, &want_p, offs_p, "P");
	k = 77;
	bad_private[1] = offs_p[k];
	say("  page %zu of P is at VRAM offset %#" PRIx64, k, bad_private[1]);
	if (!inject_ecc(bad_private[1] + 1234, 5))
		return 1;
	t = touch_page(p + k * PAGE_SZ, want_p + k * PAGE_SZ, false, "page 77 of P");
	check(t == TOUCH_SIGBUS, "a child touching the corrupt page dies of SIGBUS");
	check(pages_intact(p, want_p, n, k, "P"), "the other 511 pages of P read intact");
	check(counter("driver_retired_pages") == retired0 + 2, "driver_retired_pages counts the page");
	v = vram_info();
	check(v.private.retired == 2 && v.private.free == free_p0 - 2 * PAGE_SZ,
	      "P's VRAM is free again (its pages came back), but for the corrupt page");

	say("[3] an ECC error in a 2 MiB THP in device-private VRAM");
	h = vram_buffer(fdp, &v, n, 303, true, &want_h, offs_h, "THP H");
	dmirror(fdp, HMM_DMIRROR_SNAPSHOT, h, &prot, 1, NULL);
	for (i = 1; i < n; i++)
		contiguous += offs_h[i] == offs_h[0] + i * PAGE_SZ;
	say("  H: device snapshot 0x%02x, VRAM %#" PRIx64 "..%#" PRIx64 " %s", prot, offs_h[0],
	    offs_h[n - 1] + PAGE_SZ, contiguous == n - 1 ? "(contiguous: a device THP)" : "(not contiguous)");
	check(contiguous == n - 1 && offs_h[0] % size == 0, "H is one 2 MiB VRAM block (a device THP)");
	k = 300;
	bad_private[2] = offs_h[k];
	if (!inject_ecc(bad_private[2] + 8, 0))
		return 1;
	t = touch_page(h + k * PAGE_SZ, want_h + k * PAGE_SZ, false, "subpage 300 of H");
	check(t == TOUCH_SIGBUS, "a child touching the corrupt subpage dies of SIGBUS");
	check(pages_intact(h, want_h, n, k, "H"), "the other 511 subpages of H read intact");
	check(counter("driver_retired_pages") == retired0 + 3, "driver_retired_pages counts the page");

	say("[4] an ECC error in a device-coherent page in use");
	c = vram_buffer(fdc, &v, n, 304, false, &want_c, offs_c, "C");
	k = 200;
	bad_coherent[0] = offs_c[k];
	say("  page %zu of C is at VRAM offset %#" PRIx64, k, bad_coherent[0]);
	/*
	 * The CPU reads device-coherent pages in place: a child reads this one
	 * before the fault, so the check of what children read after it is
	 * seen to pass on the right data (and fail on a wrong read).
	 */
	check(touch_page(c + k * PAGE_SZ, want_c + k * PAGE_SZ, false, "page 200 of C") == TOUCH_READ,
	      "before the ECC error a child reads the page's data");
	if (!inject_ecc(bad_coherent[0] + 4000, 7))
		return 1;
	/*
	 * The driver has moved the page's owners onto an all-ones stand-in page
	 * (never the corrupt data) and queued its poisoning: poll, as for mce.
	 */
	memset(ones, 0xff, PAGE_SZ);
	t = poll_for_sigbus(c + k * PAGE_SZ, ones, false, "page 200 of C");
	check(t != TOUCH_WRONG_DATA, "children that read the page before its SIGBUS read the all-ones stand-in");
	check(t == TOUCH_SIGBUS, "a child touching the corrupt page dies of SIGBUS");
	check(pages_intact(c, want_c, n, k, "C"), "the other 511 pages of C read intact");
	check(counter("driver_retired_pages") == retired0 + 4, "driver_retired_pages counts the page");

	say("[5] an ECC error in the driver's link canary page");
	v = vram_info();
	bad_coherent[1] = v.canary;
	check(v.canary != UINT64_MAX, "the driver has a link canary");
	if (v.canary != UINT64_MAX && !inject_ecc(v.canary + 3, 6))
		return 1;
	v = vram_info();
	bad_coherent[2] = v.canary;
	say("  the canary is at %#" PRIx64 " now", v.canary);
	check(v.canary != UINT64_MAX && v.canary != bad_coherent[1], "the canary moved to another page");
	check(counter("driver_retired_pages") == retired0 + 5, "driver_retired_pages counts the page");

	say("[6] all of the VRAM, once the buffers are gone");
	munmap(p, size);
	munmap(h, size);
	munmap(c, size);
	v = vram_info();
	say("  VRAM free: private %#" PRIx64 " of %#" PRIx64 ", coherent %#" PRIx64 " of %#" PRIx64,
	    v.private.free, v.private.size, v.coherent.free, v.coherent.size);
	snprintf(msg, sizeof(msg), "all VRAM is free again but the 3 + 2 retired pages (retired: private %" PRIu64
		 ", coherent %" PRIu64 ") and the canary", v.private.retired, v.coherent.retired);
	check(v.private.retired == 3 && v.coherent.retired == 2 && v.private.free == free_p0 - 3 * PAGE_SZ &&
	      v.coherent.free == free_c0 - 2 * PAGE_SZ, msg);
	fill_vram(fdp, &v, &v.private, bad_private, 3, 306, "device-private");
	/* The canary's page is in use, so it counts as a page not to get. */
	fill_vram(fdc, &v, &v.coherent, bad_coherent, 3, 307, "device-coherent");
	check(counter("driver_ecc_events") == events0 + 5 && counter("driver_ecc_dropped") == 0,
	      "the driver handled 5 ECC events and dropped none");
	print_counters();
	close(fdp);
	close(fdc);
	check(system("rmmod hmmgpu") == 0, "rmmod hmmgpu succeeds");
	return verdict("ecc", NULL);
}

const struct fault_mode mode_ecc = {
	.name = "ecc",
	.args = "",
	.run = run_ecc,
};
