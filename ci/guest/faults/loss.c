// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-faults loss kill|link: catalogue entries 9 (kill: the backend
 * process is killed, a surprise loss) and 4 (link: the VRAM BAR's link goes
 * down, QEMU's link-down property), with 2 MiB in device-private VRAM (P),
 * 2 MiB in device-coherent VRAM (C, /dev/hmm_dmirror2) and 2 MiB in system
 * memory (S): the next ioctl fails with ENODEV (kill: after the driver's
 * command timeout), and so does the one after, at once; a child touching P
 * dies of SIGBUS; C reads intact (kill: the BAR still maps the VRAM) or
 * all-ones (link: as real hardware reads a failed link); S is intact; rmmod
 * hmmgpu works; afterwards a child touching P dies of SIGBUS (its page was
 * poisoned: the data went with the device), C is intact (kill: the CPU
 * copied it out) or a child touching it dies of SIGBUS (link), S is intact.
 *
 * Tests: fault-surprise-loss and fault-link-down (ci/xtask/src/tests/loss.rs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "faults.h"

static bool all_ones(const uint8_t *p, size_t size)
{
	size_t i;

	for (i = 0; i < size; i++)
		if (p[i] != 0xff)
			return false;
	return true;
}

static int run_loss_how(const char *how)
{
	const size_t n = 512, size = n * PAGE_SZ;
	bool link = !strcmp(how, "link");
	uint8_t *p = map_buffer(size, false), *c = map_buffer(size, false), *s = map_buffer(size, false);
	uint8_t *out = map_buffer(size, false);
	int fdp, fdc, e, status;
	bool lost_ok = true;
	size_t i;
	struct hmm_dmirror_cmd cmd;
	double t0, t1;

	if (!link && strcmp(how, "kill")) {
		fprintf(stderr, "hmmgpu-faults: loss kill|link, not %s\n", how);
		exit(2);
	}
	fdp = open_dev();
	fdc = open_dev_at(COHERENT_DEV_PATH);
	fill_pattern(p, size, 91);
	fill_pattern(c, size, 92);
	fill_pattern(s, size, 93);
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, p, out, n, &cmd);
	check(!e && cmd.cpages == n, "P migrated to device-private VRAM");
	e = dmirror(fdc, HMM_DMIRROR_MIGRATE_TO_DEV, c, out, n, &cmd);
	check(!e && cmd.cpages == n, "C migrated to device-coherent VRAM");

	inject(link ? "{\"kind\":\"link_down\",\"down\":true}" : "{\"kind\":\"kill_backend\"}");

	t0 = now_ms();
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, s, out, n, NULL);
	t1 = now_ms();
	say("  MIGRATE_TO_DEV after the loss: %s after %.0f ms", e ? strerror(e) : "success", t1 - t0);
	check(e == ENODEV, "the first ioctl after the loss fails with ENODEV");
	t0 = now_ms();
	e = dmirror(fdc, HMM_DMIRROR_READ, c, out, n, NULL);
	t1 = now_ms();
	check(e == ENODEV && t1 - t0 < 1000, "the next one (the coherent device) fails with ENODEV at once");

	check(touch_page(p + 3 * PAGE_SZ, NULL, false, "page 3 of P") == TOUCH_SIGBUS,
	      "a child touching P (its only copy in VRAM) dies of SIGBUS");
	if (link)
		check(all_ones(c, size), "C reads all-ones through the failed link");
	else
		check(pattern_ok(c, size, 92, "buffer C"), "C (device-coherent) reads intact");
	check(pattern_ok(s, size, 93, "buffer S"), "S (system memory) is intact");

	close(fdp);
	close(fdc);
	say("  rmmod hmmgpu");
	status = system("rmmod hmmgpu");
	check(status == 0, "rmmod hmmgpu succeeds");

	for (i = 0; i < n; i += 73) {
		char what[32];

		snprintf(what, sizeof(what), "page %zu of P", i);
		if (touch_page(p + i * PAGE_SZ, NULL, false, what) != TOUCH_SIGBUS)
			lost_ok = false;
		snprintf(what, sizeof(what), "page %zu of C", i);
		if (link && touch_page(c + i * PAGE_SZ, NULL, false, what) != TOUCH_SIGBUS)
			lost_ok = false;
	}
	check(lost_ok, link ? "after rmmod, children touching 8 pages of P and of C each die of SIGBUS (poisoned)"
			    : "after rmmod, children touching 8 pages of P each die of SIGBUS (poisoned)");
	if (!link) {
		check(pattern_ok(c, size, 92, "buffer C"), "after rmmod, C is intact (copied out by the CPU)");
	}
	check(pattern_ok(s, size, 93, "buffer S"), "after rmmod, S is intact");
	return verdict("loss", how);
}

static int run_loss(int argc, char **argv)
{
	if (argc != 1)
		usage();
	return run_loss_how(argv[0]);
}

const struct fault_mode mode_loss = {
	.name = "loss",
	.args = "kill|link",
	.run = run_loss,
};
