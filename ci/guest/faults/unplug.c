// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * hmmgpu-faults unplug [--vram-seed N]: catalogue entry 8, an orderly
 * hot-unplug (QEMU's device_del, then device_add): a 2 MiB THP (P1) and
 * 1 MiB of 4 KiB pages (P2) in device-private VRAM, 2 MiB in
 * device-coherent VRAM (C), 2 MiB in system memory (S), and a forked child
 * that inherited them. After the unplug (the host answers once QEMU deleted
 * the device, i.e. after the driver's removal evicted the VRAM): the uAPI
 * device nodes and the PCI function are gone, ioctls on the files still
 * open fail with ENODEV, /proc/self/pagemap shows every page of P1, P2 and
 * C present in system RAM before anything touches them (C's pages no longer
 * in the BAR), and every byte is intact, in this process and in the child.
 * Then the plug: /dev/hmm_dmirror0 and 2 come back (within 60 s), fresh
 * buffers migrate to both kinds of VRAM and back with every byte checked,
 * and the old buffers are still intact. With --vram-seed N, 4 MiB of the
 * pattern of seed N is left in the re-plugged device's private VRAM at exit
 * (HMMGPU-VRAM-PATTERN line, as hmmgpu-demo --leave-in-vram does), so the
 * host can find it in the VRAM file it gave the device at boot.
 *
 * Test: fault-hot-unplug (ci/xtask/src/tests/unplug.rs).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "faults.h"

/* Pages of buf that pagemap shows present in system RAM, none of them in [lo, hi). */
static size_t pages_in_ram(const uint8_t *buf, size_t npages, uint64_t lo, uint64_t hi)
{
	size_t i, n = 0;

	for (i = 0; i < npages; i++) {
		uint64_t e = pagemap_entry(buf + i * PAGE_SZ), pa = (e & PM_PFRAME_MASK) * PAGE_SZ;

		if ((e & PM_PRESENT) && !(e & PM_SWAP) && !(pa >= lo && pa < hi))
			n++;
	}
	return n;
}

/* Whether a PCI function with the hmmgpu device id (1af4:107f) exists. */
static bool hmmgpu_pci_present(void)
{
	DIR *d = opendir("/sys/bus/pci/devices");
	struct dirent *de;
	bool found = false;

	if (!d) {
		fail("opendir /sys/bus/pci/devices: %s", strerror(errno));
		return true;
	}
	while (!found && (de = readdir(d))) {
		char path[300], id[16] = "";
		FILE *f;

		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/device", de->d_name);
		f = fopen(path, "r");
		if (!f)
			continue;
		if (fgets(id, sizeof(id), f) && !strncmp(id, "0x107f", 6))
			found = true;
		fclose(f);
	}
	closedir(d);
	return found;
}

/* The workload's buffers (pages P1, P2, C, S) and their sizes in pages. */
struct unplug_bufs {
	uint8_t *p1, *p2, *c, *s;
	size_t n1, n2, nc, ns;
};

/* Checks every byte of the unplug workload's buffers; returns how many differ. */
static int unplug_bufs_bad(const struct unplug_bufs *b, const char *who)
{
	char what[64];
	int bad = 0;

	snprintf(what, sizeof(what), "%s: P1 (THP)", who);
	bad += !pattern_ok(b->p1, b->n1 * PAGE_SZ, 81, what);
	snprintf(what, sizeof(what), "%s: P2", who);
	bad += !pattern_ok(b->p2, b->n2 * PAGE_SZ, 82, what);
	snprintf(what, sizeof(what), "%s: C", who);
	bad += !pattern_ok(b->c, b->nc * PAGE_SZ, 83, what);
	snprintf(what, sizeof(what), "%s: S", who);
	bad += !pattern_ok(b->s, b->ns * PAGE_SZ, 84, what);
	return bad;
}

/* Waits up to 60 s for path to exist; returns the ms waited, or -1. */
static double wait_for_node(const char *path)
{
	double t0 = now_ms();

	while (access(path, F_OK)) {
		if (now_ms() - t0 > 60000)
			return -1;
		usleep(20 * 1000);
	}
	return now_ms() - t0;
}

static int run_unplug_seed(bool leave, uint64_t vram_seed)
{
	struct unplug_bufs b = { .n1 = 512, .n2 = 256, .nc = 512, .ns = 512 };
	const size_t n_all = b.n1 + b.n2 + b.nc;
	uint8_t *out = map_buffer(1024 * PAGE_SZ, false), *f, *g;
	uint64_t c_lo = UINT64_MAX, c_hi = 0;
	struct hmm_dmirror_cmd cmd;
	int fdp, fdc, e, status, go[2];
	size_t i, n;
	bool pmd = false;
	double t0, ms;
	char byte = 1;
	pid_t child;

	b.p1 = map_huge(HUGE_SZ);
	b.p2 = map_buffer(b.n2 * PAGE_SZ, true);
	b.c = map_buffer(b.nc * PAGE_SZ, false);
	b.s = map_buffer(b.ns * PAGE_SZ, false);
	fdp = open_dev();
	fdc = open_dev_at(COHERENT_DEV_PATH);
	fill_pattern(b.p1, b.n1 * PAGE_SZ, 81);
	fill_pattern(b.p2, b.n2 * PAGE_SZ, 82);
	fill_pattern(b.c, b.nc * PAGE_SZ, 83);
	fill_pattern(b.s, b.ns * PAGE_SZ, 84);

	say("[1] data in VRAM: P1 a 2 MiB THP and P2 1 MiB of 4 KiB pages (device-private), C 2 MiB (device-coherent), S 2 MiB (system memory)");
	pages_of_kind(fdp, b.p1, b.n1, HMM_DMIRROR_PROT_NONE, &pmd);
	check(pmd, "P1 is a PMD-mapped THP before the migration");
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, b.p1, out, b.n1, &cmd);
	check(!e && cmd.cpages == b.n1, "P1 migrated to device-private VRAM");
	n = pages_of_kind(fdp, b.p1, b.n1, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL, &pmd);
	say("  P1: %zu pages device-private, %s", n, pmd ? "one 2 MiB entry (a device-private THP)" : "4 KiB entries");
	check(n == b.n1, "SNAPSHOT: all of P1 is in device-private VRAM");
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, b.p2, out, b.n2, &cmd);
	check(!e && cmd.cpages == b.n2 && pages_of_kind(fdp, b.p2, b.n2, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL, NULL) == b.n2,
	      "P2 is in device-private VRAM");
	e = dmirror(fdc, HMM_DMIRROR_MIGRATE_TO_DEV, b.c, out, b.nc, &cmd);
	check(!e && cmd.cpages == b.nc && pages_of_kind(fdc, b.c, b.nc, HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL, NULL) == b.nc,
	      "C is in device-coherent VRAM");
	for (i = 0; i < b.nc; i++) {
		uint64_t pa = phys_of(b.c + i * PAGE_SZ);

		if (pa && pa < c_lo)
			c_lo = pa;
		if (pa + PAGE_SZ > c_hi)
			c_hi = pa + PAGE_SZ;
	}
	say("  C's pages are at physical %#" PRIx64 "..%#" PRIx64 " (the VRAM BAR)", c_lo, c_hi);
	check(pages_in_ram(b.p1, b.n1, 0, 0) == 0 && pages_in_ram(b.p2, b.n2, 0, 0) == 0,
	      "pagemap: no page of P1 or P2 is in system RAM");

	/* A child that inherits the mappings checks them after the unplug too. */
	if (pipe(go)) {
		fail("pipe: %s", strerror(errno));
		return 1;
	}
	child = fork();
	if (child < 0) {
		fail("fork: %s", strerror(errno));
		return 1;
	}
	if (child == 0) {
		int bad = 0;

		close(go[1]);
		if (read(go[0], &byte, 1) != 1)
			_exit(3);
		n = pages_in_ram(b.p1, b.n1, c_lo, c_hi) + pages_in_ram(b.p2, b.n2, c_lo, c_hi) +
		    pages_in_ram(b.c, b.nc, c_lo, c_hi);
		printf(TAG "child: %zu of %zu pages of P1, P2, C in system RAM before any touch\n", n, n_all);
		bad += n != n_all;
		bad += unplug_bufs_bad(&b, "child");
		printf(TAG "child: %s\n", bad ? "FAIL" : "every byte of P1, P2, C, S intact");
		fflush(stdout);
		_exit(bad ? 1 : 0);
	}
	close(go[0]);

	say("[2] hot-unplug (device_del) while the data is in VRAM");
	t0 = now_ms();
	inject("{\"kind\":\"unplug\"}");
	ms = now_ms() - t0;
	say("  the device was gone %.0f ms after the request", ms);
	/* The driver's removal line (pr_info: in dmesg, not on the console). */
	check(system("dmesg | grep -E 'hmmgpu[0-9]+: removed;'") == 0, "the driver logged its removal");
	check(access("/dev/hmm_dmirror0", F_OK) && errno == ENOENT &&
	      access("/dev/hmm_dmirror2", F_OK) && errno == ENOENT,
	      "/dev/hmm_dmirror0 and /dev/hmm_dmirror2 are gone");
	check(!hmmgpu_pci_present(), "no PCI function 1af4:107f is left");
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, b.s, out, 16, NULL);
	say("  MIGRATE_TO_DEV on the open file: %s", e ? strerror(e) : "success");
	check(e == ENODEV, "MIGRATE_TO_DEV on a file still open fails with ENODEV");
	e = dmirror(fdp, HMM_DMIRROR_READ, b.s, out, 16, NULL);
	check(e == ENODEV, "READ on it fails with ENODEV");
	e = dmirror(fdc, HMM_DMIRROR_SNAPSHOT, b.c, out, 16, NULL);
	check(e == ENODEV, "SNAPSHOT on the coherent file fails with ENODEV");
	n = pages_in_ram(b.p1, b.n1, c_lo, c_hi) + pages_in_ram(b.p2, b.n2, c_lo, c_hi) +
	    pages_in_ram(b.c, b.nc, c_lo, c_hi);
	say("  pagemap: %zu of %zu pages of P1, P2, C in system RAM before any touch", n, n_all);
	check(n == n_all, "every page of P1, P2 and C was evicted to system RAM at the unplug");
	check(unplug_bufs_bad(&b, "parent") == 0, "every byte of P1, P2, C and S is intact");
	if (write(go[1], &byte, 1) != 1)
		fail("waking the child: %s", strerror(errno));
	close(go[1]);
	if (waitpid(child, &status, 0) != child)
		fail("waitpid: %s", strerror(errno));
	check(WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "the forked child finds every page in RAM and every byte intact");
	close(fdp);
	close(fdc);

	say("[3] plug the device back (device_add)");
	t0 = now_ms();
	inject("{\"kind\":\"plug\"}");
	say("  device_add answered after %.0f ms", now_ms() - t0);
	ms = wait_for_node("/dev/hmm_dmirror0");
	if (ms >= 0 && wait_for_node("/dev/hmm_dmirror2") >= 0)
		say("  /dev/hmm_dmirror0 and 2 are back %.0f ms after device_add answered", ms);
	else {
		fail("/dev/hmm_dmirror0 or 2 did not come back within 60 s");
		return 1;
	}
	fdp = open_dev();
	fdc = open_dev_at(COHERENT_DEV_PATH);
	f = map_huge(HUGE_SZ);
	fill_pattern(f, 512 * PAGE_SZ, 85);
	e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, f, out, 512, &cmd);
	check(!e && cmd.cpages == 512 && pages_of_kind(fdp, f, 512, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL, NULL) == 512,
	      "the plugged device migrates a fresh 2 MiB buffer to device-private VRAM");
	e = dmirror(fdp, HMM_DMIRROR_READ, f, out, 512, &cmd);
	check(!e && pattern_ok(out, 512 * PAGE_SZ, 85, "F read by the device"), "the device reads it back intact");
	check(pattern_ok(f, 512 * PAGE_SZ, 85, "F"), "the CPU reads it back intact (migrate_to_ram)");
	check(pages_of_kind(fdp, f, 512, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL, NULL) == 0, "F is back in system memory");
	g = map_buffer(256 * PAGE_SZ, false);
	fill_pattern(g, 256 * PAGE_SZ, 86);
	e = dmirror(fdc, HMM_DMIRROR_MIGRATE_TO_DEV, g, out, 256, &cmd);
	check(!e && cmd.cpages == 256 && pages_of_kind(fdc, g, 256, HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL, NULL) == 256,
	      "it migrates a fresh 1 MiB buffer to device-coherent VRAM");
	e = dmirror(fdc, HMM_DMIRROR_MIGRATE_TO_SYS, g, NULL, 256, &cmd);
	check(!e && pattern_ok(g, 256 * PAGE_SZ, 86, "G"), "and back to system memory intact");
	check(unplug_bufs_bad(&b, "after the plug") == 0, "the buffers from before the unplug are still intact");
	if (leave) {
		uint8_t *v = map_buffer(1024 * PAGE_SZ, false);

		fill_pattern(v, 1024 * PAGE_SZ, vram_seed);
		e = dmirror(fdp, HMM_DMIRROR_MIGRATE_TO_DEV, v, out, 1024, &cmd);
		check(!e && cmd.cpages == 1024 && pages_of_kind(fdp, v, 1024, HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL, NULL) == 1024,
		      "4 MiB left in the plugged device's VRAM");
		printf("HMMGPU-VRAM-PATTERN seed=%" PRIu64 " bytes=%lu\n", vram_seed, 1024 * PAGE_SZ);
	}
	close(fdp);
	close(fdc);
	return verdict("unplug", NULL);
}

static int run_unplug(int argc, char **argv)
{
	if (argc == 0)
		return run_unplug_seed(false, 0);
	if (argc != 2 || strcmp(argv[0], "--vram-seed"))
		usage();
	return run_unplug_seed(true, number(argv[0], argv[1]));
}

const struct fault_mode mode_unplug = {
	.name = "unplug",
	.args = "[--vram-seed N]",
	.run = run_unplug,
};
